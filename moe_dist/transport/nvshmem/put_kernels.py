"""The put-with-signal path: peers that loads and stores cannot reach (no NVLink/P2P path between
the GPUs, or every peer under NvshmemOptions(peer_path="put")) get their rows and flags through
NVSHMEM's device API.

These kernels run beside the P2P ones of kernels.py, which skip put peers (HAS_PUT), and keep the
same message order (PROTOCOL.md): rows first, then the flag, and receivers wait on the same flags
and read the same staging. A put's source must be symmetric memory on a network transport, so rows
are first copied into this PE's symmetric send buffer, then put from there (non-blocking). Every put
of a call is complete before its flag goes out: put_signal_kernel calls nvshmem_quiet first (the
count exchange, this PE's row of header and counts, rides with its flag in one putmem_signal), and
the send buffer is not written again before that. Unlike the flag waits, a put to a peer that is
gone has no time limit: over a network a lost put peer can stall the stream instead of raising
PeerTimeout. Addresses are int64 symmetric addresses on this PE; NVSHMEM maps them to the peer."""

from __future__ import annotations

import triton
import triton.language as tl

from .dedup_kernels import pairs_with_slots_here, peer_pairs_block, row_of_block
from .device_lib import put_block_nbi, put_signal_block, quiet, signal_set


@triton.jit
def put_signal_kernel(
    via_put_ptr,
    peer_pe_ptr,
    me,
    epoch_ptr,
    flag_addr,
    payload_addr,
    payload_bytes,
    BUMP: tl.constexpr,
    HAS_PAYLOAD: tl.constexpr,
):
    """Program q (a put peer): once this PE's earlier puts are complete, flag[me] = epoch on PE q,
    after the payload when there is one (COUNT: this PE's row of the count exchange, its call
    header then its counts, at the same symmetric address on PE q). Launched before
    signal_and_wait, whose BUMP stores the epoch this reads as epoch + BUMP."""
    q = tl.program_id(0)
    if (q != me) & (tl.load(via_put_ptr + q) != 0):
        epoch = tl.load(epoch_ptr)
        if BUMP:
            epoch += 1
        pe = tl.load(peer_pe_ptr + q)
        quiet()
        sig = flag_addr + me * 8
        if HAS_PAYLOAD:
            put_signal_block(payload_addr, payload_addr, payload_bytes, sig, epoch, pe)
        else:
            signal_set(sig, epoch, pe)


