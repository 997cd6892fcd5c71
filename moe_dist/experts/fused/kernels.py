"""Triton kernels of the fused expert path (see fused/README.md for the data flow).

Legend: T tokens, H hidden, K slots per token, S = T*K slots (slot s = t*K + k), E experts,
EP bins of the counting sort (a power of two > E: bin E holds unused slots), NB slot blocks,
R expert-major rows (R = S; rows past ends[E-1] are unused and never read), F ffn hidden.

Index tensors: pos_TK[t, k] = row of slot (t, k) (-1: unused slot); row_slot_R[r] = slot of row r;
ends_E[e] = one past expert e's last row (inclusive cumsum of counts: torch._grouped_mm's offs).
"""

from __future__ import annotations

import triton
import triton.language as tl

SLOT_BLOCK = 512  # slots per program of the counting sort (at least: see slot_block)
SLOT_CHUNK = 128  # slots ranked at once inside a block ([CHUNK, CHUNK] comparison)
SCAN_ROWS = 64  # hist rows per step of a rank program's scan
SCAN_LIMIT = 1 << 16  # hist entries (blocks x bins) each rank program scans, at most


@triton.jit
def slot_hist_kernel(idx_ptr, S, E, hist_ptr, EP: tl.constexpr, BLOCK: tl.constexpr):
    """hist[b, e] = slots of block b that chose expert e (bin E: unused slots, expert -1)."""
    b = tl.program_id(0)
    s = b * BLOCK + tl.arange(0, BLOCK)
    m = s < S
    e = tl.load(idx_ptr + s, mask=m, other=-1).to(tl.int32)
    e = tl.where(e >= 0, e, E)
    tl.store(hist_ptr + b * EP + tl.arange(0, EP), tl.histogram(e, EP, mask=m))


@triton.jit
def slot_rank_kernel(
    idx_ptr,
    S,
    E,
    hist_ptr,
    NB,
    base_ptr,
    counts_ptr,
    ends_ptr,
    pos_ptr,
    row_slot_ptr,
    EP: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
    ROWS: tl.constexpr,
):
    """pos[s] = first row of expert e + slots of e in earlier blocks + earlier slots of e in this
    block: a stable counting sort (slot order within an expert, as a stable argsort gives), no
    sort. Also the inverse, row_slot[pos[s]] = s, and (program 0) counts and ends.
    Each program scans the whole [NB, EP] histogram itself (NB * EP <= SCAN_LIMIT), so no scan
    kernel runs between the histogram and the ranks. BLOCK need not be a power of two (the
    routing kernel's blocks are its tokens' slots). The block's base row is a per-program
    scratch, advanced chunk by chunk."""
    b = tl.program_id(0)
    ev = tl.arange(0, EP)
    tot = tl.zeros([EP], dtype=tl.int32)
    before = tl.zeros([EP], dtype=tl.int32)  # slots of each expert in blocks before b
    for b0 in range(0, NB, ROWS):
        rows = b0 + tl.arange(0, ROWS)
        h = tl.load(hist_ptr + rows[:, None] * EP + ev[None, :], mask=rows[:, None] < NB, other=0)
        tot += tl.sum(h, axis=0)
        before += tl.sum(tl.where(rows[:, None] < b, h, 0), axis=0)
    ends = tl.cumsum(tot, 0)  # unused slots (bin E) sort after every expert
    if b == 0:
        tl.store(counts_ptr + ev, tot.to(tl.int64), mask=ev < E)
        tl.store(ends_ptr + ev, ends, mask=ev < E)
    base_row = base_ptr + b * EP
    tl.store(base_row + ev, ends - tot + before)
    tl.debug_barrier()  # the base row is in memory before any thread reads it
    ii = tl.arange(0, CHUNK)
    for c in range(0, BLOCK, CHUNK):
        s = b * BLOCK + c + ii
        m = (s < S) & (c + ii < BLOCK)
        e = tl.load(idx_ptr + s, mask=m, other=-1).to(tl.int32)
        e = tl.where(e >= 0, e, E)
        same = (e[:, None] == e[None, :]) & (ii[None, :] < ii[:, None]) & m[None, :]
        r = tl.sum(same.to(tl.int32), axis=1)
        p = tl.load(base_row + e, mask=m, other=0, cache_modifier=".cg") + r
        used = m & (e < E)
        tl.store(pos_ptr + s, tl.where(used, p, -1), mask=m)
        tl.store(row_slot_ptr + p, s, mask=used)
        tl.debug_barrier()  # every thread has read the base row before it moves on
        cur = tl.load(base_row + ev, cache_modifier=".cg")
        tl.store(base_row + ev, cur + tl.histogram(e, EP, mask=m))
        tl.debug_barrier()


