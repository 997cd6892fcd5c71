"""Runs under torchrun on ONE GPU with N processes (NVSHMEM PEs sharing the GPU): the nvshmem
transport against the reference transport, forward and backward; no host sync; CUDA-graph capture;
overflow and timeout errors. Prints 'NVSHMEM WORKER OK <n>' on success. Used by
tests/gpu/test_nvshmem.py."""

import dataclasses
import os
import sys
import time

import torch
import torch.distributed as dist

from moe_dist import (
    BufferOverflow,
    MoEConfig,
    MoELayer,
    NonFiniteRouterLogits,
    PeerTimeout,
    RankFailed,
    RankMismatch,
)
from moe_dist.transport.dedup import count_pairs
from moe_dist.transport import NvshmemOptions, TransportOptions
from moe_dist.transport.nvshmem.runtime import bootstrap_method, workspace_bytes

from tests.conftest import assert_same_rows, stamp
from tests.gpu.torchrun_pes import setup_pe

H, F, E = 64, 32, 8
rank, world, dev, groups = setup_pe()
checks = []
T0 = time.monotonic()


def passed(msg):
    # Elapsed time per check shows where time-sliced multi-PE runs spend their time.
    checks.append(msg)
    print(f"[rank {rank}] {time.monotonic() - T0:6.1f}s {msg}", flush=True)


def tokens(r, seed, skew=False, hidden=H):
    T = [9, 0, 17, 5][r % 4] + seed % 3
    g = torch.Generator().manual_seed(1000 * seed + r)
    x = stamp(torch.randn(T, hidden, generator=g), r)
    return (x + (3.0 if skew else 0.0)).to(dev)


# The launcher's bootstrap (test_nvshmem.py runs this under mpirun with MOE_DIST_NVSHMEM_BOOTSTRAP).
NV = NvshmemOptions.from_env(os.environ, max_tokens_per_rank=64, peer_timeout_s=20.0)


def nvshmem_layer(cfg, nv=NV, **kw):
    options = TransportOptions(kind="nvshmem", nvshmem=nv)
    return MoELayer(cfg, groups, transport_options=options, device=dev, **kw)


def pair(cfg, seed, dtype=torch.float32, nv=NV):
    torch.manual_seed(seed)
    fast = nvshmem_layer(cfg, nv, name="fast", dtype=dtype)
    torch.manual_seed(seed)
    ref = MoELayer(cfg.replace(transport="reference"), groups, name="ref", device=dev, dtype=dtype)
    return fast, ref


def _grad(p):
    # The loop oracle leaves experts that got no rows out of the graph (grad None): that is a zero
    # gradient.
    return torch.zeros_like(p) if p.grad is None else p.grad.clone()


