"""MoEConfig: the model math of one MoE layer and its execution knobs, validated at construction.
Reads no environment. How tokens travel is sized and tuned apart, in
moe_dist.transport.TransportOptions (NVSHMEM buffers, peer path, timeout, bootstrap), given to
build_transport or MoELayer."""

from __future__ import annotations

from dataclasses import dataclass, fields

ROUTERS = ("softmax", "sigmoid", "group_limited", "top_p")
ACTIVATIONS = ("swiglu", "gelu")
TRANSPORTS = ("auto", "local", "collective", "nvshmem", "reference")
EXPERT_BACKENDS = ("auto", "grouped_mm", "loop")
ERROR_CHECKS = ("eager", "deferred")
DISPATCH_DTYPES = ("bf16", "fp8_e4m3")  # transport/fp8.py


@dataclass(frozen=True)
class MoEConfig:
    hidden_size: int  # H: the width of the tokens in and out
    ffn_hidden_size: int  # each routed expert's inner width
    num_experts: int  # E: routed experts over all ranks (split evenly over the EP group)
    top_k: int = 2  # K: experts chosen per token (router="top_p": the most it may take)

    # Shared (always-on) experts, DeepSeekMoE style: one dense FFN of num_shared_experts * shared
    # size.
    num_shared_experts: int = 0
    shared_ffn_hidden_size: int | None = None  # None: ffn_hidden_size
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x @ w_gate) scales the shared output

    # Routing.
    router: str = "softmax"  # "softmax" | "sigmoid" (DeepSeek-V3, aux-loss-free bias) | ...
    norm_topk_prob: bool = True  # renormalise the chosen experts' weights to sum to 1
    routed_scaling_factor: float = 1.0  # multiplies the chosen experts' combine weights
    num_expert_groups: int = 1  # group-limited routing: experts split into groups...
    topk_groups: int = 1  # ...and each token may only use experts of its best topk_groups groups
    top_p: float = 0.5  # router="top_p": take experts until their probability mass reaches top_p
    # router="sigmoid": the aux-loss-free bias step, applied once per optimizer step by
    # moe_dist.training.router_bias.RouterBiasUpdater (0 disables; the forward only reads the bias)
    router_bias_update_rate: float = 1e-3
    aux_loss_coef: float = 1e-2  # load-balancing loss (Switch) coefficient in MoEOutput.aux_loss
    z_loss_coef: float = 0.0  # router z-loss coefficient (ST-MoE)
    capacity_factor: float | None = None  # None = dropless

    # Experts and execution.
    activation: str = "swiglu"  # "swiglu" | "gelu", routed and shared experts alike
    expert_backend: str = "auto"  # "grouped_mm" (torch._grouped_mm) | "loop" (the oracle) | "auto"
    # Execution knob: which transport MoELayer builds when it is given none ("auto": local at EP=1,
    # nvshmem on one node where it can run, else collective; "reference": the oracle).
    # TransportOptions(kind=...) overrides it.
    transport: str = "auto"
    num_chunks: int = 1  # >1: pipeline dispatch / experts / combine over token chunks (overlap)
    shared_expert_overlap: bool = True  # CUDA: shared experts on a side stream while tokens travel
    check_finite: bool = True  # NaN/Inf router logits raise instead of routing garbage
    error_check: str = (
        "eager"  # "deferred": record errors on device, raise at the next check (no sync)
    )
    init_seed_offset: int = 0  # added to the experts' base seed (distinct layers, same seed)
    # Transport v2 (these move to the transport options object with the other transport knobs).
    dispatch_dtype: str = "bf16"  # "bf16": rows in the activation dtype; "fp8_e4m3": e4m3 + scales
    num_comm_sms: int = 24  # nvshmem: programs (SMs) each communication kernel may occupy

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "ffn_hidden_size",
            "num_experts",
            "top_k",
            "num_expert_groups",
            "topk_groups",
            "num_chunks",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.shared_expert_overlap, bool):
            raise ValueError(
                f"shared_expert_overlap must be a bool, got {self.shared_expert_overlap!r}"
            )
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.shared_ffn_hidden_size is not None and self.shared_ffn_hidden_size < 1:
            raise ValueError(
                f"shared_ffn_hidden_size must be >= 1, got {self.shared_ffn_hidden_size}"
            )
        _one_of("router", self.router, ROUTERS)
        _one_of("activation", self.activation, ACTIVATIONS)
        _one_of("transport", self.transport, TRANSPORTS)
        _one_of("expert_backend", self.expert_backend, EXPERT_BACKENDS)
        _one_of("error_check", self.error_check, ERROR_CHECKS)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.num_experts % self.num_expert_groups:
            raise ValueError(
                f"num_experts ({self.num_experts}) must be divisible by "
                f"num_expert_groups ({self.num_expert_groups})"
            )
        if self.topk_groups > self.num_expert_groups:
            raise ValueError(
                f"topk_groups ({self.topk_groups}) must be <= "
                f"num_expert_groups ({self.num_expert_groups})"
            )
        experts_reachable = self.topk_groups * (self.num_experts // self.num_expert_groups)
        if self.top_k > experts_reachable:
            raise ValueError(
                f"top_k ({self.top_k}) exceeds the {experts_reachable} experts reachable "
                f"in topk_groups ({self.topk_groups}) groups of "
                f"{self.num_experts // self.num_expert_groups}"
            )
        if self.router == "group_limited" and self.num_expert_groups == 1:
            raise ValueError("router='group_limited' needs num_expert_groups > 1")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(
                f"capacity_factor must be > 0 or None (dropless), got {self.capacity_factor}"
            )
        _one_of("dispatch_dtype", self.dispatch_dtype, DISPATCH_DTYPES)
        if self.dispatch_dtype == "fp8_e4m3" and self.hidden_size % 128:
            raise ValueError(
                f"dispatch_dtype='fp8_e4m3' needs hidden_size divisible by 128 (one scale per 128"
                f" channels; not padded), got hidden_size={self.hidden_size}"
            )
        if not isinstance(self.num_comm_sms, int) or self.num_comm_sms < 1:
            raise ValueError(f"num_comm_sms must be a positive int, got {self.num_comm_sms!r}")
        for name in ("aux_loss_coef", "z_loss_coef", "router_bias_update_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def shared_hidden(self) -> int:
        """Width of the fused shared-expert FFN (0 when there is none)."""
        return self.num_shared_experts * (self.shared_ffn_hidden_size or self.ffn_hidden_size)

    def replace(self, **changes) -> "MoEConfig":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        unknown = set(changes) - set(values)
        if unknown:
            raise ValueError(f"unknown MoEConfig fields: {sorted(unknown)}")
        values.update(changes)
        return MoEConfig(**values)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
