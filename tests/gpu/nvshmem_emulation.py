"""N NVSHMEM PEs emulated in ONE process under Triton's interpreter, for the nvshmem transport's
tests: each PE is a thread with its own NvshmemTransport and a stand-in workspace of plain CPU
tensors (the kernels only see addresses). Kernel launches are serialised (the interpreter is not
thread-safe). Two parts of NVSHMEM are stood in for:
- the device calls of put_kernels.py (putmem_nbi, putmem_signal, signal_op, quiet) copy at once to
  the same offset of the same symmetric buffer on the target PE, so the put kernels run as
  written (a put whose source or target is not symmetric fails the test);
- the flag wait (signal_and_wait_kernel spins, which would hold the interpreter's lock) is
  `Flags.wait`: the same protocol in Python (flag[me] = epoch on every P2P peer, then wait for
  every peer's flag, bounded; waits of a layer out of step do not wait).
Not exercised: NVSHMEM's allocation, the spin-wait kernel, the asynchrony of puts;
tests/gpu/nvshmem_worker.py covers them on a GPU. Legend: N PEs, E experts, K slots/token, H
hidden, T_max tokens per PE at most, C receive rows, Q = N * T_max."""

import ctypes
import os
import threading
import time
import types

import numpy as np
import torch

from moe_dist.errors import DeviceErrorFlags, PEER_TIMEOUT
from moe_dist.transport import NvshmemOptions
from moe_dist.transport import handshake as HS

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
PEER_PATHS = ("p2p", "put", "mixed")  # mixed: odd PEs are reached by puts (the worker's MIXED)
OUT_OF_STEP = 4 | 8 | 16  # kernels.OUT_OF_STEP: timeout, mismatch, peer failed

if INTERPRETED:
    from triton.runtime import interpreter as _interp

    from moe_dist.transport.nvshmem import put_kernels as P_
    from moe_dist.transport.nvshmem.transport import NvshmemTransport

    _LOCK = threading.RLock()
    _run = _interp.InterpretedFunction.run

    def _locked_run(self, *args, **kwargs):
        with _LOCK:
            return _run(self, *args, **kwargs)

    _interp.InterpretedFunction.run = _locked_run


class SymmetricHeap:
    """Every PE's symmetric buffers by name, to map an address on one PE to another PE's."""

    def __init__(self):
        self.buffers: dict[str, list[torch.Tensor]] = {}

    def add(self, name, per_pe):
        self.buffers[name] = per_pe
        return per_pe

    def at(self, addr: int, pe: int) -> int:
        """The address on PE `pe` of symmetric address `addr` (on any PE)."""
        for name, per_pe in self.buffers.items():
            for t in per_pe:
                base = t.data_ptr()
                if base <= addr < base + t.numel() * t.element_size():
                    return per_pe[pe].data_ptr() + addr - base
        raise AssertionError(f"address {addr:#x} is in no symmetric buffer")

    def put(self, dst: int, src: int, nbytes: int, pe: int) -> None:
        self.at(src, 0)  # the source must be symmetric too (NVSHMEM over a network needs it)
        ctypes.memmove(self.at(dst, pe), src, nbytes)

    def signal(self, sig: int, value: int, pe: int) -> None:
        ctypes.c_int64.from_address(self.at(sig, pe)).value = value


_HEAP = [SymmetricHeap()]  # the heap of the test running now (the put kernels reach it)


def _int(v) -> int:
    h = getattr(v, "handle", None)  # an interpreter tensor (a scalar in a kernel)
    return int(np.asarray(h.data).reshape(-1)[0]) if h is not None else int(v)


def _put_block_nbi(dst, src, nbytes, pe):
    _HEAP[0].put(_int(dst), _int(src), _int(nbytes), _int(pe))


def _put_signal_block(dst, src, nbytes, sig, signal, pe):
    _put_block_nbi(dst, src, nbytes, pe)  # the data, then the signal
    _HEAP[0].signal(_int(sig), _int(signal), _int(pe))