def compare(cfg, seed, skew=False, dtype=torch.float32, nv=NV):
    fast, ref = pair(cfg, seed, dtype, nv)
    if skew:
        for layer in (fast, ref):
            with torch.no_grad():
                layer.router.weight.zero_()
                layer.router.weight[3] = 5.0
    x = tokens(rank, seed, skew, cfg.hidden_size).to(dtype)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(
        dev, dtype
    )
    outs = []
    for layer in (fast, ref):
        xi = x.clone().requires_grad_(True)
        y, aux, counts = layer(xi)
        (y * g).sum().add(aux).backward()
        outs.append((y.detach(), xi.grad, {n: _grad(p) for n, p in layer.named_parameters()}))
    fast.check_errors()
    (y1, gx1, gp1), (y2, gx2, gp2) = outs
    if dtype == torch.float32:
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-5)
        for n in gp1:
            torch.testing.assert_close(
                gp1[n], gp2[n], rtol=1e-5, atol=1e-5, msg=lambda m: f"grad {n}: {m}"
            )
    else:  # bf16 rounds at different points (the combine sums in fp32): relative error of the whole tensor
        for n, a, b in [("output", y1, y2), ("input grad", gx1, gx2)] + [
            (f"grad {n}", gp1[n], gp2[n]) for n in gp1
        ]:
            err = (a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6)
            assert (
                err < 2e-2
            ), f"rank {rank}: {n} differs from the reference by {err:.3g} (relative)"
    # stamps: the rows dispatched are the reference's rows, in the reference's order
    plan = fast.router(x)
    tok, counts, _ = fast.transport.dispatch(x, plan)
    rtok, rcounts, _ = ref.transport.dispatch(x, plan)
    n = int(counts.sum())
    assert torch.equal(counts, rcounts), (counts, rcounts)
    assert_same_rows(tok[:n], rtok, f"rank {rank}")
    # dedup (every peer P2P, or put_dedup): rows sent = distinct (token, peer PE) pairs of the routing
    sent = fast.transport.sent_rows_N
    assert sent is not None or not nv.put_dedup, "put_dedup took the one-row-per-slot path"
    if sent is not None:
        want = count_pairs(plan.expert_idx_TK, E // world, world)
        want[rank] = 0
        assert sent.tolist() == want.tolist(), f"rank {rank}: sent {sent.tolist()} != {want}"
    mixed = f" (put to PEs {sorted(nv.put_peers)})" if nv.put_peers else ""
    passed(
        f"equal cfg={cfg.router}/k{cfg.top_k} H={cfg.hidden_size} {str(dtype)[6:]} skew={skew} "
        f"peers={nv.peer_path}{mixed} dedup={sent is not None}"
    )


def compare_fp8(cfg, seed, dtype=torch.bfloat16, nv=NV):
    """dispatch_dtype='fp8_e4m3' against the reference (activation-dtype rows): bounded relative
    error on outputs, input and weight gradients, and fewer bytes than bf16 by design."""
    fast, ref = pair(cfg.replace(dispatch_dtype="fp8_e4m3"), seed, dtype, nv)
    x = tokens(rank, seed, hidden=cfg.hidden_size).to(dtype)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(dev, dtype)
    outs = []
    for layer in (fast, ref):
        xi = x.clone().requires_grad_(True)
        y, aux, _ = layer(xi)
        (y * g).sum().add(aux).backward()
        outs.append((y.detach(), xi.grad, _grad(layer.experts.w_in)))
    fast.check_errors()
    for name, a, b in zip(("output", "input grad", "w_in grad"), outs[0], outs[1]):
        err = float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6))
        assert err < 0.06, f"rank {rank}: fp8 {name} differs from the reference by {err:.3g}"
    passed(
        f"fp8 dispatch within 6% of the reference cfg=k{cfg.top_k} H={cfg.hidden_size} "
        f"peers={nv.peer_path} put_peers={sorted(nv.put_peers)} put_dedup={nv.put_dedup}"
    )


base = MoEConfig(
    hidden_size=H,
    ffn_hidden_size=F,
    num_experts=E,
    top_k=2,
    expert_backend="loop",
)
compare(base, 1)
compare(base.replace(num_shared_experts=1), 2)
compare(base.replace(router="top_p", top_k=3, top_p=0.6), 3)
compare(base.replace(top_k=1), 4, skew=True)
compare(base, 5, skew=True)
# The put-with-signal path (for peers without P2P), forced for every peer: NVSHMEM puts to PEs on
# the same GPU; first one row per slot (put_dedup=False), the put_dedup default further below.
PUT = dataclasses.replace(NV, peer_path="put", put_dedup=False)
compare(base, 6, nv=PUT)
compare(base.replace(router="top_p", top_k=3, top_p=0.6, num_shared_experts=1), 7, nv=PUT)
compare(base.replace(top_k=1), 8, skew=True, nv=PUT)
# Rows of two chunks (the second partial) in bf16, all puts; then a mix: odd PEs by puts, the rest
# by stores.
compare(base.replace(hidden_size=1500), 9, dtype=torch.bfloat16, nv=PUT)
MIXED = dataclasses.replace(PUT, peer_path="auto", put_peers=frozenset(range(1, world, 2)))
compare(base.replace(hidden_size=1500), 10, nv=MIXED)
compare(base.replace(hidden_size=1500, top_k=1), 11, skew=True, dtype=torch.bfloat16, nv=MIXED)
# FP8 rows (dedup path, every peer P2P), forward and backward; refused clearly with put peers.
compare_fp8(base.replace(hidden_size=256, top_k=4), 12)
compare_fp8(base.replace(hidden_size=1152, router="top_p", top_k=3, top_p=0.6), 13)
if world > 1:
    torch.manual_seed(14)
    fp8_put = nvshmem_layer(
        base.replace(hidden_size=256, dispatch_dtype="fp8_e4m3"), PUT,
        name="fp8_put", dtype=torch.bfloat16,
    )  # fmt: skip
    try:
        fp8_put(tokens(rank, 14, hidden=256).to(torch.bfloat16))
        raise AssertionError("fp8 with put peers not refused")
    except RuntimeError as e:
        assert "fp8_e4m3" in str(e) and "put peers" in str(e), e
        passed("fp8 with put peers refused")
