"""The nvshmem call header (PROTOCOL.md "Header") on every path, with N PEs emulated in one process
under Triton's interpreter (tests/gpu/nvshmem_emulation.py): P2P peers get a PE's header row by
stores, put peers in the one putmem_signal that carries its counts (slot path, or the dedup path
under put_dedup). A PE that disagrees makes
every PE raise RankMismatch naming the field; a PE that fails before its dispatch makes every PE
raise its error naming it; neither waits for a timeout. Legend: T tokens, K slots/token, E experts,
G local experts, N PEs, H hidden, C receive rows."""

import time

import pytest
import torch

from moe_dist.errors import BufferOverflow, NonFiniteRouterLogits, RankFailed, RankMismatch
from moe_dist.routing import RoutingPlan

from tests.gpu import nvshmem_emulation
from tests.gpu.nvshmem_emulation import (
    INTERPRETED,
    PEER_PATHS,
    Flags,
    make_transport,
    run_pes,
    workspaces,
)

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="runs in Triton's interpreter (CPU)")
triton = pytest.importorskip("triton")

G, K, H, T_MAX = 2, 2, 40, 6
TIMEOUT_S = 30.0  # the emulated flag wait's bound: an error must come well before it


# "+dedup": the put and mixed paths under NvshmemOptions(put_dedup=True) (pairs, not slots)
PATHS = PEER_PATHS + ("put+dedup", "mixed+dedup")


def setup(N, peers, seed, check_headers=True):
    E = G * N
    C = N * T_MAX * K
    peers, dedup = peers.removesuffix("+dedup"), peers.endswith("+dedup")
    wss = workspaces(N, E, K, H, T_MAX, C, torch.float32, peers, put_dedup=dedup)
    flags = Flags(wss, timeout_s=TIMEOUT_S)
    trs = [
        make_transport(ws, E, K, T_MAX, flags, check_headers=check_headers, put_dedup=dedup)
        for ws in wss
    ]
    for tr in trs:
        tr.context.layer, tr.context.step = "moe.0", 3
        tr.error_flags.layer_name = "moe.0"
    gen = torch.Generator().manual_seed(seed)
    return trs, gen, E


def a_call(gen, E, T, hidden=H):
    """Fresh random tokens (stamped with their index) and a plan over E experts."""
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    x = torch.randn(T, hidden, generator=gen)
    x[:, 0] = torch.arange(T)
    w = torch.rand(T, K, generator=gen)
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    plan = RoutingPlan(idx, w, counts, torch.zeros(()), torch.zeros((), dtype=torch.long), True)
    return x, plan


def forward(tr, x, plan):
    """Dispatch, the experts (x2), combine; then the layer's end-of-forward check."""
    with torch.no_grad():
        tok, counts_G, h = tr.dispatch(x, plan)
        tr.combine(tok * 2, h)
    tr.error_flags.check()


@pytest.mark.parametrize("peers", PATHS)
@pytest.mark.parametrize("N,field", [(2, "layer"), (2, "call"), (3, "hidden"), (3, "step")])
def test_a_disagreeing_pe_makes_every_pe_raise_rank_mismatch(peers, N, field):
    trs, gen, E = setup(N, peers, seed=N * 10 + len(field))
    # an agreeing call first, so the mismatch is read from rows that replaced an earlier call's
    first = [a_call(gen, E, T=3) for _ in range(N)]
    assert run_pes(N, lambda pe: forward(trs[pe], *first[pe])) == [None] * N
    odd = N - 1  # the mixed path: a put peer of every other PE
    calls = [
        a_call(gen, E, T=4 + pe, hidden=H - 8 if (field == "hidden" and pe == odd) else H)
        for pe in range(N)
    ]
    if field == "layer":
        trs[odd].context.layer = "moe.1"
    elif field == "call":
        trs[odd].calls += 1  # this PE made one transport call more than its peers
    elif field == "step":
        trs[odd].context.step += 1  # this PE runs another forward of the layer
    t0 = time.monotonic()
    got = run_pes(N, lambda pe: forward(trs[pe], *calls[pe]))
    assert time.monotonic() - t0 < TIMEOUT_S, "a PE waited for a timeout"
    for pe, r in enumerate(got):
        assert isinstance(r, RankMismatch), (pe, r)
        assert f"on {field} " in str(r) and "'moe.0'" in str(r), (pe, r)
        first_other = odd if pe != odd else 0  # the first PE whose header differs from mine
        assert f"(PE {first_other} differs" in str(r), (pe, r)


