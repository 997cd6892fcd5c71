"""Router regularisers. Each is computed over the tokens of one layer call (a data-parallel
micro-batch). `AuxTerms` holds their sums over those tokens, so that the loss of several calls taken
as one batch (two overlapped micro-batches, moe_dist/lm/model.py) is exact: the load-balancing loss
E * sum_e f_e * P_e is a product of two batch means, not a sum over tokens.

Legend: T tokens, E experts, K slots per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AuxTerms:
    """The router losses of one call as sums over its tokens; `a + b` is the terms of both calls'
    tokens together and `loss()` the coefficient-weighted loss they give."""

    num_tokens: int
    num_experts: int
    aux_loss_coef: float
    z_loss_coef: float
    slots_E: torch.Tensor | None  # routed slots per expert (float; None without aux_loss_coef)
    probs_sum_E: torch.Tensor | None  # router probabilities summed over tokens (differentiable)
    z_sum: torch.Tensor | None  # squared log-partition summed over tokens (None without z loss)

    def __add__(self, other: "AuxTerms") -> "AuxTerms":
        mine = (self.num_experts, self.aux_loss_coef, self.z_loss_coef)
        theirs = (other.num_experts, other.aux_loss_coef, other.z_loss_coef)
        if mine != theirs:
            raise ValueError(
                f"aux terms of different routers cannot be added: (num_experts, aux_loss_coef, "
                f"z_loss_coef) {mine} != {theirs}"
            )

        def add(a, b):
            return None if a is None else a + b

        return AuxTerms(
            self.num_tokens + other.num_tokens,
            *mine,
            add(self.slots_E, other.slots_E),
            add(self.probs_sum_E, other.probs_sum_E),
            add(self.z_sum, other.z_sum),
        )

    def loss(self) -> torch.Tensor:
        T = max(self.num_tokens, 1)
        aux = None
        if self.slots_E is not None:
            fraction_E = self.slots_E / self.slots_E.sum().clamp(min=1)
            lb = self.num_experts * (fraction_E * (self.probs_sum_E / T)).sum()
            aux = self.aux_loss_coef * lb
        if self.z_sum is not None:
            z = self.z_loss_coef * (self.z_sum / T)
            aux = z if aux is None else aux + z
        return aux


def aux_terms(
    probs_TE: torch.Tensor | None,
    idx_TK: torch.Tensor,
    logits_TE: torch.Tensor | None,
    aux_loss_coef: float,
    z_loss_coef: float,
    num_experts: int | None = None,
    routed_E: torch.Tensor | None = None,
    probs_sum_E: torch.Tensor | None = None,
) -> AuxTerms:
    """The terms of one call's tokens (probs_TE may be None when aux_loss_coef is 0, logits_TE
    when z_loss_coef is 0: then num_experts gives E). routed_E: the routed slots per expert of
    idx_TK, and probs_sum_E: probs_TE summed over tokens, where already computed (the routing
    kernel gives both); else computed here."""
    T, E = logits_TE.shape if logits_TE is not None else (idx_TK.shape[0], num_experts)
    slots_E = z_sum = None
    if aux_loss_coef:
        if probs_sum_E is None:
            probs_sum_E = probs_TE.sum(dim=0)
        if routed_E is not None:
            slots_E = routed_E.to(probs_sum_E.dtype)
        else:
            routed_TK = (idx_TK >= 0).to(probs_sum_E.dtype)
            slots_E = torch.zeros(E, device=idx_TK.device, dtype=probs_sum_E.dtype)
            # Unused slots (-1) add 0 to expert 0: masking by weight, not by boolean indexing,
            # avoids a host sync.
            slots_E.scatter_add_(0, idx_TK.clamp(min=0).reshape(-1), routed_TK.reshape(-1))
    else:
        probs_sum_E = None
    if z_loss_coef:
        z_sum = torch.logsumexp(logits_TE, dim=-1).square().sum()
    return AuxTerms(T, E, aux_loss_coef, z_loss_coef, slots_E, probs_sum_E, z_sum)


def joint_aux_loss(terms: list[AuxTerms]) -> torch.Tensor:
    """The aux loss of several calls' tokens taken as one batch (equal, up to rounding, to the loss
    one call over all of them would return)."""
    if not terms or any(t is None for t in terms):
        raise ValueError("joint_aux_loss needs the AuxTerms of every call (RoutingPlan.aux_terms)")
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total.loss()


def load_balancing_loss(
    probs_TE: torch.Tensor, idx_TK: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Switch/GShard auxiliary loss: E * sum_e f_e * P_e, where f_e is the fraction of routed slots
    that chose expert e and P_e the mean router probability of e. Equals 1 under perfect balance."""
    if probs_TE.shape[0] == 0:
        return probs_TE.sum() * 0.0
    return aux_terms(probs_TE, idx_TK, probs_TE, 1.0, 0.0).loss()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean squared log-partition; keeps router logits small and bf16-safe."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return aux_terms(None, logits_TE.new_empty(0, 1), logits_TE, 0.0, 1.0).loss()
