"""Process groups (EP / EDP / DP) and bootstrap from torchrun or mpirun."""

from .bootstrap import exit_distributed, init_distributed, launcher_environment
from .groups import ParallelGroups, all_reduce_sum

__all__ = [
    "ParallelGroups",
    "all_reduce_sum",
    "exit_distributed",
    "init_distributed",
    "launcher_environment",
]
