"""Triton kernels of the one-sided transport: a handful of launches per call, all sizes on the
device.

dispatch: count_and_rank -> signal_and_wait(COUNT; it bumps the epoch) -> layout -> push_slots
          -> signal_and_wait(FORWARD) -> copy_segments (peer rows out of the staging; not with one
          PE)
combine:  return_segments (expert rows -> their owners' staging) -> signal_and_wait(RETURN) ->
gather_reduce GPU threads store rows straight into peers' symmetric buffers (addresses from
nvshmem_ptr: P2P over NVLink, or the same GPU) and raise flags with system-scope release atomics;
receivers spin on the flags with acquire loads and a time limit. PROTOCOL.md beside this file gives
the message order. Legend: S = T*K slots (slot s = token s // K, choice s % K), E experts, G = E/N
local experts, N PEs, H hidden, C receive rows. Rows of one PE's own slots never touch the staging:
they are written to (and read from) the regular tensors in place."""

from __future__ import annotations

import triton
import triton.language as tl

PEER_TIMEOUT_BIT = tl.constexpr(4)  # moe_dist.errors.PEER_TIMEOUT
RANK_MISMATCH_BIT = tl.constexpr(8)  # moe_dist.errors.RANK_MISMATCH
PEER_FAILED_BIT = tl.constexpr(16)  # moe_dist.errors.PEER_FAILED
OUT_OF_STEP = tl.constexpr(4 | 8 | 16)  # after these, later waits of the layer do not wait
BUFFER_OVERFLOW_BIT = tl.constexpr(2)  # moe_dist.errors.BUFFER_OVERFLOW
ROW_BLOCK = 1024  # elements of a row per program: 2 KiB of bf16, 16-byte accesses with 4 warps


@triton.jit
def _now_ns():
    return tl.inline_asm_elementwise(
        "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
    )


