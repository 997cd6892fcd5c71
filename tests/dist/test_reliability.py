"""Issue 15 on 2 gloo processes: a failing, stalling or disagreeing rank makes every rank raise the
same clear error (layer, step, origin rank), quickly; never a hang, never a wrong output.

Each scenario asserts inside the children what each rank raised; run_distributed's timeout bounds
every test far below gloo's 300 s default (the layers use a few seconds' peer_timeout_s)."""

from __future__ import annotations

import os
import re
import time

import pytest
import torch
import torch.distributed as dist

import moe_dist
from moe_dist.transport import TransportOptions
from moe_dist import (
    MoEConfig,
    MoELayer,
    NonFiniteRouterLogits,
    ParallelGroups,
    PeerTimeout,
    RankFailed,
    RankMismatch,
)

from .harness import run_distributed

WORLD, H = 2, 8
LIMIT_S = 45  # each test's bound; the 300 s process-group default is never reached
SLOW_LIMIT_S = 55  # DCP and DeepSpeed start slowly on a loaded 2-core machine


def cfg(**kw) -> MoEConfig:
    base = dict(hidden_size=H, ffn_hidden_size=16, num_experts=4, top_k=2, transport="collective")
    base.update(kw)
    return MoEConfig(**base)


def build(c: MoEConfig, groups, timeout_s: float = 20.0, **kw) -> MoELayer:
    """A layer whose transport waits at most timeout_s for a peer."""
    kw.setdefault("transport_options", TransportOptions(peer_timeout_s=timeout_s))
    return MoELayer(c, groups, **kw)


def timed(fn, *args):
    t0 = time.perf_counter()
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e, time.perf_counter() - t0
    return None, time.perf_counter() - t0


def expect_on_every_rank(err, cls, pattern: str, seconds: float, limit: float = 10.0):
    """Each rank got `cls` whose message matches `pattern`, quickly (no timeout involved)."""
    rank = dist.get_rank()
    assert isinstance(err, cls), f"rank {rank}: expected {cls.__name__}, got {err!r}"
    assert re.search(pattern, str(err)), f"rank {rank}: {pattern!r} not in {err}"
    assert seconds < limit, f"rank {rank}: the error took {seconds:.1f} s"


def still_works(layer, groups):
    """After an error every rank raised together, the group and the layer still run."""
    x = torch.randn(4 + groups.rank, H)
    out = layer(x).output
    assert out.shape == x.shape and torch.isfinite(out).all()


# -- case 1: a rank's error travels with the data ---------------------------------------------------
def scenario_errors_travel():
    groups = ParallelGroups(ep_size=WORLD)
    rank = groups.rank
    for check in ("eager", "deferred"):
        torch.manual_seed(0)
        layer = build(cfg(error_check=check), groups, name="blk")
        layer(torch.randn(5, H))  # step 0 runs clean
        bad = int(torch.randint(0, WORLD, (1,)))  # the same on every rank (same seed)
        x = torch.randn(6, H)
        if rank == bad:
            x[int(torch.randint(0, 6, ()))] = float("nan")
        err, s = timed(layer, x)
        expect_on_every_rank(
            err, NonFiniteRouterLogits, rf"layer 'blk', step 1: .*failed on rank {bad}", s
        )
        layer.step += 1  # the failed forward did not count its step; keep ranks aligned
        still_works(layer, groups)

    # An exception inside the experts of one rank (between dispatch and combine).
    torch.manual_seed(0)
    layer = build(cfg(), groups, name="blk2")
    if rank == 1:
        real = layer.experts.forward

        def broken(*args):
            raise RuntimeError("injected expert fault")

        layer.experts.forward = broken
    err, s = timed(layer, torch.randn(7, H))
    expect_on_every_rank(
        err, RankFailed, r"layer 'blk2', step 0: .*rank 1.*injected expert fault", s
    )
    if rank == 1:
        layer.experts.forward = real
        assert "injected" in str(err.__cause__)  # the failing rank chains its own exception
    still_works(layer, groups)

    # A bad input on one rank (wrong dtype): checked at entry, raised on every rank.
    torch.manual_seed(0)
    layer = build(cfg(), groups, name="blk3")
    x = torch.randn(3, H, dtype=torch.float64 if rank == 0 else torch.float32)
    err, s = timed(layer, x)
    expect_on_every_rank(err, RankFailed, r"'blk3', step 0: .*Rank 0: ValueError: .*float64", s)


