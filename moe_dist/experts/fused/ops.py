"""The fused expert path's pieces as torch.library custom ops: opaque to torch.compile (no graph
breaks, no data-dependent shapes: every output is sized from input shapes), Triton on CUDA (and on
CPU tensors under TRITON_INTERPRET=1, for the tests), the plain-torch oracle (reference.py)
otherwise.

Legend: T tokens, H hidden, K slots per token, S = T*K slots, R = S expert-major rows, E experts,
G groups (= experts here), N/Kd a GEMM's out/in features.
"""

import os
from typing import Optional

import torch
import triton

from . import reference as ref

# The interpreter runs the Triton kernels on CPU tensors: tests check them against the oracle.
_TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"


def _triton(t: torch.Tensor) -> bool:
    return t.is_cuda or _TRITON_ON_CPU


def custom_op(name: str):
    """torch.library.custom_op, keeping the plain function as `.eager`: `call` uses it outside
    torch.compile, skipping the dispatcher's Python round trip (tens of microseconds a call, on
    the critical path between small kernels)."""

    def wrap(fn):
        op = torch.library.custom_op(f"moe_dist::{name}", mutates_args=())(fn)
        op.eager = fn
        return op

    return wrap


def call(op, *args):
    return op(*args) if torch.compiler.is_compiling() else op.eager(*args)


_TUNED: dict = {}
WHOLE_ROW = 1 << 16  # reduce_rows' COLS: one program sums its token's whole row


