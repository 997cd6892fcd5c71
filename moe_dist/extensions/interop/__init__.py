"""Interop: drop moe_dist into existing models (Hugging Face MoE blocks) and build MoE layers from
dense FFNs (upcycling). Importing this package does not import `transformers`."""

from .hf import HFMoEBlock, UnsupportedMoEBlock, find_moe_blocks, replace_moe_blocks
from .upcycle import all_experts_output, upcycle

__all__ = [
    "HFMoEBlock",
    "UnsupportedMoEBlock",
    "all_experts_output",
    "find_moe_blocks",
    "replace_moe_blocks",
    "upcycle",
]
