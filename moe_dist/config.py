"""MoEConfig: every knob of one MoE layer, validated at construction. Reads no environment."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

ROUTERS = ("softmax", "sigmoid", "group_limited", "top_p")
ACTIVATIONS = ("swiglu", "gelu")
TRANSPORTS = ("auto", "local", "collective", "nvshmem", "reference")
EXPERT_BACKENDS = ("auto", "grouped_mm", "loop")
ERROR_CHECKS = ("eager", "deferred")
_TOP_P_DEFAULT = 0.5
DISPATCH_DTYPES = ("bf16", "fp8_e4m3")  # transport/fp8.py


@dataclass(frozen=True)
class MoEConfig:
    hidden_size: int
    ffn_hidden_size: int
    num_experts: int
    top_k: int = 2

    # Shared (always-on) experts, DeepSeekMoE style: one dense FFN of num_shared_experts * shared
    # size.
    num_shared_experts: int = 0
    shared_ffn_hidden_size: int | None = None  # None: ffn_hidden_size
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x @ w_gate) scales the shared output

    # Routing.
    router: str = "softmax"
    norm_topk_prob: bool = True  # renormalise the chosen experts' weights to sum to 1
    routed_scaling_factor: float = 1.0
    num_expert_groups: int = 1  # group-limited routing: experts split into groups...
    topk_groups: int = 1  # ...and each token may only use experts of its best topk_groups groups
    # router="top_p": take experts until their probability mass reaches top_p
    top_p: float = _TOP_P_DEFAULT
    # router="sigmoid": aux-loss-free bias step (0 disables); the other routers ignore it
    router_bias_update_rate: float = 1e-3
    aux_loss_coef: float = 1e-2
    z_loss_coef: float = 0.0
    # None = dropless; per rank: capacity = ceil(factor * T * top_k / E) for this rank's T tokens
    capacity_factor: float | None = None

    # Experts and execution.
    activation: str = "swiglu"
    expert_backend: str = "auto"
    transport: str = "auto"
    num_chunks: int = 1  # >1: pipeline dispatch / experts / combine over token chunks (overlap)
    shared_expert_overlap: bool = True  # CUDA: shared experts on a side stream while tokens travel
    max_tokens_per_rank: int = 16384  # sizes the nvshmem transport's symmetric buffers
    nvshmem_recv_capacity: int | None = (
        None  # rows a PE can receive; None = worst case (see README)
    )
    nvshmem_peer_path: str = (
        "auto"  # "auto": loads/stores to P2P peers, put-with-signal to others; "p2p"; "put"
    )
    peer_timeout_s: float = 60.0  # nvshmem: a wait longer than this records a PeerTimeout error
    check_finite: bool = True  # NaN/Inf router logits raise instead of routing garbage
    error_check: str = (
        "eager"  # "deferred": record errors on device, raise at the next check (no sync)
    )
    init_seed_offset: int = 0
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
            "max_tokens_per_rank",
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("num_shared_experts", "init_seed_offset"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"{name} must be an int, got {getattr(self, name)!r}")
        for name in (
            "shared_expert_overlap",
            "shared_expert_gate",
            "check_finite",
            "norm_topk_prob",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in (
            "routed_scaling_factor",
            "top_p",
            "router_bias_update_rate",
            "aux_loss_coef",
            "z_loss_coef",
        ):
            _finite_float(name, getattr(self, name))
        if self.capacity_factor is not None:
            _finite_float("capacity_factor", self.capacity_factor, " (or None: dropless)")
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.shared_ffn_hidden_size is not None and (
            not _is_int(self.shared_ffn_hidden_size) or self.shared_ffn_hidden_size < 1
        ):
            raise ValueError(
                f"shared_ffn_hidden_size must be a positive int or None, "
                f"got {self.shared_ffn_hidden_size!r}"
            )
        if not self.routed_scaling_factor > 0:
            raise ValueError(f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
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
        if self.nvshmem_recv_capacity is not None and self.nvshmem_recv_capacity < 1:
            raise ValueError(
                f"nvshmem_recv_capacity must be >= 1 or None, got {self.nvshmem_recv_capacity}"
            )
        if self.nvshmem_peer_path not in ("auto", "p2p", "put"):
            raise ValueError(
                f"nvshmem_peer_path must be 'auto', 'p2p' or 'put', got {self.nvshmem_peer_path!r}"
            )
        if not self.peer_timeout_s > 0:
            raise ValueError(f"peer_timeout_s must be > 0, got {self.peer_timeout_s}")
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
        if not _is_int(self.num_comm_sms) or self.num_comm_sms < 1:
            raise ValueError(f"num_comm_sms must be a positive int, got {self.num_comm_sms!r}")
        for name in ("aux_loss_coef", "z_loss_coef", "router_bias_update_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        _check_router_settings(self)

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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_float(name: str, value, also: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number{also}, got {value!r}")


def _check_router_settings(cfg: "MoEConfig") -> None:
    """Settings the chosen router would ignore are errors, not silent no-ops. (The sigmoid
    router's router_bias_update_rate is ignored by the other routers: its non-zero default makes
    it undetectable; documented on the field.)"""
    ignored = []
    if cfg.router in ("softmax", "top_p"):
        ignored += [
            f"{name}={getattr(cfg, name)}"
            for name in ("num_expert_groups", "topk_groups")
            if getattr(cfg, name) != 1
        ]
    if cfg.router != "top_p" and cfg.top_p != _TOP_P_DEFAULT:
        ignored.append(f"top_p={cfg.top_p}")
    if ignored:
        raise ValueError(
            f"router={cfg.router!r} ignores {', '.join(ignored)}: remove "
            f"{'it' if len(ignored) == 1 else 'them'} or choose a router that uses "
            f"{'it' if len(ignored) == 1 else 'them'}"
        )


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