@pytest.mark.parametrize("peers", PATHS)
def test_agreeing_pes_raise_nothing_over_many_calls(peers):
    """Both parities, several calls: headers of earlier calls are never taken for this call's."""
    N = 3
    trs, gen, E = setup(N, peers, seed=7)
    for step in range(3):
        calls = [a_call(gen, E, T=2 + (pe + step) % 3) for pe in range(N)]
        got = run_pes(N, lambda pe: forward(trs[pe], *calls[pe]))
        assert all(r is None for r in got), got
        for tr in trs:
            tr.context.step += 1


@pytest.mark.parametrize("peers", PATHS)
@pytest.mark.parametrize("N", [2, 3])
def test_a_failing_pe_makes_every_pe_raise_its_error(peers, N):
    """The failing PE (fail_together: its routing raised) makes one count exchange with its error
    in the header; the others dispatch and combine (their later waits do not wait: the failing PE
    never signals them) and raise the same error at their check."""
    trs, gen, E = setup(N, peers, seed=N)
    odd = N - 1
    calls = [a_call(gen, E, T=3 + pe) for pe in range(N)]
    cause = NonFiniteRouterLogits("MoE layer 'moe.0', step 3: router logits contain NaN or Inf")

    def run(pe):
        if pe == odd:
            trs[pe].fail_together(cause)
        forward(trs[pe], *calls[pe])

    t0 = time.monotonic()
    got = run_pes(N, run)
    assert time.monotonic() - t0 < TIMEOUT_S, "a PE waited for a timeout"
    for pe, r in enumerate(got):
        assert isinstance(r, NonFiniteRouterLogits), (pe, r)
        assert f"PE {odd} of the EP group" in str(r) and "'moe.0', step 3" in str(r), (pe, r)
    assert got[odd].__cause__ is cause  # the failing PE's own error is chained


@pytest.mark.parametrize("peers", PATHS)
@pytest.mark.parametrize("peers_next", ["combine", "dispatch"])
def test_a_pe_whose_experts_raise_makes_every_pe_raise_its_error(peers, peers_next):
    """After a dispatch that went well, one PE's experts raise: it carries the error in the call
    its peers are in (fail_together "combine": its header with the status, both channels'
    flags, no rows), so every PE raises it naming that PE, without waiting for a timeout. The
    peers' next call is the combine or, should a caller issue one first, a dispatch."""
    N = 3
    trs, gen, E = setup(N, peers, seed=21 + len(peers_next))
    odd = N - 1
    calls = [a_call(gen, E, T=3 + pe) for pe in range(N)]
    more = [a_call(gen, E, T=2) for pe in range(N)]
    cause = ValueError("an expert's kernel failed")

    def run(pe):
        tr = trs[pe]
        with torch.no_grad():
            tok, _, h = tr.dispatch(*calls[pe])
            if pe == odd:
                tr.fail_together(cause, "combine")
            elif peers_next == "combine":
                tr.combine(tok * 2, h)
            else:
                tr.dispatch(*more[pe])
        tr.error_flags.check()

    t0 = time.monotonic()
    got = run_pes(N, run)
    assert time.monotonic() - t0 < TIMEOUT_S, "a PE waited for a timeout"
    for pe, r in enumerate(got):
        assert isinstance(r, RankFailed), (pe, r)
        assert f"PE {odd} of the EP group" in str(r) and "'moe.0', step 3" in str(r), (pe, r)
    assert got[odd].__cause__ is cause  # the failing PE's own error is chained


@pytest.mark.parametrize("peers", PATHS)
def test_an_earlier_failed_call_is_not_taken_for_a_later_one(peers):
    """The combine's status check reads rows of earlier calls too: only a row naming this call's
    epoch counts. A PE failed in one call; after the error is cleared and the call numbers start
    again (a rebuilt layer of the same name on the same workspaces), the PEs' later calls on the
    same parity see that stale row and raise nothing."""
    N = 2
    trs, gen, E = setup(N, peers, seed=31)
    first = [a_call(gen, E, T=3) for _ in range(N)]

    def fail_in_combine(pe):
        tr = trs[pe]
        with torch.no_grad():
            tok, _, h = tr.dispatch(*first[pe])
            if pe == 0:
                tr.fail_together(ValueError("boom"), "combine")
            tr.combine(tok * 2, h)
        tr.error_flags.check()

    assert all(isinstance(r, RankFailed) for r in run_pes(N, fail_in_combine))
    for tr in trs:  # a fresh start of the same workspaces, PEs back in step
        tr.error_flags.words.zero_()
        tr.calls = 0
    for step in range(3):
        calls = [a_call(gen, E, T=2 + step) for _ in range(N)]
        got = run_pes(N, lambda pe: forward(trs[pe], *calls[pe]))
        assert got == [None] * N, (step, got)


