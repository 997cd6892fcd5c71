"""The nvshmem transport's deduplicated path (dispatch, combine and both backwards, autograd
included) with N PEs emulated in ONE process under Triton's interpreter: each PE is a thread with
its own NvshmemTransport and a stand-in workspace of plain CPU tensors (the kernels only see
addresses), the flag wait is a barrier (each call's wait: every PE has stored its rows), and kernel
launches are serialised (the interpreter is not thread-safe). Only NVSHMEM's allocation and the
spin-wait kernel are not exercised; tests/gpu/nvshmem_worker.py covers them on a GPU.
Checked against a dense oracle: out[t] = sum_k w[t, k] * f_e(x[t]) (x dequantised for peer slots
with fp8, straight-through in the backward), with gradients of x and of the weights; and the
device counter of rows sent = distinct (token, peer PE) pairs of the routing.
Legend: T tokens, K slots/token, E experts, G local experts, N PEs, H hidden, C receive rows."""

import os
import threading
import types

import pytest
import torch

from moe_dist.transport import NvshmemOptions
from moe_dist.errors import DeviceErrorFlags
from moe_dist.transport import handshake as HS
from moe_dist.routing import RoutingPlan
from moe_dist.transport.dedup import count_pairs
from moe_dist.transport.fp8 import dequantize_rows, quantize_rows

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not INTERPRETED, reason="runs in Triton's interpreter (CPU)")
triton = pytest.importorskip("triton")

if INTERPRETED:
    from triton.runtime import interpreter as _interp

    from moe_dist.transport.nvshmem.transport import DedupHandle, NvshmemTransport

    _LOCK = threading.RLock()
    _run = _interp.InterpretedFunction.run

    def _locked_run(self, *args, **kwargs):
        with _LOCK:
            return _run(self, *args, **kwargs)

    _interp.InterpretedFunction.run = _locked_run


def addresses(per_pe):  # [2, N]: parity p of each PE's tensor
    return torch.tensor([[t[p].data_ptr() for t in per_pe] for p in range(2)], dtype=torch.int64)


