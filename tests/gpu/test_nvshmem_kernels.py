"""The nvshmem transport's Triton kernels against the plain-torch layout oracle, in ONE process: N
PEs are emulated with ordinary tensors standing for each PE's symmetric buffers (the kernels only
see addresses), so every step but the flag wait runs deterministically, no NVSHMEM needed. Tokens
are stamped with (source PE, token index) so a misplaced row says where it came from. On a GPU the
kernels run compiled; with TRITON_INTERPRET=1 they run on CPU tensors in Triton's interpreter
(tests/unit/test_triton_kernels_cpu.py does that in CI)."""

import os

import pytest
import torch

from moe_dist.transport.nvshmem.layout import ranks_in_expert, segments, slot_destinations

from tests.conftest import stamp

triton = pytest.importorskip(
    "triton", reason="the nvshmem kernels are Triton kernels (pip install triton)"
)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cpu" if INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(
    not (INTERPRETED or torch.cuda.is_available()),
    reason="Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 for CPU tensors",
)

if INTERPRETED or torch.cuda.is_available():
    from moe_dist.transport.nvshmem import kernels as K_


def sync():
    if not INTERPRETED:
        torch.cuda.synchronize()


def addresses(tensors):
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=DEV)


def random_idx(T, E, K, gen, unused=0.15, hot=None):
    idx = (
        torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
        if T
        else torch.zeros(0, K, dtype=torch.long)
    )
    if hot is not None and T:
        idx[:, 0] = hot  # everyone's first choice: one expert
    idx[torch.rand(idx.shape, generator=gen) < unused] = -1
    return idx.to(DEV)


@pytest.mark.parametrize("seed", range(3))
def test_count_and_rank_and_layout_match_oracle(seed):
    gen = torch.Generator().manual_seed(seed)
    N, E, K, me = 4, 12, 3, seed % 4
    G = E // N
    idx_S = random_idx(37, E, K, gen).reshape(-1)
    # the workspace's layout: a PE's row is its header (F ints), then its counts (row stride F+E)
    F = 12
    rows_bufs = [torch.full((N, F + E), -7, dtype=torch.int64, device=DEV) for _ in range(N)]
    rank_S = torch.full_like(idx_S, -5)
    K_.count_and_rank_kernel[(E,)](
        idx_S, idx_S.numel(), rank_S, addresses(rows_bufs) + F * 8, me, N, E, F + E, BLOCK=16
    )
    want_rank, want_counts = ranks_in_expert(idx_S.cpu(), E)
    valid = idx_S.cpu() >= 0
    assert torch.equal(rank_S.cpu()[valid], want_rank[valid])
    for buf in rows_bufs:
        assert torch.equal(buf[me, F:].cpu(), want_counts)
        assert (buf[:, :F] == -7).all() and (buf[torch.arange(N) != me] == -7).all()
    for capacity in (1000, 20):  # 20: some receivers overflow
        counts_NE = torch.randint(0, 6, (N, E), generator=gen)
        counts_NE[me] = want_counts
        rows_NW = torch.randint(-99, 99, (N, F + E), generator=gen)  # headers: any value
        rows_NW[:, F:] = counts_NE
        offs = torch.full((E,), -9, dtype=torch.int64, device=DEV)
        over = torch.full((N,), -9, dtype=torch.int32, device=DEV)
        counts_G = torch.full((G,), -9, dtype=torch.int64, device=DEV)
        seg = torch.full((2, N, G), -9, dtype=torch.int64, device=DEV)
        err = torch.zeros(3, dtype=torch.int32, device=DEV)
        K_.layout_kernel[(1,)](
            rows_NW.to(DEV)[:, F:],
            me,
            N,
            E,
            F + E,
            G,
            capacity,
            offs,
            over,
            counts_G,
            seg,
            err,
            5,
            NB=triton.next_power_of_2(N),
            EB=triton.next_power_of_2(E),
        )
        dest_rank, dest_pos, want_over = slot_destinations(counts_NE, me, idx_S.cpu(), capacity)
        assert over.cpu().bool().tolist() == want_over.tolist()
        e_S = idx_S.cpu().clamp(min=0)
        ok = dest_rank >= 0
        assert torch.equal((offs.cpu()[e_S] + want_rank)[ok], dest_pos[ok])
        assert torch.equal(seg.cpu(), segments(counts_NE, me, capacity))
        mine = counts_NE[:, me * G : (me + 1) * G].sum(0)
        assert counts_G.cpu().tolist() == (mine * (0 if want_over[me] else 1)).tolist()
        assert err[0].item() == (2 if want_over.any() else 0) and (err[1].item() == 5) == bool(
            want_over.any()
        )


