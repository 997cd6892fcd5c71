"""The nvshmem transport's dedup kernels (dedup_kernels.py) against plain-torch oracles in ONE
process: N PEs are emulated with ordinary tensors standing for each PE's symmetric buffers (the
kernels only see addresses), as in test_nvshmem_kernels.py. Stamped tokens (source PE, token) say
where a misplaced row came from. Checks: one staged row per distinct (token, peer PE) and no more;
the receiver's expert-major rows in reference order; stale rows of earlier calls ignored; the
weighted combine, float32 reduce at the expert PE; both backward directions; fp8 rows; grids of 1
and 3 programs (num_comm_sms). Runs compiled on a GPU, or in Triton's interpreter on CPU
(TRITON_INTERPRET=1; tests/unit/test_triton_kernels_cpu.py does that in CI).
Legend: T tokens, K slots/token, E experts, G local experts, N PEs, H hidden, C receive rows."""

import os

import pytest
import torch

from moe_dist.transport.dedup import count_pairs
from moe_dist.transport.fp8 import quantize_rows
from tests.gpu.test_nvshmem_kernels import addresses, sync

triton = pytest.importorskip("triton", reason="the nvshmem kernels are Triton kernels")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cpu" if INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(
    not (INTERPRETED or torch.cuda.is_available()),
    reason="Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 for CPU tensors",
)
if INTERPRETED or torch.cuda.is_available():
    from moe_dist.transport.nvshmem import dedup_kernels as D_
    from moe_dist.transport.nvshmem import kernels as K_


def random_idx(T, E, K, gen, unused=0.2):
    if T == 0:
        return torch.zeros(0, K, dtype=torch.long, device=DEV)
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    idx[torch.rand(idx.shape, generator=gen) < unused] = -1
    return idx.to(DEV)


