"""Runs under torchrun, one process per GPU, NCCL: the collective transport's host syncs per
dispatch and per combine, counted by CUDA's sync debug mode (every synchronizing CUDA call warns:
device->host reads, blocking host->device copies, stream and device syncs), on fresh random
routings, with outputs against the reference transport. Expected: 1 per dispatch (headers, counts
and split sizes in one read; the header goes up from pinned memory), 1 per combine (its
handshake's verdict; collective.py says why it stays). NCCL's bounded wait polls an event and is
not counted. Prints 'COLLECTIVE SYNCS OK <n>'. Used by tests/gpu/test_collective_syncs_gpu.py.
Legend: T tokens, K slots per token, E experts, H hidden."""

import datetime
import os
import warnings

import torch
import torch.distributed as dist

from moe_dist import ParallelGroups
from moe_dist.routing import RoutingPlan
from moe_dist.transport import CollectiveTransport, ReferenceTransport
from moe_dist.transport.fp8 import fp8_unsupported_reason

E = 8
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
torch.cuda.set_device(dev)
dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=120), device_id=dev)
groups = ParallelGroups(ep_size=world)


def synced(fn, *args):
    """(fn(*args), synchronizing CUDA calls made inside it)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    n = sum("synchronizing CUDA operation" in str(w.message) for w in seen)
    return out, n


def random_plan(T, K, gen) -> RoutingPlan:
    idx = torch.zeros(0, K, dtype=torch.long)
    if T:
        idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
        idx[torch.rand(T, K, generator=gen) < 0.2] = -1
    w = torch.rand(T, K, generator=gen) * (idx >= 0)
    counts = torch.zeros(E, dtype=torch.long)
    counts.scatter_add_(0, idx[idx >= 0], torch.ones_like(idx[idx >= 0]))
    return RoutingPlan(
        idx.to(dev),
        w.to(dev),
        counts.to(dev),
        torch.zeros((), device=dev),
        torch.zeros((), dtype=torch.long, device=dev),
        True,
    )


oracle = ReferenceTransport(E, groups.ep_group)
kinds = [("bf16", 64, torch.bfloat16)]
if fp8_unsupported_reason(dev) is None:
    kinds.append(("fp8_e4m3", 128, torch.bfloat16))
checked = 0
for dispatch_dtype, H, dtype in kinds:
    fast = CollectiveTransport(E, groups.ep_group, dispatch_dtype=dispatch_dtype)
    for trial in range(5):
        gen = torch.Generator().manual_seed(1000 * trial + 17 * rank + H)
        T = int(torch.randint(0, 40, (1,), generator=gen)) if trial else 9 * rank  # 0 tokens
        K = 1 + trial % 3
        plan = random_plan(T, K, gen)
        x = torch.randn(T, H, generator=gen).to(dev, dtype)
        where = f"rank {rank}, {dispatch_dtype}, trial {trial}, T={T}, K={K}"
        if trial == 0:  # first calls: NCCL communicators, pinned-memory blocks
            tok, _, handle = fast.dispatch(x, plan)
            fast.combine(tok, handle)
        (tok, counts_G, handle), n = synced(fast.dispatch, x, plan)
        assert n == 1, f"{where}: dispatch made {n} synchronizing CUDA calls, expected 1"
        ref_tok, ref_counts, ref_handle = oracle.dispatch(x, plan)
        assert torch.equal(counts_G, ref_counts), where
        m = int(counts_G.sum())
        tol = 0.07 if dispatch_dtype == "fp8_e4m3" else 0.0  # e4m3: 3 mantissa bits
        torch.testing.assert_close(tok[:m].float(), ref_tok.float(), rtol=tol, atol=tol)
        y = torch.randn(m, H, generator=gen).to(dev, dtype)
        out, n = synced(fast.combine, y, handle)
        assert n == 1, f"{where}: combine made {n} synchronizing CUDA calls, expected 1"
        ref = oracle.combine(y, ref_handle)
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
        checked += 1

dist.barrier()
dist.destroy_process_group()
print(f"COLLECTIVE SYNCS OK {checked}", flush=True)
