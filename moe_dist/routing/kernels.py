"""Routing in one kernel each way: fp32 gate logits -> scores (softmax | sigmoid + bias | top-p) ->
top-k ids and combine weights (normalised, scaled) [-> each block's sum of probabilities, the
load-balancing loss's partial sums] -> per-expert counts and the counting sort's histogram rows (so
the fused path's sort is one rank kernel: routing metadata in two kernels); the backward turns
d(weights) [+ d(block sums)] into d(logits) in one pass. Same semantics as select.py (ties: the
lower expert id wins); group-limited routing stays on select.py.

Legend: T tokens, E experts, EP a power of two >= E, K slots per token, BT tokens per program,
B blocks of BT tokens (one program each).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..experts.fused.ops import call, custom_op
from . import select

MODES = {"softmax": 0, "sigmoid": 1, "top_p": 2}
_TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _scores(l_ptr, b_ptr, t, cols, T, E, MODE: tl.constexpr):
    """(score used for the weights, score used for selection) of a [BT, EP] tile."""
    m = (t[:, None] < T) & (cols[None, :] < E)
    lg = tl.load(l_ptr + t[:, None].to(tl.int64) * E + cols[None, :], mask=m, other=float("-inf"))
    if MODE == 1:
        s = tl.where(m, tl.sigmoid(lg), 0.0)
        bias = tl.load(b_ptr + cols, mask=cols < E, other=0.0)
        sel = tl.where(m, s + bias[None, :], float("-inf"))
    else:
        mx = tl.max(lg, axis=1)
        ex = tl.where(m, tl.exp(lg - mx[:, None]), 0.0)
        s = ex / tl.sum(ex, axis=1)[:, None]
        sel = tl.where(m, s, float("-inf"))
    # A NaN score (NaN/Inf logits or bias) ranks below every real one but above the padding, so
    # such a row still picks K distinct experts in range; the layer's finiteness check reports it.
    sel = tl.where(sel == sel, sel, -3.0e38)
    return s, sel


@triton.jit
def route_topk_kernel(
    l_ptr,
    b_ptr,
    idx_ptr,
    w_ptr,
    probs_ptr,
    counts_ptr,
    hist_ptr,
    T,
    E,
    top_p,
    scale,
    K: tl.constexpr,
    KP: tl.constexpr,
    EP: tl.constexpr,
    BT: tl.constexpr,
    MODE: tl.constexpr,
    NORM: tl.constexpr,
    WRITE_PROBS: tl.constexpr,
    HIST_BINS: tl.constexpr,
):
    """Top-k by K rounds of (max, lowest index attaining it); the chosen ids and weights build up
    in [BT, KP] register tiles, are normalised there and stored once; counts[e] += the block's
    slots of expert e (one atomic per expert per program). With HIST_BINS > 0 also the counting
    sort's histogram row of this program's BT * K slots (bin E: unused slots), so the sort
    (experts/fused/ops.sort_slots) needs no histogram pass of its own."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.arange(0, EP)
    kc = tl.arange(0, KP)
    tm = t < T
    s, sel = _scores(l_ptr, b_ptr, t, cols, T, E, MODE)
    if WRITE_PROBS:  # the load-balancing loss needs sum_t probs[t, e]: this block's share
        part = tl.sum(tl.where(tm[:, None], s, 0.0), axis=0)
        tl.store(probs_ptr + tl.program_id(0) * E + cols, part, mask=cols < E)
    idx_tile = tl.full([BT, KP], -1, dtype=tl.int32)
    w_tile = tl.zeros([BT, KP], dtype=tl.float32)
    mass = tl.zeros([BT], dtype=tl.float32)
    for k in tl.static_range(K):
        v = tl.max(sel, axis=1)
        i = tl.min(tl.where(sel == v[:, None], cols[None, :], EP), axis=1)
        hit = cols[None, :] == i[:, None]
        w = tl.sum(tl.where(hit, s, 0.0), axis=1)
        sel = tl.where(hit, float("-inf"), sel)
        if MODE == 2:  # top-p: slots past the mass p are unused (expert -1, weight 0)
            used = (mass < top_p) | (k == 0)
            mass += w
            w = tl.where(used, w, 0.0)
            i = tl.where(used, i, -1)
        idx_tile = tl.where(kc[None, :] == k, i[:, None], idx_tile)
        w_tile = tl.where(kc[None, :] == k, w[:, None], w_tile)
    if NORM:
        total = tl.sum(w_tile, axis=1)
        if MODE == 1:
            total = total + 1e-20
        w_tile = w_tile / total[:, None]
    w_tile = w_tile * scale
    om = tm[:, None] & (kc[None, :] < K)
    tl.store(idx_ptr + t[:, None] * K + kc[None, :], idx_tile.to(tl.int64), mask=om)
    tl.store(w_ptr + t[:, None] * K + kc[None, :], w_tile, mask=om)
    if HIST_BINS > 0:  # the sort's row (bin E: unused slots); the counts are its first E bins
        bins = tl.arange(0, HIST_BINS)
        flat = tl.reshape(tl.where(idx_tile >= 0, idx_tile, E), [BT * KP])
        row = tl.histogram(flat, HIST_BINS, mask=tl.reshape(om, [BT * KP]))
        tl.store(hist_ptr + tl.program_id(0) * HIST_BINS + bins, row)
        tl.atomic_add(counts_ptr + bins, row.to(tl.int64), mask=bins < E)
    else:
        routed = om & (idx_tile >= 0)
        hist = tl.histogram(tl.reshape(tl.where(routed, idx_tile, 0), [BT * KP]), EP,
                            mask=tl.reshape(routed, [BT * KP]))  # fmt: skip
        tl.atomic_add(counts_ptr + cols, hist.to(tl.int64), mask=cols < E)


