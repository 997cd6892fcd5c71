"""Two micro-batches overlapped through the layer's split call (MoELayer.start / run_experts /
finish) and the LM's `overlap_microbatches=2`, in one process (EP=1): interleaved calls equal
sequential ones (outputs, aux loss, counts, every gradient, the sigmoid router's recorded load), the
joint aux loss equals one call's over both micro-batches, the transport calls come in the schedule's
order, and what cannot be overlapped is refused at construction.

Legend: B batch rows, S sequence, T tokens, H hidden, E experts.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from moe_dist import MoEConfig, MoELayer
from moe_dist.lm import ModelConfig, MoETransformer
from moe_dist.routing import joint_aux_loss

from tests.conftest import assert_fwd_bwd_close, config_builder, fwd_bwd

H = 16
cfg_for = config_builder(
    ffn_hidden_size=24, num_experts=8, top_k=3, num_shared_experts=1, z_loss_coef=1e-2
)


def interleaved(layer, xa, xb, ga, gb):
    """The schedule of the LM's blocks on one layer: start A, start B, experts A, experts B,
    finish A, finish B; then the backward of both outputs (and both aux losses) at once."""
    xa, xb = xa.clone().requires_grad_(True), xb.clone().requires_grad_(True)
    pa = layer.start(xa)
    pb = layer.start(xb)
    # the fused path dispatches in run_experts; the others in start
    assert (pa.flight is None) == bool(getattr(layer.transport, "fused", None))
    layer.run_experts(pa)
    layer.run_experts(pb)
    oa, ob = layer.finish(pa), layer.finish(pb)
    assert (pa.step, pb.step) == (0, 1)  # each call its own step, fused ones too
    ((oa.output * ga).sum() + (ob.output * gb).sum() + oa.aux_loss + ob.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return (oa, ob), (xa.grad, xb.grad), grads


def sequential(layer, xa, xb, ga, gb):
    xa, xb = xa.clone().requires_grad_(True), xb.clone().requires_grad_(True)
    oa, ob = layer(xa), layer(xb)
    ((oa.output * ga).sum() + (ob.output * gb).sum() + oa.aux_loss + ob.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return (oa, ob), (xa.grad, xb.grad), grads


CASES = {
    "softmax": dict(),
    "sigmoid": dict(router="sigmoid", aux_loss_coef=0.0, router_bias_update_rate=1e-3),
    "top_p": dict(router="top_p", top_p=0.6),
    "llama4": dict(scale_expert_input=True, shared_expert_gate=True),
    "fused": dict(),  # the local transport's fused path, forced (CPU: its oracle ops)
    "reference": dict(transport="reference"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("ta,tb", [(9, 7), (5, 0)])
def test_interleaved_calls_equal_sequential_calls(case, ta, tb):
    cfg = cfg_for(**{"transport": "local", **CASES[case]})
    torch.manual_seed(1)
    a = MoELayer(cfg)
    torch.manual_seed(1)
    b = MoELayer(cfg)
    if case == "fused":
        a.transport.fused = b.transport.fused = True
    xa = torch.randn(ta, H)
    xb = torch.randn(2, tb, H) if tb else torch.randn(0, H)  # [B, S, H] input too
    ga, gb = torch.randn(xa.shape), torch.randn(xb.shape)
    (sa, sb), sx, sgrads = sequential(a, xa, xb, ga, gb)
    (oa, ob), ox, ograds = interleaved(b, xa, xb, ga, gb)
    for label, got, want in [("A", oa, sa), ("B", ob, sb)]:
        torch.testing.assert_close(got.output, want.output, msg=lambda m: f"{case} {label}: {m}")
        torch.testing.assert_close(got.aux_loss, want.aux_loss)
        assert torch.equal(got.tokens_per_expert, want.tokens_per_expert), label
        assert got.output.shape == want.output.shape
    for got, want in zip(ox, sx):
        torch.testing.assert_close(got, want)
    assert ograds.keys() == sgrads.keys()
    for name in sgrads:
        torch.testing.assert_close(ograds[name], sgrads[name], msg=lambda m: f"{name}: {m}")
    assert sgrads["experts.w_in"].abs().sum() > 0  # not a comparison of zeros
    assert torch.equal(a.router.load_E, b.router.load_E) and a.step == b.step == 2


def test_finish_alone_and_forward_agree_and_phases_run_once():
    torch.manual_seed(2)
    layer = MoELayer(cfg_for(transport="local"))
    x = torch.randn(2, 5, H)
    want = layer(x)
    pending = layer.start(x)
    assert pending.step == 1 and pending.plan.num_tokens == 10
    got = layer.finish(pending)  # run_experts implied
    torch.testing.assert_close(got.output, want.output)
    assert got.output.shape == x.shape
    with pytest.raises(RuntimeError, match=r"'moe', step 1: finish\(\) on a call that is 'done'"):
        layer.finish(pending)
    with pytest.raises(RuntimeError, match=r"run_experts\(\) on a call that is 'done'"):
        layer.run_experts(pending)
    other = MoELayer(cfg_for(transport="local"), name="other")
    with pytest.raises(ValueError, match=r"'other': finish\(\) got a call started by layer 'moe'"):
        other.finish(layer.start(x))


def test_observers_see_each_call():
    torch.manual_seed(3)
    layer = MoELayer(cfg_for(transport="local"))
    layer.transport.fused = True  # a one-go path: observers turn it off, they expect the rows
    seen = []
    layer.add_observer(lambda lay, x, plan, counts, y: seen.append((x.shape[0], int(counts.sum()))))
    pa, pb = layer.start(torch.randn(6, H)), layer.start(torch.randn(4, H))
    layer.finish(pa)
    layer.finish(pb)
    assert seen == [(6, 18), (4, 12)], seen  # each call's whole batch, top-3


def test_an_expert_error_marks_the_call_failed():
    torch.manual_seed(4)
    layer = MoELayer(cfg_for(transport="local"))
    pa, pb = layer.start(torch.randn(3, H)), layer.start(torch.randn(3, H))
    real = layer.experts.forward

    def broken(*args):
        raise RuntimeError("injected")

    layer.experts.forward = broken
    with pytest.raises(RuntimeError, match="injected"):
        layer.run_experts(pb)
    layer.experts.forward = real
    with pytest.raises(RuntimeError, match=r"finish\(\) on a call that is 'failed'"):
        layer.finish(pb)
    assert torch.isfinite(layer.finish(pa).output).all()  # the other call is unaffected


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_joint_aux_loss_is_the_loss_of_both_batches(router):
    cfg = cfg_for(transport="local", router=router, aux_loss_coef=0.1, num_expert_groups=1)
    torch.manual_seed(5)
    layer = MoELayer(cfg)
    xa, xb = torch.randn(7, H), torch.randn(12, H)
    whole = layer.route(torch.cat([xa, xb]))
    pa, pb = layer.route(xa), layer.route(xb)
    joint = joint_aux_loss([pa.aux_terms, pb.aux_terms])
    torch.testing.assert_close(joint, whole.aux_loss)
    # The sum of the two calls' losses is another number: the joint loss is not a sum.
    assert abs((pa.aux_loss + pb.aux_loss - whole.aux_loss).item()) > 1e-3
    # and its gradient reaches the router like the one-batch loss's does
    (g_joint,) = torch.autograd.grad(joint, layer.router.weight)
    (g_whole,) = torch.autograd.grad(whole.aux_loss, layer.router.weight)
    torch.testing.assert_close(g_joint, g_whole)
    with pytest.raises(ValueError, match="needs the AuxTerms of every call"):
        joint_aux_loss([pa.aux_terms, None])
    other = dataclasses.replace(pb.aux_terms, aux_loss_coef=0.5)
    with pytest.raises(ValueError, match=r"aux terms of different routers"):
        joint_aux_loss([pa.aux_terms, other])


# -- the LM --------------------------------------------------------------------------------------
LM = ModelConfig(d_model=H, n_layers=2, n_heads=2, max_seq_len=10)
MOE = MoEConfig(
    hidden_size=H,
    ffn_hidden_size=24,
    num_experts=4,
    top_k=2,
    aux_loss_coef=0.1,
    z_loss_coef=1e-2,
    num_shared_experts=1,
)


def lm_run(overlap: int, moe_cfg: MoEConfig, tokens, seed: int = 0):
    torch.manual_seed(seed)
    model = MoETransformer(dataclasses.replace(LM, overlap_microbatches=overlap), moe_cfg)
    out = model(tokens[:, :-1], tokens[:, 1:])
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loads = [layer.router.load_E.clone() for layer in model.moe_layers()]
    return out, grads, loads


def assert_lm_equal(got, want, label):
    (go, gg, gl), (wo, wg, wl) = got, want
    torch.testing.assert_close(go.logits, wo.logits, msg=lambda m: f"{label} logits: {m}")
    for what in ("loss", "ce_loss", "aux_loss"):
        torch.testing.assert_close(getattr(go, what), getattr(wo, what), msg=lambda m: what + m)
    for a, b in zip(go.tokens_per_expert, wo.tokens_per_expert):
        assert torch.equal(a, b), label
    assert gg.keys() == wg.keys()
    for name in wg:
        torch.testing.assert_close(gg[name], wg[name], msg=lambda m: f"{label} {name}: {m}")
    for a, b in zip(gl, wl):
        assert torch.equal(a, b), (label, a, b)


@pytest.mark.parametrize("batch", [4, 3, 1])  # odd: the first micro-batch takes the extra row
@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_lm_overlapped_equals_sequential(batch, router):
    moe_cfg = MOE.replace(router=router, router_bias_update_rate=1e-3 if router == "sigmoid" else 0)
    if router == "sigmoid":
        moe_cfg = moe_cfg.replace(aux_loss_coef=0.0)
    tokens = torch.randint(0, 256, (batch, LM.max_seq_len + 1))
    want = lm_run(1, moe_cfg, tokens)
    assert_lm_equal(lm_run(2, moe_cfg, tokens), want, f"{router} B={batch}")
    assert want[1]["layers.0.moe.experts.w_in"].abs().sum() > 0
    if router == "sigmoid":
        assert all(int(load.sum()) == batch * LM.max_seq_len * 2 for load in want[2])


def test_lm_makes_the_schedules_transport_calls():
    torch.manual_seed(0)
    model = MoETransformer(dataclasses.replace(LM, overlap_microbatches=2), MOE)
    calls = []
    for i, layer in enumerate(model.moe_layers()):
        tr = layer.transport
        dispatch, combine = tr.dispatch, tr.combine

        def d(x, plan, *a, _i=i, _f=dispatch, **kw):
            calls.append(f"d{_i}:{x.shape[0]}")
            return _f(x, plan, *a, **kw)

        def c(y, h, *a, _i=i, _f=combine, **kw):
            calls.append(f"c{_i}")
            return _f(y, h, *a, **kw)

        tr.dispatch, tr.combine = d, c
    model(torch.randint(0, 256, (3, LM.max_seq_len)))
    S = LM.max_seq_len
    assert calls == [f"d0:{2 * S}", f"d0:{S}", "c0", "c0", f"d1:{2 * S}", f"d1:{S}", "c1", "c1"]


def test_lm_refuses_what_it_cannot_overlap():
    with pytest.raises(ValueError, match=r"overlap_microbatches must be 1 or 2, got 3"):
        ModelConfig(overlap_microbatches=3)
    with pytest.raises(ValueError, match=r"needs MoELayer FFNs; coe_iterations \(2\)"):
        ModelConfig(overlap_microbatches=2, coe_iterations=2)
    two = dataclasses.replace(LM, overlap_microbatches=2)
    with pytest.raises(ValueError, match=r"needs dropless MoE layers: capacity_factor \(1.5\)"):
        MoETransformer(two, MOE.replace(capacity_factor=1.5))

    class Dense(nn.Module):
        def forward(self, x):
            return x, x.new_zeros(()), torch.zeros(4, dtype=torch.int64)

    with pytest.raises(ValueError, match=r"block 0 holds Dense"):
        MoETransformer(two, MOE, moe_factory=lambda i: Dense())
    MoETransformer(LM, MOE, moe_factory=lambda i: Dense())  # without overlap: fine
