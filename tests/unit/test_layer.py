"""Single-process layer properties: dense equivalence, oracle backends, shapes, errors."""

import pytest
import torch

from moe_dist import MoELayer, MoEOutput, NonFiniteRouterLogits, is_expert_param

from tests.conftest import config_builder, dense_expert

make = config_builder()  # H=16, F=32, E=4, top-2


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_one_expert_equals_dense_ffn(activation):
    torch.manual_seed(0)
    layer = MoELayer(make(num_experts=1, top_k=1, activation=activation))
    x = torch.randn(3, 5, 16)
    expected = dense_expert(x, layer.experts.w_in[0], layer.experts.w_out[0], activation)
    torch.testing.assert_close(layer(x).output, expected)


@pytest.mark.parametrize("router", ["softmax", "sigmoid", "group_limited", "top_p"])
@pytest.mark.parametrize("capacity", [None, 0.75])
def test_grouped_mm_backend_equals_loop_oracle(router, capacity):
    groups = 2 if router in ("group_limited", "sigmoid") else 1
    cfg = make(
        router=router,
        num_expert_groups=groups,
        topk_groups=groups if router == "sigmoid" else 1,
        capacity_factor=capacity,
        num_shared_experts=1,
    )
    torch.manual_seed(1)
    fast = MoELayer(cfg.replace(expert_backend="auto"))
    torch.manual_seed(1)
    oracle = MoELayer(cfg.replace(expert_backend="loop"))
    x = torch.randn(37, 16)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(37, 16)
    y1, aux1, c1 = fast(x1)
    y2, aux2, c2 = oracle(x2)
    ((y1 * g).sum() + aux1).backward()
    ((y2 * g).sum() + aux2).backward()
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(x1.grad, x2.grad)
    for (n, p1), (_, p2) in zip(fast.named_parameters(), oracle.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, msg=lambda m: f"{n}: {m}")
    assert torch.equal(c1, c2)


def test_output_is_named_tuple_and_keeps_shape():
    layer = MoELayer(make())
    out = layer(torch.randn(2, 3, 16))
    assert isinstance(out, MoEOutput)
    y, aux, counts = out
    assert y.shape == (2, 3, 16) and aux.dim() == 0 and counts.shape == (4,)
    assert counts.sum().item() == 2 * 3 * 2


def test_expert_params_are_tagged():
    layer = MoELayer(make(num_shared_experts=1))
    expert = {n for n, p in layer.named_parameters() if is_expert_param(p)}
    assert expert == {"experts.w_in", "experts.w_out"}
    assert all(p.allreduce is False for p in layer.experts.parameters())


def test_empty_input():
    layer = MoELayer(make())
    x = torch.randn(0, 16, requires_grad=True)
    y = layer(x).output
    y.sum().backward()
    assert y.shape == (0, 16) and x.grad.shape == (0, 16)


def test_every_output_row_written():
    # Poison-free check: each output row must equal a per-token recomputation.
    torch.manual_seed(3)
    layer = MoELayer(make(router="top_p", top_p=0.7, top_k=3))
    x = torch.randn(20, 16)
    y = layer(x).output
    for t in range(20):
        torch.testing.assert_close(y[t : t + 1], layer(x[t : t + 1]).output)


def test_same_seed_same_weights_different_seed_different():
    torch.manual_seed(5)
    a = MoELayer(make())
    torch.manual_seed(5)
    b = MoELayer(make())
    torch.manual_seed(6)
    c = MoELayer(make())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.experts.w_in, c.experts.w_in)


def test_bad_config_messages():
    with pytest.raises(ValueError, match=r"top_k \(5\) must be <= num_experts \(4\)"):
        make(top_k=5)
    with pytest.raises(ValueError, match="router must be one of"):
        make(router="bogus")
    with pytest.raises(
        ValueError, match=r"num_experts \(6\) must be divisible by num_expert_groups \(4\)"
    ):
        make(num_experts=6, num_expert_groups=4)
    with pytest.raises(ValueError, match="capacity_factor"):
        make(capacity_factor=0.0)
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        make(hidden_size=0)
    with pytest.raises(ValueError, match=r"hidden_size=12.*divisible by 4"):
        MoELayer(make(hidden_size=12, ffn_hidden_size=30, expert_backend="grouped_mm"))


def test_hidden_mismatch_names_both_sizes():
    layer = MoELayer(make())
    with pytest.raises(
        ValueError, match=r"input hidden size \(8\) does not match MoEConfig.hidden_size \(16\)"
    ):
        layer(torch.randn(4, 8))


def test_nan_logits_raise_eagerly_and_deferred():
    layer = MoELayer(make(), name="blocks.3.moe")
    x = torch.randn(6, 16)
    x[2, 0] = float("nan")
    with pytest.raises(NonFiniteRouterLogits, match=r"'blocks.3.moe', step 0.*1 of 6 tokens"):
        layer(x)
    deferred = MoELayer(make(error_check="deferred"), name="m")
    deferred(torch.randn(6, 16))
    deferred(x)  # recorded on the device, not raised here
    with pytest.raises(NonFiniteRouterLogits, match="'m', step 1"):
        deferred.check_errors()
    deferred.check_errors()  # cleared after raising


def test_nvshmem_transport_without_gpu_says_what_is_missing():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the message under test is for machines without one")
    with pytest.raises(RuntimeError, match="transport='nvshmem' cannot run: it needs CUDA"):
        MoELayer(make(transport="nvshmem"))


def test_loop_experts_stay_in_the_graph_with_no_rows():
    """A rank whose experts got no rows must still run the transport's backward calls (they are
    collective): the loop oracle keeps every expert in the graph, giving zero gradients, not None.
    """
    from moe_dist.experts.gemm import loop_mm

    x = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(3, 6, 4, requires_grad=True)
    out = loop_mm(x, w, torch.zeros(3, dtype=torch.long))
    assert out.shape == (5, 6) and out.grad_fn is not None and not out.any()
    out.sum().backward()
    assert w.grad is not None and not w.grad.any() and x.grad is not None and not x.grad.any()
    counts = torch.tensor([2, 0, 1])
    y = loop_mm(x, w, counts)
    want = torch.cat([x[:2] @ w[0].t(), x[2:3] @ w[2].t(), torch.zeros(2, 6)])
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize("mode", ["eager", "deferred"])
def test_transport_errors_raise_at_the_end_of_an_eager_forward(mode):
    """A transport that records errors on the device (nvshmem: overflow, silent peers) gets them
    raised by the forward itself in eager mode, and only at check_errors() in deferred mode (no host
    sync)."""
    from moe_dist.errors import BUFFER_OVERFLOW, BufferOverflow, DeviceErrorFlags

    layer = MoELayer(make(error_check=mode), name="flagged")
    layer.transport.error_flags = DeviceErrorFlags(
        "flagged", "cpu"
    )  # what the nvshmem transport carries
    x = torch.randn(6, 16)
    layer(x)  # nothing recorded: no error
    layer.transport.error_flags.record(BUFFER_OVERFLOW, torch.tensor(True), step=1)
    if mode == "eager":
        with pytest.raises(BufferOverflow, match="'flagged', step 1"):
            layer(x)
    else:
        layer(x)
        with pytest.raises(BufferOverflow, match="'flagged', step 1"):
            layer.check_errors()
    layer(x)  # raised once, then cleared
