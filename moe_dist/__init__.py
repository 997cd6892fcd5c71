"""moe_dist: an expert-parallel Mixture-of-Experts runtime for PyTorch."""

from .config import MoEConfig
from .errors import (
    BufferOverflow,
    MoERuntimeError,
    NonFiniteRouterLogits,
    PeerTimeout,
    RankFailed,
    RankMismatch,
)
from .layer import MoELayer, MoEOutput, MoEPending, is_expert_param
from .parallel import ParallelGroups, exit_distributed, init_distributed

__version__ = "0.2.0.dev0"  # the only place; pyproject.toml reads it (CHANGELOG.md)

# Heavier parts load on first use, so `import moe_dist` stays light and optional deps stay optional.
_LAZY = {
    "clip_grad_norm_": ("moe_dist.training.clip", "clip_grad_norm_"),
    "RoutingTelemetry": ("moe_dist.extensions.telemetry", "RoutingTelemetry"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'moe_dist' has no attribute {name!r}")


__all__ = [
    "BufferOverflow",
    "MoEConfig",
    "MoELayer",
    "MoEOutput",
    "MoEPending",
    "MoERuntimeError",
    "NonFiniteRouterLogits",
    "ParallelGroups",
    "PeerTimeout",
    "RankFailed",
    "RankMismatch",
    "RoutingTelemetry",
    "clip_grad_norm_",
    "exit_distributed",
    "init_distributed",
    "is_expert_param",
]
