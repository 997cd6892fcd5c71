"""The deduplicated data path of the nvshmem transport: each token crosses to a PE once, however
many of its K experts live there (DEDUP.md beside this file gives the layout and message order).

Pair staging, per PE and parity: row `src * T_max + t` holds token t of PE `src` (at most one row
per (token, PE), so the layout needs no pair counts and never overflows), with its meta row
[stamp, pos_0 .. pos_{K-1}] (stamp = the call's epoch, so rows of earlier calls are never read;
pos_k = the expert-major row of slot k at this receiver, -1 for slots bound elsewhere) and the
slots' combine weights. Rows of a PE's own slots never touch the staging.

dispatch: slot_destinations -> push_pairs (one row per (token, peer); own slots in place) -> flag,
          wait -> expand_pairs (each staged row to its slots' expert-major rows; meta kept)
The receiver does not know which tokens a peer sent, so expand and reduce walk all (N-1) * T_max
peer rows in blocks of ROW_SCAN rows (one vector load of their stamps or kept positions), and skip
those not of this call: a block past every peer's tokens costs one load.
combine:  reduce_pairs (per staged pair: sum_k w_k y[pos_k] in float32, one row to the owner's
          return staging at row `me * T_max + t`) -> flag, wait -> gather_pairs (own slots'
          weighted rows + one partial per peer PE)
backward: combine's gradient travels like a dispatch (push_pairs, expand scaled by the weights);
          dispatch's like a combine (reduce_pairs and gather_pairs with w = 1).
fp8: the sender quantises rows in torch (fp8.quantize_rows: e4m3 + a float32 scale per 128
channels), push_pairs moves the bytes and scales, expand_pairs dequantises; own rows stay exact.

Every kernel is persistent: a grid of at most num_comm_sms programs walks the work items.
Legend: T tokens, K slots/token (KB its power of two), S = T*K, N PEs, H hidden, Q = N*T_max
staged rows, SC = H/128 scale columns.
"""

from __future__ import annotations

import triton
import triton.language as tl

FP8_BLOCK = tl.constexpr(128)
ROW_SCAN = 64  # staged rows whose stamps one program reads at once (expand, reduce)


@triton.jit
def slot_destinations_kernel(
    idx_ptr, rank_ptr, offs_ptr, overflow_ptr, dest_rank_ptr, dest_pos_ptr, G, S
):
    """Per slot: receiving PE (-1: unused, or its receiver overflowed) and expert-major row there
    (offs_E[e] + the slot's rank within its expert): the layout of push_slots_kernel."""
    for s in range(tl.program_id(0), S, tl.num_programs(0)):
        e = tl.load(idx_ptr + s)
        r = tl.maximum(e, 0) // G
        ok = (e >= 0) & (tl.load(overflow_ptr + r) == 0)
        pos = tl.load(offs_ptr + tl.maximum(e, 0)) + tl.load(rank_ptr + s)
        tl.store(dest_rank_ptr + s, tl.where(ok, r, -1).to(tl.int64))
        tl.store(dest_pos_ptr + s, tl.where(ok, pos, 0).to(tl.int64))


@triton.jit
def _pair_dest(peer_addr_ptr, send_addr, r, put, HAS_PUT: tl.constexpr):
    """Where a pair for PE r is stored: this PE's send staging for a put peer (put_kernels.py
    carries it on), else PE r's buffer through its nvshmem_ptr address."""
    addr = tl.load(peer_addr_ptr + r)
    if HAS_PUT:
        addr = tl.where(put, send_addr.to(tl.int64), addr)
    return addr


