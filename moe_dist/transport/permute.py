"""Index math shared by every transport: sort a rank's slots by expert, and row permutations whose
backward is the inverse permutation (a gather, never an atomic scatter).

Legend: T tokens, K slots per token, S = T*K slots, E experts, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SlotOrder:
    """Slots sorted by expert (stable: token order within an expert); unused slots (-1) last."""

    order_S: torch.Tensor  # sorted position -> slot id
    inverse_S: torch.Tensor  # slot id -> sorted position
    counts_E: torch.Tensor  # int64 routed slots per expert


def sort_slots_by_expert(expert_idx_TK: torch.Tensor, num_experts: int) -> SlotOrder:
    key_S = expert_idx_TK.reshape(-1)
    key_S = torch.where(key_S >= 0, key_S, num_experts)
    order_S = torch.argsort(key_S, stable=True)
    inverse_S = torch.empty_like(order_S)
    inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
    # scatter_add, not bincount: bincount reads the max on the host to size its output (a sync).
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=key_S.device)
    counts.scatter_add_(0, key_S, torch.ones_like(key_S))
    return SlotOrder(order_S, inverse_S, counts[:num_experts])


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x[index] for a bijection `index`; the backward gathers with `inverse` instead of
    scattering."""
    return _PermuteRows.apply(x, index, inverse)


class _GatherTokenCopies(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TH, order_S, inverse_S, k, used_TK):
        ctx.save_for_backward(inverse_S, used_TK)
        ctx.k = k
        return x_TH.index_select(0, order_S // k)

    @staticmethod
    def backward(ctx, grad_SH):
        inverse_S, used_TK = ctx.saved_tensors
        grad_TKH = grad_SH.index_select(0, inverse_S).view(
            grad_SH.shape[0] // ctx.k, ctx.k, grad_SH.shape[-1]
        )
        if used_TK is not None:
            # Rows of unused slots were never computed by the grouped GEMM: their "gradient" is
            # uninitialised memory, not zero, and must not reach the tokens.
            grad_TKH = torch.where(used_TK.unsqueeze(-1), grad_TKH, grad_TKH.new_zeros(()))
        return grad_TKH.sum(1), None, None, None, None


def gather_token_copies(
    x_TH: torch.Tensor, slots: SlotOrder, k: int, used_TK: torch.Tensor | None = None
) -> torch.Tensor:
    """One row per slot, in expert-sorted order: row i is the token of slot order_S[i].
    Pass `used_TK` when some slots are unused so their rows' gradients are ignored."""
    return _GatherTokenCopies.apply(x_TH, slots.order_S, slots.inverse_S, k, used_TK)


def weighted_sum_of_slots(
    y_SH: torch.Tensor, slots: SlotOrder, weights_TK: torch.Tensor, used_TK: torch.Tensor | None
) -> torch.Tensor:
    """Back to slot order, then out[t] = sum_k w[t, k] * y[t, k]. Unused slots contribute exactly 0,
    even where their rows were never computed (uninitialised memory may hold NaN)."""
    T, K = weights_TK.shape
    y_TKH = permute_rows(y_SH, slots.inverse_S, slots.order_S).view(T, K, y_SH.shape[-1])
    if used_TK is not None:
        y_TKH = torch.where(used_TK.unsqueeze(-1), y_TKH, y_TKH.new_zeros(()))
    return weighted_sum_over_slots(y_TKH, weights_TK)


class _WeightedSum(torch.autograd.Function):
    """out[t] = sum_k w[t, k] * y[t, k]: K fused multiply-adds over rows. (An einsum becomes a bmm
    with inner size K, and its backward an fp32 GEMM: several times slower for K = 2..8.)"""

    @staticmethod
    def forward(ctx, y_TKH, w_TK):
        ctx.save_for_backward(y_TKH, w_TK)
        return sum_weighted_slots(y_TKH, w_TK)

    @staticmethod
    def backward(ctx, grad_TH):
        y_TKH, w_TK = ctx.saved_tensors
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_y = grad_TH.unsqueeze(1) * w_TK.to(grad_TH.dtype).unsqueeze(-1)
        if ctx.needs_input_grad[1]:
            grad_w = slot_weight_grad(y_TKH, grad_TH).to(w_TK.dtype)
        return grad_y, grad_w


def sum_weighted_slots(y_TKH: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
    """Forward of the weighted sum, no autograd (shared with the nvshmem combine)."""
    w = w_TK.to(y_TKH.dtype)
    out = y_TKH[:, 0] * w[:, :1]
    for k in range(1, y_TKH.shape[1]):
        out.addcmul_(y_TKH[:, k], w[:, k : k + 1])
    return out


def slot_weight_grad(y_TKH: torch.Tensor, grad_TH: torch.Tensor) -> torch.Tensor:
    """d out / d w[t, k] = <y[t, k], grad[t]>, accumulated in float32."""
    return torch.stack(
        [(y_TKH[:, k] * grad_TH).sum(-1, dtype=torch.float32) for k in range(y_TKH.shape[1])], 1
    )


def weighted_sum_over_slots(y_TKH: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    return _WeightedSum.apply(y_TKH, weights_TK)