# put_dedup (DEDUP.md "Put peers"): the deduplicated path with put peers, every peer by puts and
# the mix, fp32/bf16 and fp8 rows; compare checks the rows-sent counter (distinct (token, PE)).
PUT_DEDUP = dataclasses.replace(PUT, put_dedup=True)
MIXED_DEDUP = dataclasses.replace(MIXED, put_dedup=True)
compare(base, 15, nv=PUT_DEDUP)
compare(base.replace(router="top_p", top_k=3, top_p=0.6, num_shared_experts=1), 16, nv=PUT_DEDUP)
compare(base.replace(hidden_size=1500, top_k=4), 17, dtype=torch.bfloat16, nv=PUT_DEDUP)
compare(base.replace(top_k=1), 18, skew=True, nv=PUT_DEDUP)
compare(base.replace(hidden_size=1500, top_k=4), 19, nv=MIXED_DEDUP)
compare(base, 20, skew=True, dtype=torch.bfloat16, nv=MIXED_DEDUP)
compare_fp8(base.replace(hidden_size=256, top_k=4), 21, nv=PUT_DEDUP)
# Symmetric memory per PE (README formula, pair send staging included with put peers).
for nv in (NV, PUT, PUT_DEDUP, MIXED_DEDUP):
    torch.manual_seed(23)
    sized = nvshmem_layer(base.replace(hidden_size=256), nv, name="sized", dtype=torch.bfloat16)
    tr = sized.transport
    (ws,) = tr._workspaces.values()
    want = workspace_bytes(
        world, 256, E, nv.max_tokens_per_rank, base.top_k, tr.capacity, 2, ws.any_put, nv.put_dedup
    )
    assert tr.memory_bytes_per_pe() == want, (nv, tr.memory_bytes_per_pe(), want)
passed("memory_bytes_per_pe equals the README formula (p2p, put, put_dedup, mixed put_dedup)")
compare_fp8(base.replace(hidden_size=1152, router="top_p", top_k=3, top_p=0.6), 22, nv=MIXED_DEDUP)

# No host synchronisation between router and combine output, forward and backward (bf16 fast path).
fast_cfg = base.replace(
    expert_backend="auto", error_check="deferred", hidden_size=64, ffn_hidden_size=32
)
# (the last one's layer goes on to the CUDA-graph check)
for peer_path, ddt, put_dedup in (
    ("put", "bf16", False),
    ("put", "fp8_e4m3", True),
    ("auto", "fp8_e4m3", False),
    ("auto", "bf16", False),
):
    torch.manual_seed(7)
    hidden = 128 if ddt == "fp8_e4m3" else 64
    layer = nvshmem_layer(
        fast_cfg.replace(dispatch_dtype=ddt, hidden_size=hidden),
        dataclasses.replace(NV, peer_path=peer_path, put_dedup=put_dedup),
        name="nosync",
        dtype=torch.bfloat16,
    )
    x = tokens(rank, 7, hidden=hidden).to(torch.bfloat16).requires_grad_(True)
    for _ in range(2):  # warm-up compiles the Triton kernels (compilation itself may sync)
        layer(x).output.float().sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    y = layer(x).output
    y.float().sum().backward()
    torch.cuda.set_sync_debug_mode(0)
    layer.check_errors()
    passed(
        f"no host sync in forward+backward (peers={peer_path}, dispatch {ddt}, "
        f"put_dedup={put_dedup})"
    )

# CUDA-graph capture of a forward, replayed on new data.
static_x = tokens(rank, 8).to(torch.bfloat16)
with torch.no_grad():
    eager = layer(static_x).output.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        layer(static_x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x).output
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_y, eager, rtol=2e-2, atol=2e-2)
layer.check_errors()
passed("CUDA graph capture + replay")

# Overflow: a receive buffer too small for the rows routed is an error, not silent loss.
torch.manual_seed(9)
small = nvshmem_layer(
    base.replace(error_check="deferred"),
    dataclasses.replace(NV, recv_capacity=4),
    name="tiny_buffer",
)
small(tokens(rank, 9) + 0.0)
try:
    small.check_errors()
    raise AssertionError("overflow not reported")
except BufferOverflow as e:
    assert "tiny_buffer" in str(e), e
    passed(f"overflow raises: {e}")