@triton.jit
def push_pairs_kernel(
    src_ptr,
    own_src_ptr,
    scales_ptr,
    w_ptr,
    dest_rank_ptr,
    dest_pos_ptr,
    peer_rows_addr_ptr,
    peer_scales_addr_ptr,
    peer_meta_addr_ptr,
    peer_w_addr_ptr,
    own_out_ptr,
    epoch_ptr,
    sent_ptr,
    via_put_ptr,
    send_rows_addr,
    send_scales_addr,
    send_meta_addr,
    send_w_addr,
    me,
    T,
    K,
    H,
    T_max,
    EPOCH_AHEAD: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    HAS_META: tl.constexpr,
    SCALE_OWN: tl.constexpr,
    HAS_PUT: tl.constexpr,
    KB: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Item (token t, chunk): for each PE that t's slots chose, once: row src[t] (fp8 bytes and
    scales with HAS_SCALES) -> that PE's pair staging at row me * T_max + t, with the meta row
    (stamp = epoch (+1 when EPOCH_AHEAD: the call's epoch is bumped by its first flag, which comes
    after), the slots' positions there) and, with HAS_META, the slots' weights. Own slots: row
    own_src[t] (times w[t, k] with SCALE_OWN) straight into own_out at each slot's position.
    sent[r] counts the rows sent to PE r (the transport's counter; no host sync).
    HAS_PUT: a put peer r (via_put[r]) has no address; its pair goes to this PE's symmetric send
    staging (send_*_addr) at row r * T_max + t instead, for put_pairs_kernel to carry."""
    SPB: tl.constexpr = BLOCK // FP8_BLOCK
    chunks = tl.cdiv(H, BLOCK)
    kk = tl.arange(0, KB)
    km = kk < K
    for item in range(tl.program_id(0), T * chunks, tl.num_programs(0)):
        t = (item // chunks).to(tl.int64)
        chunk = item % chunks
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        m = offs < H
        r_vec = tl.load(dest_rank_ptr + t * K + kk, mask=km, other=-1)
        p_vec = tl.load(dest_pos_ptr + t * K + kk, mask=km, other=0)
        # each row read once per item, and not at all where no slot needs it
        any_own = tl.sum(((r_vec == me) & km).to(tl.int32), 0) > 0
        any_peer = tl.sum(((r_vec >= 0) & (r_vec != me) & km).to(tl.int32), 0) > 0
        vals = tl.load(src_ptr + t * H + offs, mask=m & any_peer)
        own_row = tl.load(own_src_ptr + t * H + offs, mask=m & any_own)
        for k in range(K):
            r = tl.sum(tl.where(kk == k, r_vec, 0), 0)
            pos = tl.sum(tl.where(kk == k, p_vec, 0), 0)
            if r == me:
                own = own_row
                if SCALE_OWN:
                    wk = tl.load(w_ptr + t * K + k).to(tl.float32)
                    own = (own.to(tl.float32) * wk).to(own.dtype)
                tl.store(own_out_ptr + pos * H + offs, own.to(own_out_ptr.dtype.element_ty), mask=m)
            else:
                lead = (r >= 0) & (tl.sum(tl.where((kk < k) & (r_vec == r), 1, 0), 0) == 0)
                if lead:  # the first slot of t bound for PE r carries the row
                    row = me * T_max + t
                    put = False
                    if HAS_PUT:
                        put = tl.load(via_put_ptr + r) != 0
                        row = tl.where(put, r * T_max + t, row)
                    rows = _pair_dest(peer_rows_addr_ptr, send_rows_addr, r, put, HAS_PUT).to(
                        tl.pointer_type(src_ptr.dtype.element_ty)
                    )
                    tl.store(rows + row * H + offs, vals, mask=m)
                    if HAS_SCALES:
                        c = chunk * SPB + tl.arange(0, SPB)
                        cm = c < tl.cdiv(H, FP8_BLOCK)
                        SC = tl.cdiv(H, FP8_BLOCK)
                        sc_src = tl.load(scales_ptr + t * SC + c, mask=cm)
                        sc_dst = _pair_dest(peer_scales_addr_ptr, send_scales_addr, r, put, HAS_PUT)
                        tl.store(sc_dst.to(tl.pointer_type(tl.float32)) + row * SC + c, sc_src,
                                 mask=cm)  # fmt: skip
                    if chunk == 0:
                        tl.atomic_add(sent_ptr + r, 1)
                        meta = _pair_dest(peer_meta_addr_ptr, send_meta_addr, r, put, HAS_PUT).to(
                            tl.pointer_type(tl.int64)
                        )
                        here = r_vec == r
                        tl.store(meta + row * (K + 1) + 1 + kk, tl.where(here, p_vec, -1), mask=km)
                        if HAS_META:
                            w_vec = tl.load(w_ptr + t * K + kk, mask=km, other=0.0)
                            pw = _pair_dest(peer_w_addr_ptr, send_w_addr, r, put, HAS_PUT).to(
                                tl.pointer_type(tl.float32)
                            )
                            tl.store(pw + row * K + kk, tl.where(here, w_vec, 0.0), mask=km)
                        stamp = tl.load(epoch_ptr)
                        if EPOCH_AHEAD:
                            stamp += 1
                        tl.store(meta + row * (K + 1), stamp)


@triton.jit
def row_of_block(vec, j, RB: tl.constexpr):
    """Element j of a [RB] vector, as a scalar (no memory access)."""
    return tl.sum(tl.where(tl.arange(0, RB) == j, vec, 0), 0)


@triton.jit
def pairs_with_slots_here(local_meta_ptr, in_range, q_vec, K, KB: tl.constexpr):
    """[RB] int32: 1 where staged pair q kept a slot on this PE (a position >= 0 in local_meta),
    the pairs that reduce and return."""
    kk = tl.arange(0, KB)
    pos2 = tl.load(local_meta_ptr + q_vec[:, None] * K + kk[None, :],
                   mask=in_range[:, None] & (kk < K)[None, :], other=-1)  # fmt: skip
    return (tl.max(pos2, 1) >= 0).to(tl.int32)


@triton.jit
def peer_pairs_block(blk, me, T_max, Q, RB: tl.constexpr):
    """Block blk of the staged rows of peers, this PE's own block of T_max rows skipped:
    (in_range [RB], q_vec [RB] int64 staged rows). Expand, reduce and the return puts walk the
    same blocks."""
    i_vec = blk * RB + tl.arange(0, RB)
    in_range = i_vec < Q - T_max
    q_vec = (i_vec + tl.where(i_vec >= me * T_max, T_max, 0)).to(tl.int64)
    return in_range, q_vec


@triton.jit
def expand_pairs_kernel(
    staging_ptr,
    staging_scales_ptr,
    staging_meta_ptr,
    staging_w_ptr,
    out_ptr,
    local_meta_ptr,
    local_w_ptr,
    y_ptr,
    grad_lw_ptr,
    epoch_ptr,
    me,
    K,
    H,
    T_max,
    Q,
    HAS_SCALES: tl.constexpr,
    KEEP_META: tl.constexpr,
    SCALE: tl.constexpr,
    DOTS: tl.constexpr,
    KB: tl.constexpr,
    RB: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Item: a block of RB staged rows of peers (q // T_max != me), their stamps read at once (a
    block with no row of this call costs one load); each row of this call (stamp == epoch) goes
    to the expert-major rows of its slots (dequantised with HAS_SCALES; times the slot's weight
    from local_w with SCALE). KEEP_META (forward): every peer row's positions (-1 for rows not of
    this call) and weights are kept in local_meta / local_w for the combine and the backward (the
    caller fills own rows with -1). DOTS (backward of the combine, the staged row being the output
    gradient g[t]): grad_lw[q, k] = <y[pos_k], g[t]> in float32, the gradient of slot k's weight
    (the caller zeroes grad_lw)."""
    chunks = tl.cdiv(H, BLOCK)
    kk = tl.arange(0, KB)
    km = kk < K
    epoch = tl.load(epoch_ptr)
    for blk in range(tl.program_id(0), tl.cdiv(Q - T_max, RB), tl.num_programs(0)):
        in_range, q_vec = peer_pairs_block(blk, me, T_max, Q, RB)
        stamps = tl.load(staging_meta_ptr + q_vec * (K + 1), mask=in_range, other=-1)
        valid_vec = in_range & (stamps == epoch)
        if KEEP_META:
            m2 = valid_vec[:, None] & km[None, :]
            pos2 = tl.load(staging_meta_ptr + q_vec[:, None] * (K + 1) + 1 + kk[None, :], mask=m2,
                           other=-1)  # fmt: skip
            w2 = tl.load(staging_w_ptr + q_vec[:, None] * K + kk[None, :], mask=m2, other=0.0)
            st2 = in_range[:, None] & km[None, :]
            tl.store(local_meta_ptr + q_vec[:, None] * K + kk[None, :], pos2, mask=st2)
            tl.store(local_w_ptr + q_vec[:, None] * K + kk[None, :], w2, mask=st2)
        if tl.max(valid_vec.to(tl.int32), 0) > 0:
            for j in range(RB):
                if row_of_block(valid_vec.to(tl.int32), j, RB) > 0:
                    q = row_of_block(q_vec, j, RB)
                    p_vec = tl.load(staging_meta_ptr + q * (K + 1) + 1 + kk, mask=km, other=-1)
                    dots = tl.zeros([KB], dtype=tl.float32)
                    for chunk in range(chunks):
                        offs = chunk * BLOCK + tl.arange(0, BLOCK)
                        m = offs < H
                        vals = tl.load(staging_ptr + q * H + offs, mask=m, other=0.0)
                        vals = vals.to(tl.float32)
                        if HAS_SCALES:
                            SC = tl.cdiv(H, FP8_BLOCK)
                            sc = tl.load(staging_scales_ptr + q * SC + offs // FP8_BLOCK, mask=m)
                            vals = vals * sc
                        for k in range(K):
                            pos = tl.sum(tl.where(kk == k, p_vec, 0), 0)
                            if pos >= 0:
                                v = vals
                                if SCALE:
                                    v = v * tl.load(local_w_ptr + q * K + k)
                                dst = out_ptr + pos * H + offs
                                tl.store(dst, v.to(out_ptr.dtype.element_ty), mask=m)
                                if DOTS:
                                    y = tl.load(y_ptr + pos * H + offs, mask=m, other=0.0)
                                    dot = tl.sum(y.to(tl.float32) * vals, 0)
                                    dots += tl.where(kk == k, dot, 0.0)
                    if DOTS:
                        tl.store(grad_lw_ptr + q * K + kk, dots, mask=km)


@triton.jit
def reduce_pairs_kernel(
    rows_ptr,
    local_meta_ptr,
    local_w_ptr,
    peer_ret_addr_ptr,
    grad_lw_ptr,
    peer_ret_w_addr_ptr,
    via_put_ptr,
    send_rows_addr,
    send_w_addr,
    me,
    K,
    H,
    T_max,
    Q,
    HAS_W: tl.constexpr,
    SEND_W: tl.constexpr,
    HAS_PUT: tl.constexpr,
    KB: tl.constexpr,
    RB: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Item: a block of RB staged rows of peers, at the expert PE (their kept positions read at
    once): for each pair q with slots here, sum_k w_k * rows[pos_k] in float32 (w = 1 without
    HAS_W), as ONE row into the owner's return staging at row me * T_max + t (owner = q // T_max,
    t = q % T_max). SEND_W (backward of the dispatch): the pair's K weight gradients grad_lw[q] go
    beside it, into the owner's ret_w. HAS_PUT: for an owner that is a put peer, row q of this PE's
    send staging instead (put_pair_returns_kernel carries it on)."""
    chunks = tl.cdiv(H, BLOCK)
    kk = tl.arange(0, KB)
    km = kk < K
    for blk in range(tl.program_id(0), tl.cdiv(Q - T_max, RB), tl.num_programs(0)):
        in_range, q_vec = peer_pairs_block(blk, me, T_max, Q, RB)
        has_vec = pairs_with_slots_here(local_meta_ptr, in_range, q_vec, K, KB)
        if tl.max(has_vec, 0) > 0:
            for j in range(RB):
                if row_of_block(has_vec, j, RB) > 0:
                    q = row_of_block(q_vec, j, RB)
                    p_vec = tl.load(local_meta_ptr + q * K + kk, mask=km, other=-1)
                    owner = q // T_max
                    row = me * T_max + q % T_max
                    put = False
                    if HAS_PUT:
                        put = tl.load(via_put_ptr + owner) != 0
                        row = tl.where(put, q, row)
                    dst = _pair_dest(peer_ret_addr_ptr, send_rows_addr, owner, put, HAS_PUT).to(
                        tl.pointer_type(rows_ptr.dtype.element_ty)
                    )
                    for chunk in range(chunks):
                        offs = chunk * BLOCK + tl.arange(0, BLOCK)
                        m = offs < H
                        acc = tl.zeros([BLOCK], dtype=tl.float32)
                        for k in range(K):
                            pos = tl.sum(tl.where(kk == k, p_vec, 0), 0)
                            if pos >= 0:
                                v = tl.load(rows_ptr + pos * H + offs, mask=m, other=0.0)
                                v = v.to(tl.float32)
                                if HAS_W:
                                    v = v * tl.load(local_w_ptr + q * K + k)
                                acc += v
                        tl.store(dst + row * H + offs, acc.to(rows_ptr.dtype.element_ty), mask=m)
                    if SEND_W:
                        gw = tl.load(grad_lw_ptr + q * K + kk, mask=km, other=0.0)
                        dst_w = _pair_dest(
                            peer_ret_w_addr_ptr, send_w_addr, owner, put, HAS_PUT
                        ).to(tl.pointer_type(tl.float32))
                        tl.store(dst_w + row * K + kk, gw, mask=km)


@triton.jit
def gather_pairs_kernel(
    own_rows_ptr,
    ret_ptr,
    dest_rank_ptr,
    dest_pos_ptr,
    w_ptr,
    out_ptr,
    ret_w_ptr,
    grad_w_ptr,
    me,
    T,
    K,
    H,
    T_max,
    HAS_W: tl.constexpr,
    GATHER_W: tl.constexpr,
    KB: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Item (token t, chunk), at the owner: out[t] = sum over t's own slots of w_k * own_rows[pos_k]
    + one partial per peer PE that t was sent to (return staging row r * T_max + t), float32.
    Exactly 0 from slots never sent (unused, overflowed receiver). GATHER_W: grad_w[t, k] = the
    weight gradient PE r returned for slot k when k went to a peer r (ret_w), else 0."""
    chunks = tl.cdiv(H, BLOCK)
    kk = tl.arange(0, KB)
    km = kk < K
    for item in range(tl.program_id(0), T * chunks, tl.num_programs(0)):
        t = (item // chunks).to(tl.int64)
        offs = (item % chunks) * BLOCK + tl.arange(0, BLOCK)
        m = offs < H
        r_vec = tl.load(dest_rank_ptr + t * K + kk, mask=km, other=-1)
        p_vec = tl.load(dest_pos_ptr + t * K + kk, mask=km, other=0)
        if GATHER_W:
            if item % chunks == 0:
                peer = (r_vec >= 0) & (r_vec != me) & km
                src_row = tl.maximum(r_vec, 0) * T_max + t
                gw = tl.load(ret_w_ptr + src_row * K + kk, mask=peer, other=0.0)
                tl.store(grad_w_ptr + t * K + kk, gw, mask=km)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(K):
            r = tl.sum(tl.where(kk == k, r_vec, 0), 0)
            if r == me:
                pos = tl.sum(tl.where(kk == k, p_vec, 0), 0)
                v = tl.load(own_rows_ptr + pos * H + offs, mask=m, other=0.0).to(tl.float32)
                if HAS_W:
                    v = v * tl.load(w_ptr + t * K + k).to(tl.float32)
                acc += v
            else:
                lead = (r >= 0) & (tl.sum(tl.where((kk < k) & (r_vec == r), 1, 0), 0) == 0)
                if lead:
                    row = r * T_max + t
                    acc += tl.load(ret_ptr + row * H + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=m)
