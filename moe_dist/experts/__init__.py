"""Expert FFNs and grouped-GEMM backends (torch._grouped_mm, with a per-expert loop oracle)."""

from .ffn import DenseFFN, GroupedExperts, activate
from .gemm import grouped_mm, grouped_mm_supported, loop_mm

__all__ = [
    "DenseFFN",
    "GroupedExperts",
    "activate",
    "grouped_mm",
    "grouped_mm_supported",
    "loop_mm",
]
