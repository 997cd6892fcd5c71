"""The example zone: a small MoE language model, its byte-level data and the trainer
(`python -m moe_dist.lm.train`). It uses the runtime only through public names."""

from .model import Block, CausalSelfAttention, LMOutput, ModelConfig, MoETransformer

__all__ = ["Block", "CausalSelfAttention", "LMOutput", "ModelConfig", "MoETransformer"]