@triton.jit
def route_topk_bwd_kernel(
    l_ptr,
    b_ptr,  # unused by the backward (sigmoid's bias only steers selection): any valid pointer
    idx_ptr,
    dw_ptr,
    dprobs_ptr,
    dl_ptr,
    T,
    E,
    scale,
    K: tl.constexpr,
    EP: tl.constexpr,
    BT: tl.constexpr,
    MODE: tl.constexpr,
    NORM: tl.constexpr,
    HAS_DPROBS: tl.constexpr,
):
    """w_k = scale * u_k q_k / (sum_j u_j q_j [+ eps]) (or scale * u_k q_k), q_k = score of slot
    k's expert, u_k = slot used: d q_j = scale * u_j * (dw_j - sum_k dw_k w_k / scale) / sum;
    then scattered to experts and through softmax / sigmoid."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.arange(0, EP)
    tm = t < T
    m = tm[:, None] & (cols[None, :] < E)
    s, sel = _scores(l_ptr, b_ptr, t, cols, T, E, MODE)
    total = tl.zeros([BT], dtype=tl.float32)
    dot = tl.zeros([BT], dtype=tl.float32)  # sum_k dw_k u_k q_k
    for k in tl.static_range(K):
        i = tl.load(idx_ptr + t * K + k, mask=tm, other=-1).to(tl.int32)
        q = tl.sum(tl.where(cols[None, :] == i[:, None], s, 0.0), axis=1)
        dw = tl.load(dw_ptr + t * K + k, mask=tm, other=0.0)
        total += q
        dot += dw * q
    if MODE == 1:
        total = total + 1e-20
    ds = tl.zeros([BT, EP], dtype=tl.float32)
    for k in tl.static_range(K):
        i = tl.load(idx_ptr + t * K + k, mask=tm, other=-1).to(tl.int32)
        dw = tl.load(dw_ptr + t * K + k, mask=tm, other=0.0)
        if NORM:
            dq = scale * (dw / total - dot / (total * total))
        else:
            dq = scale * dw
        ds += tl.where(cols[None, :] == i[:, None], dq[:, None], 0.0)  # i = -1 matches nothing
    if HAS_DPROBS:
        # d(probs[t, e]) = d(this block's sum of probs)[e] for every token t of the block
        ds += tl.load(dprobs_ptr + tl.program_id(0) * E + cols, mask=cols < E, other=0.0)[None, :]
    if MODE == 1:
        dl = ds * s * (1.0 - s)
    else:
        dl = s * (ds - tl.sum(ds * s, axis=1)[:, None])
    tl.store(dl_ptr + t[:, None].to(tl.int64) * E + cols[None, :], dl, mask=m)


@triton.jit
def split_hi_lo_kernel(g_ptr, out_ptr, N, E, BLOCK: tl.constexpr):
    """out[t] = [hi | lo] with hi = bf16(g[t]), lo = bf16(g[t] - hi): two bf16 halves that carry
    an fp32 gradient to ~16 bits through bf16 tensor-core GEMMs."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    g = tl.load(g_ptr + offs, mask=m, other=0.0)
    hi = g.to(tl.bfloat16)
    lo = (g - hi.to(tl.float32)).to(tl.bfloat16)
    t = offs // E
    e = offs - t * E
    tl.store(out_ptr + t * 2 * E + e, hi, mask=m)
    tl.store(out_ptr + t * 2 * E + E + e, lo, mask=m)


