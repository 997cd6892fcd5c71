"""The nvshmem transport (dispatch, combine and both backwards, autograd included) with N PEs
emulated in ONE process under Triton's interpreter (tests/gpu/nvshmem_emulation.py): the
deduplicated path (every peer P2P, or put peers under put_dedup), and the one-row-per-slot path
with put peers (every peer by puts, or a mix), whose put kernels run with NVSHMEM's device calls
stood in for.
Checked against a dense oracle: out[t] = sum_k w[t, k] * f_e(x[t]) (x dequantised for peer slots
with fp8, straight-through in the backward), with gradients of x and of the weights; and on the
dedup path the device counter of rows sent = distinct (token, peer PE) pairs of the routing.
Legend: T tokens, K slots/token, E experts, G local experts, N PEs, H hidden, C receive rows."""

import pytest
import torch

from moe_dist.routing import RoutingPlan
from moe_dist.transport.dedup import count_pairs
from moe_dist.transport.fp8 import dequantize_rows, quantize_rows

from tests.gpu.nvshmem_emulation import INTERPRETED, Flags, make_transport, run_pes, workspaces

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="runs in Triton's interpreter (CPU)")
triton = pytest.importorskip("triton")

if INTERPRETED:
    from moe_dist.transport.nvshmem.transport import DedupHandle, NvshmemHandle


def expert_fn(rows, local_expert):
    return torch.tanh(rows) * (1.0 + local_expert.to(rows.dtype).unsqueeze(1))


SLOT_PATH = [(1, 2, False, None, "p2p"), (2, 1, False, None, "p2p"), (3, 3, False, None, "p2p"),
             (2, 2, True, None, "p2p"), (3, 2, False, 14, "p2p"), (2, 2, False, None, "put"),
             (3, 2, False, None, "mixed"), (2, 3, False, None, "mixed"),
             (3, 2, False, 14, "put")]  # fmt: skip
# put_dedup: pairs to put peers through the send staging (DEDUP.md "Put peers"). Tokens per PE:
# under "mixed" only odd PEs take puts, so a put PE owns tokens (the return direction's puts).
F32, BF16 = torch.float32, torch.bfloat16
PUT_DEDUP = [(2, 2, False, None, "put", "random", (5, 0), F32),
             (3, 2, False, None, "put", "one_expert", (5, 0, 8), F32),
             (3, 3, False, None, "mixed", "random", (5, 8, 0), F32),
             (2, 1, False, None, "mixed", "random", (4, 7), F32),
             (2, 2, True, None, "put", "random", (6, 3), F32),
             (3, 2, True, None, "mixed", "one_expert", (0, 7, 4), F32),
             (3, 2, False, 14, "mixed", "random", (5, 8, 0), F32),
             (3, 2, False, None, "mixed", "random", (5, 8, 0), BF16),
             (2, 2, True, None, "put", "random", (6, 3), BF16)]  # fmt: skip


@pytest.mark.parametrize(
    "N,sms,fp8,capacity,peers,put_dedup,route,tokens,dtype",
    [(*case, False, "random", None, F32) for case in SLOT_PATH]
    + [(*case[:5], True, *case[5:]) for case in PUT_DEDUP],
)
def test_transport_matches_dense_oracle(
    N, sms, fp8, capacity, peers, put_dedup, route, tokens, dtype
):
    """capacity: a receive buffer too small for some PE's rows: that PE gets none (its slots
    contribute exactly 0, forward and backward), the error is recorded, the others are exact.
    peers: "p2p" (the dedup path), "put" (every peer by puts), "mixed" (odd PEs by puts); with
    put_dedup the dedup path takes put peers too. route "one_expert": every token's first slot
    goes to the same expert (the last PE's first). tokens: per PE (default 5, 0, 8). dtype: of
    the rows (bf16: the oracle in float32, a bounded relative error)."""
    G, K = (3 if N > 1 else 6), 4
    E, H, T_max = G * N, (256 if fp8 else 40), 8
    T_of = list(tokens) if tokens else [5, 0, 8][:N] if N > 1 else [7]
    C = capacity or sum(T_of) * K
    wss = workspaces(N, E, K, H, T_max, C, dtype, peers, put_dedup=put_dedup)
    flags = Flags(wss)
    gens = [torch.Generator().manual_seed(100 + pe) for pe in range(N)]
    inputs = []
    hot = (N - 1) * G  # route "one_expert"
    others = torch.tensor([e for e in range(E) if e != hot])
    for pe in range(N):
        g, T = gens[pe], T_of[pe]
        pick = (
            (lambda: torch.randperm(E, generator=g)[:K])
            if route == "random"
            else (
                lambda: torch.cat(
                    [torch.tensor([hot]), others[torch.randperm(E - 1, generator=g)[: K - 1]]]
                )
            )
        )
        idx = torch.stack([pick() for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
        unused = torch.rand(T, K, generator=g) < 0.2
        if route == "one_expert":
            unused[:, 0] = False
        idx[unused] = -1
        x = torch.randn(T, H, generator=g)
        x[:, 0], x[:, 1] = pe, torch.arange(T)  # stamps (exact in bf16)
        x = x.to(dtype)
        w = torch.rand(T, K, generator=g) * (idx >= 0)
        gout = torch.randn(T, H, generator=g).to(dtype)
        inputs.append((idx, x, w, gout))

    def run(pe):
        idx, x0, w0, gout = inputs[pe]
        tr = make_transport(wss[pe], E, K, T_max, flags, sms=sms, fp8=fp8, put_dedup=put_dedup)
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        counts = torch.zeros(E, dtype=torch.long).scatter_add_(
            0, idx[idx >= 0], torch.ones_like(idx[idx >= 0])
        )
        plan = RoutingPlan(idx, w, counts, torch.zeros(()), torch.zeros((), dtype=torch.long),
                           True)  # fmt: skip
        tok, counts_G, h = tr.dispatch(x, plan)
        dedup = peers == "p2p" or N == 1 or put_dedup
        assert isinstance(h, DedupHandle if dedup else NvshmemHandle)
        n = int(counts_G.sum())
        local = torch.repeat_interleave(torch.arange(G), counts_G)
        y = torch.cat([expert_fn(tok[:n], local), tok.new_zeros(C - n, H)])
        out = tr.combine(y, h)
        (out * gout).sum().backward()
        sent = tr.sent_rows_N.clone() if tr.sent_rows_N is not None else None
        return (tok[:n].detach(), counts_G, out.detach(), x.grad, w.grad, sent,
                tr.error_flags.words.clone())  # fmt: skip

    results = run_pes(N, run)
    for r in results:
        if isinstance(r, BaseException):
            raise r
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
        assert (int(err[0]) & ~2) == 0, err  # nothing but the overflow
        assert (sent is not None) == (peers == "p2p" or N == 1 or put_dedup)
        if sent is not None:  # the dedup path counts the rows it sends
            want_sent = count_pairs(kept, G, N)
            want_sent[pe] = 0
            assert sent.tolist() == want_sent.tolist(), (pe, sent, want_sent)
        # Dense oracle with autograd.
        x, w = x0.float().requires_grad_(True), w0.clone().requires_grad_(True)
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
        (ref * gout.float()).sum().backward()
        for name, got, want in (("out", out, ref.detach()), ("x grad", gx, x.grad),
                                ("w grad", gw, w.grad)):  # fmt: skip
            if dtype == torch.float32:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            else:  # rows rounded to bf16 on the way and in the experts
                err = (got.float() - want).norm() / want.norm().clamp_min(1e-6)
                assert err < 2e-2, f"PE {pe}: {name} differs from the oracle by {err:.3g}"
