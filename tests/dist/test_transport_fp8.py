"""dispatch_dtype="fp8_e4m3" on the collective transport over gloo: outputs and input gradients
stay within a bounded relative error of the activation-dtype path, the rows really travel as e4m3
(bytes counted), and the gradient rows of the backward stay in the activation dtype.
Legend: T tokens, H hidden."""

import pytest
import torch
import torch.distributed as dist

from moe_dist import MoEConfig, MoELayer, ParallelGroups

from .harness import run_distributed

H = 256


def rel(a, b):
    return float((a - b).norm() / b.norm())


def scenario():
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = ParallelGroups(ep_size=world)
    cfg = MoEConfig(
        hidden_size=H, ffn_hidden_size=64, num_experts=8, top_k=4, transport="collective"
    )
    results = {}
    for dt in ("bf16", "fp8_e4m3"):
        torch.manual_seed(0)
        layer = MoELayer(cfg.replace(dispatch_dtype=dt), groups)
        gen = torch.Generator().manual_seed(rank)
        T = [24, 9, 17, 3][rank]
        x = (torch.randn(T, H, generator=gen) * torch.logspace(-1, 1, H)).requires_grad_(True)
        out = layer(x).output
        g = torch.randn(out.shape, generator=gen)
        (out * g).sum().backward()
        grad_w = layer.experts.w_in.grad.clone()
        results[dt] = (out.detach(), x.grad, grad_w, layer.transport.stats.last_dispatch)
    out_b, dx_b, dw_b, st_b = results["bf16"]
    out_f, dx_f, dw_f, st_f = results["fp8_e4m3"]
    # e4m3 keeps 3 mantissa bits: <= 6.25% per element, a few % in norm after the experts.
    errs = rel(out_f, out_b), rel(dx_f, dx_b), rel(dw_f, dw_b)
    print(f"rank {rank}: fp8 relative error output {errs[0]:.4f} dx {errs[1]:.4f} dw {errs[2]:.4f}")
    assert 0 < errs[0] < 0.05 and 0 < errs[1] < 0.05 and 0 < errs[2] < 0.05, errs
    assert st_f.rows == st_b.rows
    assert st_b.payload_bytes == st_b.rows * H * 4  # float32 activations
    assert st_f.payload_bytes == st_f.rows * (H + 4 * H // 128)  # e4m3 bytes + fp32 scales


@pytest.mark.parametrize("world", [2])
def test_fp8_dispatch_error_is_bounded(world):
    run_distributed(scenario, world, timeout_s=120)


def test_fp8_config_is_validated():
    with pytest.raises(ValueError, match=r"divisible by 128.*hidden_size=96"):
        MoEConfig(hidden_size=96, ffn_hidden_size=8, num_experts=4, dispatch_dtype="fp8_e4m3")
    with pytest.raises(ValueError, match="dispatch_dtype must be one of"):
        MoEConfig(hidden_size=128, ffn_hidden_size=8, num_experts=4, dispatch_dtype="fp16")
    with pytest.raises(ValueError, match="num_comm_sms must be a positive int or None, got 0"):
        MoEConfig(hidden_size=128, ffn_hidden_size=8, num_experts=4, num_comm_sms=0)