# The call header beside the counts (PROTOCOL.md "Header"; on by default), on every path: P2P
# (dedup), every peer by puts, and the mix (odd PEs by puts: at 2 PEs PE 0 puts to PE 1 and PE 1
# stores to PE 0, where the H200 once reported a false mismatch). Each check has its own workspace
# (hidden size and peer path): PEs that call different layers record RANK_MISMATCH on the device; a
# PE whose routing fails carries the error in its header and every PE raises it; neither waits for
# a timeout. The error check leaves that workspace's epochs out of step: it is not used again.
HEADER_PATHS = (
    ("p2p", NV),
    ("put", PUT),
    ("mixed", MIXED),
    ("put_dedup", PUT_DEDUP),
    ("mixed_dedup", MIXED_DEDUP),
)
if world > 1:
    assert NV.check_headers, "the call header is on by default"
    for i, (path, nv) in enumerate(HEADER_PATHS):
        torch.manual_seed(12)
        hdr_cfg = base.replace(hidden_size=80 + 32 * i)
        one, other = (
            nvshmem_layer(hdr_cfg, nv, name=f"{n}_{path}", dtype=torch.float32)
            for n in ("one", "other")
        )
        t0 = time.monotonic()
        try:
            (one if rank == 0 else other)(tokens(rank, 12, hidden=hdr_cfg.hidden_size))
            raise AssertionError(f"a header mismatch was not reported ({path})")
        except RankMismatch as e:
            assert "on layer" in str(e), e
            assert time.monotonic() - t0 < 10, f"the mismatch waited for a timeout ({path})"
            passed(f"header mismatch raises ({path}): {e}")
        torch.manual_seed(13)
        flaky_cfg = base.replace(hidden_size=96 + 32 * i)
        flaky = nvshmem_layer(flaky_cfg, nv, name=f"flaky_{path}", dtype=torch.float32)
        x = tokens(rank, 13, hidden=flaky_cfg.hidden_size)
        if rank == world - 1:
            x[0, 5] = float("nan")
        t0 = time.monotonic()
        try:
            flaky(x)
            raise AssertionError(f"the error status was not reported ({path})")
        except NonFiniteRouterLogits as e:
            assert f"flaky_{path}" in str(e) and f"PE {world - 1} of the EP group" in str(e), e
            assert time.monotonic() - t0 < 10, f"the error waited for a timeout ({path})"
            passed(f"error status raises on every PE ({path}): {e}")
        # The last PE's experts raise after a dispatch that went well: it carries the error in
        # the combine its peers are in (fail_together "combine"), and every PE raises it.
        torch.manual_seed(14)
        broken_cfg = base.replace(hidden_size=112 + 32 * i)
        broken = nvshmem_layer(broken_cfg, nv, name=f"broken_{path}", dtype=torch.float32)
        if rank == world - 1:

            def failing_experts(*args, **kwargs):
                raise ValueError("an expert kernel failed")

            broken.experts.forward = failing_experts
        t0 = time.monotonic()
        try:
            broken(tokens(rank, 14, hidden=broken_cfg.hidden_size))
            raise AssertionError(f"the experts' error was not reported ({path})")
        except RankFailed as e:
            assert f"broken_{path}" in str(e) and f"PE {world - 1} of the EP group" in str(e), e
            assert time.monotonic() - t0 < 10, f"the error waited for a timeout ({path})"
            passed(f"an expert's error raises on every PE ({path}): {e}")
        dist.barrier()

# Timeout: rank 0 dispatches alone; it must get an error naming a peer, not hang.
if world > 1:
    torch.manual_seed(10)
    lonely = nvshmem_layer(
        base.replace(error_check="deferred"),
        dataclasses.replace(NV, peer_timeout_s=2.0, max_tokens_per_rank=32),
        name="lonely",
        dtype=torch.float32,
    )  # a dtype: buffers made now, by every PE (a silent peer never would)
    dist.barrier()
    if rank == 0:
        with torch.no_grad():
            lonely(tokens(0, 11))
        try:
            lonely.check_errors()
            raise AssertionError("timeout not reported")
        except PeerTimeout as e:
            assert "lonely" in str(e) and "peer" in str(e), e
            passed(f"timeout raises: {e}")
    dist.barrier()
    if rank == 0:
        print(
            f"NVSHMEM WORKER OK {world} (bootstrap {bootstrap_method()}): " + "; ".join(checks),
            flush=True,
        )
    if "mpi4py.MPI" in sys.modules:  # mpirun counts an exit without MPI_Finalize as a failure
        sys.modules["mpi4py.MPI"].Finalize()
    os._exit(0)  # skip NVSHMEM's teardown: after the timeout check the PEs are out of step

print(
    f"NVSHMEM WORKER OK {world} (bootstrap {bootstrap_method()}): " + "; ".join(checks), flush=True
)
dist.barrier()
