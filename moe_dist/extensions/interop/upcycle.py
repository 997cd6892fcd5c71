"""Upcycling: split a dense FFN's hidden units into fine-grained experts (as FactorLLM and
Dynamic-DINO decompose dense FFNs), with a fresh router.

A dense FFN is a sum over its hidden units, so cutting the F units into E contiguous slices of F/E
gives E experts whose outputs add up to the dense output exactly:

    dense(x) = W_out · act(W_in · x) = sum_e W_out[:, S_e] · act(W_in[S_e] · x)      (S_e = slice e)

(for SwiGLU the slice is taken in the gate rows and the up rows alike). `all_experts_output(layer,
x)` evaluates that sum through the layer's own transport and experts (every expert, weight 1) and so
equals the dense FFN. The routed layer itself renormalises its top-k weights and scales them by E
(`routed_scaling_factor`), so each of the k chosen slices weighs about E/k and the output keeps the
dense FFN's scale (k of E slices, each E/k times); with `router_init="zeros"` and top_k = E it *is*
the dense output (every softmax weight is 1/E, renormalised and scaled by E: exactly 1).

Legend: T tokens, H hidden, F dense ffn hidden, E experts, f = F/E expert ffn hidden.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_dist import MoEConfig, MoELayer
from moe_dist.experts import DenseFFN
from moe_dist.routing import RoutingPlan


def upcycle(
    ffn: nn.Module,
    num_experts: int,
    top_k: int,
    groups=None,
    *,
    router_init: str = "random",
    name: str = "upcycled",
    **overrides,
) -> MoELayer:
    """A MoELayer whose `num_experts` experts are slices of `ffn`'s hidden units (see module
    docstring).

    ffn: a bias-free dense FFN in one of these forms:
      - moe_dist's DenseFFN (swiglu or gelu, no gate); - SwiGLU with nn.Linear `gate_proj`,
      `up_proj`, `down_proj` and a SiLU `act_fn` (HF Llama/Qwen/Mistral MLP); - SwiGLU with
      nn.Linear `w1` (gate), `w3` (up), `w2` (down) and SiLU (gpt-fast, Mixtral 4.x experts); -
      nn.Sequential(Linear(H, F), GELU(), Linear(F, H)) with exact (erf) GELU.
    groups: ParallelGroups for EP > 1 (each rank copies only its local experts' slices).
    router_init: "random" (a fresh router, MoELayer's init) or "zeros" (uniform; with top_k =
    num_experts
      the layer's forward equals the dense FFN).
    overrides: other MoEConfig fields (transport, capacity_factor, router, ...).
    """
    w_in, w_out, activation = dense_ffn_weights(ffn)
    Fd, H = w_out.shape[1], w_out.shape[0]
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if Fd % num_experts:
        raise ValueError(
            f"the dense FFN's hidden size ({Fd}) must be divisible by num_experts ({num_experts})"
        )
    if router_init not in ("random", "zeros"):
        raise ValueError(f"router_init must be 'random' or 'zeros', got {router_init!r}")
    f = Fd // num_experts
    fields = dict(
        hidden_size=H,
        ffn_hidden_size=f,
        num_experts=num_experts,
        top_k=top_k,
        activation=activation,
        router="softmax",
        norm_topk_prob=True,
        routed_scaling_factor=float(num_experts),
    )
    fields.update(overrides)
    cfg = MoEConfig(**fields)
    if cfg.num_shared_experts:
        raise ValueError(
            "upcycle splits the dense FFN into routed experts only; num_shared_experts must be 0"
        )

    moe = MoELayer(cfg, groups, name=name, device=w_in.device, dtype=w_in.dtype)
    w_in_E, w_out_E = split_into_experts(w_in, w_out, num_experts, activation)
    first, n = moe.experts.first_expert, moe.experts.num_local
    with torch.no_grad():
        moe.experts.w_in.copy_(w_in_E[first : first + n])
        moe.experts.w_out.copy_(w_out_E[first : first + n])
        if router_init == "zeros":
            moe.router.weight.zero_()
    return moe


def split_into_experts(w_in: torch.Tensor, w_out: torch.Tensor, num_experts: int, activation: str):
    """Dense [in_width, H] / [H, F] weights (moe_dist layout) -> per-expert [E, in_width/E, H] / [E,
    H, F/E]."""
    H, Fd = w_out.shape
    E, f = num_experts, Fd // num_experts
    if activation == "swiglu":
        gate, up = w_in[:Fd].view(E, f, H), w_in[Fd:].view(E, f, H)
        w_in_E = torch.cat([gate, up], dim=1)  # each expert's own gate rows, then its up rows
    else:
        w_in_E = w_in.view(E, f, H)
    w_out_E = w_out.view(H, E, f).permute(1, 0, 2)
    return w_in_E.contiguous(), w_out_E.contiguous()


def dense_ffn_weights(ffn: nn.Module) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(w_in [2F or F, H] with gate rows first for swiglu, w_out [H, F], "swiglu" | "gelu"),
    detached."""
    if isinstance(ffn, DenseFFN):
        if ffn.gate is not None:
            raise ValueError(
                "upcycle: a DenseFFN with an output gate (shared_expert_gate) has no routed"
                " equivalent"
            )
        return ffn.w_in.detach(), ffn.w_out.detach(), ffn.activation
    names = dict(ffn.named_children())
    for gate_n, up_n, down_n in (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")):
        if all(isinstance(names.get(k), nn.Linear) for k in (gate_n, up_n, down_n)):
            act = getattr(ffn, "act_fn", None)
            is_silu = type(act).__name__ in ("SiLU", "SiLUActivation")
            if not is_silu and not (
                act is None and gate_n == "w1"
            ):  # gpt-fast's w1/w3/w2 hard-codes silu
                raise ValueError(
                    f"upcycle: {type(ffn).__name__} activation {type(act).__name__} is not SiLU; "
                    "moe_dist's swiglu experts compute silu(gate) * up"
                )
            gate, up, down = names[gate_n], names[up_n], names[down_n]
            _no_bias(ffn, gate, up, down)
            return torch.cat([gate.weight, up.weight]).detach(), down.weight.detach(), "swiglu"
    if (
        isinstance(ffn, nn.Sequential)
        and len(ffn) == 3
        and isinstance(ffn[0], nn.Linear)
        and isinstance(ffn[1], nn.GELU)
        and isinstance(ffn[2], nn.Linear)
    ):
        if ffn[1].approximate != "none":
            raise ValueError(
                f"upcycle: GELU(approximate={ffn[1].approximate!r}); moe_dist's gelu experts use "
                "exact GELU"
            )
        _no_bias(ffn, ffn[0], ffn[2])
        return ffn[0].weight.detach(), ffn[2].weight.detach(), "gelu"
    raise ValueError(
        f"upcycle: cannot read a dense FFN from {type(ffn).__name__}; expected DenseFFN, "
        "gate_proj/up_proj/down_proj, w1/w3/w2, or Sequential(Linear, GELU, Linear)"
    )


def _no_bias(ffn: nn.Module, *linears: nn.Linear) -> None:
    if any(lin.bias is not None for lin in linears):
        raise ValueError(
            f"upcycle: {type(ffn).__name__} has biases; moe_dist experts have none (an input bias "
            "would split per expert, but the output bias would be added once per chosen expert)"
        )


def all_experts_output(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's output with every expert active at weight 1 (plus shared experts), through its
    own transport and experts, bypassing the router. Collective at EP > 1 (every rank must call it).
    For an upcycled layer this equals the dense FFN it came from."""
    x_TH = x.reshape(-1, x.shape[-1])
    T, E = x_TH.shape[0], layer.cfg.num_experts
    idx_TK = torch.arange(E, device=x.device).expand(T, E).contiguous()
    plan = RoutingPlan(
        expert_idx_TK=idx_TK,
        weights_TK=torch.ones(T, E, dtype=torch.float32, device=x.device),
        tokens_per_expert_E=torch.full((E,), T, dtype=torch.int64, device=x.device),
        aux_loss=torch.zeros((), device=x.device),
        dropped_tokens=torch.zeros((), dtype=torch.int64, device=x.device),
        may_have_unused_slots=False,
    )
    out_TH, _ = layer.routed_pass(x_TH, plan)
    return out_TH.view(x.shape)