def _signal_set(sig, signal, pe):
    _HEAP[0].signal(_int(sig), _int(signal), _int(pe))


def _quiet():
    pass  # the copies above are complete when they return


if INTERPRETED:  # the kernels look these names up in put_kernels' globals at each call
    P_.put_block_nbi, P_.put_signal_block = _put_block_nbi, _put_signal_block
    P_.signal_set, P_.quiet = _signal_set, _quiet


def via_put_of(peer_path: str, N: int, me: int) -> list[int]:
    """Which peers PE `me` reaches by puts, as runtime.SymmetricWorkspace decides."""
    if peer_path == "p2p":
        return [0] * N
    return [int(q != me and (peer_path == "put" or q % 2 == 1)) for q in range(N)]


def workspaces(N, E, K, H, T_max, C, dtype, peer_path="p2p", put_dedup=False):
    """Stand-in SymmetricWorkspaces (runtime.py's layout), stale garbage in every staging buffer.
    With put peers (any PE's) every PE takes the one-row-per-slot path and has a send buffer, or
    with put_dedup the pair staging and a pair send staging."""
    heap = _HEAP[0] = SymmetricHeap()
    F, Q, S_max = HS.F, N * T_max, T_max * K
    any_put = peer_path != "p2p" and N > 1
    dedup = not any_put or put_dedup
    # Stale values where the runtime can hold them: headers of no call (-3), but counts >= 0 and
    # slot ids in [0, T_max * K) (symmetric memory starts zeroed and then holds only real ones), so
    # a PE that stops waiting (out of step) reads void data that still addresses inside buffers.
    rows = torch.zeros(2, N, F + E, dtype=torch.int64)
    rows[:, :, :F] = -3
    bufs = {
        "count_rows": [rows.clone() for _ in range(N)],
        "flags": [torch.zeros(2, 3, N, dtype=torch.int64) for _ in range(N)],
    }
    if dedup:
        bufs.update(
            pair_rows=[torch.randn(2, Q, H).to(dtype) for _ in range(N)],
            pair_meta=[torch.randint(-1, 3, (2, Q, K + 1)) for _ in range(N)],
            pair_w=[torch.rand(2, Q, K) for _ in range(N)],
            pair_ret=[torch.randn(2, Q, H).to(dtype) for _ in range(N)],
            pair_ret_w=[torch.rand(2, Q, K) for _ in range(N)],
            pair_scales=[torch.rand(2, Q, max(H // 128, 1)) for _ in range(N)],
        )
        for m in bufs["pair_meta"]:
            m[:, :, 0] = -5  # stamps of no call
        if any_put:  # garbage the puts must not carry: only rows that carry a pair move
            heap.add("pair_send_rows", [torch.randn(Q, H).to(dtype) for _ in range(N)])
            heap.add("pair_send_meta", [torch.randint(-1, 3, (Q, K + 1)) for _ in range(N)])
            heap.add("pair_send_w", [torch.rand(Q, K) for _ in range(N)])
            heap.add("pair_send_scales", [torch.rand(Q, max(H // 128, 1)) for _ in range(N)])
    else:
        bufs.update(
            fwd_rows=[torch.randn(2, C, H).to(dtype) for _ in range(N)],
            fwd_meta=[torch.randint(0, S_max, (2, C)) for _ in range(N)],
            ret_rows=[torch.randn(2, S_max, H).to(dtype) for _ in range(N)],
        )
        heap.add("send_rows", [torch.randn(max(C, S_max), H).to(dtype) for _ in range(N)])
        heap.add("send_meta", [torch.randint(0, S_max, (S_max,)) for _ in range(N)])
    for name, per_pe in bufs.items():
        heap.add(name, per_pe)
    out = []
    for me in range(N):
        via = via_put_of(peer_path, N, me)
        ws = types.SimpleNamespace(
            n=N, me=me, dtype=dtype, capacity=C, max_tokens=T_max, top_k=K, dedup=dedup,
            any_put=any_put, epoch_dev=torch.zeros(1, dtype=torch.int64), calls=0, row_ints=F + E,
            via_put=torch.tensor(via, dtype=torch.int32),
            peer_pe=torch.arange(N, dtype=torch.int32),
        )  # fmt: skip
        for name, per_pe in heap.buffers.items():
            setattr(ws, name, per_pe[me])
            if "send_" not in name:  # [2, N]: a put peer's entry is our own
                ws.__dict__[name + "_at"] = torch.tensor(
                    [[per_pe[me if via[q] else q][p].data_ptr() for q in range(N)] for p in (0, 1)],
                    dtype=torch.int64,
                )
        ws.headers, ws.counts = ws.count_rows[:, :, :F], ws.count_rows[:, :, F:]
        ws.headers_at, ws.counts_at = ws.count_rows_at, ws.count_rows_at + F * 8

        def next_epoch(ws=ws):
            ws.calls += 1
            return ws.calls % 2

        ws.next_epoch = next_epoch
        out.append(ws)
    return out


class Flags:
    """signal_and_wait_kernel's protocol over the workspaces' flag tensors, in Python: flag[me] =
    epoch on every P2P peer (put peers got theirs from put_signal_kernel), then wait until every
    flag of this PE reaches the epoch, at most timeout_s; past it PEER_TIMEOUT is recorded. A layer
    whose error words hold an out-of-step error does not wait (as the kernel)."""

    def __init__(self, wss, timeout_s=60.0):
        self.wss, self.timeout_s = wss, timeout_s
        self.cond = threading.Condition()

    def wait(self, tr, ws, channel, parity, first_of_call):
        if first_of_call:
            ws.epoch_dev += 1
        epoch = int(ws.epoch_dev)
        words = tr.error_flags.words
        with self.cond:
            for q in range(ws.n):
                if q == ws.me or not int(ws.via_put[q]):
                    self.wss[q].flags[parity, channel, ws.me] = epoch
            self.cond.notify_all()
            if int(words[0]) & OUT_OF_STEP:
                return
            mine = ws.flags[parity, channel]
            deadline = time.monotonic() + self.timeout_s
            while (mine < epoch).any() and time.monotonic() < deadline:
                self.cond.wait(0.01)  # put signals arrive without a notify: poll
            if (mine < epoch).any():
                if int(words[0]) == 0:
                    words[1], words[2] = tr.context.step, int((mine < epoch).nonzero()[0])
                words[0] |= PEER_TIMEOUT


def make_transport(ws, E, K, T_max, flags, *, sms=2, fp8=False, check_headers=True,
                   put_dedup=False):  # fmt: skip
    """An NvshmemTransport on a stand-in workspace (no NVSHMEM, no process group)."""
    tr = object.__new__(NvshmemTransport)
    tr.num_experts, tr.ep_size, tr.ep_rank, tr.top_k = E, ws.n, ws.me, K
    tr.max_tokens, tr.capacity, tr.fp8 = T_max, ws.capacity, fp8
    tr.peer_path = "p2p" if not ws.any_put else "auto"
    tr.num_comm_sms, tr.calls, tr._put_libs, tr.sent_rows_N = sms, 0, None, None
    tr.error_flags = DeviceErrorFlags("emulated", "cpu")
    tr.device, tr.context, tr._header_TF = "cpu", HS.CallContext(), None  # the call header
    tr._last_ws = None
    tr.options = NvshmemOptions(check_headers=check_headers, put_dedup=put_dedup)
    tr._workspaces = {(ws.dtype, None): ws}
    tr.workspace = lambda dtype, hidden: ws
    tr._wait = lambda ws_, channel, parity, first: flags.wait(tr, ws_, channel, parity, first)
    return tr


def run_pes(N, fn, timeout_s=300):
    """fn(pe) on N threads; returns their results (an exception a PE raised is its result)."""
    results = [None] * N

    def run(pe):
        try:
            results[pe] = fn(pe)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            results[pe] = e

    threads = [threading.Thread(target=run, args=(pe,)) for pe in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
        assert not t.is_alive(), "an emulated PE hangs"
    return results
