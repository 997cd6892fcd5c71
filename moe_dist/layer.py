"""MoELayer: route -> dispatch -> experts -> combine (+ shared experts). Knows no process group:
where tokens travel is its transport's business (transport/), which ranks exist is parallel/'s.

Legend: T tokens on this rank, H hidden, E experts, K slots per token, M rows received by local
experts."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .config import MoEConfig
from .errors import (
    NONFINITE_LOGITS,
    DeviceErrorFlags,
    NonFiniteRouterLogits,
    PeerTimeout,
    RankFailed,
    RankMismatch,
)
from .experts import DenseFFN, GroupedExperts, grouped_mm_supported
from .overlap import pipelined_moe, start_shared_experts
from .routing import Router, RoutingPlan, scale_inputs
from .transport import build_transport
from .transport.handshake import config_crc, config_fields, tensor_crc


class MoEOutput(NamedTuple):
    output: torch.Tensor  # same shape as the input
    aux_loss: (
        torch.Tensor
    )  # scalar, already scaled by the coefficients; add it to the training loss
    tokens_per_expert: torch.Tensor  # int64 [E]: slots this rank routed to each (global) expert


class MoELayer(nn.Module):
    """One expert-parallel MoE FFN.

    EP-invariant initialisation: the router and shared experts draw from torch's global RNG in a
    fixed order, then one base seed is drawn, and expert e is initialised from seed (base + e). So
    under one torch.manual_seed an EP=N layer holds exactly the EP=1 weights of its local experts.
    """

    def __init__(self, cfg: MoEConfig, groups=None, *, name: str = "moe", device=None, dtype=None):
        super().__init__()
        ep_size = 1 if groups is None else groups.ep_size
        if cfg.num_experts % ep_size:
            raise ValueError(
                f"num_experts ({cfg.num_experts}) must be divisible by ep_size ({ep_size})"
            )
        device = torch.device(device) if device is not None else None
        if cfg.expert_backend == "grouped_mm":
            ok, why = grouped_mm_supported(
                device or torch.device("cpu"),
                dtype or torch.float32,
                cfg.hidden_size,
                cfg.ffn_hidden_size,
            )
            if not ok:
                raise ValueError(
                    f"expert_backend='grouped_mm' (hidden_size={cfg.hidden_size}, "
                    f"ffn_hidden_size={cfg.ffn_hidden_size}): {why}"
                )
        self.cfg, self.name = cfg, name
        act_kwargs = (
            dict(alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)
            if cfg.activation == "clamped_swiglu"
            else None
        )
        self.router = Router(cfg, device=device, dtype=dtype)
        self.shared_experts = (
            DenseFFN(
                cfg.hidden_size,
                cfg.shared_hidden,
                cfg.activation,
                cfg.shared_expert_gate,
                device=device,
                dtype=dtype,
                act_kwargs=act_kwargs,
                scale=cfg.shared_expert_scale,
            )
            if cfg.num_shared_experts
            else None
        )
        self.transport = build_transport(cfg.transport, cfg.num_experts, groups, device, cfg, dtype)
        if getattr(self.transport, "error_flags", None) is not None:
            self.transport.error_flags.layer_name = name
        context = getattr(self.transport, "context", None)  # the handshake header's identity
        if context is not None:
            context.layer, context.config = name, config_crc(cfg)
            context.config_text = config_fields(cfg)
            context.on_device_error = self._clear_device_errors
        base_seed = int(torch.randint(0, 2**62, (1,)).item()) + cfg.init_seed_offset
        num_local = cfg.num_experts // ep_size
        first = self.transport.ep_rank * num_local
        self.experts = GroupedExperts(
            cfg.hidden_size,
            cfg.ffn_hidden_size,
            num_local,
            first,
            cfg.activation,
            cfg.expert_backend,
            [base_seed + e for e in range(first, first + num_local)],
            device=device,
            dtype=dtype,
            bias=cfg.expert_ffn_bias,
            act_kwargs=act_kwargs,
        )
        for p in self.experts.parameters():
            mark_expert_param(p, ep_size)
        self.step = 0
        agree = getattr(self.transport, "agree", None)
        if agree is not None:  # every rank of the EP group builds the same layer: check it
            agree()
        self.error_flags: DeviceErrorFlags | None = None
        self._observers: list = []

    # -- the forward, in data-flow order
    # -------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> MoEOutput:
        # A rank that fails before its tokens travel does not leave its peers waiting: the next
        # transport call carries the error and every rank raises it (transport/handshake.py).
        try:
            self._begin_call()
            self._check_input(x)
            x_TH = x.reshape(-1, x.shape[-1])
            # On CUDA the shared experts run on a side stream from here on, while tokens route and
            # travel.
            shared = start_shared_experts(self, x_TH)
            plan = self.route(x_TH)
            self._send_device_errors()
        except Exception as e:
            self.fail_together(e)
        out_TH = shared.add_to(self.routed_output(x_TH, plan))
        if self.cfg.error_check == "eager":
            # The nvshmem transport records overflow and timeouts on the device; eager mode raises
            # them here (one host sync, only where flags exist), also those of the previous
            # backward.
            self.check_errors()
        self.step += 1
        return MoEOutput(out_TH.view(x.shape), plan.aux_loss, plan.tokens_per_expert_E)

    def route(self, x_TH: torch.Tensor) -> RoutingPlan:
        logits_TE = self.router.logits(x_TH)
        if self.cfg.check_finite:
            self._check_finite(logits_TE)
        plan = self.router(x_TH, logits_TE)
        if self.training and self.cfg.router == "sigmoid" and self.cfg.router_bias_update_rate > 0:
            # The bias for the next step comes from this step's load over the whole batch (all
            # ranks).
            self.router.update_bias(self.transport.global_load(plan.tokens_per_expert_E))
        return plan

    def routed_output(self, x_TH: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """The routed experts' combined output (shared experts not included): chunks overlapped
        when cfg.num_chunks > 1; with cfg.scale_expert_input (Llama 4) each expert sees its token
        times the routing weight and its output joins the sum unweighted."""
        x_in, plan_in = scale_inputs(x_TH, plan) if self.cfg.scale_expert_input else (x_TH, plan)
        if self.cfg.num_chunks > 1:
            out_TH = pipelined_moe(self, x_in, plan_in)  # dispatch/experts/combine overlapped
        else:
            out_TH = self.routed_experts(x_in, plan_in)
        if plan_in is not plan and plan.top_k > 1:  # one row per slot: sum each token's K rows
            out_TH = out_TH.view(plan.num_tokens, plan.top_k, -1).sum(dim=1)
        return out_TH

    def routed_experts(self, x_TH: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        use_fused = getattr(self.transport, "use_fused", None)
        if use_fused is not None and not self._observers and use_fused(x_TH, self.experts):
            return self.transport.fused_experts(x_TH, plan, self.experts)
        tokens_MH, counts_G, handle = self.transport.dispatch(x_TH, plan)
        try:
            y_MH = self.experts(tokens_MH, counts_G)
            for observe in self._observers:
                observe(self, x_TH, plan, counts_G, y_MH)
        except Exception as e:
            self.fail_together(e, "combine")  # the combine's handshake carries it
        return self.transport.combine(y_MH, handle)

    def add_observer(self, fn) -> None:
        """fn(layer, x_TH, plan, counts_G, y_MH) runs after the experts of every forward
        (telemetry). y_MH holds this rank's local-expert outputs, grouped by local expert, counts_G
        rows each."""
        self._observers.append(fn)

    def remove_observer(self, fn) -> None:
        self._observers.remove(fn)

    # -- errors
    # ------------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        where = f"MoE layer '{self.name}'"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1:
            raise ValueError(f"{where}: input must have >= 1 dims [..., hidden], got shape []")
        if x.shape[-1] != self.cfg.hidden_size:
            raise ValueError(
                f"input hidden size ({x.shape[-1]}) does not match MoEConfig.hidden_size "
                f"({self.cfg.hidden_size}) in {where}"
            )
        w = self.router.weight
        if x.device != w.device:
            raise ValueError(
                f"{where}: input is on {x.device}, the layer's parameters on {w.device}"
            )
        # Under autocast the matmuls cast for themselves; otherwise a mismatch would surface only
        # inside the grouped GEMM, after tokens have travelled.
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"{where}: input dtype {x.dtype} does not match the layer's parameter dtype "
                f"{w.dtype}"
            )

    def _check_finite(self, logits_TE: torch.Tensor) -> None:
        # The sigmoid router's bias steers selection: a NaN there (a corrupt checkpoint) would
        # send every token to one expert, so it is checked with the logits.
        bias_E = self.router.expert_bias if self.cfg.router == "sigmoid" else None
        bad = ~torch.isfinite(logits_TE).all()
        if bias_E is not None:
            bad = bad | ~torch.isfinite(bias_E).all()
        if self.cfg.error_check == "deferred":
            if self.error_flags is None:
                self.error_flags = DeviceErrorFlags(self.name, logits_TE.device)
            self.error_flags.record(NONFINITE_LOGITS, bad, self.step)
        elif bool(bad):
            rows = int((~torch.isfinite(logits_TE)).any(-1).sum())
            what = f"router logits contain NaN or Inf for {rows} of {logits_TE.shape[0]} tokens"
            if bias_E is not None and not bool(torch.isfinite(bias_E).all()):
                n = int((~torch.isfinite(bias_E)).sum())
                what = f"router expert_bias holds NaN or Inf for {n} of {bias_E.numel()} experts"
            raise NonFiniteRouterLogits(f"MoE layer '{self.name}', step {self.step}: {what}")

    def _begin_call(self) -> None:
        """Fills the handshake header's identity for this forward (EP>1 transports)."""
        context = getattr(self.transport, "context", None)
        if context is None:
            return
        context.step = self.step
        context.chunks = 1 if self._observers else self.cfg.num_chunks
        if not context.router_crc:  # the router weights are compared once, at the first call
            context.router_crc = tensor_crc(self.router.weight)

    def _send_device_errors(self) -> None:
        """Deferred checks: the error bits recorded on the device travel in the dispatch header."""
        context = getattr(self.transport, "context", None)
        if context is not None and self.error_flags is not None:
            context.device_status = self.error_flags.words[:1]

    def fail_together(self, exc: Exception, phase: str = "dispatch") -> None:
        """Raises `exc` so that every rank of the EP group raises: with an EP>1 transport the next
        transport call (the one the peers are in: a dispatch, or a combine after the experts)
        carries the error. Call from an except block."""
        fail = getattr(self.transport, "fail_together", None)
        if fail is None or isinstance(exc, (RankFailed, RankMismatch, PeerTimeout)):
            raise exc
        fail(exc, phase)

    def _clear_device_errors(self) -> None:
        if self.error_flags is not None:
            self.error_flags.words.zero_()

    def check_errors(self) -> None:
        """Raises what a deferred-check forward recorded on the device (synchronises)."""
        for flags in (self.error_flags, getattr(self.transport, "error_flags", None)):
            if flags is not None:
                flags.check()


def mark_expert_param(p: nn.Parameter, ep_size: int) -> None:
    """DeepSpeed/Megatron convention: expert parameters are not all-reduced over the data-parallel
    group."""
    p.allreduce = False
    p.group_name = f"ep_size_{ep_size}"


def is_expert_param(p: torch.Tensor) -> bool:
    return getattr(p, "allreduce", True) is False