@custom_op("split_hi_lo")
def split_hi_lo(g_TE: torch.Tensor) -> torch.Tensor:
    """[T, 2E] bf16 = [hi | lo] of an fp32 [T, E] tensor (hi + lo == g to ~2^-17)."""
    T, E = g_TE.shape
    out = g_TE.new_empty(T, 2 * E, dtype=torch.bfloat16)
    if not _use_triton(g_TE):
        hi = g_TE.to(torch.bfloat16)
        return torch.cat([hi, (g_TE - hi.float()).to(torch.bfloat16)], 1)
    if T:
        split_hi_lo_kernel[(triton.cdiv(T * E, 1024),)](
            g_TE.contiguous(), out, T * E, E, BLOCK=1024
        )
    return out


@split_hi_lo.register_fake
def _(g_TE):
    return g_TE.new_empty(g_TE.shape[0], 2 * g_TE.shape[1], dtype=torch.bfloat16)


_MM_OUT_DTYPE = [True]  # cleared if this torch's CUDA mm refuses out_dtype


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32 from bf16 operands: one tensor-core GEMM with fp32 output where torch has
    it, else fp32 copies."""
    if _MM_OUT_DTYPE[0]:
        if torch.compiler.is_compiling():
            return torch.mm(a, b, out_dtype=torch.float32)
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE[0] = False
    return torch.mm(a.float(), b.float())


def gate_logits(x_TH: torch.Tensor, w_EH: torch.Tensor, bf16: bool) -> torch.Tensor:
    """fp32 logits = x @ w^T: one bf16 GEMM with fp32 output (bf16), else fp32 copies. Autocast
    off: the gate stays fp32 under it, and the backward's recompute equals the forward's."""
    with torch.autocast(x_TH.device.type, enabled=False):
        return _mm_f32(x_TH, w_EH.t()) if bf16 else torch.mm(x_TH.float(), w_EH.float().t())


def gate_backward(x_TH, w_EH, grad_TE, need_x: bool, need_w: bool, bf16: bool):
    """(dx, dw) of gate_logits. bf16: the fp32 gradient is split into two bf16 halves, so
    dx = [hi | lo] @ [w; w] and dw = [hi | lo]^T @ x are bf16 GEMMs with fp32 accumulation,
    accurate to ~2^-17 before the final bf16 rounding."""
    grad_x = grad_w = None
    if not bf16:
        grad_TE = grad_TE.float()
        if need_x:
            grad_x = (grad_TE @ w_EH.float()).to(x_TH.dtype)
        if need_w:
            grad_w = (grad_TE.t() @ x_TH.float()).to(w_EH.dtype)
        return grad_x, grad_w
    E = w_EH.shape[0]
    g_T2E = call(split_hi_lo, grad_TE.float())
    if need_x:
        grad_x = torch.mm(g_T2E, torch.cat([w_EH, w_EH], 0))
    if need_w:
        both = _mm_f32(g_T2E.t(), x_TH)
        grad_w = (both[:E] + both[E:]).to(w_EH.dtype)
    return grad_x, grad_w


class Bf16GateFp32(torch.autograd.Function):
    """logits = x @ w^T for bf16 x, w on CUDA, in fp32 without fp32 copies of x or w: one bf16
    tensor-core GEMM with fp32 accumulation and output (the products of bf16 values are exact in
    fp32, so this is the fp32 gate up to summation order); gate_backward says how the backward
    keeps fp32 accuracy."""

    @staticmethod
    def forward(ctx, x_TH, w_EH):
        ctx.save_for_backward(x_TH, w_EH)
        return gate_logits(x_TH, w_EH, bf16=True)

    @staticmethod
    def backward(ctx, grad_TE):
        x_TH, w_EH = ctx.saved_tensors
        return gate_backward(x_TH, w_EH, grad_TE, *ctx.needs_input_grad[:2], bf16=True)


def bf16_gate_supported(x_TH: torch.Tensor, w_EH: torch.Tensor) -> bool:
    return (
        x_TH.is_cuda
        and x_TH.dtype == w_EH.dtype == torch.bfloat16
        and hasattr(torch.ops.aten.mm, "dtype")
    )


def _kp(K: int) -> int:
    return triton.next_power_of_2(max(K, 2))


def _meta(E: int, K: int = 1):
    EP = triton.next_power_of_2(max(E, 2))
    BT = max(2, min(64, 4096 // EP))
    return EP, BT


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or _TRITON_ON_CPU


def _reference(logits_TE, bias_E, k, mode, norm, top_p, scale):
    if mode == "softmax":
        idx, w, probs = select.softmax_topk(logits_TE, k, norm)
    elif mode == "sigmoid":
        idx, w, probs = select.sigmoid_topk(logits_TE, bias_E, k, 1, 1, norm)
    else:
        idx, w, probs = select.top_p_select(logits_TE, k, top_p, norm)
    return idx, w * scale if scale != 1.0 else w, probs


def _block_sums(probs_TE: torch.Tensor, BT: int) -> torch.Tensor:
    """[B, E]: the probabilities summed over each block of BT tokens (the kernel's partial sums)."""
    T, E = probs_TE.shape
    pad = probs_TE.new_zeros(triton.cdiv(T, BT) * BT - T, E)
    return torch.cat([probs_TE, pad]).view(-1, BT, E).sum(1)


def _reference_backward(logits_TE, idx_TK, dw_TK, dprobs_BE, mode, norm, scale):
    """The kernel's backward in plain torch (custom ops run below autograd: no autograd.grad)."""
    s_TE = logits_TE.sigmoid() if mode == "sigmoid" else logits_TE.softmax(dim=-1)
    used_TK = idx_TK >= 0
    safe_TK = idx_TK.clamp(min=0)
    q_TK = torch.where(used_TK, s_TE.gather(1, safe_TK), 0.0)
    dw_TK = dw_TK.float()
    if norm:
        total = q_TK.sum(-1, keepdim=True) + (1e-20 if mode == "sigmoid" else 0.0)
        dot = (dw_TK * q_TK).sum(-1, keepdim=True)
        dq_TK = scale * (dw_TK / total - dot / (total * total))
    else:
        dq_TK = scale * dw_TK
    ds_TE = torch.zeros_like(s_TE).scatter_add_(1, safe_TK, torch.where(used_TK, dq_TK, 0.0))
    if dprobs_BE is not None:  # each block's sum of probs: every token of the block gets its grad
        BT = _meta(s_TE.shape[1])[1]
        ds_TE = ds_TE + dprobs_BE.repeat_interleave(BT, 0)[: s_TE.shape[0]]
    if mode == "sigmoid":
        return ds_TE * s_TE * (1 - s_TE)
    return s_TE * (ds_TE - (ds_TE * s_TE).sum(-1, keepdim=True))


def slot_hist_block(num_tokens: int, num_experts: int, k: int) -> int:
    """Slots per block of the counting-sort histogram the routing kernel writes (its BT tokens'
    slots), or 0 where that histogram would be too long for the sort's rank programs to scan:
    then the routing kernel writes none and the sort counts for itself."""
    from ..experts.fused.ops import hist_fits_scan

    BT = _meta(num_experts, k)[1]
    return BT * k if hist_fits_scan(triton.cdiv(num_tokens, BT), num_experts) else 0


def _hist_layout(T: int, E: int, k: int, write_hist: bool) -> tuple[int, tuple[int, ...]]:
    """(slots per block, shape) of the histogram route_topk writes; (0, (0,)) for none."""
    from ..experts.fused.ops import slot_bins

    block = slot_hist_block(T, E, k) if write_hist else 0
    return block, ((triton.cdiv(T * k, block), slot_bins(E)) if block else (0,))


def _reference_hist(idx_TK: torch.Tensor, E: int, block: int, shape) -> torch.Tensor:
    """The kernel's histogram in plain torch: slots of each block of `block` slots per expert
    (bin E: unused slots); `shape` (0,) for none."""
    hist = torch.zeros(shape, dtype=torch.int32, device=idx_TK.device)
    if len(shape) == 2 and idx_TK.numel():
        bins = torch.where(idx_TK >= 0, idx_TK, E).reshape(-1)
        blocks = torch.arange(bins.numel(), device=bins.device) // block
        hist.index_put_((blocks, bins), torch.ones_like(bins, dtype=torch.int32), accumulate=True)
    return hist


@custom_op("route_topk")
def route_topk(
    logits_TE: torch.Tensor,
    bias_E: torch.Tensor,
    k: int,
    mode: str,
    norm: bool,
    top_p: float,
    scale: float,
    write_probs: bool,
    write_hist: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(idx_TK int64, weights_TK fp32, probs_BE fp32: with write_probs, each block's sum of the
    probabilities over its BT tokens (else empty), counts_E int64: routed slots per expert,
    slot_hist int32: with write_hist, the counting sort's histogram of blocks of
    slot_hist_block(T, E, k) slots (empty where that is 0))."""
    T, E = logits_TE.shape
    EP, BT = _meta(E, k)
    counts = torch.zeros(E, dtype=torch.int64, device=logits_TE.device)
    block, hist_shape = _hist_layout(T, E, k, write_hist)
    if not _use_triton(logits_TE):
        idx, w, probs = _reference(logits_TE, bias_E, k, mode, norm, top_p, scale)
        counts.scatter_add_(0, idx.clamp(min=0).reshape(-1), (idx >= 0).long().reshape(-1))
        hist = _reference_hist(idx, E, block, hist_shape)
        probs = _block_sums(probs, BT) if write_probs else probs.new_empty(0)
        return idx, w, probs, counts, hist
    logits_TE = logits_TE.contiguous()
    idx = torch.empty(T, k, dtype=torch.int64, device=logits_TE.device)
    w = torch.empty(T, k, dtype=torch.float32, device=logits_TE.device)
    probs = logits_TE.new_empty((triton.cdiv(T, BT), E) if write_probs else (0,))
    hist = torch.empty(hist_shape, dtype=torch.int32, device=logits_TE.device)
    if T:
        route_topk_kernel[(triton.cdiv(T, BT),)](
            logits_TE, bias_E, idx, w, probs, counts, hist, T, E, top_p, scale,
            K=k, KP=_kp(k), EP=EP, BT=BT, MODE=MODES[mode], NORM=norm, WRITE_PROBS=write_probs,
            HIST_BINS=hist_shape[1] if len(hist_shape) == 2 else 0,
        )  # fmt: skip
    return idx, w, probs, counts, hist


@route_topk.register_fake
def _(logits_TE, bias_E, k, mode, norm, top_p, scale, write_probs, write_hist):
    T, E = logits_TE.shape
    new = logits_TE.new_empty
    return (
        new(T, k, dtype=torch.int64),
        new(T, k, dtype=torch.float32),
        new((triton.cdiv(T, _meta(E, k)[1]), E) if write_probs else (0,)),
        new(E, dtype=torch.int64),
        new(_hist_layout(T, E, k, write_hist)[1], dtype=torch.int32),
    )


@custom_op("route_topk_backward")
def route_topk_backward(
    logits_TE: torch.Tensor,
    idx_TK: torch.Tensor,
    dw_TK: torch.Tensor,
    dprobs_BE: Optional[torch.Tensor],
    mode: str,
    norm: bool,
    top_p: float,
    scale: float,
) -> torch.Tensor:
    """d(logits) from d(weights) and d(probs_BE), the gradient of route_topk's block sums."""
    T, E = logits_TE.shape
    K = idx_TK.shape[1]
    if not _use_triton(logits_TE):
        return _reference_backward(logits_TE, idx_TK, dw_TK, dprobs_BE, mode, norm, scale)
    dl = torch.empty_like(logits_TE)
    EP, BT = _meta(E, K)
    if T:
        has = dprobs_BE is not None
        route_topk_bwd_kernel[(triton.cdiv(T, BT),)](
            logits_TE.contiguous(), logits_TE, idx_TK.contiguous(), dw_TK.float().contiguous(),
            dprobs_BE.contiguous() if has else dl, dl, T, E, scale,
            K=K, EP=EP, BT=BT, MODE=MODES[mode], NORM=norm, HAS_DPROBS=has,
        )  # fmt: skip
    return dl


@route_topk_backward.register_fake
def _(logits_TE, idx_TK, dw_TK, dprobs_BE, mode, norm, top_p, scale):
    return torch.empty_like(logits_TE)


class _RouteTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, bias_E, k, mode, norm, top_p, scale, write_probs, write_hist):
        idx, w, probs, counts, hist = call(
            route_topk, logits_TE, bias_E, k, mode, norm, top_p, scale, write_probs, write_hist
        )
        ctx.save_for_backward(logits_TE, idx)  # not the bias: it only steers selection
        ctx.args = (mode, norm, top_p, scale)
        ctx.mark_non_differentiable(idx, counts, hist)
        ctx.set_materialize_grads(False)
        return idx, w, probs, counts, hist

    @staticmethod
    def backward(ctx, _, dw_TK, dprobs_BE, __, ___):
        logits_TE, idx = ctx.saved_tensors
        return logits_grad(logits_TE, idx, dw_TK, dprobs_BE, ctx.args), *(None,) * 8


def logits_grad(logits_TE, idx_TK, dw_TK, dprobs_BE, args) -> torch.Tensor:
    """d(logits) from d(weights) (None: zero) and d(probs) (None: zero); args = (mode, norm,
    top_p, scale)."""
    if dw_TK is None:
        dw_TK = torch.zeros(idx_TK.shape, dtype=torch.float32, device=idx_TK.device)
    return call(route_topk_backward, logits_TE, idx_TK, dw_TK, dprobs_BE, *args)


def route_topk_fused(
    logits_TE: torch.Tensor,
    bias_E: torch.Tensor,
    k: int,
    mode: str,
    norm: bool,
    top_p: float = 1.0,
    scale: float = 1.0,
    write_probs: bool = False,
    write_hist: bool = False,
):
    """(idx_TK, weights_TK, probs_BE or None, counts_E, slot_hist or None) as select.py computes
    them, weights already scaled; probs_BE (write_probs): the probabilities summed over each block
    of tokens (probs_BE.sum(0) is the load-balancing loss's sum over tokens); counts = routed slots
    per expert; slot_hist the counting sort's histogram (write_hist; None where slot_hist_block is
    0). Differentiable in logits through weights and probs_BE."""
    idx, w, probs, counts, hist = _RouteTopK.apply(
        logits_TE, bias_E, k, mode, norm, float(top_p), float(scale), write_probs, write_hist
    )
    return idx, w, probs if write_probs else None, counts, hist if hist.dim() == 2 else None


class _GateRouteTopK(torch.autograd.Function):
    """The gate and the routing kernel as one autograd node that keeps x, w and the ids, not the
    [T, E] fp32 logits: the backward recomputes them (one small GEMM, T*H*E) before the routing
    backward. The logits are the only [T, E] tensor a routed layer would hold until backward."""

    @staticmethod
    def forward(
        ctx, x_TH, w_EH, bias_E, bf16, k, mode, norm, top_p, scale, write_probs, check, hist
    ):
        logits_TE = gate_logits(x_TH, w_EH, bf16)
        idx, w, probs, counts, hist = call(
            route_topk, logits_TE, bias_E, k, mode, norm, top_p, scale, write_probs, hist
        )
        # the finiteness check reads the logits here, while they exist
        finite = torch.isfinite(logits_TE).all() if check else counts.new_empty(0, dtype=bool)
        ctx.save_for_backward(x_TH, w_EH, idx)
        ctx.bf16, ctx.args = bf16, (mode, norm, top_p, scale)
        ctx.mark_non_differentiable(idx, counts, finite, hist)
        ctx.set_materialize_grads(False)
        return idx, w, probs, counts, finite, hist

    @staticmethod
    def backward(ctx, _, dw_TK, dprobs_BE, __, ___, ____):
        x_TH, w_EH, idx = ctx.saved_tensors
        if dw_TK is None and dprobs_BE is None:
            return (None,) * 12
        logits_TE = gate_logits(x_TH, w_EH, ctx.bf16)  # recomputed, as the forward computed it
        dl_TE = logits_grad(logits_TE, idx, dw_TK, dprobs_BE, ctx.args)
        del logits_TE
        need_x, need_w = ctx.needs_input_grad[:2]
        dx, dw = gate_backward(x_TH, w_EH, dl_TE, need_x, need_w, ctx.bf16)
        return dx, dw, *(None,) * 10


def gate_route_topk_fused(
    x_TH: torch.Tensor,
    w_EH: torch.Tensor,
    bias_E: torch.Tensor,
    k: int,
    mode: str,
    norm: bool,
    top_p: float = 1.0,
    scale: float = 1.0,
    write_probs: bool = False,
    check_finite: bool = False,
    write_hist: bool = False,
):
    """route_topk_fused(x @ w^T in fp32, ...) without holding the logits until backward: (idx_TK,
    weights_TK, probs_BE or None, counts_E, finite or None, slot_hist or None); finite, with
    check_finite, says on the device whether every logit was finite."""
    bf16 = bf16_gate_supported(x_TH, w_EH)
    idx, w, probs, counts, finite, hist = _GateRouteTopK.apply(
        x_TH, w_EH, bias_E, bf16, k, mode, norm, float(top_p), float(scale), write_probs,
        check_finite, write_hist,
    )  # fmt: skip
    return (
        idx,
        w,
        probs if write_probs else None,
        counts,
        finite if check_finite else None,
        hist if hist.dim() == 2 else None,
    )
