"""The fused expert path (EP=1): a counting sort of the slots, one gather, two grouped GEMMs with
the combine weight folded into the SwiGLU, one gather-reduce; torch.library ops throughout."""

from .path import fused_experts

__all__ = ["fused_experts"]