def test_a_failing_rank_makes_every_rank_raise_the_same_error():
    run_distributed(scenario_errors_travel, WORLD, timeout_s=LIMIT_S)


# -- case 2: ranks that disagree fail together, before any token moves ---------------------------
MISMATCHES = [
    # (what differs on rank 1, expected pattern); config differences fail at construction
    (
        dict(shared_expert_overlap=False),
        r"construction: .*disagree on MoEConfig.shared_expert_overlap: rank 0: True, rank 1: False",
    ),
    (dict(top_k=3), r"construction: .*disagree on MoEConfig.top_k: rank 0: 2, rank 1: 3"),
    (dict(num_experts=8), r"construction: .*MoEConfig.num_experts: rank 0: 4, rank 1: 8"),
    (dict(hidden_size=6), r"construction: .*MoEConfig.hidden_size: rank 0: 8, rank 1: 6"),
    (
        dict(dtype=torch.float64),
        r"step 0, dispatch call 0: .*disagree on dtype: "
        r"rank 0: torch.float32, rank 1: torch.float64",
    ),
    (dict(seed=1), r"step 0, dispatch call 0: .*disagree on the router weights"),
]


def scenario_mismatches():
    groups = ParallelGroups(ep_size=WORLD)
    rank = groups.rank
    for i, (change, pattern) in enumerate(MISMATCHES):
        change = dict(change) if rank == 1 else {}
        dtype, seed = change.pop("dtype", torch.float32), change.pop("seed", 0)
        torch.manual_seed(seed)
        c = cfg(**change)

        def build_and_run():
            layer = build(c, groups, name=f"m{i}", dtype=dtype)
            layer(torch.randn(5, c.hidden_size, dtype=dtype))

        err, s = timed(build_and_run)
        expect_on_every_rank(err, RankMismatch, rf"layer 'm{i}', .*{pattern}", s)

    # A different number of forward calls: rank 0 runs layer a twice, rank 1 once, then both b.
    torch.manual_seed(0)
    a, b = (build(cfg(), groups, name=n) for n in "ab")
    x = torch.randn(4, H)
    a(x)
    err, s = timed(lambda: [a(x), b(x)] if rank == 0 else b(x))
    expect_on_every_rank(err, RankMismatch, r"disagree on which MoE layer is called", s)


def test_ranks_that_disagree_fail_together():
    run_distributed(scenario_mismatches, WORLD, timeout_s=LIMIT_S)


def scenario_nvshmem_options_disagree():
    """The options that size NVSHMEM's collective allocations are compared before any of it
    (NvshmemTransport runs this first; nvshmem itself needs a GPU): equal options pass, and a
    difference raises RankMismatch on every rank naming the field and each rank's value."""
    from moe_dist.transport import NvshmemOptions
    from moe_dist.transport.handshake import agree_on_options

    groups = ParallelGroups(ep_size=WORLD)
    rank = groups.rank
    agree_on_options("NvshmemOptions", NvshmemOptions(), groups.ep_group, 10.0)
    for field, value in (("put_dedup", False), ("max_tokens_per_rank", 4096)):
        options = NvshmemOptions(**({field: value} if rank == 1 else {}))
        err, s = timed(agree_on_options, "NvshmemOptions", options, groups.ep_group, 10.0)
        default = repr(getattr(NvshmemOptions(), field))
        expect_on_every_rank(
            err,
            RankMismatch,
            rf"NvshmemOptions\.{field}: rank 0: {default}, rank 1: {value!r}\. .*nothing was",
            s,
        )


def test_ranks_with_different_nvshmem_options_fail_together():
    run_distributed(scenario_nvshmem_options_disagree, WORLD, timeout_s=LIMIT_S)


# -- case 7: bounded waits on the collective transport ---------------------------------------------
def scenario_stall():
    groups = ParallelGroups(ep_size=WORLD)
    torch.manual_seed(0)
    layer = build(cfg(), groups, timeout_s=2.0, name="slow")
    layer(torch.randn(4, H))
    if groups.rank == 1:
        time.sleep(6.0)  # the stalled rank
        os._exit(0)
    err, s = timed(layer, torch.randn(4, H))
    expect_on_every_rank(
        err, PeerTimeout, r"layer 'slow', step 1: dispatch handshake: no answer within 2 s", s
    )
    assert s >= 1.9, s
    os._exit(0)  # the group is unusable after a timeout: leave without the harness's barrier