@pytest.mark.parametrize(
    "N,hot,capacity,sms",
    [
        (1, None, None, None),
        (2, None, None, 1),
        (3, None, None, 3),
        (3, 4, None, None),
        (3, 4, 12, 1),
        (3, None, None, 1),
    ],
)
def test_emulated_dispatch_experts_combine(N, hot, capacity, sms):
    """Every PE's steps in protocol order on emulated symmetric buffers: received rows are the
    reference order (expert-major, then source, then token), and the weighted sum of f(row) comes
    back; then both backward directions (the combine's gradient travels like a dispatch, scaled by
    the weights; the dispatch's like a combine, unweighted). With a small capacity the hot expert's
    receiver overflows: nothing reaches it, its slots contribute exactly 0, and the others are
    unaffected. `sms` bounds every row kernel's grid (num_comm_sms; None: one program per item):
    the persistent loops must cover every item at any value, 1 included."""
    gen = torch.Generator().manual_seed(N * 7 + (hot or 0))
    E, K, H = 6 * N, 3, 80  # H not a multiple of the row block: masked tails
    G = E // N

    def grid(items):
        return K_.comm_grid(items, sms)

    seg_grid = grid(N * G * 4 * K_.row_chunks(H))  # SPLIT = 4
    T_of = [5, 0, 9][:N] if N > 1 else [11]
    C = capacity or sum(T_of) * K
    dt = torch.bfloat16
    x = [torch.randn(T, H, generator=gen).to(dt).to(DEV) for T in T_of]
    for pe, xt in enumerate(x):
        stamp(xt, pe)  # exact in bf16 for these sizes
    idx = [random_idx(T, E, K, gen, hot=hot) for T in T_of]
    w = [torch.rand(T, K, generator=gen).to(DEV) for T in T_of]
    counts = [torch.zeros(N, E, dtype=torch.int64, device=DEV) for _ in range(N)]
    fwd_rows = [torch.full((C, H), float("nan"), dtype=dt, device=DEV) for _ in range(N)]
    fwd_meta = [torch.full((C,), -1, dtype=torch.int64, device=DEV) for _ in range(N)]
    ret_rows = [
        torch.full((max(T_of) * K, H), float("nan"), dtype=dt, device=DEV) for _ in range(N)
    ]
    no_put = torch.zeros(
        N, dtype=torch.int32, device=DEV
    )  # every peer by stores (the put path needs NVSHMEM)
    pe_state = []

    def sent_mask(pe):  # slots that reach an expert: used, and not bound to an overflowing receiver
        rows_to = [
            sum(int(((idx[s] >= 0) & (idx[s] // G == r)).sum()) for s in range(N)) for r in range(N)
        ]
        receiver_ok = torch.tensor([n <= C for n in rows_to], dtype=torch.bool, device=DEV)
        return (idx[pe] >= 0) & receiver_ok[idx[pe].clamp(min=0) // G]

    for me in range(N):  # step 1 on every PE: counts and ranks, counts to everyone
        idx_S = idx[me].reshape(-1).contiguous()
        rank_S = torch.empty_like(idx_S)
        K_.count_and_rank_kernel[(E,)](
            idx_S, idx_S.numel(), rank_S, addresses(counts), me, N, E, E, BLOCK=16
        )
        pe_state.append({"idx_S": idx_S, "rank_S": rank_S})
    sync()
    for me, st in enumerate(pe_state):  # step 2: layout and rows to their receivers
        st["offs"] = torch.empty(E, dtype=torch.int64, device=DEV)
        st["over"] = torch.empty(N, dtype=torch.int32, device=DEV)
        st["counts_G"] = torch.empty(G, dtype=torch.int64, device=DEV)
        st["seg"] = torch.empty(2, N, G, dtype=torch.int64, device=DEV)
        err = torch.zeros(3, dtype=torch.int32, device=DEV)
        K_.layout_kernel[(1,)](
            counts[me],
            me,
            N,
            E,
            E,
            G,
            C,
            st["offs"],
            st["over"],
            st["counts_G"],
            st["seg"],
            err,
            0,
            NB=triton.next_power_of_2(N),
            EB=triton.next_power_of_2(E),
        )
        S = st["idx_S"].numel()
        st["dest_rank"] = torch.empty(S, dtype=torch.int64, device=DEV)
        st["dest_pos"] = torch.empty(S, dtype=torch.int64, device=DEV)
        st["out"] = torch.full((C, H), float("nan"), dtype=dt, device=DEV)
        st["slot_of_row"] = torch.full((C,), -1, dtype=torch.int64, device=DEV)
        if S:
            K_.push_slots_kernel[grid(S * K_.row_chunks(H))](
                x[me],
                st["dest_pos"],
                st["idx_S"],
                st["rank_S"],
                st["offs"],
                st["over"],
                st["dest_rank"],
                st["dest_pos"],
                addresses(fwd_rows),
                st["out"],
                addresses(fwd_meta),
                no_put,
                me,
                G,
                K,
                H,
                S,
                COMPUTE_DEST=True,
                SCALE=False,
                HAS_PUT=False,
                BLOCK=K_.ROW_BLOCK,
            )
    sync()
    assert bool(pe_state[0]["over"].any()) == (
        capacity is not None
    ), "the small capacity must overflow a receiver"
    for me, st in enumerate(
        pe_state
    ):  # step 3: peer rows out of the staging; check against the reference
        if N > 1:
            K_.copy_segments_kernel[seg_grid](
                fwd_rows[me],
                st["out"],
                fwd_meta[me],
                st["slot_of_row"],
                st["seg"],
                me,
                N,
                G,
                H,
                HAS_META=True,
                SPLIT=4,
                BLOCK=K_.ROW_BLOCK,
            )
        want = [
            (e, src, t)
            for e in range(me * G, (me + 1) * G)
            for src in range(N)
            for t in range(T_of[src])
            for k in range(K)
            if idx[src][t, k].item() == e
        ]
        if len(want) > C:  # this receiver overflowed: it gets nothing
            want = []
        st["want"] = want
        n = len(want)
        got = [(src, t) for src, t in st["out"][:n, :2].float().cpu().long().tolist()]
        assert got == [
            (src, t) for _, src, t in want
        ], f"PE {me}: rows (source, token) out of reference order"
        assert st["counts_G"].sum().item() == n
        st["y"] = st["out"] * 2 + 1  # the "experts"
    sync()
    for me, st in enumerate(pe_state):  # step 4: answers back to their owners
        if N > 1:
            K_.return_segments_kernel[seg_grid](
                st["y"],
                st["slot_of_row"],
                st["seg"],
                addresses(ret_rows),
                no_put,
                me,
                N,
                G,
                H,
                SPLIT=4,
                HAS_PUT=False,
                BLOCK=K_.ROW_BLOCK,
            )
    sync()
    for me, st in enumerate(pe_state):  # step 5: the owner's weighted sum
        T = T_of[me]
        out = torch.full((T, H), float("nan"), dtype=dt, device=DEV)
        slots = torch.full((T, K, H), float("nan"), dtype=dt, device=DEV)
        if T:
            K_.gather_reduce_kernel[grid(T * K_.row_chunks(H))](
                st["y"],
                ret_rows[me],
                st["dest_rank"],
                st["dest_pos"],
                w[me],
                out,
                slots,
                me,
                K,
                H,
                T,
                HAS_W=True,
                KEEP_SLOTS=True,
                BLOCK=K_.ROW_BLOCK,
            )
        used = sent_mask(me).unsqueeze(-1)
        f = (x[me].float() * 2 + 1).to(dt).float()
        want_slots = torch.where(used, f.unsqueeze(1), 0.0)
        torch.testing.assert_close(slots.float(), want_slots, rtol=0, atol=0)
        want = (want_slots * w[me].unsqueeze(-1)).sum(1)
        torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2)
        assert not out.isnan().any(), "an output element was never written"

    # Backward of the combine: grad rows w[t, k] * g[t] travel to the slots' expert rows (dispatch
    # direction).
    g = [torch.randn(T, H, generator=gen).to(dt).to(DEV) for T in T_of]
    fwd_rows2 = [torch.full((C, H), float("nan"), dtype=dt, device=DEV) for _ in range(N)]
    for me, st in enumerate(pe_state):
        st["grad_y"] = torch.full((C, H), float("nan"), dtype=dt, device=DEV)
        S = st["idx_S"].numel()
        if S:
            K_.push_slots_kernel[grid(S * K_.row_chunks(H))](
                g[me],
                w[me].reshape(-1),
                st["dest_pos"],
                st["dest_pos"],
                st["dest_pos"],
                st["dest_pos"],
                st["dest_rank"],
                st["dest_pos"],
                addresses(fwd_rows2),
                st["grad_y"],
                addresses(fwd_meta),
                no_put,
                me,
                G,
                K,
                H,
                S,
                COMPUTE_DEST=False,
                SCALE=True,
                HAS_PUT=False,
                BLOCK=K_.ROW_BLOCK,
            )
    sync()
    for me, st in enumerate(pe_state):
        if N > 1:
            K_.copy_segments_kernel[seg_grid](
                fwd_rows2[me],
                st["grad_y"],
                fwd_meta[me],
                st["seg"],
                st["seg"],
                me,
                N,
                G,
                H,
                HAS_META=False,
                SPLIT=4,
                BLOCK=K_.ROW_BLOCK,
            )
        slot_rows = [
            (src, t, k)
            for e, src, t in st["want"]
            for k in [next(k for k in range(K) if idx[src][t, k].item() == e)]
        ]
        want_g = [(g[src][t].float() * w[src][t, k]).to(dt).float() for src, t, k in slot_rows]
        if want_g:
            torch.testing.assert_close(
                st["grad_y"][: len(want_g)].float(), torch.stack(want_g), rtol=1e-2, atol=1e-2
            )
    # Backward of the dispatch: expert-side gradient rows go back to their slots, summed per token.
    ret_rows2 = [
        torch.full((max(T_of) * K, H), float("nan"), dtype=dt, device=DEV) for _ in range(N)
    ]
    for me, st in enumerate(pe_state):
        if N > 1:
            K_.return_segments_kernel[seg_grid](
                st["grad_y"],
                st["slot_of_row"],
                st["seg"],
                addresses(ret_rows2),
                no_put,
                me,
                N,
                G,
                H,
                SPLIT=4,
                HAS_PUT=False,
                BLOCK=K_.ROW_BLOCK,
            )
    sync()
    for me, st in enumerate(pe_state):
        T = T_of[me]
        grad_x = torch.full((T, H), float("nan"), dtype=dt, device=DEV)
        if T:
            K_.gather_reduce_kernel[grid(T * K_.row_chunks(H))](
                st["grad_y"],
                ret_rows2[me],
                st["dest_rank"],
                st["dest_pos"],
                st["dest_pos"],
                grad_x,
                grad_x,
                me,
                K,
                H,
                T,
                HAS_W=False,
                KEEP_SLOTS=False,
                BLOCK=K_.ROW_BLOCK,
            )
        per_slot = (g[me].float().unsqueeze(1) * w[me].unsqueeze(-1)).to(dt).float()
        want = torch.where(sent_mask(me).unsqueeze(-1), per_slot, 0.0).sum(1)
        torch.testing.assert_close(grad_x.float(), want, rtol=1e-2, atol=1e-2)


def test_p2p_kernels_leave_put_peers_to_the_put_kernels():
    """With HAS_PUT, push_slots and return_segments store nothing for peers marked in via_put (their
    rows go by NVSHMEM puts, which need a GPU: the worker checks that path) and everything else as
    before."""
    N, G, K, H = 3, 2, 1, 40
    S = 6
    dest_rank = torch.tensor(
        [0, 1, 2, 1, 2, -1], dtype=torch.int64, device=DEV
    )  # PE 1 sends; PE 2 is a put peer
    dest_pos = torch.tensor([0, 0, 0, 1, 1, 0], dtype=torch.int64, device=DEV)
    via_put = torch.tensor([0, 0, 1], dtype=torch.int32, device=DEV)
    x = torch.arange(S * H, dtype=torch.float32, device=DEV).reshape(S, H)
    staging = [torch.full((4, H), float("nan"), device=DEV) for _ in range(N)]
    meta = [torch.full((4,), -1, dtype=torch.int64, device=DEV) for _ in range(N)]
    own = torch.full((4, H), float("nan"), device=DEV)
    K_.push_slots_kernel[(S * K_.row_chunks(H),)](
        x,
        dest_pos,
        dest_pos,
        dest_pos,
        dest_pos,
        dest_pos,
        dest_rank,
        dest_pos,
        addresses(staging),
        own,
        addresses(meta),
        via_put,
        1,
        G,
        K,
        H,
        S,
        COMPUTE_DEST=False,
        SCALE=False,
        HAS_PUT=True,
        BLOCK=K_.ROW_BLOCK,
    )
    sync()
    assert (
        torch.equal(staging[0][0], x[0]) and meta[0][0] == 0
    )  # a P2P peer: stored, with the slot id
    assert torch.equal(own[0], x[1]) and torch.equal(own[1], x[3])  # own rows in place
    assert staging[2].isnan().all() and (meta[2] == -1).all()  # the put peer: untouched
    # combine direction, at PE 0: segment (source, local expert); sources 1 (P2P) and 2 (put) sent
    # one row each
    seg = torch.tensor([[0, 0, 1, 0, 2, 0], [0, 0, 1, 0, 1, 0]], dtype=torch.int64, device=DEV)
    rows = torch.randn(3, H, device=DEV)
    slot_of_row = torch.tensor([0, 4, 5], dtype=torch.int64, device=DEV)
    ret = [torch.full((S, H), float("nan"), device=DEV) for _ in range(N)]
    K_.return_segments_kernel[(N * G * 2 * K_.row_chunks(H),)](
        rows,
        slot_of_row,
        seg,
        addresses(ret),
        via_put,
        0,
        N,
        G,
        H,
        SPLIT=2,
        HAS_PUT=True,
        BLOCK=K_.ROW_BLOCK,
    )
    sync()
    assert torch.equal(ret[1][4], rows[1]) and ret[1].isnan().sum() == (S - 1) * H
    assert ret[2].isnan().all() and ret[0].isnan().all()


# -- the call header beside the counts (transport/handshake.py FIELDS; PROTOCOL.md "Header") -------
def run_headers(headers, words=None, extra=5):
    """Emulated PEs: each sends its header to every PE, then each checks the matrix it holds. The
    matrices have the workspace's layout: a PE's row is its header, then `extra` ints (its counts,
    left alone). `words`: the error words [N, 3] each PE held before (default zeros). Returns the
    error words each PE recorded."""
    from moe_dist.transport import handshake as HS

    N, F = len(headers), HS.F
    W = F + extra
    mats = [torch.full((N, W), -9, dtype=torch.int64, device=DEV) for _ in range(N)]
    for me, h in enumerate(headers):
        K_.send_header_kernel[(N,)](h.to(DEV), addresses(mats), me, W, F=F, FB=16)
    words = torch.zeros(N, 3, dtype=torch.int32) if words is None else words.clone()
    words = words.to(DEV)
    for me in range(N):
        K_.check_header_kernel[(1,)](
            mats[me],
            me,
            N,
            W,
            words[me],
            7,
            F=F,
            STATUS=HS.FIELDS.index("status"),
            ORIGIN=HS.FIELDS.index("origin"),
            NB=triton.next_power_of_2(N),
            FB=16,
        )
    sync()
    for m in mats:  # every PE holds every PE's header; the rest of each row is untouched
        assert torch.equal(m[:, :F].cpu(), torch.stack(headers)), m
        assert (m[:, F:] == -9).all(), m
    return words.cpu()


def a_header(gen, **fields):
    from moe_dist.transport import handshake as HS

    h = torch.randint(0, 1000, (HS.F,), generator=gen)
    h[HS.FIELDS.index("status")], h[HS.FIELDS.index("origin")] = 0, -1
    for name, v in fields.items():
        h[HS.FIELDS.index(name)] = v
    return h


@pytest.mark.parametrize("seed", range(3))
def test_headers_agree_mismatch_and_failure(seed):
    from moe_dist.errors import PEER_FAILED, RANK_MISMATCH
    from moe_dist.transport import handshake as HS

    gen = torch.Generator().manual_seed(seed)
    N = 2 + seed
    base = a_header(gen)
    assert run_headers([base.clone() for _ in range(N)]).abs().sum() == 0  # agreement: no error

    # one PE differs in one field: every PE records RANK_MISMATCH naming that field
    odd = int(torch.randint(0, N, (1,), generator=gen))
    field = int(torch.randint(0, HS.FIELDS.index("status"), (1,), generator=gen))
    hs = [base.clone() for _ in range(N)]
    hs[odd][field] += 1 + int(torch.randint(0, 5, (1,), generator=gen))
    words = run_headers(hs)
    assert (words[:, 0] == RANK_MISMATCH).all() and (words[:, 1] == 7).all(), words
    assert ((words[:, 2] // 65536) == field).all(), (words, field)
    for me in range(N):  # the first PE whose header differs from this PE's own
        assert words[me, 2] % 65536 == (odd if me != odd else (1 if odd == 0 else 0))

    # one PE carries an error status: every PE records PEER_FAILED with its origin and status;
    # a mismatch beside it is not reported (the failure explains it)
    hs = [base.clone() for _ in range(N)]
    hs[odd][HS.FIELDS.index("status")] = HS.RANK_FAILED
    hs[odd][HS.FIELDS.index("origin")] = odd
    hs[odd][HS.FIELDS.index("hidden")] += 3
    words = run_headers(hs)
    assert (words[:, 0] == PEER_FAILED).all(), words
    assert (words[:, 2] == odd * 65536 + HS.RANK_FAILED).all(), words


def test_header_check_keeps_an_earlier_error():
    """Out of step (a timeout recorded, now or before): rows may be stale, so nothing is compared
    and the timeout's step and peer stand. An earlier overflow (not out of step) is outranked:
    the mismatch's step and detail replace it (check() raises RankMismatch first)."""
    from moe_dist.errors import BUFFER_OVERFLOW, PEER_TIMEOUT, RANK_MISMATCH
    from moe_dist.transport import handshake as HS

    gen = torch.Generator().manual_seed(5)
    base = a_header(gen)
    hs = [base.clone() for _ in range(3)]
    hs[2][HS.FIELDS.index("top_k")] += 1  # a stale row from PE 2
    before = torch.tensor([[PEER_TIMEOUT, 3, 2], [0, 0, 0], [BUFFER_OVERFLOW, 4, 0]])
    words = run_headers(hs, before)
    assert words[0].tolist() == [PEER_TIMEOUT, 3, 2], words
    top_k = HS.FIELDS.index("top_k")
    assert words[1].tolist() == [RANK_MISMATCH, 7, top_k * 65536 + 2], words
    assert words[2].tolist() == [BUFFER_OVERFLOW | RANK_MISMATCH, 7, top_k * 65536 + 0], words
