"""Expert FFNs: the routed experts of one rank (grouped) and the dense shared expert.

Weights are stored [out, in] per expert, like nn.Linear, so a dense FFN's weights drop straight in.
Legend: M rows, H hidden, F ffn hidden, G local experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .activations import add_expert_bias, clamped_swiglu
from .gemm import grouped_mm, grouped_mm_supported, loop_mm


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up that saves only its input: autograd's version also keeps silu(gate), one more
    [rows, F] activation per layer. The backward recomputes it (elementwise, cheap)."""

    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        out = torch.empty_like(h)
        d_gate, d_up = out.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        torch.mul(grad, gate * sig, out=d_up)  # d/d up = silu(gate)
        # d/d gate = grad * up * silu'(gate), silu' = sig * (1 + gate * (1 - sig)); written in place
        torch.mul(grad * up, sig * (1 + gate * (1 - sig)), out=d_gate)
        return out


def activate(
    h: torch.Tensor,
    activation: str,
    rows_used: torch.Tensor | None = None,
    *,
    alpha: float = 1.702,
    limit: float = 7.0,
) -> torch.Tensor:
    """rows_used (device scalar): on CUDA the fused SwiGLU computes only rows [0, rows_used).
    alpha, limit: "clamped_swiglu" only (experts/activations.py)."""
    if activation == "clamped_swiglu":
        return clamped_swiglu(h, alpha, limit)
    if activation == "swiglu":
        if h.is_cuda:
            from .swiglu_triton import SwiGLUTriton  # one fused pass each way

            return SwiGLUTriton.apply(h, rows_used)
        return _SwiGLU.apply(h)
    return F.gelu(h)


def _init_uniform_(w: torch.Tensor, fan_in: int, generator: torch.Generator | None) -> None:
    # nn.Linear's default scale, drawn from an explicit generator so EP=N matches EP=1 (see
    # layer.py).
    bound = 1.0 / math.sqrt(fan_in)
    w.uniform_(-bound, bound, generator=generator)


class GroupedExperts(nn.Module):
    """The experts this rank holds: global experts [first_expert, first_expert + num_local)."""

    def __init__(
        self,
        hidden: int,
        ffn_hidden: int,
        num_local: int,
        first_expert: int,
        activation: str,
        backend: str,
        seeds: list[int],
        device=None,
        dtype=None,
        *,
        bias: bool = False,
        act_kwargs: dict | None = None,
    ):
        super().__init__()
        self.hidden, self.ffn_hidden, self.activation = hidden, ffn_hidden, activation
        self.num_local, self.first_expert, self.backend = num_local, first_expert, backend
        self.act_kwargs = act_kwargs or {}
        in_width = 2 * ffn_hidden if activation != "gelu" else ffn_hidden
        w_in = torch.empty(num_local, in_width, hidden, dtype=dtype or torch.float32)
        w_out = torch.empty(num_local, hidden, ffn_hidden, dtype=dtype or torch.float32)
        for g, seed in enumerate(seeds):
            gen = torch.Generator().manual_seed(seed)
            _init_uniform_(w_in[g], hidden, gen)
            _init_uniform_(w_out[g], ffn_hidden, gen)
        self.w_in = nn.Parameter(w_in.to(device))
        self.w_out = nn.Parameter(w_out.to(device))
        # GPT-OSS style biases, zero-initialised: nothing drawn, the RNG stream is unchanged.
        zeros = lambda n: nn.Parameter(torch.zeros(num_local, n, device=device, dtype=dtype))
        self.b_in, self.b_out = (zeros(in_width), zeros(hidden)) if bias else (None, None)

    def resolved_backend(self, x: torch.Tensor) -> str:
        if self.backend != "auto":
            return self.backend
        ok, _ = grouped_mm_supported(x.device, x.dtype, self.hidden, self.ffn_hidden)
        return "grouped_mm" if ok else "loop"

    def forward(self, x_MH: torch.Tensor, counts_G: torch.Tensor) -> torch.Tensor:
        mm = grouped_mm if self.resolved_backend(x_MH) == "grouped_mm" else loop_mm
        # Rows past sum(counts_G) (a shape-static transport's spare capacity) are skipped on CUDA.
        rows_used = counts_G.sum() if x_MH.is_cuda else None
        h = mm(x_MH, self.w_in, counts_G)
        if self.b_in is not None:
            h = add_expert_bias(h, self.b_in, counts_G)
        h = activate(h, self.activation, rows_used, **self.act_kwargs)
        y = mm(h, self.w_out, counts_G)
        return y if self.b_out is None else add_expert_bias(y, self.b_out, counts_G)


class DenseFFN(nn.Module):
    """Shared experts fused into one FFN (their hidden units side by side), plus an optional
    gate."""

    def __init__(
        self,
        hidden: int,
        ffn_hidden: int,
        activation: str,
        gate: bool,
        device=None,
        dtype=None,
        *,
        act_kwargs: dict | None = None,
        scale: float = 1.0,
    ):
        super().__init__()
        self.activation, self.act_kwargs, self.scale = activation, act_kwargs or {}, scale
        in_width = 2 * ffn_hidden if activation != "gelu" else ffn_hidden
        self.w_in = nn.Parameter(torch.empty(in_width, hidden, device=device, dtype=dtype))
        self.w_out = nn.Parameter(torch.empty(hidden, ffn_hidden, device=device, dtype=dtype))
        self.gate = (
            nn.Parameter(torch.empty(1, hidden, device=device, dtype=dtype)) if gate else None
        )
        with torch.no_grad():
            _init_uniform_(self.w_in, hidden, None)
            _init_uniform_(self.w_out, ffn_hidden, None)
            if self.gate is not None:
                _init_uniform_(self.gate, hidden, None)

    def forward(self, x_MH: torch.Tensor) -> torch.Tensor:
        y = F.linear(
            activate(F.linear(x_MH, self.w_in), self.activation, **self.act_kwargs), self.w_out
        )
        if self.gate is not None:
            y = torch.sigmoid(F.linear(x_MH, self.gate)) * y
        return y if self.scale == 1.0 else y * self.scale
