"""The CUDA fast paths against their oracles: fused SwiGLU vs the torch version, and the bf16 layer
(grouped_mm + Triton SwiGLU) vs the per-expert loop, forward and backward, on fresh random inputs.
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_fused_swiglu_matches_torch():
    from moe_dist.experts.ffn import _SwiGLU
    from moe_dist.experts.swiglu_triton import SwiGLUTriton

    h = torch.randn(333, 2 * 1408, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(333, 1408, device="cuda", dtype=torch.bfloat16)
    a, b = h.clone().requires_grad_(), h.clone().requires_grad_()
    ya, yb = SwiGLUTriton.apply(a, None), _SwiGLU.apply(b)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(ya, yb, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(a.grad, b.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("router", ["softmax", "top_p"])
def test_bf16_layer_matches_loop_oracle(router):
    from moe_dist import MoEConfig, MoELayer

    cfg = MoEConfig(
        hidden_size=256,
        ffn_hidden_size=128,
        num_experts=16,
        top_k=2,
        router=router,
        top_p=0.6 if router == "top_p" else 0.5,
    )
    torch.manual_seed(0)
    fast = MoELayer(cfg, device="cuda", dtype=torch.bfloat16)
    torch.manual_seed(0)
    oracle = MoELayer(cfg.replace(expert_backend="loop"), device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(x)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = fast(x1).output, oracle(x2).output
    y1.backward(g)
    y2.backward(g)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
    assert rel(y1, y2) < 1e-2 and rel(x1.grad, x2.grad) < 1e-2
    assert rel(fast.experts.w_in.grad, oracle.experts.w_in.grad) < 1e-2


def sync_free_layer(router: str):
    """(bf16 layer on the fused path, x [1000, 256] requiring grad): aux loss on, and neither the
    finiteness check nor eager error checks, the two parts that sync by design."""
    from moe_dist import MoEConfig, MoELayer

    cfg = MoEConfig(
        hidden_size=256,
        ffn_hidden_size=128,
        num_experts=16,
        top_k=4,
        router=router,
        top_p=0.6 if router == "top_p" else 0.5,
        aux_loss_coef=0.01,
        check_finite=False,
        error_check="deferred",
    )
    layer = MoELayer(cfg, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return layer, x


@pytest.mark.parametrize("router", ["softmax", "sigmoid", "top_p"])
def test_fused_layer_step_never_waits_on_the_host(router):
    """The fused path (routing kernel, counting sort, grouped GEMMs, row kernels) forward and
    backward with no host synchronisation once warm: a sync leaves the GPU idle while the host
    launches what follows. check_finite=False and deferred errors: those two sync by design."""
    layer, x = sync_free_layer(router)
    assert layer.transport.use_fused(x, layer.experts), "the fused path is the default on CUDA"
    for _ in range(2):  # warm-up: Triton compiles and autotunes (both may synchronise)
        out = layer(x)
        (out.output.float().sum() + out.aux_loss).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(x)
        (out.output.float().sum() + out.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    layer.check_errors()


@pytest.mark.parametrize("router", ["softmax", "top_p"])
def test_fused_layer_step_replays_from_a_cuda_graph(router):
    """Forward and backward of the fused path captured once in a CUDA graph (no host sync, no
    host-sized shapes) and replayed on new inputs copied into the captured one: the output and
    every gradient equal an eager step's on the same inputs. Replayed, a step costs no launches."""
    torch.manual_seed(0)
    layer, x = sync_free_layer(router)
    g = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16)
    params = [x, *layer.parameters()]

    def step():
        out = layer(x)
        (out.output.float() * g).sum().add(out.aux_loss).backward()
        return out.output

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: Triton compiles and autotunes
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    captured = [p.grad for p in params]  # the replays write these buffers
    for seed in (1, 2):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        with torch.no_grad():
            x.copy_(torch.randn(x.shape, generator=gen, device="cuda", dtype=x.dtype))
            g.copy_(torch.randn(g.shape, generator=gen, device="cuda", dtype=g.dtype))
        graph.replay()
        got = [out.clone(), *(c.clone() for c in captured)]
        for p in params:
            p.grad = None
        want = [step(), *(p.grad for p in params)]
        for i, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, b, msg=f"tensor {i}, seed {seed}")
