"""Example models built on moe_dist."""
from .transformer import Block, CausalSelfAttention, LMOutput, ModelConfig, MoETransformer

__all__ = ["Block", "CausalSelfAttention", "LMOutput", "ModelConfig", "MoETransformer"]
