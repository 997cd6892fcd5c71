"""The fused expert path at layer level on CPU (its custom ops run their plain-torch oracles here;
the Triton kernels are checked against those in tests/gpu/test_fused_kernels.py):

- the fused path (routing kernel op + counting sort + fused experts) equals the previous path,
  forward and every gradient, for each router it serves and with unused slots (top-p, capacity);
- torch.compile of a CPU fp32 layer on it equals eager, with no graph break (torch._dynamo.explain).

Legend: T tokens, H hidden.
"""

import pytest
import torch

from moe_dist import MoEConfig, MoELayer

H = 32


def make_layer(fused: bool, **kw):
    torch.manual_seed(0)
    cfg = dict(hidden_size=H, ffn_hidden_size=24, num_experts=8, top_k=3, transport="local")
    layer = MoELayer(MoEConfig(**{**cfg, **kw}))
    layer.transport.fused = fused
    layer.router.fused_routing = fused
    return layer


def step(layer, x, g):
    x = x.clone().requires_grad_()
    out = layer(x)
    (out.output * g).sum().add(out.aux_loss).backward()
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    return [out.output.detach(), out.aux_loss.detach()] + grads


@pytest.mark.parametrize(
    "kw",
    [
        dict(router="softmax"),
        dict(router="softmax", norm_topk_prob=False, routed_scaling_factor=2.0, z_loss_coef=1e-3),
        dict(router="sigmoid", aux_loss_coef=0.0),
        dict(router="top_p", top_p=0.5),
        dict(router="softmax", capacity_factor=0.5),  # drops: expert -1, weight 0
        dict(router="group_limited", num_expert_groups=4, topk_groups=2),  # select.py routing
    ],
)
def test_fused_layer_equals_previous_path(kw):
    gen = torch.Generator().manual_seed(len(str(kw)))
    x = torch.randn(29, H, generator=gen)  # T not a multiple of 16
    g = torch.randn(29, H, generator=gen)
    got = step(make_layer(True, **kw), x, g)
    want = step(make_layer(False, **kw), x, g)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"output {i}")


@pytest.mark.parametrize("save_rows,save_act", [(False, True), (True, False), (False, False)])
def test_fused_layer_memory_knobs_change_nothing_but_memory(save_rows, save_act):
    """fused_save_rows=False (keep x, gather again) and fused_save_act=False (recompute a, dh over
    h) give the same output and gradients as the previous path, top-p's unused slots included."""
    gen = torch.Generator().manual_seed(3)
    x, g = torch.randn(29, H, generator=gen), torch.randn(29, H, generator=gen)
    lean = make_layer(True, router="top_p", top_p=0.5)
    lean.transport.fused_save_rows, lean.transport.fused_save_act = save_rows, save_act
    got = step(lean, x, g)
    want = step(make_layer(False, router="top_p", top_p=0.5), x, g)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"output {i}")


def test_fused_layer_handles_no_tokens():
    layer = make_layer(True)
    x = torch.randn(0, H, requires_grad=True)
    out = layer(x)
    out.output.sum().backward()
    assert out.output.shape == (0, H) and x.grad.shape == (0, H)


def test_torch_compile_of_the_fused_layer_equals_eager_without_graph_breaks():
    layer = make_layer(True, check_finite=False)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(21, H, generator=gen)
    g = torch.randn(21, H, generator=gen)
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    want = step(layer, x, g)
    for p in layer.parameters():
        p.grad = None
    compiled = torch.compile(layer, backend="aot_eager")
    got = step(compiled, x, g)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"output {i}")