def _tuned(kernel, kind: str, H: int, KP: int = 1):
    """(launchable, meta): on a GPU the row kernels pick their tile by Triton's autotuner (they are
    pure functions of their inputs, so the trial runs are harmless); the interpreter gets one
    fixed tile that still exercises every loop and masked tail."""
    if _TRITON_ON_CPU:
        block = min(_pow2(H), 16)  # several column tiles and a masked tail on small H
        if kind == "gather":
            return kernel, dict(BLOCK_H=block, ROWS=4)
        return kernel, dict(BLOCK_H=block, BLOCK_K=max(KP // 2, 1), COLS=2 * block)
    if kind not in _TUNED:
        if kind == "gather":
            configs = [
                triton.Config(dict(ROWS=r, BLOCK_H=b), num_warps=w)
                for r, b, w in [(4, 1024, 4), (8, 1024, 8), (16, 512, 8)]
            ]
            tuner = triton.autotune(configs=configs, key=["H"])
        else:
            tuner = triton.autotune(
                configs=_reduce_configs(),
                key=["H", "K", "HAS_VALS"],
                prune_configs_by=dict(early_config_prune=_prune_reduce_configs),
                do_bench=_quick_bench,
            )
        _TUNED[kind] = tuner(kernel)
    return _TUNED[kind], {}


def _reduce_configs() -> list:
    """[BLOCK_K, BLOCK_H] loads of 1K-16K elements; a program takes one tile or its whole row."""
    configs = []
    for bk in (1, 2, 4, 8, 16):
        for bh in (256, 512, 1024, 2048):
            if 1024 <= bk * bh <= 16384:
                warps = 4 if bk * bh <= 4096 else 8
                for cols in (bh, WHOLE_ROW):
                    configs.append(triton.Config(dict(BLOCK_K=bk, BLOCK_H=bh, COLS=cols), warps))
    return configs


def _prune_reduce_configs(configs, named_args, **kwargs):
    """Drops tiles wider than the row or taller than the slots, and duplicate column spans."""
    args = {**named_args, **kwargs}
    H, KP = _pow2(args["H"]), args["KP"]
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_K"] <= KP
        and c.kwargs["BLOCK_H"] <= H
        and (c.kwargs["COLS"] == WHOLE_ROW or c.kwargs["BLOCK_H"] < H)
    ]
    return kept or configs[:1]


def _quick_bench(fn, quantiles):
    # the default (25 ms warm-up, 100 ms per config) would spend seconds per shape on ~20 configs
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


# -- counting sort: expert ids -> row of each slot ------------------------------------------------
def slot_bins(num_experts: int) -> int:
    """Bins of the counting sort's histogram: a power of two > E (bin E: unused slots)."""
    return _pow2(num_experts + 1)


def slot_block(num_slots: int, num_experts: int) -> int:
    """Slots per histogram block: SLOT_BLOCK, or more where that many blocks would make each rank
    program's scan of the histogram longer than SCAN_LIMIT entries."""
    from .kernels import SCAN_LIMIT, SLOT_BLOCK

    blocks = max(SCAN_LIMIT // slot_bins(num_experts), 1)
    return max(SLOT_BLOCK, _pow2(triton.cdiv(num_slots, blocks)))


def hist_fits_scan(num_blocks: int, num_experts: int) -> bool:
    """Whether a histogram of num_blocks blocks is short enough for the rank programs' scan."""
    from .kernels import SCAN_LIMIT

    return num_blocks * slot_bins(num_experts) <= SCAN_LIMIT


@custom_op("sort_slots")
def sort_slots(
    idx_TK: torch.Tensor, num_experts: int, hist: Optional[torch.Tensor] = None, block: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pos_TK int32, row_slot_R int32, counts_E int64, ends_E int32): the stable order of the
    slots by expert that argsort would give, by a counting sort: a histogram kernel, then one
    kernel that scans it and ranks the slots. `hist` [NB, slot_bins(E)] int32: the histogram of
    blocks of `block` slots, already counted (the routing kernel writes it): only the rank kernel
    runs."""
    if not _triton(idx_TK):
        return ref.sort_slots(idx_TK, num_experts)
    from .kernels import SCAN_LIMIT, SCAN_ROWS, SLOT_CHUNK, slot_hist_kernel, slot_rank_kernel

    idx_S = idx_TK.reshape(-1).contiguous()
    S, E, dev = idx_S.numel(), num_experts, idx_TK.device
    EP = slot_bins(E)
    if hist is None:
        block = slot_block(S, E)
        NB = triton.cdiv(S, block)
        hist = torch.empty(max(NB, 1), EP, dtype=torch.int32, device=dev)
        if NB:
            slot_hist_kernel[(NB,)](idx_S, S, E, hist, EP=EP, BLOCK=block)
    else:
        NB = triton.cdiv(S, block) if block > 0 else -1
        if tuple(hist.shape) != (NB, EP) or hist.dtype != torch.int32 or not hist_fits_scan(NB, E):
            raise ValueError(
                f"sort_slots: an int32 histogram of {NB} blocks x {EP} bins (at most "
                f"{SCAN_LIMIT} entries) counts {S} slots in blocks of {block}; got "
                f"{hist.dtype} {tuple(hist.shape)}"
            )
    pos = torch.empty(S, dtype=torch.int32, device=dev)
    row_slot = torch.empty(S, dtype=torch.int32, device=dev)
    counts = torch.empty(E, dtype=torch.int64, device=dev)
    ends = torch.empty(E, dtype=torch.int32, device=dev)
    base = torch.empty(max(NB, 1), EP, dtype=torch.int32, device=dev)
    slot_rank_kernel[(max(NB, 1),)](
        idx_S, S, E, hist, NB, base, counts, ends, pos, row_slot,
        EP=EP, BLOCK=block, CHUNK=SLOT_CHUNK, ROWS=SCAN_ROWS,
    )  # fmt: skip
    return pos.view(idx_TK.shape), row_slot, counts, ends


@sort_slots.register_fake
def _(idx_TK, num_experts, hist=None, block=0):
    S = idx_TK.numel()
    new = idx_TK.new_empty
    return (
        new(idx_TK.shape, dtype=torch.int32),
        new(S, dtype=torch.int32),
        new(num_experts, dtype=torch.int64),
        new(num_experts, dtype=torch.int32),
    )


# -- rows: gather (token -> expert-major) and gather-reduce (expert-major -> token) ---------------
@custom_op("gather_rows")
def gather_rows(
    x_TH: torch.Tensor, row_slot_R: torch.Tensor, ends_E: torch.Tensor, k: int
) -> torch.Tensor:
    """out[r] = x[row_slot[r] // k] for used rows; rows past ends[-1] are left unwritten on the
    Triton path (nothing reads them)."""
    if not _triton(x_TH):
        return ref.gather_rows(x_TH, row_slot_R, ends_E, k)
    from .kernels import gather_rows_kernel

    x_TH = x_TH.contiguous()
    R, H = row_slot_R.numel(), x_TH.shape[1]
    out = x_TH.new_empty(R, H)
    if R and H:
        kernel, meta = _tuned(gather_rows_kernel, "gather", H)
        grid = lambda m: (triton.cdiv(R, m["ROWS"]), triton.cdiv(H, m["BLOCK_H"]))  # noqa: E731
        kernel[grid](x_TH, row_slot_R, ends_E, out, ends_E.numel(), H, k, **meta)
    return out


@gather_rows.register_fake
def _(x_TH, row_slot_R, ends_E, k):
    return x_TH.new_empty(row_slot_R.numel(), x_TH.shape[1])


@custom_op("reduce_rows")
def reduce_rows(
    y_RH: torch.Tensor, pos_TK: torch.Tensor, vals_R: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out_TH, vals_TK): out[t] = sum_k y[pos[t, k]] accumulated in fp32, in y's dtype; unused
    slots (pos -1) add nothing and read nothing. vals_TK[t, k] = vals[pos[t, k]] (0 if unused;
    an empty tensor when vals is None)."""
    if not _triton(y_RH):
        return ref.reduce_rows(y_RH, pos_TK, vals_R)
    from .kernels import reduce_rows_kernel

    y_RH = y_RH.contiguous()
    T, K = pos_TK.shape
    H = y_RH.shape[1]
    out = y_RH.new_empty(T, H)
    has_vals = vals_R is not None
    vals_TK = (
        torch.empty(T, K, dtype=vals_R.dtype, device=y_RH.device)
        if has_vals
        else y_RH.new_empty(0, dtype=torch.float32)
    )
    if T:
        KP = max(_pow2(K), 2)
        kernel, meta = _tuned(reduce_rows_kernel, "reduce", H, KP)
        grid = lambda m: (T, triton.cdiv(H, m["COLS"]))  # noqa: E731
        kernel[grid](
            y_RH,
            pos_TK.contiguous(),
            out,
            vals_R if has_vals else out,
            vals_TK if has_vals else out,
            H,
            K=K,
            KP=KP,
            HAS_VALS=has_vals,
            **meta,
        )
    return out, vals_TK


@reduce_rows.register_fake
def _(y_RH, pos_TK, vals_R):
    T, K = pos_TK.shape
    out = y_RH.new_empty(T, y_RH.shape[1])
    if vals_R is None:
        return out, y_RH.new_empty(0, dtype=torch.float32)
    return out, vals_R.new_empty(T, K)


# -- SwiGLU with the combine weight folded in ------------------------------------------------------
@custom_op("swiglu_rows")
def swiglu_rows(
    h_R2F: torch.Tensor, w_S: torch.Tensor, row_slot_R: torch.Tensor, ends_E: torch.Tensor
) -> torch.Tensor:
    """a[r] = w[row_slot[r]] * silu(gate[r]) * up[r] for used rows (h = [gate | up])."""
    if not _triton(h_R2F):
        return ref.swiglu_rows(h_R2F, w_S, row_slot_R, ends_E)
    from .kernels import swiglu_rows_fwd_kernel

    h_R2F = h_R2F.contiguous()
    R, F = h_R2F.shape[0], h_R2F.shape[1] // 2
    out = h_R2F.new_empty(R, F)
    if R and F:
        block = min(_pow2(F), 1024)
        swiglu_rows_fwd_kernel[(R, triton.cdiv(F, block))](
            h_R2F, w_S.contiguous(), row_slot_R, ends_E, out, ends_E.numel(), F, BLOCK=block
        )
    return out


@swiglu_rows.register_fake
def _(h_R2F, w_S, row_slot_R, ends_E):
    return h_R2F.new_empty(h_R2F.shape[0], h_R2F.shape[1] // 2)


@custom_op("swiglu_rows_backward")
def swiglu_rows_backward(
    h_R2F: torch.Tensor,
    da_RF: torch.Tensor,
    w_S: torch.Tensor,
    row_slot_R: torch.Tensor,
    ends_E: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh_R2F, dw_R): the backward of swiglu_rows, dw[r] = <silu(gate[r]) * up[r], da[r]>."""
    if not _triton(h_R2F):
        return ref.swiglu_rows_backward(h_R2F, da_RF, w_S, row_slot_R, ends_E)
    h_R2F = h_R2F.contiguous()
    dh = torch.empty_like(h_R2F)
    dw, _ = _swiglu_rows_bwd(h_R2F, da_RF, w_S, row_slot_R, ends_E, dh, None)
    return dh, dw


@swiglu_rows_backward.register_fake
def _(h_R2F, da_RF, w_S, row_slot_R, ends_E):
    return torch.empty_like(h_R2F), h_R2F.new_empty(h_R2F.shape[0], dtype=torch.float32)


def swiglu_rows_backward_in_place(
    h_R2F: torch.Tensor,
    da_RF: torch.Tensor,
    w_S: torch.Tensor,
    row_slot_R: torch.Tensor,
    ends_E: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dw_R, a_RF): swiglu_rows_backward writing dh over h (contiguous), and recomputing
    a = w * silu(gate) * up for the down projection's weight gradient, so the forward keeps
    neither a nor a second [R, 2F] buffer. Eager only: no custom op may overwrite its input."""
    if not h_R2F.is_contiguous():
        raise ValueError("swiglu_rows_backward_in_place overwrites h: it must be contiguous")
    if not _triton(h_R2F):
        a = ref.swiglu_rows(h_R2F, w_S, row_slot_R, ends_E)
        dh, dw = ref.swiglu_rows_backward(h_R2F, da_RF, w_S, row_slot_R, ends_E)
        h_R2F.copy_(dh)
        return dw, a
    a = h_R2F.new_empty(h_R2F.shape[0], h_R2F.shape[1] // 2)
    return _swiglu_rows_bwd(h_R2F, da_RF, w_S, row_slot_R, ends_E, h_R2F, a)


def _swiglu_rows_bwd(h_R2F, da_RF, w_S, row_slot_R, ends_E, dh, a):
    """Launches swiglu_rows_bwd_kernel: dh (may be h), and a when given; returns (dw, a)."""
    from .kernels import swiglu_rows_bwd_kernel

    da_RF = da_RF.contiguous()
    R, F = h_R2F.shape[0], h_R2F.shape[1] // 2
    dw = torch.empty(R, dtype=torch.float32, device=h_R2F.device)
    if R and F:
        block = min(_pow2(F), 1024)
        swiglu_rows_bwd_kernel[(R,)](
            h_R2F, da_RF, w_S.contiguous(), row_slot_R, ends_E, dh, dw,
            dh if a is None else a, ends_E.numel(), F, BLOCK=block, WRITE_A=a is not None,
        )  # fmt: skip
    return dw, a


# -- grouped GEMMs ---------------------------------------------------------------------------------
@custom_op("grouped_mm")
def grouped_mm(a_RK: torch.Tensor, b_GKN: torch.Tensor, ends_G: torch.Tensor) -> torch.Tensor:
    """out[rows of g] = a[rows of g] @ b[g]; rows past ends[-1] are not computed.
    torch._grouped_mm where it runs (CUDA bf16, CPU fp32), else a per-group loop."""
    if _grouped_ok(a_RK, b_GKN):
        return torch._grouped_mm(a_RK, b_GKN, offs=ends_G)
    return ref.grouped_mm(a_RK, b_GKN, ends_G)


@grouped_mm.register_fake
def _(a_RK, b_GKN, ends_G):
    return a_RK.new_empty(a_RK.shape[0], b_GKN.shape[2])


@custom_op("grouped_mm_wgrad")
def grouped_mm_wgrad(a_RN: torch.Tensor, b_RK: torch.Tensor, ends_G: torch.Tensor) -> torch.Tensor:
    """out[g] = a[rows of g]^T @ b[rows of g] ([G, N, Kd]; zero for an empty group): the weight
    gradient of grouped_mm."""
    if _grouped_ok(a_RN, b_RK):
        return torch._grouped_mm(a_RN.t(), b_RK, offs=ends_G)
    return ref.grouped_mm_wgrad(a_RN, b_RK, ends_G)


@grouped_mm_wgrad.register_fake
def _(a_RN, b_RK, ends_G):
    return a_RN.new_empty(ends_G.shape[0], a_RN.shape[1], b_RK.shape[1])


def _grouped_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or a.dtype != b.dtype:
        return False
    if a.is_cuda:
        return a.dtype == torch.bfloat16 and torch.cuda.get_device_capability(a.device) >= (9, 0)
    return a.dtype == torch.float32 and all(d % 4 == 0 for d in (*a.shape[1:], *b.shape[1:]))
