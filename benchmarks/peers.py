"""The peers the benchmarks time moe_dist against, built in one place so that every benchmark runs
the same peer:

  SwiGLUExpert     one SwiGLU expert as DeepSpeed and Hugging Face hold it (w_in, w_out)
  hf_loop_forward  Hugging Face Mixtral's per-expert loop, run on a MoELayer's own weights
  deepspeed_moe    deepspeed.moe.layer.MoE: dropless, deterministic top-k gate (no noisy gate, no
                   second-expert sampling, no random token selection), parallelism set up without
                   an engine
  deepspeed_like   deepspeed_moe holding a MoELayer's router and local expert weights

Legend: T tokens, H hidden, F expert ffn width, E experts, K top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist import MoELayer


class SwiGLUExpert(nn.Module):
    """w_out (silu(gate) * up), [gate; up] = w_in x: moe_dist's SwiGLU expert as one module."""

    def __init__(self, w_in_2FH: torch.Tensor, w_out_HF: torch.Tensor):
        super().__init__()
        self.w_in = nn.Parameter(w_in_2FH.detach().clone())
        self.w_out = nn.Parameter(w_out_HF.detach().clone())

    @classmethod
    def fresh(cls, hidden: int, ffn: int) -> SwiGLUExpert:
        """New weights, initialised as nn.Linear initialises them."""
        w_in = nn.Linear(hidden, 2 * ffn, bias=False).weight
        w_out = nn.Linear(ffn, hidden, bias=False).weight
        return cls(w_in, w_out)

    def forward(self, x_TH):
        gate_TF, up_TF = F.linear(x_TH, self.w_in).chunk(2, dim=-1)
        return F.linear(F.silu(gate_TF) * up_TF, self.w_out)


def hf_loop_forward(layer: MoELayer, x_TH: torch.Tensor) -> torch.Tensor:
    """Mixtral's MixtralSparseMoeBlock.forward (softmax top-k, renormalised), written against
    MoELayer's router and expert weights."""
    probs_TE = F.softmax(F.linear(x_TH.float(), layer.router.weight.float()), dim=-1)
    w_TK, idx_TK = probs_TE.topk(layer.cfg.top_k, dim=-1)
    w_TK = (w_TK / w_TK.sum(-1, keepdim=True)).to(x_TH.dtype)
    out_TH = torch.zeros_like(x_TH)
    mask_EKT = F.one_hot(idx_TK, layer.cfg.num_experts).permute(2, 1, 0)
    for e in range(layer.cfg.num_experts):
        slot, token = torch.where(mask_EKT[e])
        gate, up = F.linear(x_TH[token], layer.experts.w_in[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, layer.experts.w_out[e]) * w_TK[token, slot, None]
        out_TH.index_add_(0, token, y)
    return out_TH


def deepspeed_moe(hidden: int, expert: nn.Module, num_experts: int, ep_size: int, k: int):
    """deepspeed.moe.layer.MoE over the existing process group, each local expert a copy of
    `expert`; called as moe(x_BTH) -> (output, aux loss, counts)."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.moe.layer import MoE

    deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the existing group
    moe = MoE(
        hidden,
        expert,
        num_experts=num_experts,
        ep_size=ep_size,
        k=k,
        capacity_factor=1.0,
        drop_tokens=False,
        use_rts=False,
        noisy_gate_policy=None,
        top2_2nd_expert_sampling=False,
    )
    moe.set_deepspeed_parallelism()  # the engine would call it; there is no engine here
    return moe


def deepspeed_like(ref: MoELayer, ep_size: int, device, dtype):
    """deepspeed_moe holding exactly ref's router and local experts (same SwiGLU layout), on
    device in dtype."""
    cfg = ref.cfg
    expert = SwiGLUExpert(ref.experts.w_in[0], ref.experts.w_out[0])
    moe = deepspeed_moe(cfg.hidden_size, expert, cfg.num_experts, ep_size, cfg.top_k)
    moe = moe.to(device, dtype)
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(ref.router.weight)
        for g, local in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            local.w_in.copy_(ref.experts.w_in[g])
            local.w_out.copy_(ref.experts.w_out[g])
    return moe
