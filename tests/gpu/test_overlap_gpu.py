"""The overlap on a real GPU: the shared experts on the side stream equal them on the compute
stream (forward and backward, two steps) with the local transport, backward ops run on their
forward's stream (a split call: transport on comm, experts on compute, shared experts on side), and
the nvshmem transport with 1 and 2 PEs sharing one GPU (tests/gpu/overlap_worker.py under
torchrun; time-sliced, so small shapes). Two micro-batches: tests/gpu/test_microbatch_gpu.py.

Legend: T tokens, H hidden, E experts.
"""

import pytest
import torch

from moe_dist import MoEConfig, MoELayer
from moe_dist.transport import nvshmem_unavailable_reason

from tests.conftest import assert_fwd_bwd_close, fwd_bwd

from .torchrun_pes import run_worker

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize(
    "dtype,T,H", [(torch.float32, 301, 64), (torch.float32, 2, 64), (torch.bfloat16, 8192, 256)]
)
def test_local_side_stream_equals_compute_stream(dtype, T, H):
    cfg = MoEConfig(
        hidden_size=H,
        ffn_hidden_size=128,
        num_experts=16,
        top_k=4,
        num_shared_experts=1,
        router_bias_update_rate=0.0,
        shared_expert_overlap=False,
    )
    torch.manual_seed(0)
    plain = MoELayer(cfg, device="cuda", dtype=dtype)
    torch.manual_seed(0)
    side = MoELayer(cfg.replace(shared_expert_overlap=True), device="cuda", dtype=dtype)
    x = torch.randn(T, H, device="cuda", dtype=dtype)
    g = torch.randn(T, H, device="cuda")
    # bf16 (tol None): relative norm error, as the streams may change the order of bf16 sums
    tol = 1e-5 if dtype == torch.float32 else None
    expected = fwd_bwd(plain, x, g)
    for step in range(2):  # a second step reuses memory the first freed across streams
        label = f"{dtype} T={T} side stream, step {step}"
        assert_fwd_bwd_close(fwd_bwd(side, x, g), expected, label, rtol=tol, atol=tol)
        side.zero_grad()


def test_backward_runs_on_forward_streams():
    """Autograd runs each backward node on its forward's stream: combine on comm, experts on
    compute, shared experts on side. This is what gives the overlap in backward. A split call puts
    the transport on comm (a plain forward makes its transport calls on the current stream)."""
    cfg = MoEConfig(
        hidden_size=64,
        ffn_hidden_size=64,
        num_experts=8,
        top_k=2,
        num_shared_experts=1,
    )
    torch.manual_seed(0)
    layer = MoELayer(cfg, device="cuda")
    seen = {}

    def probe(name, fn):
        def wrapped(*a, **kw):
            out = fn(*a, **kw)
            t = out[0] if isinstance(out, tuple) else out
            t.grad_fn.register_prehook(
                lambda g: seen.setdefault(name, torch.cuda.current_stream()) and None
            )
            return out

        return wrapped

    layer.transport.combine = probe("combine", layer.transport.combine)
    layer.experts.forward = probe("experts", layer.experts.forward)
    layer.shared_experts.forward = probe("shared", layer.shared_experts.forward)
    x = torch.randn(40, 64, device="cuda", requires_grad=True)
    compute = torch.cuda.current_stream()
    layer.finish(layer.start(x)).output.sum().backward()
    torch.cuda.synchronize()
    dev = torch.cuda.current_device()
    assert seen["combine"] == layer.streams.comm(torch.device("cuda", dev)), seen
    assert seen["experts"] == compute, seen
    assert seen["shared"] == layer.streams.side(torch.device("cuda", dev)), seen


nv_reason = nvshmem_unavailable_reason(
    torch.device("cuda", 0) if torch.cuda.is_available() else None
)


@pytest.mark.skipif(nv_reason is not None, reason=f"nvshmem transport cannot run here: {nv_reason}")
@pytest.mark.parametrize("pes", [1, 2])
def test_nvshmem_side_stream_equals_compute_stream(pes):
    run_worker("overlap_worker.py", pes, f"OVERLAP WORKER OK {pes}")
