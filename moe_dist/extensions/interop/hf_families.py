"""Which Hugging Face sparse-MoE blocks replace_moe_blocks (hf.py) supports, and how each is read:
the family table, and readers that turn a block's attributes and weights into a MoEConfig and the
tensors to copy (views of MoELayer's layouts; no model-sized copies).

Legend: T tokens, H hidden, E experts, F expert ffn hidden, K slots per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_dist import MoEConfig


class UnsupportedMoEBlock(NotImplementedError):
    """A sparse-MoE block whose class (or layout) replace_moe_blocks cannot express exactly."""


@dataclass(frozen=True)
class Family:
    # "softmax_renorm" | "softmax_plain" | "softmax_norm_attr" | "sigmoid_grouped"
    # | "sigmoid_renorm" | "deepseek_v2" | "gpt_oss" | "llama4" | "dbrx" | "ernie" | "cohere2"
    routing: str
    # None | "gated_shared_expert" (Qwen) | or the attribute of a plain shared SwiGLU MLP:
    # "shared_experts" (DeepSeek), "shared_expert" (Llama 4), "shared_mlp" (HunYuan)
    shared: str | None = None
    # where the multiplicative input jitter (training only) is: "jitter_noise" (Mixtral)
    jitter: str | None = None
    router: str = "gate"  # the block's attribute holding the router
    router_weight: str = "weight"  # the router's [E, H] parameter, relative to the router
    top_k_of: str = "router"  # "router" | "block": which holds top_k
    experts: str = "fused"  # "fused" (transformers-5 gate_up_proj/down_proj) | "dbrx" (w1 v1 w2)
    # "tensor" | "scores" (GPT-OSS: (out, top-k weights [T, K])) | "logits" (Llama 4: (out_TH,
    # router logits [T, E]))
    returns: str = "tensor"
    # transformers-5 expert-layout flags the experts class does not carry itself
    expert_flags: tuple[tuple[str, bool], ...] = ()


# Every class here was checked line by line against the installed transformers' modeling code,
# and is covered by tests/unit/test_interop_hf.py (logits before == after) at EP=1 and EP=2.
FAMILIES: dict[str, Family] = {
    # softmax over all experts -> top-k -> always renormalised
    "MixtralSparseMoeBlock": Family("softmax_renorm", jitter="jitter_noise"),
    "MiniMaxSparseMoeBlock": Family("softmax_renorm", jitter="jitter_noise"),
    "HunYuanMoEV1Moe": Family("softmax_renorm", "shared_mlp", router_weight="wg.weight"),
    # (top-k of the logits -> softmax over the k: the same function)
    "GraniteMoeMoE": Family("softmax_renorm", router="router"),
    "GraniteMoeSharedMoE": Family("softmax_renorm", router="router"),  # shared MLP outside
    "GraniteMoeHybridMoE": Family("softmax_renorm", router="router"),
    # softmax -> top-k, never renormalised
    "JambaSparseMoeBlock": Family("softmax_plain", router="router"),
    # softmax -> top-k -> renormalised iff router.norm_topk_prob
    "Qwen3MoeSparseMoeBlock": Family("softmax_norm_attr"),
    "OlmoeSparseMoeBlock": Family("softmax_norm_attr"),
    "FlexOlmoSparseMoeBlock": Family("softmax_norm_attr"),
    # ... plus one shared expert scaled by sigmoid(x @ shared_expert_gate)
    "Qwen2MoeSparseMoeBlock": Family("softmax_norm_attr", "gated_shared_expert"),
    "Qwen3NextSparseMoeBlock": Family("softmax_norm_attr", "gated_shared_expert"),
    "Qwen3_5MoeSparseMoeBlock": Family("softmax_renorm", "gated_shared_expert"),  # always renorm
    # sigmoid + e_score_correction_bias, group-limited (groups scored by their top-2), scaled;
    # shared experts
    "DeepseekV3MoE": Family("sigmoid_grouped", "shared_experts"),
    "Glm4MoeMoE": Family("sigmoid_grouped", "shared_experts"),
    "Glm4MoeLiteMoE": Family("sigmoid_grouped", "shared_experts"),
    "Dots1MoE": Family("sigmoid_grouped", "shared_experts"),
    # softmax; top-k of probs + e_score_correction_bias (gate.moe_statics); renormalised (the
    # clamp of the sum at moe_norm_min, 1e-12, is not reproduced); optional shared experts
    "Ernie4_5_MoeSparseMoeBlock": Family("ernie", "shared_experts"),
    # top-k of the logits -> softmax over the k, or sigmoid (renormalised iff norm_topk_prob);
    # shared experts summed, or averaged with the routed output
    "Cohere2MoeSparseMoeBlock": Family("cohere2", "shared_experts"),
    # sigmoid + e_score_correction_bias (held by the block), renormalised; input jitter
    "MiniMaxM2SparseMoeBlock": Family("sigmoid_renorm", jitter="jitter_noise"),
    # softmax greedy or group-limited greedy (groups scored by their max), never renormalised,
    # scaled
    "DeepseekV2Moe": Family("deepseek_v2", "shared_experts"),
    # logits with a bias -> top-k -> softmax over the k (= softmax, top-k, renormalised); biased
    # experts with GPT-OSS's clamped SwiGLU
    "GptOssMLP": Family("gpt_oss", router="router", returns="scores"),
    # top-k of the logits -> sigmoid; the weight scales the expert's *input*; one shared expert
    "Llama4TextMoe": Family(
        "llama4",
        "shared_expert",
        router="router",
        returns="logits",
        expert_flags=(("is_transposed", True),),
    ),
    # softmax -> top-k -> divided by their p-norm (p = 1: renormalised; None: not); experts as
    # w1 (gate), v1 (up), w2 ([E*F, H]); the router's input jitter
    "DbrxFFN": Family(
        "dbrx",
        router="router",
        router_weight="layer.weight",
        top_k_of="block",
        experts="dbrx",
        jitter="router.moe_jitter_eps",
    ),
}

# Fields the HF weights fix; overriding them could only break the copy.
FIXED_BY_WEIGHTS = (
    "hidden_size",
    "ffn_hidden_size",
    "num_experts",
    "num_shared_experts",
    "shared_ffn_hidden_size",
    "shared_expert_gate",
    "activation",
    "init_seed_offset",
    "router_bias",
    "expert_ffn_bias",
    "swiglu_alpha",
    "swiglu_limit",
    "scale_expert_input",
    "softmax_selection_bias",
)
# HF computes the load-balancing loss from router_logits (output_router_logits=True), which the
# replacement keeps recording; MoELayer's own aux loss would have nowhere to go, and its bias update
# would make the model drift from the HF function while training. Both stay overridable (the bias
# one).
DEFAULTS = {"aux_loss_coef": 0.0, "z_loss_coef": 0.0, "router_bias_update_rate": 0.0}


# -- reading one HF block
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Weights:
    router_weight: torch.Tensor  # [E, H]
    expert_bias: torch.Tensor | None  # [E] selection-only bias (sigmoid routers)
    gate_up: torch.Tensor  # [E, 2F, H] (a view); gate rows then up rows, or interleaved
    down: torch.Tensor  # [E, H, F] (a view)
    up: torch.Tensor | None  # [E, F, H] where gate and up are apart (DBRX): gate_up holds gates
    interleaved: bool  # gate_up rows (and gate_up_bias) alternate gate, up (GPT-OSS)
    gate_up_bias: torch.Tensor | None  # [E, 2F] (GPT-OSS)
    down_bias: torch.Tensor | None  # [E, H]
    router_bias: torch.Tensor | None  # [E] a logit bias (GPT-OSS)
    shared_w_in: torch.Tensor | None  # [2Fs, H]: gate rows, then up rows
    shared_w_out: torch.Tensor | None  # [H, Fs]
    shared_gate: torch.Tensor | None  # [1, H]
    jitter_noise: float


def read_block(name: str, block: nn.Module, overrides: dict) -> tuple[MoEConfig, Weights]:
    cls = type(block).__name__
    family = FAMILIES.get(cls)
    if family is None:
        raise UnsupportedMoEBlock(
            f"{cls} (at '{name}') is not a supported sparse-MoE block; supported:"
            f" {', '.join(sorted(FAMILIES))}"
        )
    gate, experts = getattr(block, family.router, None), getattr(block, "experts", None)
    router_weight = None
    if gate is not None:
        try:
            router_weight = gate.get_parameter(family.router_weight)
        except AttributeError:
            pass
    if router_weight is None or experts is None:
        raise UnsupportedMoEBlock(
            f"{cls} (at '{name}'): expected `{family.router}` (router with .{family.router_weight})"
            " and `experts` children"
        )
    if family.experts == "dbrx":
        ex = _dbrx_experts(cls, name, experts)
    else:
        ex = _fused_experts(cls, name, experts, family)
    gate_up, down = ex["gate_up"], ex["down"]
    E, H, F = down.shape
    if tuple(router_weight.shape) != (E, H):
        raise UnsupportedMoEBlock(
            f"{cls} (at '{name}'): router weight {tuple(router_weight.shape)} does not match "
            f"{E} experts of hidden size {H}"
        )

    fields_ = dict(
        hidden_size=H,
        ffn_hidden_size=F,
        num_experts=E,
        top_k=int((block if family.top_k_of == "block" else gate).top_k),
        activation=ex["activation"],
        expert_ffn_bias=ex["gate_up_bias"] is not None,
        **ex["act_params"],
        **_routing(cls, name, family.routing, block if family.routing == "dbrx" else gate),
    )
    router_bias = getattr(gate, "bias", None) if family.routing == "gpt_oss" else None
    if family.routing == "gpt_oss" and router_bias is None:
        raise UnsupportedMoEBlock(f"{cls} (at '{name}'): expected a router with a bias")
    expert_bias = None
    if family.routing in ("sigmoid_grouped", "sigmoid_renorm"):
        owner = gate if hasattr(gate, "e_score_correction_bias") else block  # MiniMax-M2: block
        expert_bias = owner.e_score_correction_bias
    if family.routing == "ernie":
        expert_bias = gate.moe_statics.e_score_correction_bias.reshape(-1)  # [1, E] -> [E]

    shared_w_in = shared_w_out = shared_gate = None
    if family.shared == "gated_shared_expert":
        shared_w_in, shared_w_out = _dense_swiglu(cls, name, block.shared_expert)
        shared_gate = block.shared_expert_gate.weight
        if (
            tuple(shared_gate.shape) != (1, H)
            or getattr(block.shared_expert_gate, "bias", None) is not None
        ):
            raise UnsupportedMoEBlock(
                f"{cls} (at '{name}'): shared_expert_gate must be Linear({H}, 1, bias=False)"
            )
    elif family.shared is not None and getattr(block, family.shared, None) is not None:
        shared_w_in, shared_w_out = _dense_swiglu(cls, name, getattr(block, family.shared))
    if shared_w_in is not None:
        # The HF shared MLP is already fused (n_shared * moe_intermediate wide): one shared expert
        # of its width.
        fields_.update(
            num_shared_experts=1,
            shared_ffn_hidden_size=shared_w_out.shape[1],
            shared_expert_gate=shared_gate is not None,
        )

    if family.routing == "cohere2" and shared_w_in is not None:
        strategy = block.shared_expert_combination_strategy
        if strategy == "average":  # (routed + shared) / 2
            fields_.update(routed_scaling_factor=0.5, shared_expert_scale=0.5)
        elif strategy != "sum":
            raise UnsupportedMoEBlock(
                f"{cls} (at '{name}'): shared_expert_combination_strategy={strategy!r}"
            )

    jitter = 0.0
    if family.jitter is not None:
        owner, _, attr = family.jitter.rpartition(".")
        jitter = float(getattr(block.get_submodule(owner), attr, 0.0) or 0.0)
    try:
        cfg = MoEConfig(**{**fields_, **DEFAULTS, **overrides})
    except ValueError as e:
        raise UnsupportedMoEBlock(
            f"{cls} (at '{name}'): its routing does not fit MoEConfig: {e}"
        ) from e
    return cfg, Weights(
        router_weight,
        expert_bias,
        gate_up,
        down,
        ex.get("up"),
        ex["interleaved"],
        ex["gate_up_bias"],
        ex["down_bias"],
        router_bias,
        shared_w_in,
        shared_w_out,
        shared_gate,
        jitter,
    )


def _routing(cls: str, name: str, routing: str, gate: nn.Module) -> dict:
    if routing == "softmax_renorm":
        return dict(router="softmax", norm_topk_prob=True)
    if routing == "softmax_plain":
        return dict(router="softmax", norm_topk_prob=False)
    if routing == "sigmoid_renorm":
        return dict(router="sigmoid", norm_topk_prob=True)
    if routing == "softmax_norm_attr":
        return dict(router="softmax", norm_topk_prob=bool(gate.norm_topk_prob))
    if routing == "sigmoid_grouped":
        return dict(
            router="sigmoid",
            norm_topk_prob=bool(gate.norm_topk_prob),
            routed_scaling_factor=float(gate.routed_scaling_factor),
            num_expert_groups=int(gate.num_group),
            topk_groups=int(gate.topk_group),
        )
    if routing == "deepseek_v2":
        scale = dict(norm_topk_prob=False, routed_scaling_factor=float(gate.routed_scaling_factor))
        if gate.topk_method == "greedy":
            return dict(router="softmax", **scale)
        if gate.topk_method == "group_limited_greedy":
            return dict(
                router="group_limited",
                num_expert_groups=int(gate.num_group),
                topk_groups=int(gate.topk_group),
                **scale,
            )
        raise UnsupportedMoEBlock(
            f"{cls} (at '{name}'): topk_method={gate.topk_method!r} is not supported "
            "(only 'greedy' and 'group_limited_greedy', as the HF router itself)"
        )
    if routing == "dbrx":  # `gate` is the block here
        p = gate.moe_normalize_expert_weights
        if p is None:
            return dict(router="softmax", norm_topk_prob=False)
        if float(p) == 1.0:  # the L1 norm of probabilities is their sum
            return dict(router="softmax", norm_topk_prob=True)
        raise UnsupportedMoEBlock(
            f"{cls} (at '{name}'): moe_normalize_expert_weights={p} (a p-norm other than 1) is "
            "not supported"
        )
    if routing == "ernie":
        if float(gate.norm_min) > 1e-6:
            raise UnsupportedMoEBlock(
                f"{cls} (at '{name}'): moe_norm_min={gate.norm_min} would clamp real weight sums"
            )
        return dict(router="softmax", norm_topk_prob=True, softmax_selection_bias=True)
    if routing == "cohere2":
        if gate.expert_selection_fn == "softmax":  # over the top-k logits = renormalised
            return dict(router="softmax", norm_topk_prob=True)
        if gate.expert_selection_fn == "sigmoid":  # top-k of logits = top-k of their sigmoid
            return dict(router="sigmoid", norm_topk_prob=bool(gate.norm_topk_prob))
        raise UnsupportedMoEBlock(
            f"{cls} (at '{name}'): expert_selection_fn={gate.expert_selection_fn!r}"
        )
    if routing == "gpt_oss":
        # softmax over the top-k logits == softmax over all, top-k, renormalised (same order)
        return dict(router="softmax", norm_topk_prob=True, router_bias=True)
    if routing == "llama4":
        # sigmoid is monotonic: the top-k of the logits are the top-k of sigmoid(logits)
        return dict(router="sigmoid", norm_topk_prob=False, scale_expert_input=True)
    raise AssertionError(routing)


def _is_silu(act) -> bool:
    return type(act).__name__ in ("SiLU", "SiLUActivation")


def _fused_experts(cls: str, name: str, experts: nn.Module, family: Family) -> dict:
    """The experts' weights as views of MoELayer's shapes (gate_up [E, 2F, H], down [E, H, F]),
    whether gate/up rows are interleaved (de-interleaved when the local slice is copied, so no
    model-sized copy is made), their biases or None, and the activation with its parameters."""
    if not (hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj")):
        raise UnsupportedMoEBlock(
            f"{cls} (at '{name}'): experts of class {type(experts).__name__} are not in the fused "
            "gate_up_proj/down_proj layout of transformers 5"
        )
    # transformers 5's flags (set by @use_experts_implementation); a family's own fixes what a
    # class without the decorator (Llama 4) does not say.
    flags = {
        "has_bias": False,
        "is_transposed": False,
        "has_gate": True,
        "is_concatenated": True,
        "has_post_expert_norm": False,
        "_is_expert_parallel": False,
    }
    flags.update(dict(family.expert_flags))
    got = {k: getattr(experts, k, want) for k, want in flags.items()}
    supported = {"has_bias", "is_transposed", "is_concatenated"}  # converted below
    off = [k for k, want in flags.items() if got[k] != want and k not in supported]
    if off:
        raise UnsupportedMoEBlock(
            f"{cls} (at '{name}'): experts with {', '.join(f'{k}={got[k]}' for k in off)} "
            "are not supported"
        )
    activation, act_params = _expert_activation(cls, name, experts, family)

    gate_up, down = experts.gate_up_proj, experts.down_proj
    if got["is_transposed"]:  # [E, H, 2F] and [E, F, H]: x @ w
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    E, two_F, H = gate_up.shape
    if two_F % 2 or tuple(down.shape) != (E, H, two_F // 2):
        raise UnsupportedMoEBlock(
            f"{cls} (at '{name}'): gate_up_proj {tuple(experts.gate_up_proj.shape)} and down_proj "
            f"{tuple(experts.down_proj.shape)} are not [E, 2F, H] and [E, H, F] (or transposed)"
        )
    gate_up_bias = down_bias = None
    if got["has_bias"]:
        gate_up_bias, down_bias = experts.gate_up_proj_bias, experts.down_proj_bias
        if tuple(gate_up_bias.shape) != (E, two_F) or tuple(down_bias.shape) != (E, H):
            raise UnsupportedMoEBlock(
                f"{cls} (at '{name}'): expert biases {tuple(gate_up_bias.shape)} and "
                f"{tuple(down_bias.shape)} are not [E, 2F] and [E, H]"
            )
    return dict(
        interleaved=not got["is_concatenated"],
        gate_up=gate_up,
        down=down,
        gate_up_bias=gate_up_bias,
        down_bias=down_bias,
        activation=activation,
        act_params=act_params,
    )


def _dbrx_experts(cls: str, name: str, experts: nn.Module) -> dict:
    mlp = getattr(experts, "mlp", None)
    if not all(hasattr(mlp, w) for w in ("w1", "v1", "w2")):
        raise UnsupportedMoEBlock(f"{cls} (at '{name}'): expected experts.mlp.w1/v1/w2")
    if not _is_silu(getattr(mlp, "activation_fn", None)):
        raise UnsupportedMoEBlock(
            f"{cls} (at '{name}'): expert activation {type(mlp.activation_fn).__name__} is not "
            "SiLU (MoELayer's swiglu)"
        )
    E, F = int(experts.num_experts), int(experts.ffn_hidden_size)
    H = mlp.w1.shape[1]
    if any(tuple(getattr(mlp, w).shape) != (E * F, H) for w in ("w1", "v1", "w2")):
        raise UnsupportedMoEBlock(
            f"{cls} (at '{name}'): w1/v1/w2 {tuple(mlp.w1.shape)}, {tuple(mlp.v1.shape)}, "
            f"{tuple(mlp.w2.shape)} are not [E*F, H] = [{E * F}, {H}]"
        )
    # y = (silu(x @ w1_e^T) * (x @ v1_e^T)) @ w2_e: w2_e [F, H] is down^T
    return dict(
        gate_up=mlp.w1.view(E, F, H),
        up=mlp.v1.view(E, F, H),
        down=mlp.w2.view(E, F, H).transpose(1, 2),
        interleaved=False,
        gate_up_bias=None,
        down_bias=None,
        activation="swiglu",
        act_params={},
    )


def _expert_activation(cls: str, name: str, experts: nn.Module, family: Family):
    apply_gate = getattr(type(experts), "_apply_gate", None)
    if family.routing == "gpt_oss":
        # GPT-OSS's own _apply_gate: clamp, gate * sigmoid(alpha * gate) * (up + 1)
        if getattr(apply_gate, "__qualname__", "") != "GptOssExperts._apply_gate":
            raise UnsupportedMoEBlock(
                f"{cls} (at '{name}'): experts {type(experts).__name__} do not use GPT-OSS's "
                "clamped SwiGLU"
            )
        params = dict(swiglu_alpha=float(experts.alpha), swiglu_limit=float(experts.limit))
        return "clamped_swiglu", params
    # The default gate: act_fn(gate) * up.
    if apply_gate is not None and apply_gate.__name__ != "_default_apply_gate":
        raise UnsupportedMoEBlock(
            f"{cls} (at '{name}'): experts {type(experts).__name__} have their own _apply_gate"
        )
    if not _is_silu(getattr(experts, "act_fn", None)):
        raise UnsupportedMoEBlock(
            f"{cls} (at '{name}'): expert activation {type(experts.act_fn).__name__} is not "
            "SiLU (MoELayer's swiglu)"
        )
    return "swiglu", {}


def _dense_swiglu(cls: str, name: str, mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    projs = [getattr(mlp, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
    act = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)  # Llama 4's name
    if any(not isinstance(p, nn.Linear) for p in projs) or not _is_silu(act):
        raise UnsupportedMoEBlock(
            f"{cls} (at '{name}'): shared expert {type(mlp).__name__} is not a SiLU "
            "gate/up/down MLP"
        )
    if any(p.bias is not None for p in projs):
        raise UnsupportedMoEBlock(
            f"{cls} (at '{name}'): shared expert {type(mlp).__name__} has biases "
            "(mlp_bias=True), which MoELayer's shared experts do not"
        )
    gate_proj, up_proj, down_proj = projs
    return torch.cat([gate_proj.weight, up_proj.weight], dim=0), down_proj.weight