def workspaces(N, E, K, H, T_max, C, dtype):
    Q = N * T_max
    bufs = {
        "counts": [torch.zeros(2, N, E, dtype=torch.int64) for _ in range(N)],
        "headers": [torch.full((2, N, HS.F), -3, dtype=torch.int64) for _ in range(N)],
        "pair_rows": [torch.randn(2, Q, H).to(dtype) for _ in range(N)],  # stale garbage
        "pair_meta": [torch.randint(-1, 3, (2, Q, K + 1)) for _ in range(N)],
        "pair_w": [torch.rand(2, Q, K) for _ in range(N)],
        "pair_ret": [torch.randn(2, Q, H).to(dtype) for _ in range(N)],
        "pair_ret_w": [torch.rand(2, Q, K) for _ in range(N)],
        "pair_scales": [torch.rand(2, Q, H // 128) for _ in range(N)],
    }
    for m in bufs["pair_meta"]:
        m[:, :, 0] = -5  # stamps of no call
    out = []
    for me in range(N):
        ws = types.SimpleNamespace(
            n=N, me=me, dtype=dtype, capacity=C, max_tokens=T_max, top_k=K, dedup=True,
            any_put=False, epoch_dev=torch.zeros(1, dtype=torch.int64), calls=0,
        )  # fmt: skip
        for name, per_pe in bufs.items():
            setattr(ws, name, per_pe[me])
            setattr(ws, name + "_at", addresses(per_pe))

        def next_epoch(ws=ws):
            ws.calls += 1
            return ws.calls % 2

        ws.next_epoch = next_epoch
        ws.via_put = torch.zeros(N, dtype=torch.int32)  # every peer P2P
        ws.any_put = False
        out.append(ws)
    return out


def make_transport(ws, E, K, T_max, sms, fp8, barrier):
    tr = object.__new__(NvshmemTransport)
    tr.num_experts, tr.ep_size, tr.ep_rank, tr.top_k = E, ws.n, ws.me, K
    tr.max_tokens, tr.capacity, tr.peer_path, tr.fp8 = T_max, ws.capacity, "p2p", fp8
    tr.num_comm_sms, tr.calls, tr._put_libs, tr.sent_rows_N = sms, 0, None, None
    tr.error_flags = DeviceErrorFlags("emulated", "cpu")
    tr.device, tr.context, tr._header_TF = "cpu", HS.CallContext(), None  # the call header
    tr.options = NvshmemOptions(check_headers=True)  # the header is exchanged and checked
    tr._workspaces = {(ws.dtype, None): ws}
    tr.workspace = lambda dtype, hidden: ws

    def signal_and_wait(ws_, channel, parity, first_of_call):
        if first_of_call:
            ws_.epoch_dev += 1
        barrier.wait()  # every PE stored its rows (and flags) before any PE reads

    tr._signal_and_wait = signal_and_wait
    return tr


def expert_fn(rows, local_expert):
    return torch.tanh(rows) * (1.0 + local_expert.to(rows.dtype).unsqueeze(1))


@pytest.mark.parametrize(
    "N,sms,fp8,capacity",
    [(1, 2, False, None), (2, 1, False, None), (3, 3, False, None), (2, 2, True, None),
     (3, 2, False, 14)],
)  # fmt: skip
def test_dedup_transport_matches_dense_oracle(N, sms, fp8, capacity):
    """capacity: a receive buffer too small for some PE's rows: that PE gets none (its slots
    contribute exactly 0, forward and backward), the error is recorded, the others are exact."""
    G, K = (3 if N > 1 else 6), 4
    E, H, T_max = G * N, (256 if fp8 else 40), 8
    T_of = [5, 0, 8][:N] if N > 1 else [7]
    C = capacity or sum(T_of) * K
    dtype = torch.float32
    wss = workspaces(N, E, K, H, T_max, C, dtype)
    barrier = threading.Barrier(N, timeout=120)
    gens = [torch.Generator().manual_seed(100 + pe) for pe in range(N)]
    inputs = []
    for pe in range(N):
        g, T = gens[pe], T_of[pe]
        idx = (
            torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
            if T
            else torch.zeros(0, K, dtype=torch.long)
        )
        idx[torch.rand(T, K, generator=g) < 0.2] = -1
        x = torch.randn(T, H, generator=g)
        x[:, 0], x[:, 1] = pe, torch.arange(T)  # stamps
        w = torch.rand(T, K, generator=g) * (idx >= 0)
        gout = torch.randn(T, H, generator=g)
        inputs.append((idx, x, w, gout))
    results, errors = [None] * N, []

    def run(pe):
        try:
            idx, x0, w0, gout = inputs[pe]
            tr = make_transport(wss[pe], E, K, T_max, sms, fp8, barrier)
            x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
            counts = torch.zeros(E, dtype=torch.long).scatter_add_(
                0, idx[idx >= 0], torch.ones_like(idx[idx >= 0])
            )
            plan = RoutingPlan(idx, w, counts, torch.zeros(()), torch.zeros((), dtype=torch.long),
                               True)  # fmt: skip
            tok, counts_G, h = tr.dispatch(x, plan)
            assert isinstance(h, DedupHandle)
            n = int(counts_G.sum())
            local = torch.repeat_interleave(torch.arange(G), counts_G)
            y = torch.cat([expert_fn(tok[:n], local), tok.new_zeros(C - n, H)])
            out = tr.combine(y, h)
            (out * gout).sum().backward()
            results[pe] = (tok[:n].detach(), counts_G, out.detach(), x.grad, w.grad,
                           tr.sent_rows_N.clone(), tr.error_flags.words.clone())  # fmt: skip
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append((pe, e))
            barrier.abort()

    threads = [threading.Thread(target=run, args=(pe,)) for pe in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    if errors:
        raise errors[0][1]
    for pe in range(N):
        idx, x0, w0, gout = inputs[pe]
        tok, counts_G, out, gx, gw, sent, err = results[pe]
        rows_to = [
            sum(int(((inputs[s][0] >= 0) & (inputs[s][0] // G == r)).sum()) for s in range(N))
            for r in range(N)
        ]
        over = [n > C for n in rows_to]
        assert (capacity is not None) == any(over), "the small capacity must overflow a PE"
        assert bool(err[0] & 2) == any(over), err  # BUFFER_OVERFLOW recorded, never silent
        # Receiver rows: expert-major, then source, token, slot (the reference order).
        want = [
            (src, t)
            for e in range(pe * G, (pe + 1) * G)
            for src in range(N)
            for t in range(T_of[src])
            for k in range(K)
            if int(inputs[src][0][t, k]) == e and not over[pe]
        ]
        assert tok[:, :2].round().long().tolist() == [list(p) for p in want], f"PE {pe} order"
        kept = torch.where(
            (idx >= 0) & ~torch.tensor(over)[idx.clamp(min=0) // G], idx, -1
        )  # slots bound to an overflowed PE are not sent
        want_sent = count_pairs(kept, G, N)
        want_sent[pe] = 0
        assert sent.tolist() == want_sent.tolist(), (pe, sent, want_sent)
        # Dense oracle with autograd.
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        x_peer = x
        if fp8 and x.shape[0]:
            q, sc = quantize_rows(x.detach())
            x_peer = x + (dequantize_rows(q, sc, x.dtype) - x).detach()  # straight through
        ref = torch.zeros_like(x)
        for k in range(K):
            e = idx[:, k]
            ok = (kept[:, k] >= 0).unsqueeze(1)
            own = (e // G == pe).unsqueeze(1)
            src = torch.where(own, x, x_peer)
            ref = ref + torch.where(ok, w[:, k : k + 1] * expert_fn(src, e.clamp(min=0) % G), 0.0)
        (ref * gout).sum().backward()
        torch.testing.assert_close(out, ref.detach(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gw, w.grad, rtol=1e-4, atol=1e-4)