@triton.jit
def put_rows_kernel(
    src_ptr,
    scale_ptr,
    dest_rank_ptr,
    dest_pos_ptr,
    via_put_ptr,
    peer_pe_ptr,
    send_addr,
    send_meta_addr,
    staging_addr,
    staging_meta_addr,
    K,
    H,
    S,
    SCALE: tl.constexpr,
    HAS_META: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (slot, chunk), dispatch direction, for a slot whose receiver is a put peer: row
    src[slot // K] (times scale[slot]) -> send buffer row `slot` -> the receiver's staging at
    dest_pos, with the slot id beside it (HAS_META). push_slots_kernel has stored the destinations.
    Persistent: the grid's programs (at most num_comm_sms) take the S * chunks items in turn.
    """
    chunks = tl.cdiv(H, BLOCK)
    for w in range(tl.program_id(0), S * chunks, tl.num_programs(0)):
        _put_row(
            src_ptr, scale_ptr, dest_rank_ptr, dest_pos_ptr, via_put_ptr, peer_pe_ptr, send_addr,
            send_meta_addr, staging_addr, staging_meta_addr, K, H, w // chunks, w % chunks,
            SCALE, HAS_META, BLOCK,
        )  # fmt: skip


@triton.jit
def _put_row(
    src_ptr, scale_ptr, dest_rank_ptr, dest_pos_ptr, via_put_ptr, peer_pe_ptr, send_addr,
    send_meta_addr, staging_addr, staging_meta_addr, K, H, slot, chunk,
    SCALE: tl.constexpr, HAS_META: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    slot = slot.to(tl.int64)  # byte offsets below pass 2**31 for large buffers
    r = tl.load(dest_rank_ptr + slot)
    if r >= 0:
        if tl.load(via_put_ptr + r) != 0:
            pos = tl.load(dest_pos_ptr + slot)
            elem = src_ptr.dtype.element_ty.primitive_bitwidth // 8
            offs = chunk * BLOCK + tl.arange(0, BLOCK)
            m = offs < H
            vals = tl.load(src_ptr + (slot // K).to(tl.int64) * H + offs, mask=m)
            if SCALE:
                vals = (vals.to(tl.float32) * tl.load(scale_ptr + slot).to(tl.float32)).to(
                    vals.dtype
                )
            send = send_addr.to(tl.pointer_type(src_ptr.dtype.element_ty))
            tl.store(send + slot * H + offs, vals, mask=m)
            if HAS_META:
                if chunk == 0:
                    tl.store(send_meta_addr.to(tl.pointer_type(tl.int64)) + slot, slot.to(tl.int64))
            # the whole program's stores are in the send buffer before the put reads it
            tl.debug_barrier()
            pe = tl.load(peer_pe_ptr + r).to(tl.int32)
            n = tl.minimum(BLOCK, H - chunk * BLOCK)
            first = chunk * BLOCK
            put_block_nbi(
                staging_addr + (pos * H + first) * elem,
                send_addr + (slot * H + first) * elem,
                n * elem,
                pe,
            )
            if HAS_META:
                if chunk == 0:
                    put_block_nbi(staging_meta_addr + pos * 8, send_meta_addr + slot * 8, 8, pe)


@triton.jit
def put_return_kernel(
    rows_ptr,
    slot_of_row_ptr,
    seg_ptr,
    via_put_ptr,
    peer_pe_ptr,
    send_addr,
    ret_addr,
    me,
    N,
    G,
    H,
    SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (segment, j, chunk), combine direction, for segments whose source is a put peer: each
    row the experts here computed for that peer -> send buffer (same row) -> the peer's return
    staging at the slot id it came with (rows j, j + SPLIT, ... of the segment). Persistent: the
    grid's programs take the N*G * SPLIT * chunks items in turn."""
    chunks = tl.cdiv(H, BLOCK)
    for w in range(tl.program_id(0), N * G * SPLIT * chunks, tl.num_programs(0)):
        seg = w // (SPLIT * chunks)
        j = (w // chunks) % SPLIT
        chunk = w % chunks
        src = seg // G
        if (src != me) & (tl.load(via_put_ptr + src) != 0):
            start = tl.load(seg_ptr + seg)
            length = tl.load(seg_ptr + N * G + seg)
            pe = tl.load(peer_pe_ptr + src).to(tl.int32)
            elem = rows_ptr.dtype.element_ty.primitive_bitwidth // 8
            send = send_addr.to(tl.pointer_type(rows_ptr.dtype.element_ty))
            offs = chunk * BLOCK + tl.arange(0, BLOCK)
            m = offs < H
            n = tl.minimum(BLOCK, H - chunk * BLOCK)
            first = chunk * BLOCK
            for i in range(j, length.to(tl.int32), SPLIT):
                row = start + i
                slot = tl.load(slot_of_row_ptr + row)
                vals = tl.load(rows_ptr + row * H + offs, mask=m)
                tl.store(send + row * H + offs, vals, mask=m)
                tl.debug_barrier()
                put_block_nbi(
                    ret_addr + (slot * H + first) * elem,
                    send_addr + (row * H + first) * elem,
                    n * elem,
                    pe,
                )


# -- the deduplicated path (DEDUP.md "Put peers"): push_pairs_kernel / reduce_pairs_kernel have put
# a put peer's pairs into this PE's symmetric send staging (pair_send_*, row = the peer's row of
# Q); these kernels carry exactly those rows, whole, to the pair staging's row on that peer.


@triton.jit
def put_pairs_kernel(
    dest_rank_ptr,
    via_put_ptr,
    peer_pe_ptr,
    send_rows_addr,
    send_scales_addr,
    send_meta_addr,
    send_w_addr,
    rows_addr,
    scales_addr,
    meta_addr,
    w_addr,
    me,
    T,
    K,
    H,
    T_max,
    row_bytes,
    HAS_SCALES: tl.constexpr,
    HAS_META: tl.constexpr,
    KB: tl.constexpr,
):
    """Item: token t, dispatch direction. For each put peer r that t's slots chose (once per r, as
    push_pairs_kernel): send staging row r * T_max + t -> PE r's pair staging row me * T_max + t:
    the row (row_bytes), its fp8 scales (HAS_SCALES), meta row (stamp, positions) and, with
    HAS_META, the slots' weights. Only rows that carry a pair move."""
    kk = tl.arange(0, KB)
    km = kk < K
    SC = tl.cdiv(H, 128)
    for item in range(tl.program_id(0), T, tl.num_programs(0)):
        t = tl.cast(item, tl.int64)  # byte offsets below pass 2**31 for large buffers
        r_vec = tl.load(dest_rank_ptr + t * K + kk, mask=km, other=-1)
        for k in range(K):
            r = tl.sum(tl.where(kk == k, r_vec, 0), 0)
            lead = (r >= 0) & (tl.sum(tl.where((kk < k) & (r_vec == r), 1, 0), 0) == 0)
            if lead & (r != me):
                if tl.load(via_put_ptr + r) != 0:
                    pe = tl.load(peer_pe_ptr + r).to(tl.int32)
                    src = r * T_max + t
                    dst = me * T_max + t
                    put_block_nbi(rows_addr + dst * row_bytes, send_rows_addr + src * row_bytes,
                                  row_bytes, pe)  # fmt: skip
                    put_block_nbi(meta_addr + dst * (K + 1) * 8,
                                  send_meta_addr + src * (K + 1) * 8, (K + 1) * 8, pe)  # fmt: skip
                    if HAS_SCALES:
                        put_block_nbi(scales_addr + dst * SC * 4, send_scales_addr + src * SC * 4,
                                      SC * 4, pe)  # fmt: skip
                    if HAS_META:
                        put_block_nbi(w_addr + dst * K * 4, send_w_addr + src * K * 4, K * 4, pe)


@triton.jit
def put_pair_returns_kernel(
    local_meta_ptr,
    via_put_ptr,
    peer_pe_ptr,
    send_rows_addr,
    send_w_addr,
    ret_addr,
    ret_w_addr,
    me,
    K,
    H,
    T_max,
    Q,
    row_bytes,
    SEND_W: tl.constexpr,
    KB: tl.constexpr,
    RB: tl.constexpr,
):
    """Item: a block of RB staged pairs of peers (reduce_pairs_kernel's blocks), combine direction:
    each pair q with slots here whose owner (q // T_max) is a put peer: send staging row q -> the
    owner's return staging row me * T_max + q % T_max (with SEND_W, its K weight gradients into
    the owner's ret_w). Pairs with no slot here were not sent and do not move."""
    for blk in range(tl.program_id(0), tl.cdiv(Q - T_max, RB), tl.num_programs(0)):
        in_range, q_vec = peer_pairs_block(blk, me, T_max, Q, RB)
        has_vec = pairs_with_slots_here(local_meta_ptr, in_range, q_vec, K, KB)
        put_vec = tl.load(via_put_ptr + q_vec // T_max, mask=in_range, other=0)
        send_vec = ((has_vec != 0) & (put_vec != 0)).to(tl.int32)
        if tl.max(send_vec, 0) > 0:
            for j in range(RB):
                if row_of_block(send_vec, j, RB) > 0:
                    q = row_of_block(q_vec, j, RB)
                    owner = q // T_max
                    pe = tl.load(peer_pe_ptr + owner).to(tl.int32)
                    dst = me * T_max + q % T_max
                    put_block_nbi(ret_addr + dst * row_bytes, send_rows_addr + q * row_bytes,
                                  row_bytes, pe)  # fmt: skip
                    if SEND_W:
                        put_block_nbi(ret_w_addr + dst * K * 4, send_w_addr + q * K * 4, K * 4,
                                      pe)  # fmt: skip
