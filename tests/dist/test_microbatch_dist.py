"""Two overlapped micro-batches at EP=2 over gloo (collective transport, each token sent once per
rank): the LM with overlap_microbatches=2 equals the sequential one (outputs, loss, every gradient,
the sigmoid router's load, rows sent), with per-rank batches that differ, one odd and one that
leaves an empty micro-batch; FSDP2 trains both to the same losses and gradient norms; a rank that
fails inside one micro-batch's experts or routing makes every rank raise the same error naming that
micro-batch's step.

Legend: B batch rows per rank, S sequence, H hidden.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from moe_dist import (
    MoEConfig,
    MoELayer,
    NonFiniteRouterLogits,
    ParallelGroups,
    RankFailed,
    RankMismatch,
)
from moe_dist.lm import ModelConfig, MoETransformer
from moe_dist.transport import TransportOptions

from .harness import run_distributed
from .test_reliability import expect_on_every_rank, timed

WORLD = 2
LIMIT_S = 120
LM = ModelConfig(d_model=16, n_layers=2, n_heads=2, max_seq_len=8)
MOE = MoEConfig(
    hidden_size=16,
    ffn_hidden_size=24,
    num_experts=8,
    top_k=3,
    num_shared_experts=1,
    aux_loss_coef=0.1,
    z_loss_coef=1e-2,
    transport="collective",
)
BATCH = [3, 1]  # per rank: rank 0's micro-batches are 2 + 1 rows, rank 1's are 1 + 0


def build(groups, overlap: int, moe_cfg: MoEConfig = MOE, seed: int = 0) -> MoETransformer:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(LM, overlap_microbatches=overlap)
    return MoETransformer(cfg, moe_cfg, groups)


def run(model, tokens):
    out = model(tokens[:, :-1], tokens[:, 1:])
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loads = [layer.router.load_E.clone() for layer in model.moe_layers()]
    rows = [layer.transport.stats.total_dispatch.rows for layer in model.moe_layers()]
    return out, grads, loads, rows


def scenario_equal():
    groups = ParallelGroups(ep_size=WORLD)
    rank = groups.rank
    cases = {
        "softmax": MOE,
        "sigmoid": MOE.replace(router="sigmoid", aux_loss_coef=0.0, router_bias_update_rate=1e-3),
    }
    for name, moe_cfg in cases.items():
        gen = torch.Generator().manual_seed(10 + rank)
        tokens = torch.randint(0, 256, (BATCH[rank], LM.max_seq_len + 1), generator=gen)
        want = run(build(groups, 1, moe_cfg), tokens)
        got = run(build(groups, 2, moe_cfg), tokens)
        label = f"rank {rank} {name}"
        (go, gg, gl, gr), (wo, wg, wl, wr) = got, want
        torch.testing.assert_close(go.logits, wo.logits, msg=lambda m: f"{label} logits: {m}")
        for what in ("loss", "ce_loss", "aux_loss"):
            torch.testing.assert_close(
                getattr(go, what), getattr(wo, what), msg=lambda m: f"{label} {what}: {m}"
            )
        for a, b in zip(go.tokens_per_expert, wo.tokens_per_expert):
            assert torch.equal(a, b), label
        assert gg.keys() == wg.keys(), label
        for n in wg:
            torch.testing.assert_close(gg[n], wg[n], msg=lambda m: f"{label} grad {n}: {m}")
        for a, b in zip(gl, wl):
            assert torch.equal(a, b), (label, a, b)
        # Rows sent: one per (token, destination rank), fewer than the slots (dedup at work).
        assert gr == wr, (label, gr, wr)
        slots = BATCH[rank] * LM.max_seq_len * moe_cfg.top_k
        assert all(r < slots for r in wr) or BATCH[rank] * LM.max_seq_len == 0, (label, wr, slots)
        # Not a comparison of zeros: the experts got gradients somewhere in the group.
        total = wg["layers.0.moe.experts.w_in"].abs().sum().reshape(1)
        dist.all_reduce(total)
        assert total.item() > 0, label


def test_overlapped_lm_equals_sequential_at_ep2():
    run_distributed(scenario_equal, WORLD, timeout_s=LIMIT_S)


# -- training: FSDP2 runs the block's micro-batch schedule inside one forward ---------------------
def scenario_fsdp_training():
    from moe_dist.lm.train import make_backend, parse_args

    groups = ParallelGroups(ep_size=WORLD)
    args = parse_args(["--lr", "1e-2", "--clip", "0.5", "--warmup", "1", "--dtype", "fp32"])
    curves = {}
    for overlap in (1, 2):
        trainer = make_backend(
            "fsdp", build(groups, overlap), groups, args, device=torch.device("cpu"), micro_batch=3
        )
        losses, norms = [], []
        for step in range(3):
            gen = torch.Generator().manual_seed(100 * step + groups.rank)
            tokens = torch.randint(0, 256, (3, LM.max_seq_len + 1), generator=gen)
            out = trainer.forward_backward(tokens[:, :-1], tokens[:, 1:])
            norms.append(trainer.step(1e-2))
            losses.append(out.loss.item())
        curves[overlap] = torch.tensor(losses), torch.tensor(norms)
    (l1, n1), (l2, n2) = curves[1], curves[2]
    assert l1[-1] != l1[0], l1  # the steps changed the model
    torch.testing.assert_close(l2, l1, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(n2, n1, rtol=2e-5, atol=2e-5)


def test_fsdp_trains_the_overlapped_lm_like_the_sequential_one():
    run_distributed(scenario_fsdp_training, WORLD, timeout_s=LIMIT_S)


# -- errors travel: a rank failing inside one micro-batch --------------------------------------
def scenario_errors():
    groups = ParallelGroups(ep_size=WORLD)
    rank = groups.rank
    options = TransportOptions(peer_timeout_s=20.0)
    for failing_call in (0, 1):  # micro-batch A's experts, then B's
        torch.manual_seed(0)
        model = MoETransformer(
            dataclasses.replace(LM, overlap_microbatches=2),
            MOE,
            moe_factory=lambda i: MoELayer(
                MOE, groups, transport_options=options, name=f"layers.{i}.moe"
            ),
        )
        layer = model.moe_layers()[0]
        calls = []
        if rank == 1:
            real = layer.experts.forward

            def broken(*args, _real=real):
                calls.append(1)
                if len(calls) - 1 == failing_call:
                    raise RuntimeError("injected expert fault")
                return _real(*args)

            layer.experts.forward = broken
        tokens = torch.randint(0, 256, (2, LM.max_seq_len + 1))
        err, s = timed(model, tokens[:, :-1], tokens[:, 1:])
        expect_on_every_rank(
            err,
            RankFailed,
            rf"layer 'layers.0.moe', step {failing_call}: .*rank 1.*injected expert fault",
            s,
        )
        if rank == 1:
            assert "injected" in str(err.__cause__)  # the failing rank chains its own exception
            layer.experts.forward = real
        out = model(tokens[:, :-1], tokens[:, 1:])  # the group and the model still work
        assert torch.isfinite(out.loss)

    # NaN router logits in micro-batch B of rank 0: raised in B's dispatch, on every rank.
    torch.manual_seed(0)
    layer = MoELayer(MOE, groups, transport_options=options, name="blk")
    xa, xb = torch.randn(5, 16), torch.randn(4, 16)
    if rank == 0:
        xb[2] = float("nan")
    pending = layer.start(xa)
    err, s = timed(layer.start, xb)
    expect_on_every_rank(err, NonFiniteRouterLogits, r"layer 'blk', step 1: .*failed on rank 0", s)
    del pending  # micro-batch A is abandoned on every rank alike

    # Ranks that run the phases in different orders: the combine handshakes name different steps.
    torch.manual_seed(0)
    layer = MoELayer(MOE, groups, transport_options=options, name="order")
    calls = [layer.start(torch.randn(3, 16)), layer.start(torch.randn(2, 16))]
    order = calls if rank == 0 else calls[::-1]
    err, s = timed(lambda: [layer.run_experts(c) for c in order])
    expect_on_every_rank(
        err,
        RankMismatch,
        r"'order', step \d, combine call 2: .*the layer's step .*: rank 0: 0, rank 1: 1",
        s,
    )


def test_a_rank_failing_in_one_microbatch_makes_every_rank_raise():
    run_distributed(scenario_errors, WORLD, timeout_s=LIMIT_S)


# -- the trainer's flag, end to end --------------------------------------------------------------
def test_trainer_flag_gives_the_same_curve(tmp_path):
    """`--overlap-microbatches 2` under torchrun (2 gloo processes, FSDP2, EP=2) repeats the loss
    curve of the run without it."""
    import json

    from tests.conftest import assert_ran, torchrun

    curves = {}
    for n in (1, 2):
        path = tmp_path / f"run{n}.json"
        flags = ["--steps", "6", "--log-every", "3", "--val-every", "0", "--max-bytes", "200000"]
        flags += ["--overlap-microbatches", str(n), "--json", str(path), "--shared-experts", "1"]
        out = assert_ran(torchrun(2, "-m", "moe_dist.lm.train", *flags, timeout=240))
        assert ("two micro-batches overlapped" in out) == (n == 2), out
        curves[n] = json.loads(path.read_text())
    assert curves[2]["overlap_microbatches"] == 2 and curves[1]["overlap_microbatches"] == 1
    want, got = torch.tensor(curves[1]["losses"]), torch.tensor(curves[2]["losses"])
    assert len(want) == 6 and want[-1] < want[0], want
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
