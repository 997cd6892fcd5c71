"""Triton kernels of the one-sided transport. GPU threads store rows straight into peers' symmetric
buffers (addresses from nvshmem_ptr, i.e. P2P over NVLink or the same GPU) and raise flags with
system-scope release atomics; receivers spin on the flags with acquire loads and a time limit.
See PROTOCOL.md beside this file for the message order.
"""
from __future__ import annotations

import triton
import triton.language as tl

PEER_TIMEOUT_BIT = tl.constexpr(4)  # moe_dist.errors.PEER_TIMEOUT


@triton.jit
def _now_ns():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def push_rows_kernel(src_ptr, src_row_ptr, dest_rank_ptr, dest_pos_ptr, peer_addr_ptr, self_out_ptr,
                     meta_val_ptr, peer_meta_addr_ptr, self_meta_ptr, me, H,
                     HAS_META: tl.constexpr, BLOCK: tl.constexpr):
    """Item i: row src[src_row[i]] -> row dest_pos[i] of PE dest_rank[i] (own output when it is me)."""
    item = tl.program_id(0)
    chunk = tl.program_id(1)
    rank = tl.load(dest_rank_ptr + item)
    pos = tl.load(dest_pos_ptr + item)
    row = tl.load(src_row_ptr + item)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    m = (offs < H) & (rank >= 0)
    vals = tl.load(src_ptr + row * H + offs, mask=m)
    if rank == me:
        tl.store(self_out_ptr + pos * H + offs, vals, mask=m)
    else:
        peer = tl.load(peer_addr_ptr + tl.maximum(rank, 0)).to(tl.pointer_type(src_ptr.dtype.element_ty))
        tl.store(peer + pos * H + offs, vals, mask=m)
    if HAS_META:
        if (chunk == 0) & (rank >= 0):
            meta = tl.load(meta_val_ptr + item)
            if rank == me:
                tl.store(self_meta_ptr + pos, meta)
            else:
                peer_meta = tl.load(peer_meta_addr_ptr + rank).to(tl.pointer_type(tl.int64))
                tl.store(peer_meta + pos, meta)


@triton.jit
def signal_peers_kernel(peer_flag_addr_ptr, me, epoch_ptr):
    """Program q: flag[me] = epoch on PE q, released at system scope after everything this stream
    wrote before. Epochs live in device memory so a replayed CUDA graph signals fresh ones (the push kernels ran to completion before this kernel started)."""
    q = tl.program_id(0)
    epoch = tl.load(epoch_ptr)
    flag = tl.load(peer_flag_addr_ptr + q).to(tl.pointer_type(tl.int64))
    tl.atomic_xchg(flag + me, epoch, sem="release", scope="sys")


@triton.jit
def wait_flags_kernel(flag_ptr, n, epoch_ptr, timeout_ns, err_ptr, step):
    """Waits until flag[q] >= epoch for every q, at most timeout_ns in all. On timeout it records
    PEER_TIMEOUT with the step and the first silent peer in err_ptr (moe_dist.errors.DeviceErrorFlags)
    and returns, so the stream moves on and the host check raises instead of hanging."""
    epoch = tl.load(epoch_ptr)
    start = _now_ns()
    timed_out = 0
    for q in range(n):
        seen = tl.atomic_add(flag_ptr + q, 0, sem="acquire", scope="sys")
        while (seen < epoch) & (timed_out == 0):
            if _now_ns() - start > timeout_ns:
                timed_out = 1
                if tl.atomic_or(err_ptr, PEER_TIMEOUT_BIT) == 0:
                    tl.store(err_ptr + 1, step)
                    tl.store(err_ptr + 2, q)
            else:
                seen = tl.atomic_add(flag_ptr + q, 0, sem="acquire", scope="sys")


@triton.jit
def copy_from_peers_kernel(staging_ptr, out_ptr, src_of_row_ptr, staging_meta_ptr, out_meta_ptr, me, H,
                           HAS_META: tl.constexpr, BLOCK: tl.constexpr):
    """Rows that peers wrote into this PE's symmetric staging move to the regular output tensor (which
    autograd may keep past the next layer's reuse of the staging). Own rows were written in place."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    src = tl.load(src_of_row_ptr + row)
    take = (src >= 0) & (src != me)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    m = (offs < H) & take
    tl.store(out_ptr + row * H + offs, tl.load(staging_ptr + row * H + offs, mask=m), mask=m)
    if HAS_META:
        if (chunk == 0) & take:
            tl.store(out_meta_ptr + row, tl.load(staging_meta_ptr + row))


def row_grid(rows: int, H: int, block: int):
    return (rows, triton.cdiv(H, block))


def pick_block(H: int) -> int:
    return min(4096, triton.next_power_of_2(H))
