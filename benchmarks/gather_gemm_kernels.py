"""Candidate kernels timed by `benchmarks.gather_gemm`, not used by the layer: grouped GEMMs
(Triton) that read token rows by index and run the SwiGLU in their epilogue, to replace
`gather_rows` + `torch._grouped_mm` + `swiglu_rows` (forward) and `torch._grouped_mm` +
`swiglu_rows_backward` (backward) with one kernel each. On the H200 they lost on every shape
(results/gather_gemm_h200.json), so the fused path keeps CUTLASS's grouped GEMM.

    gather_swiglu_mm:  h = x[token(r)] @ w_in[e]^T;  a = w_slot * silu(gate) * up    (h, a)
    mm_swiglu_bwd:     da = dy[r or token(r)] @ w_out[e];  from h: dh, a, <silu(gate)*up, da>

A program owns a [BM, BN] tile of one expert's rows; the expert and row span of an M tile come
from ends_E inside the kernel (no host sync, no tile list). Rows past an expert's end read row 0
and are not stored.

Legend: T tokens, H hidden, K slots per token, R expert-major rows, E experts (EP: power of two
>= E), F ffn hidden, NT column tiles of F.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _expert_of_tile(ends_ptr, E, m_tile, EP: tl.constexpr, BM: tl.constexpr):
    """(expert, first row, end row) of the m_tile-th M tile, counting each expert's
    cdiv(rows, BM) tiles in expert order; expert >= E when m_tile is past the last tile."""
    ev = tl.arange(0, EP)
    ends = tl.load(ends_ptr + ev, mask=ev < E, other=0)
    starts = tl.load(ends_ptr + ev - 1, mask=(ev > 0) & (ev < E), other=0)
    tiles = tl.where(ev < E, (ends - starts + BM - 1) // BM, 0)
    last_tile = tl.cumsum(tiles, 0)
    e = tl.sum((last_tile <= m_tile).to(tl.int32), 0)
    mine = ev == e
    first_tile = tl.sum(tl.where(mine, last_tile - tiles, 0), 0)
    row0 = tl.sum(tl.where(mine, starts, 0), 0) + (m_tile - first_tile) * BM
    return e, row0, tl.sum(tl.where(mine, ends, 0), 0)


@triton.jit
def _tile(ends_ptr, row_slot_ptr, E, F, EP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """This program's tile: (expert (>= E: no tile), N tile, rows, used rows, their slots,
    columns, columns < F). N tiles vary fastest, so neighbours share the gathered rows in L2."""
    NT = tl.cdiv(F, BN)
    n_tile = tl.program_id(0) % NT
    e, row0, row_end = _expert_of_tile(ends_ptr, E, tl.program_id(0) // NT, EP, BM)
    rows = row0 + tl.arange(0, BM)
    used = rows < row_end
    slot = tl.load(row_slot_ptr + rows, mask=used, other=0)
    cols = n_tile * BN + tl.arange(0, BN)
    return e, n_tile, rows, used, slot, cols, cols < F


@triton.jit
def gather_swiglu_mm_kernel(
    x_ptr,
    row_slot_ptr,
    ends_ptr,
    w_ptr,
    wt_ptr,
    h_ptr,
    a_ptr,
    E,
    H,
    F,
    K,
    EP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    EVEN_K: tl.constexpr,
    TMA_W: tl.constexpr,
):
    """h[r] = x[row_slot[r] // K] @ w[e]^T (w: [E, 2F, H] = [gate | up]) and
    a[r] = wt[row_slot[r]] * silu(gate) * up, from the bf16-rounded h the backward will read.
    Gate and up columns of the same tile share each A load."""
    e, n_tile, rows, used, slot, cols, col_ok = _tile(ends_ptr, row_slot_ptr, E, F, EP, BM, BN)
    if e < E:
        tok = (slot // K).to(tl.int64)
        ks = tl.arange(0, BK)
        w_cols = tl.where(col_ok, cols, 0).to(tl.int64)  # in bounds: no masked weight loads
        xp = x_ptr + tok[:, None] * H + ks[None, :]
        gp = w_ptr + e.to(tl.int64) * 2 * F * H + w_cols[None, :] * H + ks[:, None]
        up_off = F * H
        acc_g = tl.zeros([BM, BN], dtype=tl.float32)
        acc_u = tl.zeros([BM, BN], dtype=tl.float32)
        if TMA_W:  # the weights through the copy engine; columns past F are masked at the store
            wd = tl.make_tensor_descriptor(w_ptr, [E * 2 * F, H], [H, 1], [BN, BK])
            w_row = e * 2 * F + n_tile * BN
        for k0 in range(0, H, BK):
            if TMA_W:
                if EVEN_K:
                    xa = tl.load(xp)
                else:
                    xa = tl.load(xp, mask=(k0 + ks < H)[None, :], other=0.0)
                bg = wd.load([w_row, k0]).T
                bu = wd.load([w_row + F, k0]).T
            elif EVEN_K:
                xa = tl.load(xp)
                bg = tl.load(gp)
                bu = tl.load(gp + up_off)
            else:
                k_ok = k0 + ks < H
                xa = tl.load(xp, mask=k_ok[None, :], other=0.0)
                bg = tl.load(gp, mask=k_ok[:, None], other=0.0)
                bu = tl.load(gp + up_off, mask=k_ok[:, None], other=0.0)
            acc_g = tl.dot(xa, bg, acc_g)
            acc_u = tl.dot(xa, bu, acc_u)
            xp += BK
            gp += BK
        out = used[:, None] & col_ok[None, :]
        hp = h_ptr + rows.to(tl.int64)[:, None] * 2 * F + cols[None, :]
        gate = acc_g.to(h_ptr.dtype.element_ty)
        up = acc_u.to(h_ptr.dtype.element_ty)
        tl.store(hp, gate, mask=out)
        tl.store(hp + F, up, mask=out)
        wr = tl.load(wt_ptr + slot, mask=used, other=0.0).to(tl.float32)
        g = gate.to(tl.float32)
        a = wr[:, None] * g * tl.sigmoid(g) * up.to(tl.float32)
        ap = a_ptr + rows.to(tl.int64)[:, None] * F + cols[None, :]
        tl.store(ap, a.to(a_ptr.dtype.element_ty), mask=out)


@triton.jit
def mm_swiglu_bwd_kernel(
    dy_ptr,
    row_slot_ptr,
    ends_ptr,
    w_ptr,
    wt_ptr,
    h_ptr,
    dh_ptr,
    a_ptr,
    dw_ptr,
    E,
    H,
    F,
    K,
    dw_stride,
    EP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    GATHER: tl.constexpr,
):
    """da = dy[r] @ w[e] (w: [E, H, F]; with GATHER dy is [T, H] and row r reads token
    row_slot[r] // K), then the SwiGLU backward on the tile: dh (may be h itself: a program reads
    its h tile before it writes the same tile), a recomputed, and dw[r, n_tile] =
    <silu(gate) * up, da> over the tile's columns (dw: [R, dw_stride >= NT]; the caller sums)."""
    e, n_tile, rows, used, slot, cols, col_ok = _tile(ends_ptr, row_slot_ptr, E, F, EP, BM, BN)
    if e < E:
        if GATHER:
            src = (slot // K).to(tl.int64)
        else:
            src = tl.where(used, rows, 0).to(tl.int64)
        ks = tl.arange(0, BK)
        # columns are the weights' contiguous axis: a mask, not a clamp, keeps their loads vector
        dp = dy_ptr + src[:, None] * H + ks[None, :]
        wp = w_ptr + e.to(tl.int64) * H * F + ks[:, None].to(tl.int64) * F + cols[None, :]
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, H, BK):
            if EVEN_K and EVEN_N:
                da = tl.load(dp)
                b = tl.load(wp)
            else:
                k_ok = k0 + ks < H
                da = tl.load(dp, mask=k_ok[None, :], other=0.0)
                b = tl.load(wp, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(da, b, acc)
            dp += BK
            wp += BK * F
        out = used[:, None] & col_ok[None, :]
        r64 = rows.to(tl.int64)[:, None]
        hp = h_ptr + r64 * 2 * F + cols[None, :]
        gate = tl.load(hp, mask=out, other=0.0).to(tl.float32)
        up = tl.load(hp + F, mask=out, other=0.0).to(tl.float32)
        # the unfused path rounds da to bf16 between the GEMM and the SwiGLU backward
        g = acc.to(dh_ptr.dtype.element_ty).to(tl.float32)
        wr = tl.load(wt_ptr + slot, mask=used, other=0.0).to(tl.float32)[:, None]
        sig = tl.sigmoid(gate)
        silu = gate * sig
        tl.store(dw_ptr + rows * dw_stride + n_tile, tl.sum(silu * up * g, axis=1), mask=used)
        gw = g * wr
        dp_out = dh_ptr + r64 * 2 * F + cols[None, :]
        d_gate = gw * up * sig * (1.0 + gate * (1.0 - sig))
        tl.store(dp_out, d_gate.to(dh_ptr.dtype.element_ty), mask=out)
        tl.store(dp_out + F, (gw * silu).to(dh_ptr.dtype.element_ty), mask=out)
        ap = a_ptr + r64 * F + cols[None, :]
        tl.store(ap, (wr * silu * up).to(a_ptr.dtype.element_ty), mask=out)


# -- launchers -------------------------------------------------------------------------------------
BK = 64  # every GPU tile's K step (EVEN_K is decided from it before the autotuner picks BM, BN)


def _configs(two_acc: bool) -> list:
    """Tiles for Hopper's wgmma: the forward holds two accumulators (gate and up), so half the N."""
    # two stages leave room for a second program per SM, whose mainloop hides this one's epilogue
    shapes = [(128, 64, 4, 8), (128, 64, 3, 4), (64, 64, 4, 4), (64, 128, 3, 4), (128, 128, 3, 8)]
    shapes += [(128, 128, 2, 8), (128, 64, 2, 4)]
    if not two_acc:
        shapes += [(128, 128, 4, 8), (128, 256, 3, 8)]
    return [
        triton.Config(dict(BM=bm, BN=bn, BK=BK), num_stages=s, num_warps=w)
        for bm, bn, s, w in shapes
    ]


_TUNED: dict = {}


def _tuned(kind: str, interpret: bool):
    """(launchable, meta, K step): autotuned on a GPU; one small tile in the interpreter."""
    kernel = mm_swiglu_bwd_kernel if kind == "bwd" else gather_swiglu_mm_kernel
    if interpret:
        return kernel, dict(BM=16, BN=16, BK=16), 16
    if kind not in _TUNED:
        # dh may overwrite h, and each tile width fills its own dw columns: trials must not leak
        bwd = kind == "bwd"
        _TUNED[kind] = triton.autotune(
            configs=_configs(not bwd),
            key=["H", "F", "E"],
            restore_value=["h_ptr"] if bwd else [],
            reset_to_zero=["dw_ptr"] if bwd else [],
        )(kernel)
    return _TUNED[kind], {}, BK


def _tma_scratch(device):
    """Device-built TMA descriptors need a global scratch allocator (set once)."""
    triton.set_allocator(
        lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=device)
    )


def _grid(R: int, E: int, F: int):
    # an upper bound on the M tiles: each expert's last tile may be partial
    return lambda meta: ((triton.cdiv(R, meta["BM"]) + E) * triton.cdiv(F, meta["BN"]),)


def gather_swiglu_mm(
    x_TH, row_slot_R, ends_E, w_in, w_S, K: int, interpret: bool = False, tma: bool = False
):
    """(h [R, 2F], a [R, F]) for R = row_slot_R.numel() rows; rows past ends[-1] unset."""
    R, E, F, H = row_slot_R.numel(), w_in.shape[0], w_in.shape[1] // 2, w_in.shape[2]
    h = x_TH.new_empty(R, 2 * F)
    a = x_TH.new_empty(R, F)
    if R and F and E:
        kernel, meta, bk = _tuned("fwd_tma" if tma else "fwd", interpret)
        if tma:
            _tma_scratch(x_TH.device)
        kernel[_grid(R, E, F)](
            x_TH, row_slot_R, ends_E, w_in, w_S, h, a, E, H, F, K,
            EP=triton.next_power_of_2(E), EVEN_K=H % bk == 0, TMA_W=tma, **meta,
        )  # fmt: skip
    return h, a


def mm_swiglu_bwd(
    dy, row_slot_R, ends_E, w_out, w_S, h, K: int, gather: bool, dh=None, interpret: bool = False
):
    """(dh, a, dw_part [R, NTmax]): the down projection's dgrad with the SwiGLU backward in its
    epilogue; dh=h writes over h. dy is [T, H] with gather, else [R, H]. dw_part.sum(1) is
    d(weight) per row (zero-filled: unused columns add nothing)."""
    R, E, H, F = row_slot_R.numel(), w_out.shape[0], w_out.shape[1], w_out.shape[2]
    dh = torch.empty_like(h) if dh is None else dh
    a = h.new_empty(R, F)
    nt_max = triton.cdiv(F, 16)
    dw_part = torch.zeros(R, nt_max, dtype=torch.float32, device=h.device)
    if R and F and E:
        kernel, meta, bk = _tuned("bwd", interpret)
        kernel[_grid(R, E, F)](
            dy, row_slot_R, ends_E, w_out, w_S, h, dh, a, dw_part, E, H, F, K, nt_max,
            EP=triton.next_power_of_2(E), EVEN_K=H % bk == 0, EVEN_N=F % 256 == 0, GATHER=gather,
            **meta,
        )  # fmt: skip
    return dh, a, dw_part