@pytest.mark.parametrize(
    "N,sms,fp8", [(1, None, False), (2, 1, False), (3, 3, False), (3, None, True), (2, 1, True)]
)
def test_emulated_dedup_round_trip(N, sms, fp8):
    gen = torch.Generator().manual_seed(N * 11 + (sms or 0) + fp8)
    # K > G: tokens often pick several experts of one PE (one PE: all K of its E = G experts)
    G, K, H = (3 if N > 1 else 6), 4, 256 if fp8 else 80
    E = G * N
    T_of = [6, 0, 9][:N] if N > 1 else [7]
    T_max = 10
    C = sum(T_of) * K
    Q = N * T_max
    KB = triton.next_power_of_2(K)
    RB = 4  # rows per scan block: T_max = 10 is not a multiple, blocks straddle PEs' rows
    dt = torch.bfloat16
    BLOCK = K_.ROW_BLOCK

    def grid(items):
        return K_.comm_grid(items, sms)

    chunks = K_.row_chunks(H)
    no_put = torch.zeros(N, dtype=torch.int32, device=DEV)  # every peer P2P here (HAS_PUT=False)
    x = [(torch.randn(T, H, generator=gen) * 3).to(dt).to(DEV) for T in T_of]
    for pe, xt in enumerate(x):
        xt[:, 0], xt[:, 1] = pe, torch.arange(xt.shape[0])  # stamps (exact in bf16 and e4m3)
    idx = [random_idx(T, E, K, gen) for T in T_of]
    w = [torch.rand(T, K, generator=gen).to(DEV) for T in T_of]
    counts = [torch.zeros(N, E, dtype=torch.int64, device=DEV) for _ in range(N)]
    SC = H // 128
    # Each PE's pair staging, full of stale rows of an earlier call (stamp 0) that must be ignored.
    # It holds rows of the activation dtype (the backward's gradients); fp8 rows use its first
    # bytes (row q at q * H bytes).
    rows = [torch.randn(Q, H, generator=gen).to(DEV).to(dt) for _ in range(N)]
    scales = [torch.ones(Q, max(SC, 1), device=DEV) for _ in range(N)]
    meta = [torch.randint(0, 3, (Q, K + 1), generator=gen).to(DEV) for _ in range(N)]
    for mt in meta:
        mt[:, 0] = 0
    wst = [torch.rand(Q, K, generator=gen).to(DEV) for _ in range(N)]
    ret = [torch.full((Q, H), float("nan"), dtype=dt, device=DEV) for _ in range(N)]
    ret_w = [torch.full((Q, K), float("nan"), device=DEV) for _ in range(N)]
    epoch = [torch.ones(1, dtype=torch.int64, device=DEV) for _ in range(N)]
    st = [{} for _ in range(N)]
    sent = [torch.zeros(N, dtype=torch.int64, device=DEV) for _ in range(N)]  # rows to each PE

    for me in range(N):  # counts, ranks and the layout (the existing kernels), then destinations
        idx_S = idx[me].reshape(-1).contiguous()
        st[me]["rank_S"] = torch.empty_like(idx_S)
        st[me]["idx_S"] = idx_S
        K_.count_and_rank_kernel[(E,)](
            idx_S, idx_S.numel(), st[me]["rank_S"], addresses(counts), me, N, E, E, BLOCK=16
        )
    sync()
    for me in range(N):
        s = st[me]
        s["offs"] = torch.empty(E, dtype=torch.int64, device=DEV)
        s["over"] = torch.empty(N, dtype=torch.int32, device=DEV)
        s["counts_G"] = torch.empty(G, dtype=torch.int64, device=DEV)
        s["seg"] = torch.empty(2, N, G, dtype=torch.int64, device=DEV)
        err = torch.zeros(3, dtype=torch.int32, device=DEV)
        K_.layout_kernel[(1,)](
            counts[me], me, N, E, E, G, C, s["offs"], s["over"], s["counts_G"], s["seg"], err, 0,
            NB=triton.next_power_of_2(N), EB=triton.next_power_of_2(E),
        )  # fmt: skip
        S = s["idx_S"].numel()
        s["dest_rank"] = torch.empty(S, dtype=torch.int64, device=DEV)
        s["dest_pos"] = torch.empty(S, dtype=torch.int64, device=DEV)
        D_.slot_destinations_kernel[grid(S)](
            s["idx_S"], s["rank_S"], s["offs"], s["over"], s["dest_rank"], s["dest_pos"], G, S
        )
        s["out"] = torch.full((C, H), float("nan"), dtype=dt, device=DEV)
    sync()

    def push(me, src, own_src, src_scales, weights, out, has_meta, scale_own, ahead):
        s = st[me]
        T = T_of[me]
        if T:
            D_.push_pairs_kernel[grid(T * chunks)](
                src, own_src, src_scales, weights, s["dest_rank"], s["dest_pos"],
                addresses(rows), addresses(scales), addresses(meta), addresses(wst), out,
                epoch[me], sent[me], no_put, 0, 0, 0, 0, me, T, K, H, T_max,
                EPOCH_AHEAD=ahead, HAS_SCALES=src_scales is not None and fp8, HAS_META=has_meta,
                SCALE_OWN=scale_own, HAS_PUT=False, KB=KB, BLOCK=BLOCK,
            )  # fmt: skip

    # -- dispatch: pairs out, then each receiver expands its staged rows
    for me in range(N):
        if fp8 and T_of[me]:
            q, sc = quantize_rows(x[me].float())
            st[me]["q"], st[me]["sc"] = q.view(torch.float8_e4m3fn), sc
        else:
            st[me]["q"], st[me]["sc"] = x[me], None
        push(me, st[me]["q"], x[me], st[me]["sc"], w[me], st[me]["out"], True, False, False)
    sync()
    # Rows sent = distinct (token, peer PE) pairs, counted from the routing; own slots send none.
    for me in range(N):
        want_N = count_pairs(idx[me].cpu(), G, N)
        want_N[me] = 0
        assert sent[me].cpu().tolist() == want_N.tolist(), (me, sent[me], want_N)
    staged = sum(int((mt[:, 0] == 1).sum()) for mt in meta)
    assert staged == sum(int(s.sum()) for s in sent), "a staged row of this call per pair"
    for me in range(N):
        s = st[me]
        s["lmeta"] = torch.full((Q, K), -7, dtype=torch.int64, device=DEV)
        s["lw"] = torch.full((Q, K), -7.0, device=DEV)
        staged_rows = rows[me].view(torch.float8_e4m3fn) if fp8 else rows[me]
        D_.expand_pairs_kernel[grid(triton.cdiv(Q - T_max, RB))](
            staged_rows, scales[me], meta[me], wst[me], s["out"], s["lmeta"], s["lw"], s["out"],
            s["lw"], epoch[me], me, K, H, T_max, Q,
            HAS_SCALES=fp8, KEEP_META=True, SCALE=False, DOTS=False, KB=KB, RB=RB, BLOCK=BLOCK,
        )  # fmt: skip
    sync()
    for me in range(N):
        s = st[me]
        want = [
            (src, t, k)
            for e in range(me * G, (me + 1) * G)
            for src in range(N)
            for t in range(T_of[src])
            for k in range(K)
            if idx[src][t, k].item() == e
        ]
        s["want"] = want
        n = len(want)
        assert s["counts_G"].sum().item() == n
        got = s["out"][:n, :2].float().cpu().round().long().tolist()  # fp8: within 6%
        assert got == [[src, t] for src, t, _ in want], f"PE {me}: rows out of reference order"
        ref = torch.stack([x[src][t].float() for src, t, _ in want]) if n else None
        if n:
            tol = 0.07 if fp8 else 0.0  # e4m3: 3 mantissa bits (own rows stay exact)
            torch.testing.assert_close(s["out"][:n].float(), ref, rtol=tol, atol=tol * 3)
        s["y"] = s["out"] * 2 + 1  # the "experts"
    # -- combine: one weighted partial per (token, peer) back to the owner, then the owner's sum
    for me in range(N):
        D_.reduce_pairs_kernel[grid(triton.cdiv(Q - T_max, RB))](
            st[me]["y"], st[me]["lmeta"], st[me]["lw"], addresses(ret), st[me]["lw"],
            addresses(ret_w), no_put, 0, 0, me, K, H, T_max, Q,
            HAS_W=True, SEND_W=False, HAS_PUT=False, KB=KB, RB=RB, BLOCK=BLOCK,
        )  # fmt: skip
    sync()

    def gather(me, own_rows, weights, has_w, grad_w=None):
        T = T_of[me]
        out = torch.full((T, H), float("nan"), dtype=dt, device=DEV)
        if T:
            D_.gather_pairs_kernel[grid(T * chunks)](
                own_rows, ret[me], st[me]["dest_rank"], st[me]["dest_pos"], weights, out,
                ret_w[me], grad_w if grad_w is not None else weights, me, T, K, H, T_max,
                HAS_W=has_w, GATHER_W=grad_w is not None, KB=KB, BLOCK=BLOCK,
            )  # fmt: skip
        return out

    # Where each (source, token, slot) landed: its row at the receiver (reference order).
    row_of = {(r, *key): i for r in range(N) for i, key in enumerate(st[r]["want"])}
    for me in range(N):
        out = gather(me, st[me]["y"], w[me], True)
        want = torch.zeros(T_of[me], H)
        for t in range(T_of[me]):
            for k in range(K):
                if idx[me][t, k] >= 0:  # the expert's real output row, weighted
                    r = int(idx[me][t, k]) // G
                    want[t] += w[me][t, k].cpu() * st[r]["y"][row_of[(r, me, t, k)]].float().cpu()
        torch.testing.assert_close(out.float().cpu(), want, rtol=2e-2, atol=2e-2)
        assert not out.isnan().any(), "an output element was never written"

    # -- backward of the combine: g[t] once per (token, peer), expanded times each slot's weight
    epoch_next = [e + 1 for e in epoch]
    g = [torch.randn(T, H, generator=gen).to(dt).to(DEV) for T in T_of]
    for me in range(N):
        st[me]["grad_y"] = torch.full((C, H), float("nan"), dtype=dt, device=DEV)
        st[me]["grad_lw"] = torch.zeros(Q, K, device=DEV)
        push(me, g[me], g[me], None, w[me], st[me]["grad_y"], False, True, True)
    sync()
    for me in range(N):
        epoch[me].copy_(epoch_next[me])  # the call's first flag bumps the epoch
        s = st[me]
        D_.expand_pairs_kernel[grid(triton.cdiv(Q - T_max, RB))](
            rows[me], scales[me], meta[me], wst[me], s["grad_y"], s["lmeta"], s["lw"], s["y"],
            s["grad_lw"], epoch[me], me, K, H, T_max, Q,
            HAS_SCALES=False, KEEP_META=False, SCALE=True, DOTS=True, KB=KB, RB=RB, BLOCK=BLOCK,
        )  # fmt: skip
    sync()
    for me in range(N):
        want = [(g[src][t].float() * w[src][t, k]) for src, t, k in st[me]["want"]]
        if want:
            torch.testing.assert_close(
                st[me]["grad_y"][: len(want)].float(), torch.stack(want), rtol=2e-2, atol=2e-2
            )
    # -- backward of the dispatch: unweighted partials back, summed per token
    ret_before = [r.clone() for r in ret]
    for me in range(N):
        D_.reduce_pairs_kernel[grid(triton.cdiv(Q - T_max, RB))](
            st[me]["grad_y"], st[me]["lmeta"], st[me]["lw"], addresses(ret), st[me]["grad_lw"],
            addresses(ret_w), no_put, 0, 0, me, K, H, T_max, Q,
            HAS_W=False, SEND_W=True, HAS_PUT=False, KB=KB, RB=RB, BLOCK=BLOCK,
        )  # fmt: skip
    sync()
    for me in range(N):
        grad_w = torch.full((T_of[me], K), float("nan"), device=DEV)
        grad_x = gather(me, st[me]["grad_y"], w[me], False, grad_w)
        used = (idx[me] >= 0).unsqueeze(-1).float()
        want = (g[me].float().unsqueeze(1) * w[me].unsqueeze(-1) * used).sum(1)
        torch.testing.assert_close(grad_x.float(), want, rtol=3e-2, atol=3e-2)
        # The weights' gradient <y(t, k), g[t]>: peer slots' from their expert PE (ret_w); own
        # slots' the transport computes locally (0 here).
        want_w = torch.zeros(T_of[me], K)
        for t in range(T_of[me]):
            for k in range(K):
                e = int(idx[me][t, k])
                if e >= 0 and e // G != me:
                    y_row = st[e // G]["y"][row_of[(e // G, me, t, k)]].float().cpu()
                    want_w[t, k] = (y_row * g[me][t].float().cpu()).sum()
        torch.testing.assert_close(grad_w.cpu(), want_w, rtol=2e-2, atol=5e-2)
    assert len(ret_before) == N
