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
from .overlap import (
    InFlight,
    SharedExperts,
    StreamSet,
    combine_async,
    compute_experts,
    dispatch_async,
    landed,
)
from .routing import Router, RoutingPlan, scale_inputs
from .transport import Transport, TransportOptions, build_transport
from .transport.handshake import config_crc, config_fields, tensor_crc


class MoEOutput(NamedTuple):
    output: torch.Tensor  # same shape as the input
    aux_loss: (
        torch.Tensor
    )  # scalar, already scaled by the coefficients; add it to the training loss
    tokens_per_expert: torch.Tensor  # int64 [E]: slots this rank routed to each (global) expert


class MoEPending:
    """One MoELayer call between `start` and `finish`: its routing plan, the layer step it counts
    as, and what the phases hand on (the shared experts, the tokens in flight). Goes back to the
    layer that made it, through each phase once."""

    __slots__ = ("layer", "plan", "step", "shared", "x_in", "plan_in", "flight", "out_TH")
    __slots__ += ("shape", "stage", "counts")

    def __init__(self, layer, plan, step, shared, x_in, plan_in):
        self.layer, self.plan, self.step, self.shared = layer, plan, step, shared
        self.x_in, self.plan_in = x_in, plan_in  # the pass's tokens and plan (Llama-4 scaled)
        self.flight: InFlight | None = None  # None: dispatched in run_experts (fused path)
        self.out_TH: torch.Tensor | None = None  # the routed output of a fused call
        self.shape, self.stage = None, "dispatched"
        self.counts = False  # a layer call (start), counted in layer.step; not a routed pass

    def check_layer(self, layer, phase: str) -> None:
        if layer is not self.layer:
            raise ValueError(
                f"MoE layer '{layer.name}': {phase}() got a call started by layer "
                f"'{self.layer.name}'"
            )

    def advance(self, layer, expected: str, phase: str) -> None:
        self.check_layer(layer, phase)
        if self.stage != expected:
            raise RuntimeError(
                f"MoE layer '{layer.name}', step {self.step}: {phase}() on a call that is "
                f"'{self.stage}', not '{expected}' (each phase runs once: start, run_experts, "
                f"finish)"
            )

    def release(self) -> None:
        self.stage = "done"
        self.x_in = self.plan_in = self.flight = self.out_TH = None  # free what autograd need not


