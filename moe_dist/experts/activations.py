"""Expert activations beyond plain SwiGLU / GELU, and per-expert biases, each with its plain-torch
oracle (`*_reference`) that tests compare the fast version against.

- clamped SwiGLU (GPT-OSS): gate clamped above at `limit`, up clamped to [-limit, limit], then
  gate * sigmoid(alpha * gate) * (up + 1). Rows are [gate | up] halves, like `swiglu` (a model that
  stores gate/up interleaved is de-interleaved once when its weights are copied in).
- expert biases: y[rows of expert g] += b[g] after a grouped GEMM, with no host sync on the counts.

Legend: M rows, F ffn hidden (h is [M, 2F]: gate then up), G local experts, N out-features.
"""

from __future__ import annotations

import torch


def clamped_swiglu_reference(h_M2F: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """Oracle: HF GptOssExperts._apply_gate, on [gate | up] halves; autograd differentiates it."""
    gate, up = h_M2F.chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(gate * alpha) * (up + 1)


class ClampedSwiGLU(torch.autograd.Function):
    """clamped_swiglu_reference that saves only its input (autograd's version keeps the clamped
    halves and the sigmoid: three more [M, F] activations); the backward recomputes them."""

    @staticmethod
    def forward(ctx, h_M2F, alpha: float, limit: float):
        ctx.save_for_backward(h_M2F)
        ctx.alpha, ctx.limit = alpha, limit
        return clamped_swiglu_reference(h_M2F, alpha, limit)

    @staticmethod
    def backward(ctx, grad_MF):
        (h_M2F,) = ctx.saved_tensors
        alpha, limit = ctx.alpha, ctx.limit
        gate_raw, up_raw = h_M2F.chunk(2, dim=-1)
        gate = gate_raw.clamp(max=limit)
        up = up_raw.clamp(min=-limit, max=limit)
        sig = torch.sigmoid(gate * alpha)
        dh_M2F = torch.empty_like(h_M2F)
        d_gate, d_up = dh_M2F.chunk(2, dim=-1)  # written in place: no torch.cat
        torch.mul(grad_MF, gate * sig, out=d_up)
        torch.mul(grad_MF * (up + 1), sig * (1 + alpha * gate * (1 - sig)), out=d_gate)
        # torch.clamp passes the gradient where the input lies within the bounds, ends included.
        d_gate.masked_fill_(gate_raw > limit, 0)
        d_up.masked_fill_(up_raw.abs() > limit, 0)
        return dh_M2F, None, None


def clamped_swiglu(h_M2F: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    return ClampedSwiGLU.apply(h_M2F, alpha, limit)


def add_expert_bias_reference(
    y_MN: torch.Tensor, b_GN: torch.Tensor, counts_G: torch.Tensor
) -> torch.Tensor:
    """Oracle: one slice per expert (reads the counts on the host); rows past the groups get 0."""
    pieces, start = [], 0
    for g, n in enumerate(counts_G.tolist()):
        pieces.append(y_MN[start : start + n] + b_GN[g])
        start += n
    pieces.append(y_MN[start:])
    return torch.cat(pieces)


def add_expert_bias(y_MN: torch.Tensor, b_GN: torch.Tensor, counts_G: torch.Tensor) -> torch.Tensor:
    """y[rows of group g] + b[g]; counts stay on the device. Rows past sum(counts_G) (a
    shape-static transport's spare rows) get a zero bias, as they got no GEMM output."""
    M, G = y_MN.shape[0], b_GN.shape[0]
    ends_G = torch.cumsum(counts_G, 0)
    group_M = torch.searchsorted(ends_G, torch.arange(M, device=y_MN.device), right=True)
    b_padded = torch.cat([b_GN, b_GN.new_zeros(1, b_GN.shape[1])])  # row G: past the groups
    return y_MN + b_padded[group_M.clamp(max=G)].to(y_MN.dtype)
