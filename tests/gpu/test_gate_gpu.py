"""The bf16 gate (moe_dist/routing/kernels.py Bf16GateFp32: one tensor-core GEMM with fp32 output,
the fp32 gradient through bf16 hi/lo halves) against the fp32 gate, forward and backward. CUDA only:
torch's mm(out_dtype=float32) of bf16 runs there alone."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda"


def test_bf16_gate_equals_the_fp32_gate_forward_and_backward():
    from moe_dist.routing.kernels import Bf16GateFp32
    from moe_dist.routing.router import _Fp32Gate

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 256, generator=gen).to(DEV, torch.bfloat16)
    w = (torch.randn(24, 256, generator=gen) / 16).to(DEV, torch.bfloat16)
    g = torch.randn(300, 24, generator=gen).to(DEV)
    outs = []
    for gate in (Bf16GateFp32, _Fp32Gate):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = gate.apply(xs, ws)
        out.backward(g)
        outs.append((out, xs.grad, ws.grad))
    for a, b in zip(*outs):
        assert a.dtype == b.dtype
        assert ((a.float() - b.float()).norm() / b.float().norm()) < (
            1e-5 if a.dtype == torch.float32 else 8e-3
        )