@triton.jit
def gather_rows_kernel(
    x_ptr, row_slot_ptr, ends_ptr, out_ptr, E, H, K, ROWS: tl.constexpr, BLOCK_H: tl.constexpr
):
    """out[r] = x[row_slot[r] // K] for the used rows r < ends[E-1] (expert-major token rows).
    A [ROWS, BLOCK_H] tile per program (grid: row tiles x column tiles), no inner loop: many
    independent loads in flight."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    used = r < tl.load(ends_ptr + E - 1)
    t = (tl.load(row_slot_ptr + r, mask=used, other=0) // K).to(tl.int64)
    m = used[:, None] & (offs[None, :] < H)
    v = tl.load(x_ptr + t[:, None] * H + offs[None, :], mask=m)
    tl.store(out_ptr + r.to(tl.int64)[:, None] * H + offs[None, :], v, mask=m)


@triton.jit
def reduce_rows_kernel(
    y_ptr,
    pos_ptr,
    out_ptr,
    vals_ptr,
    vals_out_ptr,
    H,
    K: tl.constexpr,
    KP: tl.constexpr,
    HAS_VALS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    COLS: tl.constexpr,
):
    """out[t] = sum_k y[pos[t, k]] in fp32 (a gather-reduce: no atomics, unused slots read
    nothing); with HAS_VALS also vals_out[t, k] = vals[pos[t, k]] (0 for unused slots).
    Grid: tokens x column spans of COLS. A program walks its span in BLOCK_H tiles and its
    token's slots in [BLOCK_K, BLOCK_H] loads summed into one fp32 row of registers, so the
    autotuner trades rows in flight against columns (one [K, H] tile per program ran ~2.5x
    the bandwidth floor on top-8 shapes)."""
    t = tl.program_id(0).to(tl.int64)
    if HAS_VALS:
        if tl.program_id(1) == 0:
            kk = tl.arange(0, KP)
            p = tl.load(pos_ptr + t * K + kk, mask=kk < K, other=-1)
            v = tl.load(vals_ptr + p, mask=p >= 0, other=0.0)
            tl.store(vals_out_ptr + t * K + kk, v, mask=kk < K)
    kb = tl.arange(0, BLOCK_K)
    c0 = tl.program_id(1) * COLS
    for h0 in tl.range(c0, tl.minimum(c0 + COLS, H), BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        m = offs < H
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for k0 in tl.static_range(0, KP, BLOCK_K):
            p = tl.load(pos_ptr + t * K + k0 + kb, mask=k0 + kb < K, other=-1)
            y = tl.load(
                y_ptr + p.to(tl.int64)[:, None] * H + offs[None, :],
                mask=(p[:, None] >= 0) & m[None, :],
                other=0.0,
            )
            acc += tl.sum(y.to(tl.float32), axis=0)
        tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def swiglu_rows_fwd_kernel(
    h_ptr, w_ptr, row_slot_ptr, ends_ptr, out_ptr, E, F, BLOCK: tl.constexpr
):
    """out[r] = w[row_slot[r]] * silu(gate[r]) * up[r] for used rows: the combine weight rides
    into the down projection, so the combine is a plain sum and its backward a plain gather."""
    r = tl.program_id(0)
    if r < tl.load(ends_ptr + E - 1):
        wr = tl.load(w_ptr + tl.load(row_slot_ptr + r)).to(tl.float32)
        r64 = r.to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < F
        gate = tl.load(h_ptr + r64 * 2 * F + offs, mask=m).to(tl.float32)
        up = tl.load(h_ptr + r64 * 2 * F + F + offs, mask=m).to(tl.float32)
        a = wr * gate * tl.sigmoid(gate) * up
        tl.store(out_ptr + r64 * F + offs, a.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def swiglu_rows_bwd_kernel(
    h_ptr,
    da_ptr,
    w_ptr,
    row_slot_ptr,
    ends_ptr,
    dh_ptr,
    dw_ptr,
    a_ptr,
    E,
    F,
    BLOCK: tl.constexpr,
    WRITE_A: tl.constexpr,
):
    """With a = w * silu(gate) * up and da = d(loss)/da: dh = d(loss)/d[gate | up], and
    dw[r] = <silu(gate) * up, da> in fp32 (the combine weight's gradient, one per row). With
    WRITE_A also a, recomputed (the forward need not keep it). dh may be h itself: each chunk's
    gate and up are loaded before its d_gate and d_up are stored, and chunks are disjoint."""
    r = tl.program_id(0)
    if r < tl.load(ends_ptr + E - 1):
        wr = tl.load(w_ptr + tl.load(row_slot_ptr + r)).to(tl.float32)
        r64 = r.to(tl.int64)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for f0 in range(0, F, BLOCK):
            offs = f0 + tl.arange(0, BLOCK)
            m = offs < F
            gate = tl.load(h_ptr + r64 * 2 * F + offs, mask=m, other=0.0).to(tl.float32)
            up = tl.load(h_ptr + r64 * 2 * F + F + offs, mask=m, other=0.0).to(tl.float32)
            g = tl.load(da_ptr + r64 * F + offs, mask=m, other=0.0).to(tl.float32)
            sig = tl.sigmoid(gate)
            silu = gate * sig
            acc += silu * up * g
            gw = g * wr
            d_gate = gw * up * sig * (1.0 + gate * (1.0 - sig))
            d_up = gw * silu
            tl.store(dh_ptr + r64 * 2 * F + offs, d_gate.to(dh_ptr.dtype.element_ty), mask=m)
            tl.store(dh_ptr + r64 * 2 * F + F + offs, d_up.to(dh_ptr.dtype.element_ty), mask=m)
            if WRITE_A:
                a = (wr * silu * up).to(a_ptr.dtype.element_ty)
                tl.store(a_ptr + r64 * F + offs, a, mask=m)
        tl.store(dw_ptr + r, tl.sum(acc, axis=0))