@pytest.mark.parametrize("peers", PATHS)
def test_too_many_tokens_on_one_pe_is_raised_on_every_pe(peers):
    """A PE with more tokens than max_tokens_per_rank fails inside its dispatch: the count
    exchange carries BufferOverflow to its peers instead of leaving them waiting."""
    N = 2
    trs, gen, E = setup(N, peers, seed=11)
    calls = [a_call(gen, E, T=T_MAX + 3 if pe == 0 else 4) for pe in range(N)]
    got = run_pes(N, lambda pe: forward(trs[pe], *calls[pe]))
    for pe, r in enumerate(got):
        assert isinstance(r, BufferOverflow) and "PE 0 of the EP group" in str(r), (pe, r)
    assert "exceed max_tokens_per_rank=6" in str(got[0].__cause__)


def test_headers_off_compare_nothing():
    """NvshmemOptions(check_headers=False): a disagreeing layer name goes unnoticed (the data
    still travels, the rest of the protocol is the same)."""
    N = 2
    trs, gen, E = setup(N, "mixed", seed=5, check_headers=False)
    trs[1].context.layer = "moe.1"
    calls = [a_call(gen, E, T=4) for _ in range(N)]
    got = run_pes(N, lambda pe: forward(trs[pe], *calls[pe]))
    assert all(r is None for r in got), got


@pytest.mark.parametrize("peers", PEER_PATHS)
def test_an_experts_error_travels_in_the_workspace_its_dispatch_used(peers):
    """A transport holds one workspace per (dtype, hidden): one made at construction for the
    layer's dtype, another at the first call in a different dtype (autocast, a cast model). The
    error of a PE whose experts raise must travel in the workspace of the call its peers are in
    (the one its dispatch used), not in the first one made, where nobody waits."""
    N = 2
    E, C = G * N, N * T_MAX * K
    made_first = workspaces(N, E, K, H, T_MAX, C, torch.float64, peers)
    first_heap = nvshmem_emulation._HEAP[0]
    wss = workspaces(N, E, K, H, T_MAX, C, torch.float32, peers)
    for name, per_pe in first_heap.buffers.items():  # the put kernels reach both sets
        nvshmem_emulation._HEAP[0].add(name + "@first", per_pe)
    flags_first, flags = Flags(made_first, TIMEOUT_S), Flags(wss, TIMEOUT_S)
    trs = []
    for pe in range(N):
        tr = make_transport(wss[pe], E, K, T_MAX, flags)
        tr._workspaces = {(torch.float64, H): made_first[pe], (torch.float32, H): wss[pe]}
        tr.workspace = lambda dtype, hidden, spaces=tr._workspaces: spaces[(dtype, hidden)]
        tr._wait = lambda ws, *args, tr=tr: (
            flags_first if ws.dtype == torch.float64 else flags
        ).wait(tr, ws, *args)
        tr.context.layer, tr.context.step = "moe.0", 3
        tr.error_flags.layer_name = "moe.0"
        trs.append(tr)
    gen = torch.Generator().manual_seed(41)
    calls = [a_call(gen, E, T=3 + pe) for pe in range(N)]
    odd = N - 1
    cause = ValueError("an expert's kernel failed")

    def run(pe):
        tr = trs[pe]
        with torch.no_grad():
            tok, _, h = tr.dispatch(*calls[pe])  # float32: the workspace made second
            if pe == odd:
                tr.fail_together(cause, "combine")
            tr.combine(tok * 2, h)
        tr.error_flags.check()

    t0 = time.monotonic()
    got = run_pes(N, run)
    assert time.monotonic() - t0 < TIMEOUT_S, "a PE waited for a timeout"
    for pe, r in enumerate(got):
        assert isinstance(r, RankFailed) and f"PE {odd} of the EP group" in str(r), (pe, r)
    assert got[odd].__cause__ is cause
