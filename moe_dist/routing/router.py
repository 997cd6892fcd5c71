"""Router: a linear gate plus the configured selection rule, producing a RoutingPlan.

Legend: T tokens, H hidden, E experts, K slots per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoEConfig
from .capacity import drop_over_capacity, expert_capacity
from .losses import aux_terms
from .plan import RoutingPlan, SlotHistogram
from .select import group_limited_topk, sigmoid_topk, softmax_topk, top_p_select


class _Fp32Gate(torch.autograd.Function):
    """logits = x @ w^T in float32, saving x in its own dtype (not an fp32 copy of every token)."""

    @staticmethod
    def forward(ctx, x_TH, w_EH):
        ctx.save_for_backward(x_TH, w_EH)
        return F.linear(x_TH.float(), w_EH.float())

    @staticmethod
    def backward(ctx, grad_TE):
        x_TH, w_EH = ctx.saved_tensors
        grad_x = (grad_TE @ w_EH.float()).to(x_TH.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (grad_TE.t() @ x_TH.float()).to(w_EH.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


class Router(nn.Module):
    def __init__(self, cfg: MoEConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(
            torch.empty(cfg.num_experts, cfg.hidden_size, device=device, dtype=dtype)
        )
        bound = 1.0 / math.sqrt(cfg.hidden_size)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
        # Aux-loss-free load balancing (DeepSeek-V3): a per-expert bias that only steers selection.
        # A buffer, so checkpoints carry it and optimizers never touch it.
        self.register_buffer(
            "expert_bias", torch.zeros(cfg.num_experts, device=device, dtype=torch.float32)
        )
        # GPT-OSS: a learned logit bias (unlike expert_bias it also weighs). Zero-initialised:
        # nothing drawn, so the RNG stream (and EP-invariant initialisation) is unchanged.
        self.bias = (
            nn.Parameter(torch.zeros(cfg.num_experts, device=device, dtype=dtype))
            if cfg.router_bias
            else None
        )
        # This rank's slots per expert since the last bias update (recorded by the layer's forward,
        # consumed by update_bias once per optimizer step). Not persistent: empty after a step.
        self.register_buffer(
            "load_E",
            torch.zeros(cfg.num_experts, device=device, dtype=torch.int64),
            persistent=False,
        )
        # None: the fused routing kernel (routing/kernels.py) on CUDA where it serves the router.
        self.fused_routing: bool | None = None

    def logits(self, x_TH: torch.Tensor) -> torch.Tensor:
        # fp32 gate: top-k on bf16 logits flips near-ties, which would break EP=N == EP=1
        # comparisons.
        if self.fused_routing is not False and x_TH.is_cuda:
            from .kernels import Bf16GateFp32, bf16_gate_supported

            if bf16_gate_supported(x_TH, self.weight):
                logits_TE = Bf16GateFp32.apply(x_TH, self.weight)
            else:
                logits_TE = _Fp32Gate.apply(x_TH, self.weight)
        else:
            logits_TE = _Fp32Gate.apply(x_TH, self.weight)
        return logits_TE if self.bias is None else logits_TE + self.bias.float()

    def forward(
        self, x_TH: torch.Tensor, logits_TE: torch.Tensor | None = None, check_finite: bool = False
    ) -> RoutingPlan:
        """The plan for x_TH (logits_TE: the gate's output, if the caller computed it).
        check_finite: the plan's logits_finite says on the device whether every logit was
        finite (no host sync)."""
        cfg = self.cfg
        finite = None
        k, E = cfg.top_k, cfg.num_experts
        kernel = self._use_kernel(x_TH if logits_TE is None else logits_TE)
        kernel_args = (
            self.expert_bias,
            k,
            cfg.router,
            cfg.norm_topk_prob,
            cfg.top_p,
            cfg.routed_scaling_factor,
            bool(cfg.aux_loss_coef),
        )
        # the kernel also counts the slots for the fused path's sort, unless capacity drops some
        hist = None
        write_hist = cfg.capacity_factor is None
        if kernel and logits_TE is None and self.bias is None and not cfg.z_loss_coef:
            # gate + kernel as one node: no [T, E] logits held for backward (the z-loss and a
            # gate bias need the logits themselves)
            from .kernels import gate_route_topk_fused

            idx_TK, weights_TK, probs_BE, kernel_counts_E, finite, hist = gate_route_topk_fused(
                x_TH, self.weight, *kernel_args, check_finite=check_finite, write_hist=write_hist
            )
        else:
            if logits_TE is None:
                logits_TE = self.logits(x_TH)
            if check_finite:
                finite = torch.isfinite(logits_TE).all()
            if kernel:
                from .kernels import route_topk_fused

                idx_TK, weights_TK, probs_BE, kernel_counts_E, hist = route_topk_fused(
                    logits_TE, *kernel_args, write_hist=write_hist
                )
            else:
                idx_TK, weights_TK, probs_TE = self._select(logits_TE)
        if cfg.routed_scaling_factor != 1.0 and not kernel:
            weights_TK = weights_TK * cfg.routed_scaling_factor

        # The losses as sums over tokens (losses.py): several calls' plans give the loss of their
        # tokens together (joint_aux_loss), as two overlapped micro-batches need.
        if kernel:  # the kernel's counts and block sums of probabilities (None without aux loss)
            terms = aux_terms(
                None,
                idx_TK,
                logits_TE,
                cfg.aux_loss_coef,
                cfg.z_loss_coef,
                E,
                routed_E=kernel_counts_E,
                probs_sum_E=None if probs_BE is None else probs_BE.sum(0),
            )
        else:
            terms = aux_terms(probs_TE, idx_TK, logits_TE, cfg.aux_loss_coef, cfg.z_loss_coef, E)
        aux = terms.loss()
        if aux is None:
            aux = torch.zeros((), dtype=torch.float32, device=idx_TK.device)

        dropped = torch.zeros((), dtype=torch.int64, device=idx_TK.device)
        if cfg.capacity_factor is not None:
            capacity = expert_capacity(idx_TK.shape[0], k, E, cfg.capacity_factor)
            idx_TK, weights_TK, dropped = drop_over_capacity(idx_TK, weights_TK, E, capacity)

        if kernel and cfg.capacity_factor is None:
            tokens_per_expert_E = kernel_counts_E  # counted by the routing kernel
        else:
            tokens_per_expert_E = torch.zeros(E + 1, dtype=torch.int64, device=idx_TK.device)
            tokens_per_expert_E.scatter_add_(
                0,
                torch.where(idx_TK >= 0, idx_TK, E).reshape(-1),
                torch.ones(idx_TK.numel(), dtype=torch.int64, device=idx_TK.device),
            )
        slot_hist = None
        if hist is not None:
            from .kernels import slot_hist_block

            slot_hist = SlotHistogram(hist, slot_hist_block(idx_TK.shape[0], E, k), idx_TK)
        return RoutingPlan(
            expert_idx_TK=idx_TK,
            weights_TK=weights_TK,
            tokens_per_expert_E=tokens_per_expert_E[:E],
            aux_loss=aux,
            dropped_tokens=dropped,
            may_have_unused_slots=cfg.router == "top_p" or cfg.capacity_factor is not None,
            aux_terms=terms,
            logits_finite=finite,
            slot_hist=slot_hist,
        )

    @property
    def updates_bias(self) -> bool:
        """Whether this router's expert_bias learns (aux-loss-free balancing, router="sigmoid")."""
        return self.cfg.router == "sigmoid" and self.cfg.router_bias_update_rate > 0

    def _select(self, logits_TE: torch.Tensor):
        """(idx_TK, weights_TK, probs_TE) by select.py: the routers the kernel does not serve."""
        cfg, k = self.cfg, self.cfg.top_k
        if cfg.router == "softmax":
            bias_E = self.expert_bias if cfg.softmax_selection_bias else None
            return softmax_topk(logits_TE, k, cfg.norm_topk_prob, bias_E)
        if cfg.router == "group_limited":
            return group_limited_topk(
                logits_TE, k, cfg.num_expert_groups, cfg.topk_groups, cfg.norm_topk_prob
            )
        if cfg.router == "sigmoid":
            return sigmoid_topk(
                logits_TE,
                self.expert_bias,
                k,
                cfg.num_expert_groups,
                cfg.topk_groups,
                cfg.norm_topk_prob,
            )
        return top_p_select(logits_TE, k, cfg.top_p, cfg.norm_topk_prob)

    def _use_kernel(self, logits_TE: torch.Tensor) -> bool:
        """The fused kernel serves softmax, top-p and ungrouped sigmoid routing (sigmoid's
        load-balancing "probabilities" are normalised affinities, which it does not write)."""
        cfg = self.cfg
        # (the selection bias on softmax probabilities, ERNIE-4.5's, is not in the kernel)
        served = (cfg.router in ("softmax", "top_p") and not cfg.softmax_selection_bias) or (
            cfg.router == "sigmoid" and cfg.num_expert_groups <= 1 and not cfg.aux_loss_coef
        )
        if self.fused_routing is False or not served:
            return False
        return bool(self.fused_routing) or logits_TE.is_cuda

    @torch.no_grad()
    def record_load(self, tokens_per_expert_E: torch.Tensor) -> None:
        """Adds one forward's slots per expert to load_E (on the device, no sync)."""
        self.load_E += tokens_per_expert_E.to(self.load_E.dtype)

    @torch.no_grad()
    def update_bias(self, global_tokens_per_expert_E: torch.Tensor | None = None) -> None:
        """DeepSeek-V3's update: raise the bias of under-loaded experts, lower it for over-loaded
        ones, then clear load_E. Must be fed the load of the whole batch (summed over every rank
        that shares this router) so every rank keeps the same bias; None: this rank's load_E (one
        process). Runs once per optimizer step (moe_dist.training.router_bias), never in forward,
        so an activation-checkpoint recompute routes exactly as the forward did."""
        if global_tokens_per_expert_E is None:
            global_tokens_per_expert_E = self.load_E
        load = global_tokens_per_expert_E.float()
        self.expert_bias += self.cfg.router_bias_update_rate * torch.sign(load.mean() - load)
        self.load_E.zero_()