class MoELayer(nn.Module):
    """One expert-parallel MoE FFN.

    EP-invariant initialisation: the router and shared experts draw from torch's global RNG in a
    fixed order, then one base seed is drawn, and expert e is initialised from seed (base + e). So
    under one torch.manual_seed an EP=N layer holds exactly the EP=1 weights of its local experts.

    The transport is given (`transport=`, e.g. from moe_dist.transport.build_transport) or built
    here by build_transport(cfg, groups, transport_options). `streams`: the CUDA streams the
    overlap uses (overlap.StreamSet; several layers may share one); None: the layer's own.

    The sigmoid router's bias is only read here: the forward records each step's load on the
    device (router.load_E) and moe_dist.training.router_bias updates the bias once per optimizer
    step, so an activation-checkpoint recompute routes exactly as the forward did.
    """

    def __init__(
        self,
        cfg: MoEConfig,
        groups=None,
        *,
        transport: Transport | None = None,
        transport_options: TransportOptions | None = None,
        streams: StreamSet | None = None,
        name: str = "moe",
        device=None,
        dtype=None,
    ):
        super().__init__()
        ep_size = 1 if groups is None else groups.ep_size
        if transport is not None:
            if transport_options is not None:
                raise ValueError("pass a built transport or transport_options, not both")
            if groups is None:
                ep_size = transport.ep_size
            if transport.num_experts != cfg.num_experts or transport.ep_size != ep_size:
                raise ValueError(
                    f"the transport given moves tokens among {transport.num_experts} experts over "
                    f"ep_size {transport.ep_size}, the layer has num_experts ({cfg.num_experts}) "
                    f"over ep_size ({ep_size})"
                )
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
        self.streams = streams if streams is not None else StreamSet()
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
        if transport is None:
            transport = build_transport(cfg, groups, transport_options, device=device, dtype=dtype)
        self.transport = transport
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
        """x: [..., hidden] -> MoEOutput. Every phase on the current stream (the shared experts
        excepted, see overlap.py); `start`/`finish` split it to overlap calls."""
        return self.finish(self._start(x, streams=None))

    def start(self, x: torch.Tensor) -> MoEPending:
        """Phase 1 of a split call: entry checks, routing, and the dispatch issued. On CUDA the
        dispatch runs on the comm stream (async_finish) and start returns while tokens travel;
        the shared experts will run on the side stream from x. Then `run_experts(p)` (optional:
        experts once the tokens landed, combine issued) and `finish(p)` -> MoEOutput, equal to
        forward(x). In between the caller may compute (another micro-batch's attention) and start
        other calls; every rank must make the same calls in the same order, since transport calls
        are collective (each handshake carries its call's step: with the collective transport a
        different order raises RankMismatch on every rank).
        On a fused transport path dispatch and combine both run in run_experts (observers force
        the plain path). Errors travel as in forward: a rank that fails makes every rank raise."""
        return self._start(x, streams=self.streams)

    def run_experts(self, pending: MoEPending) -> None:
        """Phase 2: the experts on the received tokens (on the current stream, after the dispatch
        landed), then the combine issued (comm stream on CUDA). `finish` runs it when not run."""
        pending.advance(self, "dispatched", "run_experts")
        flight = pending.flight
        if flight is None and pending.counts:  # its first transport call is made here
            pending.step = self.step
        try:
            self._set_call_step(pending.step)  # the combine's handshake names this call's step
            if flight is None:  # fused: dispatch, experts and combine here
                pending.out_TH = self._routed_experts(pending.x_in, pending.plan_in)
            else:
                compute_experts(flight, self._experts_for(pending.x_in, pending.plan_in))
                combine_async(self.transport, flight, self.streams)
        except BaseException:
            pending.stage = "failed"
            raise
        pending.stage = "computed"
        if flight is None and pending.counts:
            self.step += 1

    def finish(self, pending: MoEPending) -> MoEOutput:
        """Phase 3: waits (on the current stream) for the combine, adds the shared experts, and in
        eager error mode raises what the transport recorded (a host sync)."""
        pending.check_layer(self, "finish")
        if pending.stage == "dispatched":
            self.run_experts(pending)
        pending.advance(self, "computed", "finish")
        out_TH = self._close_pass(pending)
        if self.cfg.error_check == "eager":
            self.check_errors()
        plan = pending.plan
        return MoEOutput(out_TH.view(pending.shape), plan.aux_loss, plan.tokens_per_expert_E)

    def _start(self, x: torch.Tensor, streams: StreamSet | None) -> MoEPending:
        # A rank that fails before its tokens travel does not leave its peers waiting: the next
        # transport call carries the error and every rank raises it (transport/handshake.py).
        try:
            self._begin_call()
            self._check_input(x)
        except Exception as e:
            self.fail_together(e)
        pending = self._open_pass(x.reshape(-1, x.shape[-1]), None, None, streams)
        pending.shape, pending.counts = x.shape, True
        # A call counts once its first transport call is made: then every rank counts it (a
        # failure there raises on every rank, uncounted). Fused: in run_experts.
        if pending.flight is not None:
            self.step += 1
        return pending

    def routed_pass(
        self,
        x_TH: torch.Tensor,
        plan: RoutingPlan | None = None,
        *,
        router: Router | None = None,
    ) -> tuple[torch.Tensor, RoutingPlan]:
        """One routed pass: route (unless `plan` is given) -> dispatch -> experts -> combine, plus
        the shared experts (added in _close_pass and nowhere else). `router`: route with another
        router of the same config (Chain-of-Experts' later passes); default self.router. Returns
        (out_TH, plan). Collective at EP > 1: every rank calls it the same number of times."""
        pending = self._open_pass(x_TH, plan, router, None)
        self.run_experts(pending)
        pending.advance(self, "computed", "routed_pass")
        return self._close_pass(pending), pending.plan

    def _open_pass(self, x_TH, plan, router, streams) -> MoEPending:
        """Route (unless given) and, on the plain path, dispatch: the start of every pass.
        `streams`: dispatch on streams.comm (CUDA); None: on the current stream."""
        self._set_call_step(self.step)
        # On CUDA the shared experts run on a side stream from here on, while tokens route and
        # travel.
        shared = SharedExperts(
            self.shared_experts, x_TH, self.streams, self.cfg.shared_expert_overlap
        )
        if plan is None:
            try:
                plan = self.route(x_TH, router)
                self._send_device_errors()
            except Exception as e:
                self.fail_together(e)
        # Llama 4 (cfg.scale_expert_input): each expert sees its token times the routing weight,
        # one row per slot, and the K rows of a token are summed unweighted.
        x_in, plan_in = scale_inputs(x_TH, plan) if self.cfg.scale_expert_input else (x_TH, plan)
        pending = MoEPending(self, plan, self.step, shared, x_in, plan_in)
        if self._one_go_path(x_in) is None:
            pending.flight = dispatch_async(self.transport, x_in, plan_in, streams)
        return pending

    def _close_pass(self, pending: MoEPending) -> torch.Tensor:
        flight, plan = pending.flight, pending.plan
        out_TH = pending.out_TH if flight is None else landed(flight)
        if pending.plan_in is not plan and plan.top_k > 1:
            out_TH = out_TH.view(plan.num_tokens, plan.top_k, out_TH.shape[-1]).sum(dim=1)
        pending.release()
        return pending.shared.add_to(out_TH)

    def _one_go_path(self, x_TH: torch.Tensor) -> str | None:
        """ "fused" where dispatch, experts and combine run in one call (so the dispatch cannot be
        issued ahead of the experts); None: the plain path. Observers expect one unfused call over
        the whole batch."""
        if self._observers:
            return None
        use_fused = getattr(self.transport, "use_fused", None)
        return "fused" if use_fused is not None and use_fused(x_TH, self.experts) else None

    def _routed_experts(self, x_TH: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """The routed experts in one go (no shared experts), on the current stream."""
        if self._one_go_path(x_TH) == "fused":
            return self.transport.fused_experts(x_TH, plan, self.experts)
        flight = dispatch_async(self.transport, x_TH, plan, None)
        compute_experts(flight, self._experts_for(x_TH, plan))
        combine_async(self.transport, flight, None)
        return landed(flight)

    def route(self, x_TH: torch.Tensor, router: Router | None = None) -> RoutingPlan:
        """The routing plan of x_TH: logits, the finiteness check, selection. In training, a
        router whose bias learns records this pass's load on the device (not inside an
        activation-checkpoint recompute: that pass was recorded when it first ran)."""
        router = self.router if router is None else router
        plan = router(x_TH, check_finite=self.cfg.check_finite)
        if self.cfg.check_finite:
            self.check_finite(plan.logits_finite, router, x_TH)
        if self.training and router.updates_bias and not _in_backward():
            router.record_load(plan.tokens_per_expert_E)
        return plan

    def _guarded_experts(self, tokens_MH: torch.Tensor, counts_G: torch.Tensor) -> torch.Tensor:
        """The experts; an exception travels to the peers in the combine's handshake."""
        try:
            return self.experts(tokens_MH, counts_G)
        except Exception as e:
            self.fail_together(e, "combine")

    def _experts_for(self, x_TH: torch.Tensor, plan: RoutingPlan):
        """The guarded experts, then the observers (telemetry) on their outputs."""

        def experts(tokens_MH: torch.Tensor, counts_G: torch.Tensor) -> torch.Tensor:
            y_MH = self._guarded_experts(tokens_MH, counts_G)
            try:
                for observe in self._observers:
                    observe(self, x_TH, plan, counts_G, y_MH)
            except Exception as e:
                self.fail_together(e, "combine")  # the combine's handshake carries it
            return y_MH

        return experts

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

    def check_finite(self, logits_finite: torch.Tensor, router: Router, x_TH: torch.Tensor) -> None:
        """NaN/Inf router logits (or a NaN/Inf sigmoid expert_bias) raise NonFiniteRouterLogits
        (cfg.error_check="eager") or are recorded on the device for check_errors ("deferred").
        logits_finite: the router's device flag (RoutingPlan.logits_finite)."""
        # The sigmoid router's bias steers selection: a NaN there (a corrupt checkpoint) would
        # send every token to one expert, so it is checked with the logits.
        bias_E = router.expert_bias if self.cfg.router == "sigmoid" else None
        bad = ~logits_finite
        if bias_E is not None:
            bad = bad | ~torch.isfinite(bias_E).all()
        if self.cfg.error_check == "deferred":
            if self.error_flags is None:
                self.error_flags = DeviceErrorFlags(self.name, x_TH.device)
            self.error_flags.record(NONFINITE_LOGITS, bad, self.step)
        elif bool(bad):
            with torch.no_grad():  # the error's details: the logits again (the router kept none)
                logits_TE = router.logits(x_TH)
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
        if not context.router_crc:  # the router weights are compared once, at the first call
            context.router_crc = tensor_crc(self.router.weight)

    def _set_call_step(self, step: int) -> None:
        """The step the next transport call's header carries (and its errors name): with calls
        split by start/finish, other calls' phases run in between."""
        context = getattr(self.transport, "context", None)
        if context is not None:
            context.step = step

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

    def finish_step(self) -> None:
        """End of a wrapper's forward made of routed passes (Chain-of-Experts): in eager error
        mode raises what the transport recorded on the device (one host sync, only where flags
        exist; also those of the previous backward), then counts the step. (MoELayer's own calls
        count their step in start and check in finish.)"""
        if self.cfg.error_check == "eager":
            self.check_errors()
        self.step += 1

    def check_errors(self) -> None:
        """Raises what a deferred-check forward recorded on the device (synchronises)."""
        for flags in (self.error_flags, getattr(self.transport, "error_flags", None)):
            if flags is not None:
                flags.check()


def _in_backward() -> bool:
    """True while autograd runs a backward: that is where activation checkpointing recomputes the
    forward (reentrant or not)."""
    return torch._C._current_graph_task_id() != -1


def mark_expert_param(p: nn.Parameter, ep_size: int) -> None:
    """DeepSpeed/Megatron convention: expert parameters are not all-reduced over the data-parallel
    group."""
    p.allreduce = False
    p.group_name = f"ep_size_{ep_size}"


def is_expert_param(p: torch.Tensor) -> bool:
    return getattr(p, "allreduce", True) is False