@triton.jit
def count_and_rank_kernel(
    idx_ptr, S, rank_ptr, peer_counts_addr_ptr, me, N, E, ROW, BLOCK: tl.constexpr
):
    """Program e: rank_S[s] = how many earlier slots (token order) chose expert e, for the slots
    that chose e (a stable counting sort without the sort); then counts[me, e] on every PE (own
    included). ROW: the count matrix's row stride in ints (a PE's row also holds its header)."""
    e = tl.program_id(0)
    running = 0
    for start in range(0, S, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < S
        hit = (tl.load(idx_ptr + offs, mask=inb, other=-1) == e).to(tl.int32)
        before = tl.cumsum(hit, 0) - hit
        tl.store(rank_ptr + offs, (running + before).to(tl.int64), mask=inb & (hit > 0))
        running += tl.sum(hit, 0)
    for q in range(N):
        counts = tl.load(peer_counts_addr_ptr + q).to(tl.pointer_type(tl.int64))
        tl.store(counts + me * ROW + e, running.to(tl.int64))


@triton.jit
def signal_and_wait_kernel(
    peer_flag_addr_ptr, flag_ptr, me, n, epoch_ptr, timeout_ns, err_ptr, step, BUMP: tl.constexpr
):
    """flag[me] = epoch on every PE (release, system scope: everything earlier kernels of this
    stream stored is visible first), then wait until flag[q] >= epoch for every q, at most
    timeout_ns in all. On timeout: record PEER_TIMEOUT with the step and the first silent peer and
    return, so the stream moves on and the host check raises instead of hanging. Once a wait of this
    layer has timed out (and until the host check clears it), later waits do not wait: the PEs are
    out of step, the data is void, and each further timeout would only delay the error. Epochs live
    in device memory, so a replayed CUDA graph signals fresh ones; BUMP (the first wait of a call)
    advances the epoch first."""
    epoch = tl.load(epoch_ptr)
    if BUMP:
        epoch += 1
        tl.store(epoch_ptr, epoch)
    earlier_timeout = tl.load(err_ptr) & OUT_OF_STEP
    for q in range(n):
        flag = tl.load(peer_flag_addr_ptr + q).to(tl.pointer_type(tl.int64))
        tl.atomic_xchg(flag + me, epoch, sem="release", scope="sys")
    start = _now_ns()
    timed_out = 0
    for q in range(n):
        seen = tl.atomic_add(flag_ptr + q, 0, sem="acquire", scope="sys")
        while (seen < epoch) & (timed_out == 0) & (earlier_timeout == 0):
            if _now_ns() - start > timeout_ns:
                timed_out = 1
                if tl.atomic_or(err_ptr, PEER_TIMEOUT_BIT) == 0:
                    tl.store(err_ptr + 1, step)
                    tl.store(err_ptr + 2, q)
            else:
                seen = tl.atomic_add(flag_ptr + q, 0, sem="acquire", scope="sys")


@triton.jit
def send_header_kernel(hdr_ptr, peer_hdr_addr_ptr, me, ROW, F: tl.constexpr, FB: tl.constexpr):
    """Program q: this PE's header (handshake.FIELDS, F int64) -> row `me` of PE q's header
    matrix (row stride ROW: the header starts the PE's row of the count exchange). Launched before
    signal_and_wait(COUNT), whose release makes it visible to P2P peers; a put peer (whose address
    here is this PE's own row) gets it with the counts in put_signal_kernel's one putmem_signal."""
    q = tl.program_id(0)
    f = tl.arange(0, FB)
    vals = tl.load(hdr_ptr + f, mask=f < F, other=0)
    rows = tl.load(peer_hdr_addr_ptr + q).to(tl.pointer_type(tl.int64))
    tl.store(rows + me * ROW + f, vals, mask=f < F)


@triton.jit
def _record_peer_failed(err_ptr, step, row_Q, status_Q, origin_Q):
    """PEER_FAILED from the header row selected by row_Q: detail = origin * 65536 + status. It
    replaces an earlier overflow's step and detail (check() raises it first), not an out-of-step
    error already recorded."""
    status = tl.sum(tl.where(row_Q, status_Q, 0), 0)
    origin = tl.sum(tl.where(row_Q, origin_Q, 0), 0)
    if (tl.atomic_or(err_ptr, PEER_FAILED_BIT) & OUT_OF_STEP) == 0:
        tl.store(err_ptr + 1, step)
        tl.store(err_ptr + 2, (origin * 65536 + status).to(tl.int32))


@triton.jit
def check_header_kernel(
    hdr_ptr,
    me,
    N,
    ROW,
    err_ptr,
    step,
    F: tl.constexpr,
    STATUS: tl.constexpr,
    ORIGIN: tl.constexpr,
    NB: tl.constexpr,
    FB: tl.constexpr,
):
    """After the COUNT wait, every PE holds every PE's header [N, F] (row stride ROW). A row whose
    status is set: PEER_FAILED, detail = origin * 65536 + status (the first failed row). Otherwise
    a field before STATUS that differs from this PE's own row: RANK_MISMATCH, detail = field *
    65536 + the first PE that differs. Every PE sees the same matrix, so every PE records the same
    error; the waits after it do not wait (OUT_OF_STEP). Rows are read only when the wait saw every
    peer's flag of this call (each flag follows its header row, P2P and put alike): with an
    out-of-step error recorded (a timeout now or earlier) some rows are stale, and that first
    error stands."""
    if (tl.load(err_ptr) & OUT_OF_STEP) == 0:
        q = tl.arange(0, NB)[:, None]
        f = tl.arange(0, FB)[None, :]
        valid = q < N
        h = tl.load(hdr_ptr + q * ROW + f, mask=valid & (f < F), other=0)
        mine = tl.load(hdr_ptr + me * ROW + f, mask=f < F, other=0)
        status_Q = tl.sum(tl.where(f == STATUS, h, 0), 1)
        origin_Q = tl.sum(tl.where(f == ORIGIN, h, 0), 1)
        qv = tl.arange(0, NB)
        failed = (status_Q != 0) & (qv < N)
        first_failed = tl.min(tl.where(failed, qv, NB), 0)
        differs = valid & (f < STATUS) & (h != mine)
        code = tl.where(differs, f * 65536 + q, NB * 65536 * FB)  # smallest: first field, PE
        first_diff = tl.min(tl.min(code, 1), 0)
        # check() raises these before any other bit, so their step and detail replace an
        # earlier overflow's
        if first_failed < NB:
            _record_peer_failed(err_ptr, step, qv == first_failed, status_Q, origin_Q)
        elif first_diff < NB * 65536 * FB:
            if (tl.atomic_or(err_ptr, RANK_MISMATCH_BIT) & OUT_OF_STEP) == 0:
                tl.store(err_ptr + 1, step)
                tl.store(err_ptr + 2, first_diff.to(tl.int32))


@triton.jit
def check_status_kernel(
    hdr_ptr,
    N,
    ROW,
    err_ptr,
    step,
    epoch_ptr,
    layer,
    F: tl.constexpr,
    STATUS: tl.constexpr,
    ORIGIN: tl.constexpr,
    CALL: tl.constexpr,
    LAYER: tl.constexpr,
    NB: tl.constexpr,
    FB: tl.constexpr,
    AHEAD: tl.constexpr,
):
    """After a RETURN wait (a combine, or the dispatch's backward): a PE that failed after its
    dispatch (its experts raised) stored its header, status set and this call's epoch in the CALL
    field, into row `src` of this call's parity, and raised the flags without rows
    (NvshmemTransport.fail_together). The other rows hold earlier calls' headers: only a row
    naming this layer and this epoch (epochs are never reused, unlike call numbers of a rebuilt
    layer) counts; AHEAD = 1 before the call's BUMP. Records PEER_FAILED, detail = origin * 65536
    + status, like check_header_kernel."""
    if (tl.load(err_ptr) & OUT_OF_STEP) == 0:
        call = tl.load(epoch_ptr) + AHEAD
        q = tl.arange(0, NB)[:, None]
        f = tl.arange(0, FB)[None, :]
        h = tl.load(hdr_ptr + q * ROW + f, mask=(q < N) & (f < F), other=0)
        status_Q = tl.sum(tl.where(f == STATUS, h, 0), 1)
        origin_Q = tl.sum(tl.where(f == ORIGIN, h, 0), 1)
        call_Q = tl.sum(tl.where(f == CALL, h, 0), 1)
        layer_Q = tl.sum(tl.where(f == LAYER, h, 0), 1)
        qv = tl.arange(0, NB)
        failed = (status_Q != 0) & (call_Q == call) & (layer_Q == layer) & (qv < N)
        first_failed = tl.min(tl.where(failed, qv, NB), 0)
        if first_failed < NB:
            _record_peer_failed(err_ptr, step, qv == first_failed, status_Q, origin_Q)


@triton.jit
def layout_kernel(
    counts_ptr,
    me,
    N,
    E,
    ROW,
    G,
    capacity,
    offs_ptr,
    overflow_ptr,
    counts_G_ptr,
    seg_ptr,
    err_ptr,
    step,
    NB: tl.constexpr,
    EB: tl.constexpr,
):
    """From the exchanged count matrix counts[src, e] (row stride ROW; one program, [NB, EB]
    tiles):
    offs_E[e]       row at e's receiver where this PE's first slot of expert e lands: the
                    receiver's rows are expert-major, then source, then slot (the reference order);
    overflow_N      receiver r gets more than `capacity` rows: nobody writes to it, the error is
                    recorded;
    counts_G        rows this PE's local experts received (0 when it overflowed);
    seg[0|1, s, g]  start and length of the rows source s sent to local expert g here."""
    s = tl.arange(0, NB)[:, None]
    e = tl.arange(0, EB)[None, :]
    inb = (s < N) & (e < E)
    c = tl.load(counts_ptr + s * ROW + e, mask=inb, other=0)
    tot = tl.sum(c, 0)  # [EB] rows of expert e over all sources
    in_r = (e // G == s) & (e < E)  # [NB, EB], reading s as a receiver index
    rows_R = tl.sum(tl.where(in_r, tot[None, :], 0), 1)  # [NB] rows each receiver gets
    start_R = tl.cumsum(rows_R, 0) - rows_R
    block_start = tl.sum(
        tl.where(in_r, start_R[:, None], 0), 0
    )  # [EB] receiver's first row, globally
    base = tl.cumsum(tot, 0) - tot - block_start  # [EB] first row of expert e at its receiver
    src_prefix = tl.sum(tl.where(s < me, c, 0), 0)  # [EB] rows lower sources send before mine
    ev = tl.arange(0, EB)
    tl.store(offs_ptr + ev, base + src_prefix, mask=ev < E)
    rv = tl.arange(0, NB)
    over = ((rows_R > capacity) & (rv < N)).to(tl.int32)
    tl.store(overflow_ptr + rv, over, mask=rv < N)
    my_over = tl.sum(tl.where(rv == me, over, 0), 0)
    mine = (ev >= me * G) & (ev < me * G + G)
    tl.store(counts_G_ptr + ev - me * G, tl.where(my_over > 0, 0, tot), mask=mine)
    seg_start = base[None, :] + tl.cumsum(c, 0) - c
    seg_len = tl.where(my_over > 0, 0, c)
    mine2 = inb & (e >= me * G) & (e < me * G + G)
    tl.store(seg_ptr + s * G + (e - me * G), seg_start, mask=mine2)
    tl.store(seg_ptr + N * G + s * G + (e - me * G), seg_len, mask=mine2)
    if tl.max(over, 0) > 0:
        if tl.atomic_or(err_ptr, BUFFER_OVERFLOW_BIT) == 0:
            tl.store(err_ptr + 1, step)


@triton.jit
def push_slots_kernel(
    src_ptr,
    scale_ptr,
    idx_ptr,
    rank_ptr,
    offs_ptr,
    overflow_ptr,
    dest_rank_ptr,
    dest_pos_ptr,
    peer_rows_addr_ptr,
    own_out_ptr,
    peer_meta_addr_ptr,
    via_put_ptr,
    me,
    G,
    K,
    H,
    S,
    COMPUTE_DEST: tl.constexpr,
    SCALE: tl.constexpr,
    HAS_PUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (slot, chunk): row src[slot // K] (times scale[slot] if SCALE) -> row dest_pos of PE
    dest_rank: this PE's own rows into own_out, a peer's into its symmetric staging, with the slot
    id beside it (the receiver sends the expert's answer back to that slot). COMPUTE_DEST: the
    destination comes from the expert id, the slot's rank within its expert and offs_E (and is saved
    for later calls); otherwise it is read from dest_rank/dest_pos. HAS_PUT: rows for put peers
    (via_put) are left to put_rows_kernel. Persistent: the grid's programs (at most num_comm_sms)
    take the S * chunks work items in turn."""
    chunks = tl.cdiv(H, BLOCK)
    for w in range(tl.program_id(0), S * chunks, tl.num_programs(0)):
        _push_slot(
            src_ptr, scale_ptr, idx_ptr, rank_ptr, offs_ptr, overflow_ptr, dest_rank_ptr,
            dest_pos_ptr, peer_rows_addr_ptr, own_out_ptr, peer_meta_addr_ptr, via_put_ptr, me, G,
            K, H, w // chunks, w % chunks, COMPUTE_DEST, SCALE, HAS_PUT, BLOCK,
        )  # fmt: skip


@triton.jit
def _push_slot(
    src_ptr, scale_ptr, idx_ptr, rank_ptr, offs_ptr, overflow_ptr, dest_rank_ptr, dest_pos_ptr,
    peer_rows_addr_ptr, own_out_ptr, peer_meta_addr_ptr, via_put_ptr, me, G, K, H, slot, chunk,
    COMPUTE_DEST: tl.constexpr, SCALE: tl.constexpr, HAS_PUT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    if COMPUTE_DEST:
        e = tl.load(idx_ptr + slot)
        r = tl.maximum(e, 0) // G
        ok = (e >= 0) & (tl.load(overflow_ptr + r) == 0)
        pos = tl.load(offs_ptr + tl.maximum(e, 0)) + tl.load(rank_ptr + slot)
        r = tl.where(ok, r, -1)
        pos = tl.where(ok, pos, 0)
        if chunk == 0:
            tl.store(dest_rank_ptr + slot, r.to(tl.int64))
            tl.store(dest_pos_ptr + slot, pos)
    else:
        r = tl.load(dest_rank_ptr + slot)
        pos = tl.load(dest_pos_ptr + slot)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    m = (offs < H) & (r >= 0)
    vals = tl.load(src_ptr + (slot // K).to(tl.int64) * H + offs, mask=m)
    if SCALE:
        vals = (vals.to(tl.float32) * tl.load(scale_ptr + slot).to(tl.float32)).to(vals.dtype)
    if r == me:
        tl.store(own_out_ptr + pos * H + offs, vals, mask=m)
    else:
        direct = r >= 0
        if HAS_PUT:
            direct = direct & (tl.load(via_put_ptr + tl.maximum(r, 0)) == 0)
        if direct:
            peer = tl.load(peer_rows_addr_ptr + r).to(tl.pointer_type(src_ptr.dtype.element_ty))
            tl.store(peer + pos * H + offs, vals, mask=m)
            if chunk == 0:
                meta = tl.load(peer_meta_addr_ptr + r).to(tl.pointer_type(tl.int64))
                tl.store(meta + pos, slot.to(tl.int64))


@triton.jit
def copy_segments_kernel(
    staging_ptr,
    out_ptr,
    staging_meta_ptr,
    out_meta_ptr,
    seg_ptr,
    me,
    N,
    G,
    H,
    HAS_META: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (segment, j, chunk): rows that source s wrote for local expert g into the staging
    move to the regular output (autograd may keep it past the staging's reuse two calls later). Own
    rows were written in place. The segment's rows are shared among SPLIT programs, row j, j+SPLIT,
    ... Persistent: the grid's programs take the N*G * SPLIT * chunks work items in turn."""
    chunks = tl.cdiv(H, BLOCK)
    for w in range(tl.program_id(0), N * G * SPLIT * chunks, tl.num_programs(0)):
        seg = w // (SPLIT * chunks)
        j = (w // chunks) % SPLIT
        chunk = w % chunks
        src = seg // G
        if src != me:
            start = tl.load(seg_ptr + seg)
            length = tl.load(seg_ptr + N * G + seg)
            offs = chunk * BLOCK + tl.arange(0, BLOCK)
            m = offs < H
            for i in range(j, length.to(tl.int32), SPLIT):
                row = start + i
                vals = tl.load(staging_ptr + row * H + offs, mask=m)
                tl.store(out_ptr + row * H + offs, vals, mask=m)
                if HAS_META:
                    if chunk == 0:
                        tl.store(out_meta_ptr + row, tl.load(staging_meta_ptr + row))


@triton.jit
def return_segments_kernel(
    rows_ptr,
    slot_of_row_ptr,
    seg_ptr,
    peer_ret_addr_ptr,
    via_put_ptr,
    me,
    N,
    G,
    H,
    SPLIT: tl.constexpr,
    HAS_PUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (segment, j, chunk): rows the experts here computed for a peer's slots go back into
    that peer's return staging at the slot's index. Rows of this PE's own slots stay where they are:
    the owner's gather reads them in place. HAS_PUT: segments of put peers are left to
    put_return_kernel. Persistent: the grid's programs take the N*G * SPLIT * chunks work items
    in turn."""
    chunks = tl.cdiv(H, BLOCK)
    for w in range(tl.program_id(0), N * G * SPLIT * chunks, tl.num_programs(0)):
        seg = w // (SPLIT * chunks)
        j = (w // chunks) % SPLIT
        chunk = w % chunks
        src = seg // G
        direct = src != me
        if HAS_PUT:
            direct = direct & (tl.load(via_put_ptr + src) == 0)
        if direct:
            start = tl.load(seg_ptr + seg)
            length = tl.load(seg_ptr + N * G + seg)
            dst = tl.load(peer_ret_addr_ptr + src).to(tl.pointer_type(rows_ptr.dtype.element_ty))
            offs = chunk * BLOCK + tl.arange(0, BLOCK)
            m = offs < H
            for i in range(j, length.to(tl.int32), SPLIT):
                row = start + i
                slot = tl.load(slot_of_row_ptr + row)
                vals = tl.load(rows_ptr + row * H + offs, mask=m)
                tl.store(dst + slot * H + offs, vals, mask=m)


@triton.jit
def gather_reduce_kernel(
    own_rows_ptr,
    staging_ptr,
    dest_rank_ptr,
    dest_pos_ptr,
    w_ptr,
    out_ptr,
    slots_out_ptr,
    me,
    K,
    H,
    T,
    HAS_W: tl.constexpr,
    KEEP_SLOTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (token, chunk): out[t] = sum_k w[t, k] * row(t, k) in float32, where row(t, k) is
    read in place from own_rows (this PE's experts) or from the return staging (a peer's), and is
    exactly 0 for a slot that was never sent (unused, dropped by overflow) whatever its weight.
    KEEP_SLOTS also stores each row(t, k) (the weights' gradient needs them). Persistent: the
    grid's programs take the T * chunks work items in turn."""
    chunks = tl.cdiv(H, BLOCK)
    for item in range(tl.program_id(0), T * chunks, tl.num_programs(0)):
        t = item // chunks
        offs = (item % chunks) * BLOCK + tl.arange(0, BLOCK)
        m = offs < H
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(K):
            slot = (t * K + k).to(tl.int64)
            r = tl.load(dest_rank_ptr + slot)
            pos = tl.load(dest_pos_ptr + slot)
            v_own = tl.load(own_rows_ptr + pos * H + offs, mask=m & (r == me), other=0.0)
            peer_m = m & (r >= 0) & (r != me)
            v = v_own + tl.load(staging_ptr + slot * H + offs, mask=peer_m, other=0.0)
            if KEEP_SLOTS:
                tl.store(slots_out_ptr + slot * H + offs, v, mask=m)
            if HAS_W:
                w = tl.where(r >= 0, tl.load(w_ptr + slot).to(tl.float32), 0.0)
                acc += v.to(tl.float32) * w
            else:
                acc += v.to(tl.float32)
        tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


def row_chunks(H: int) -> int:
    return triton.cdiv(H, ROW_BLOCK)


# No bound by default: on the H200 a 24-program grid made a 4096 x 7168 top-8 round trip 4x
# slower, 8 programs 11x (benchmarks/results/transport_1pe_h200.json); a bound pays only once the
# kernels keep enough bytes in flight per program.
DEFAULT_COMM_SMS = None


def comm_grid(work_items: int, num_comm_sms: int | None) -> tuple[int]:
    """The grid of a persistent communication kernel: one program per work item, at most
    num_comm_sms (None: no bound), at least one (a kernel with no work still launches cheaply)."""
    n = work_items if num_comm_sms is None else min(work_items, num_comm_sms)
    return (max(1, n),)
