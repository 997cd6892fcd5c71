"""Host syncs and collective launches per call of the collective transport (issue 15's cost), over
2 gloo processes: a dispatch reads the device once (headers, counts and split sizes in one
transfer), a combine once (its handshake's verdict, made before the combine waits on the experts'
event), with outputs checked against the reference
transport on fresh random routings so the counted path is the real one.

On CPU nothing is on a device, so a "read" is counted where the code would read a GPU: a call of
tolist / cpu / item / numpy / bool / int / float on a tensor that no earlier read produced (a
tensor `.cpu()` returned is on the host already: reading it again costs nothing). Host->device
uploads cannot be told apart on CPU; tests/gpu/test_collective_syncs_gpu.py counts every sync, those
included, with CUDA's sync debug mode.
Legend: T tokens, K slots per token, E experts, H hidden."""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_dist import MoEConfig, MoELayer, ParallelGroups
from moe_dist.routing import RoutingPlan
from moe_dist.transport import CollectiveTransport, ReferenceTransport, collective

from .harness import run_distributed

WORLD, E = 2, 8
READS = ("tolist", "cpu", "item", "numpy", "__bool__", "__int__", "__float__")


class Counted:
    """Counts host reads (see the module docstring) and all_to_all_single launches while active.
    Installs its wrappers on torch.Tensor / torch.distributed for the process's lifetime (the
    children of run_distributed are short-lived)."""

    def __init__(self):
        self.active = False
        self.reads = self.launches = 0
        self._host: dict[int, torch.Tensor] = {}  # id -> tensor, kept alive so ids stay unique
        self._depth = 0  # a read inside a read (tolist calling item, say) is one read
        for name in READS:
            setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name)))
        launch = dist.all_to_all_single

        def counted_launch(*args, **kwargs):
            self.launches += self.active
            return launch(*args, **kwargs)

        dist.all_to_all_single = counted_launch

    def _wrap(self, read):
        def counted(t, *args, **kwargs):
            if self.active and self._depth == 0 and id(t) not in self._host:
                self.reads += 1
            self._depth += 1
            try:
                out = read(t, *args, **kwargs)
            finally:
                self._depth -= 1
            if self.active and isinstance(out, torch.Tensor):
                self._host[id(out)] = out
            return out

        return counted

    def run(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) -> (its result, host reads, launches) made inside it."""
        reads, launches = self.reads, self.launches
        self.active = True
        try:
            out = fn(*args, **kwargs)
        finally:
            self.active = False
            self._host.clear()
        return out, self.reads - reads, self.launches - launches


def random_plan(T: int, K: int, gen: torch.Generator) -> RoutingPlan:
    idx = torch.zeros(0, K, dtype=torch.long)
    if T:
        idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    if T:
        idx[torch.rand(T, K, generator=gen) < 0.2] = -1  # unused slots (top-p, drops)
    w = torch.rand(T, K, generator=gen) * (idx >= 0)
    counts = torch.zeros(E, dtype=torch.long)
    counts.scatter_add_(0, idx[idx >= 0], torch.ones_like(idx[idx >= 0]))
    return RoutingPlan(idx, w, counts, torch.zeros(()), torch.zeros((), dtype=torch.long), True)


def scenario_transport():
    rank = dist.get_rank()
    groups = ParallelGroups(ep_size=WORLD)
    count = Counted()
    oracle = ReferenceTransport(E, groups.ep_group)
    for dispatch_dtype, H, rows_launches in (("bf16", 6, 2), ("fp8_e4m3", 128, 3)):
        fast = CollectiveTransport(E, groups.ep_group, dispatch_dtype=dispatch_dtype)
        for trial in range(4):
            gen = torch.Generator().manual_seed(1000 * trial + 17 * rank + H)
            T = int(torch.randint(0, 12, (1,), generator=gen)) if trial else 5 * rank  # 0 tokens
            K = 1 + trial % 3
            plan = random_plan(T, K, gen)
            x = torch.randn(T, H, generator=gen)
            (tok, counts_G, handle), reads, launches = count.run(fast.dispatch, x, plan)
            where = f"rank {rank}, {dispatch_dtype}, trial {trial}, T={T}, K={K}"
            assert reads == 1, f"{where}: dispatch made {reads} host reads, expected 1"
            # the handshake, then the rows and their metadata (fp8: rows, scales, metadata)
            assert launches == 1 + rows_launches, f"{where}: dispatch launched {launches}"
            ref_tok, ref_counts, ref_handle = oracle.dispatch(x, plan)
            assert torch.equal(counts_G, ref_counts), where
            n = int(counts_G.sum())
            tol = 0.07 if dispatch_dtype == "fp8_e4m3" else 0.0  # e4m3: 3 mantissa bits
            torch.testing.assert_close(tok[:n], ref_tok, rtol=tol, atol=tol)
            y = torch.randn(n, H, generator=gen)
            seen = []  # the combine's handshake comes before its wait on the experts' event
            collective.wait_event = lambda ev, device: seen.append((ev, count.launches))
            launches_before = count.launches
            out, reads, launches = count.run(fast.combine, y, handle, previous_event="experts")
            assert seen == [("experts", launches_before + 1)], f"{where}: {seen}"
            assert reads == 1, f"{where}: combine made {reads} host reads, expected 1"
            assert launches == 2, f"{where}: combine launched {launches}, expected 2"
            torch.testing.assert_close(out, oracle.combine(y, ref_handle), rtol=1e-5, atol=1e-5)


def scenario_split_calls():
    """Two split calls in flight (start A, start B, run_experts A and B, finish A and B): 2
    dispatches and 2 combines per step, one read each, however the calls interleave."""
    rank = dist.get_rank()
    groups = ParallelGroups(ep_size=WORLD)
    count = Counted()
    cfg = MoEConfig(
        hidden_size=8,
        ffn_hidden_size=16,
        num_experts=E,
        top_k=2,
        transport="collective",
    )
    torch.manual_seed(0)
    layer = MoELayer(cfg, groups)
    calls = {"dispatch": [], "combine": []}
    for name in calls:
        real = getattr(layer.transport, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            out, reads, launches = count.run(_real, *args, **kwargs)
            calls[_name].append((reads, launches))
            return out

        setattr(layer.transport, name, counted)
    for step in range(2):
        pending = [layer.start(torch.randn(7 + 3 * rank + step + i, 8)) for i in range(2)]
        for p in pending:
            layer.run_experts(p)
        sum(layer.finish(p).output.sum() for p in pending).backward()
    assert calls["dispatch"] == [(1, 3)] * 4, f"rank {rank}: dispatch {calls['dispatch']}"
    assert calls["combine"] == [(1, 2)] * 4, f"rank {rank}: combine {calls['combine']}"


def test_one_host_read_per_dispatch_and_per_combine():
    run_distributed(scenario_transport, WORLD, timeout_s=60)


def test_split_calls_read_once_per_transport_call():
    run_distributed(scenario_split_calls, WORLD, timeout_s=60)