def test_a_stalled_peer_raises_peer_timeout_naming_the_layer():
    run_distributed(scenario_stall, WORLD, timeout_s=LIMIT_S)


def scenario_clip_refuses_groups_none():
    groups = ParallelGroups(ep_size=WORLD)
    torch.manual_seed(0)
    layer = MoELayer(cfg(), groups)
    layer(torch.randn(5, H)).output.sum().backward()
    with pytest.raises(ValueError, match=r"EP>1 layer \(group_name 'ep_size_2'\) but groups=None"):
        moe_dist.clip_grad_norm_(layer.parameters(), 0.1, None)
    moe_dist.clip_grad_norm_(layer.parameters(), 0.1, groups)  # the right call still works


def test_clip_refuses_groups_none_at_ep2():
    run_distributed(scenario_clip_refuses_groups_none, WORLD, timeout_s=LIMIT_S)


# -- case 3: a corrupt checkpoint is an error naming the path and the tensor, on every rank ------
def scenario_corrupt_checkpoint(root: str):
    from moe_dist.training import checkpoint

    groups = ParallelGroups(ep_size=WORLD)
    torch.manual_seed(0)
    layer = MoELayer(cfg(), groups, name="moe")
    checkpoint.save(layer, root)
    expert = int(torch.randint(0, 4, ()))  # held by rank expert // 2 only
    key = f"model.experts.w_in.{expert}"
    if groups.rank == 0:
        reader = checkpoint.SafeFileSystemReader(root)
        (info,) = [i for x, i in reader.read_metadata().storage_data.items() if x.fqn == key]
        path = f"{root}/{info.relative_path}"
        data = bytearray(open(path, "rb").read())
        at = info.offset + info.length - 100 + int(torch.randint(0, 60, ()))
        data[at : at + 4] = bytes(b ^ 0x5A for b in data[at : at + 4])
        open(path, "wb").write(bytes(data))
    dist.barrier()
    torch.manual_seed(1)
    fresh = MoELayer(cfg(), groups, name="moe")
    with pytest.raises(checkpoint.CheckpointCorrupt, match=rf"{root}: tensor '{key}' .*is corrupt"):
        checkpoint.load(fresh, root)  # DCP gathers the failure: the rank without it raises too


def test_corrupt_checkpoint_raises_on_every_rank(tmp_path):
    run_distributed(
        scenario_corrupt_checkpoint, WORLD, str(tmp_path / "ck"), timeout_s=SLOW_LIMIT_S
    )


# -- case 4: DeepSpeed checkpoints load with weights_only=True --------------------------------------
class _Exploit:
    """Unpickling this runs open(marker, 'w'): the stand-in for arbitrary code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def scenario_deepspeed_refuses_malicious_pickle(root: str):
    from moe_dist.training import deepspeed as moe_ds

    from .test_training_checkpoint import trainer

    base, groups = trainer(ep=WORLD, backend="deepspeed")
    try:
        base.engine.save_checkpoint(root, tag="t")
        dist.barrier()
        # A resume of the untouched checkpoint works with weights_only loading (ZeRO state too).
        base.engine.load_checkpoint(root, tag="t")
        dist.barrier()  # every rank has read the file before rank 0 rewrites it
        marker = f"{root}/pwned"
        target = f"{root}/t/mp_rank_00_model_states.pt"  # every rank reads it
        if dist.get_rank() == 0:
            state = torch.load(target, map_location="cpu", weights_only=False)  # test's own file
            state["innocent_looking"] = _Exploit(marker)
            torch.save(state, target)
        dist.barrier()
        with pytest.raises(moe_ds.UnsafeCheckpoint, match=r"cannot be loaded safely .*open"):
            base.engine.load_checkpoint(root, tag="t")
        assert not os.path.exists(marker), "the malicious pickle ran"
    finally:
        moe_ds.unregister_groups(groups)


def test_deepspeed_refuses_a_malicious_pickle(tmp_path):
    run_distributed(
        scenario_deepspeed_refuses_malicious_pickle, WORLD, str(tmp_path), timeout_s=SLOW_LIMIT_S
    )
