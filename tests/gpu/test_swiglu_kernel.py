"""The fused SwiGLU kernels against the torch version: forward and backward, masked row tails, and
only rows [0, rows_used) written (the rest of a shape-static buffer is skipped). On a GPU in bf16;
with TRITON_INTERPRET=1 on CPU tensors in fp32 (tests/unit/test_triton_kernels_cpu.py does that in
CI). """

import os

import pytest
import torch

triton = pytest.importorskip(
    "triton", reason="the fused SwiGLU is a Triton kernel (pip install triton)"
)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEV, DT = ("cpu", torch.float32) if INTERPRETED else ("cuda", torch.bfloat16)
pytestmark = pytest.mark.skipif(
    not (INTERPRETED or torch.cuda.is_available()),
    reason="Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 for CPU tensors",
)


@pytest.mark.parametrize("rows_used", [0, 23, 50])
def test_swiglu_kernels_write_exactly_the_used_rows(rows_used):
    from moe_dist.experts.ffn import _SwiGLU
    from moe_dist.experts.swiglu_triton import _grid, _swiglu_bwd, _swiglu_fwd

    rows, F = 50, 1100  # F not a multiple of the block: masked tails
    gen = torch.Generator().manual_seed(rows_used)
    h = torch.randn(rows, 2 * F, generator=gen).to(DEV, DT)
    g = torch.randn(rows, F, generator=gen).to(DEV, DT)
    n = torch.full((), rows_used, dtype=torch.int64, device=DEV)
    out = torch.full((rows, F), float("nan"), device=DEV, dtype=DT)
    dh = torch.full((rows, 2 * F), float("nan"), device=DEV, dtype=DT)
    _swiglu_fwd[_grid(rows, F, 1024)](h, out, n, F, BLOCK=1024)
    _swiglu_bwd[_grid(rows, F, 1024)](h, g, dh, n, F, BLOCK=1024)
    href = h.float().requires_grad_(True)
    ref = _SwiGLU.apply(href)
    ref.backward(g.float())
    tol = dict(rtol=2e-2, atol=2e-2) if DT == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:rows_used].float(), ref[:rows_used].detach(), **tol)
    torch.testing.assert_close(dh[:rows_used].float(), href.grad[:rows_used], **tol)
    assert (
        out[rows_used:].isnan().all() and dh[rows_used:].isnan().all()
    ), "rows past rows_used were written"
