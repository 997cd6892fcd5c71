"""Hugging Face interop: tiny random models built from their configs (nothing downloaded) compute
the same logits (fp32, rtol 1e-5) before and after replace_moe_blocks, for every supported family.

The EP=2 version of the same comparison is tests/dist/test_interop_hf.py (it reuses tiny_model).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from moe_dist import MoELayer  # noqa: E402
from moe_dist.extensions.interop import (
    HFMoEBlock,
    UnsupportedMoEBlock,
    find_moe_blocks,
    replace_moe_blocks,
)  # noqa: E402

COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.1,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MLA = dict(q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
MOE = dict(intermediate_size=48, moe_intermediate_size=16)

# family -> (config class, model class, config fields, MoE blocks expected). Routing choices differ
# per family on purpose (renormalised or not, groups, scaling) so each reader's branch is exercised.
FAMILIES = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2),
        2,
    ),
    "minimax": (
        "MiniMaxConfig",
        "MiniMaxForCausalLM",
        dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2),
        2,
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",  # layer 0 stays a dense MLP
        dict(
            **MOE,
            shared_expert_intermediate_size=40,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            mlp_only_layers=[0],
            num_hidden_layers=3,
        ),
        2,
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(**MOE, num_experts=8, num_experts_per_tok=3, norm_topk_prob=True, head_dim=8),
        2,
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        dict(
            **MOE,
            shared_expert_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            head_dim=8,
            layer_types=["linear_attention", "full_attention"],
            linear_num_value_heads=2,
            linear_num_key_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
        ),
        2,
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
        2,
    ),
    "flex_olmo": (
        "FlexOlmoConfig",
        "FlexOlmoForCausalLM",
        dict(intermediate_size=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
        2,
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",  # layer 0 dense (first_k_dense_replace)
        dict(
            **MOE,
            **MLA,
            n_routed_experts=8,
            n_shared_experts=2,
            num_experts_per_tok=3,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            first_k_dense_replace=1,
            num_hidden_layers=3,
        ),
        2,
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(
            **MOE,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.5,
            norm_topk_prob=False,
            first_k_dense_replace=1,
            num_hidden_layers=3,
            head_dim=8,
        ),
        2,
    ),
    "dots1": (
        "Dots1Config",
        "Dots1ForCausalLM",
        dict(
            **MOE,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=2.0,
            norm_topk_prob=True,
            first_k_dense_replace=0,
            head_dim=8,
        ),
        2,
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            **MOE,
            **MLA,
            n_routed_experts=8,
            n_shared_experts=2,
            num_experts_per_tok=2,
            topk_method="greedy",
            routed_scaling_factor=1.5,
            first_k_dense_replace=0,
        ),
        2,
    ),
    "deepseek_v2_grouped": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            **MOE,
            **MLA,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=3,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
            first_k_dense_replace=0,
        ),
        2,
    ),
    "glm4_moe_lite": (
        "Glm4MoeLiteConfig",
        "Glm4MoeLiteForCausalLM",  # layer 0 dense
        dict(
            **MOE,
            **MLA,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.5,
            norm_topk_prob=True,
            num_hidden_layers=3,
        ),
        2,
    ),
    "qwen3_5_moe": (
        "Qwen3_5MoeTextConfig",
        "Qwen3_5MoeForCausalLM",
        dict(
            **MOE,
            shared_expert_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=2,
            head_dim=8,
            layer_types=["linear_attention", "full_attention"],
            linear_num_value_heads=2,
            linear_num_key_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
        ),
        2,
    ),
    "granitemoe": (
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2),
        2,
    ),
    "granitemoeshared": (
        "GraniteMoeSharedConfig",
        "GraniteMoeSharedForCausalLM",
        dict(
            intermediate_size=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            shared_intermediate_size=24,
        ),
        2,
    ),
    "jamba": (
        "JambaConfig",
        "JambaForCausalLM",  # layer 0 mamba, layer 1 attention, both with MoE
        dict(
            intermediate_size=16,
            num_experts=8,
            num_experts_per_tok=2,
            expert_layer_period=1,
            expert_layer_offset=0,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=4,
            mamba_d_conv=2,
            mamba_expand=2,
            mamba_dt_rank=4,
        ),
        2,
    ),
    "minimax_m2": (
        "MiniMaxM2Config",
        "MiniMaxM2ForCausalLM",
        dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8),
        2,
    ),
    "ernie4_5_moe": (
        "Ernie4_5_MoeConfig",
        "Ernie4_5_MoeForCausalLM",  # layer 0 dense; selection bias; shared experts
        dict(
            **MOE,
            num_experts=8,
            num_experts_per_tok=2,
            moe_num_shared_experts=2,
            moe_layer_start_index=1,
            num_hidden_layers=3,
            head_dim=8,
        ),
        2,
    ),
    "cohere2_moe": (  # softmax over the top-k logits; shared experts averaged in
        "Cohere2MoeConfig",
        "Cohere2MoeForCausalLM",
        dict(
            intermediate_size=16,
            num_experts=8,
            num_experts_per_tok=2,
            num_shared_experts=1,
            head_dim=8,
            shared_expert_combination_strategy="average",
        ),
        2,
    ),
    "cohere2_moe_sigmoid": (  # sigmoid of the top-k logits, not renormalised; shared summed
        "Cohere2MoeConfig",
        "Cohere2MoeForCausalLM",
        dict(
            intermediate_size=16,
            num_experts=8,
            num_experts_per_tok=3,
            num_shared_experts=2,
            head_dim=8,
            expert_selection_fn="sigmoid",
            norm_topk_prob=False,
            shared_expert_combination_strategy="sum",
        ),
        2,
    ),
    "granitemoehybrid": (  # layer 0 mamba2, layer 1 attention
        "GraniteMoeHybridConfig",
        "GraniteMoeHybridForCausalLM",
        dict(
            intermediate_size=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            shared_intermediate_size=24,
            layer_types=["mamba", "attention"],
            mamba_n_heads=4,
            mamba_d_head=16,
            mamba_d_state=8,
            mamba_n_groups=1,
            mamba_expand=2,
            mamba_chunk_size=8,
        ),
        2,
    ),
    "hunyuan_v1_moe": (
        "HunYuanMoEV1Config",
        "HunYuanMoEV1ForCausalLM",  # router weight at gate.wg, shared MLP
        dict(intermediate_size=16, num_experts=8, moe_topk=2, head_dim=8),
        2,
    ),
    "dbrx": (
        "DbrxConfig",
        "DbrxForCausalLM",
        dict(
            d_model=32,
            n_heads=4,
            n_layers=2,
            max_seq_len=64,
            attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 8, "moe_top_k": 2},
        ),
        2,
    ),
    # ... p-norm None: not renormalised
    "dbrx_unnormalised": (
        "DbrxConfig",
        "DbrxForCausalLM",
        dict(
            d_model=32,
            n_heads=4,
            n_layers=2,
            max_seq_len=64,
            attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            ffn_config={
                "ffn_hidden_size": 16,
                "moe_num_experts": 8,
                "moe_top_k": 3,
                "moe_normalize_expert_weights": None,
            },
        ),
        2,
    ),
    # biased experts, clamped SwiGLU (limit low enough to bite), interleaved gate/up, router bias
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            intermediate_size=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            head_dim=8,
            swiglu_limit=1.5,
            swiglu_alpha=1.702,
            sliding_window=4,
        ),
        2,
    ),
    # sigmoid top-1 scaling the expert input, plus a shared expert
    "llama4": (
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        dict(
            intermediate_size=16,
            intermediate_size_mlp=48,
            num_local_experts=8,
            num_experts_per_tok=1,
            head_dim=8,
        ),
        2,
    ),
    # ... top-2 (each chosen expert sees its own scaled copy), layer 0 dense
    "llama4_top2": (
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        dict(
            intermediate_size=16,
            intermediate_size_mlp=48,
            num_local_experts=8,
            num_experts_per_tok=2,
            head_dim=8,
            moe_layers=[1, 2],
            num_hidden_layers=3,
        ),
        2,
    ),
}


def tiny_model(family: str, seed: int = 0) -> nn.Module:
    """A tiny random fp32 model of `family`, in eval mode. MoE-block weights are drawn larger than
    HF's init (so the blocks weigh in the logits and routing is decisive) and selection biases
    (DeepSeek-V3 style) non-zero (so that they matter)."""
    config_cls, model_cls, fields, _ = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **fields})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for _, block in find_moe_blocks(model):
            for p in block.parameters():
                p.normal_(0.0, 0.3)
            for name, buf in [*block.named_buffers(), *block.named_parameters()]:
                if name.endswith("e_score_correction_bias"):  # ERNIE's is a frozen parameter
                    buf.normal_(0.0, 0.1)
    return model


def hf_router(block: nn.Module) -> nn.Module:
    return block.gate if hasattr(block, "gate") else block.router


def hf_tensors(block: nn.Module, grad: bool = False) -> dict[str, torch.Tensor]:
    """The HF block's router and expert tensors (or their gradients) in MoELayer's layout, keyed
    like MoELayer's own (see ours()): written here independently of hf.py's conversion."""
    get = (lambda p: p.grad) if grad else (lambda p: p.detach())
    ex, cls, router = block.experts, type(block).__name__, hf_router(block)
    router_weight = {"HunYuanMoEV1Moe": "wg.weight", "DbrxFFN": "layer.weight"}.get(cls, "weight")
    out = {"router.weight": get(router.get_parameter(router_weight))}
    if cls == "DbrxFFN":  # w1 (gate), v1 (up), w2: [E*F, H] each, y = (...) @ w2_e
        E, F = ex.num_experts, ex.ffn_hidden_size
        w1, v1, w2 = (get(getattr(ex.mlp, w)).view(E, F, -1) for w in ("w1", "v1", "w2"))
        out["experts.w_in"] = torch.cat([w1, v1], dim=1)
        out["experts.w_out"] = w2.transpose(1, 2)
        return out
    gate_up, down = get(ex.gate_up_proj), get(ex.down_proj)
    if cls == "GptOssMLP":  # [E, H, 2F], columns alternate gate, up
        E, H, F2 = gate_up.shape
        out["experts.w_in"] = gate_up.view(E, H, F2 // 2, 2).permute(0, 3, 2, 1).reshape(E, F2, H)
        out["experts.b_in"] = get(ex.gate_up_proj_bias).view(E, F2 // 2, 2).transpose(1, 2)
        out["experts.b_in"] = out["experts.b_in"].reshape(E, F2)
        out["experts.w_out"] = down.transpose(1, 2)
        out["experts.b_out"] = get(ex.down_proj_bias)
        out["router.bias"] = get(block.router.bias)
    elif cls == "Llama4TextMoe":  # [E, H, 2F] gate columns first, [E, F, H]
        out["experts.w_in"], out["experts.w_out"] = gate_up.transpose(1, 2), down.transpose(1, 2)
    else:
        out["experts.w_in"], out["experts.w_out"] = gate_up, down
    return out


def ours(moe: MoELayer) -> dict[str, torch.Tensor]:
    return dict(moe.named_parameters())


def token_ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(
        0, COMMON["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed)
    )


def assert_logits_close(actual, expected):
    """rtol 1e-5; the absolute floor (for logits near zero) is 1e-5 of the largest logit."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_equal_after_replacement(family):
    model = tiny_model(family)
    ids = token_ids(3, 11, seed=1)
    with torch.no_grad():
        expected = model(ids).logits
    hf_classes = {type(b).__name__ for _, b in find_moe_blocks(model)}
    replace_moe_blocks(model)
    blocks = [m for m in model.modules() if isinstance(m, HFMoEBlock)]
    assert len(blocks) == FAMILIES[family][3] and {b.hf_class for b in blocks} == hf_classes
    assert not any(type(m).__name__ in hf_classes for m in model.modules())
    with torch.no_grad():
        actual = model(ids).logits
    assert_logits_close(actual, expected)

    # The MoE layers matter to these logits (the comparison above is not vacuous): swap expert
    # outputs.
    with torch.no_grad():
        for b in blocks:
            b.moe.experts.w_out.copy_(b.moe.experts.w_out.roll(1, dims=0))
        assert (model(ids).logits - expected).abs().max() > 0.05


@pytest.mark.parametrize(
    "family",
    [
        "qwen2_moe",
        "deepseek_v3",
        "mixtral",
        "gpt_oss",
        "llama4_top2",
        "dbrx",
        "hunyuan_v1_moe",
        "ernie4_5_moe",
        "cohere2_moe",
    ],
)
def test_gradients_equal_after_replacement(family):
    """Training through the replacement: same loss, same gradients for every weight, by name."""
    ref, model = tiny_model(family), tiny_model(family)
    replace_moe_blocks(model)
    ids = token_ids(2, 9, seed=2)
    ref_loss = ref(ids, labels=ids).loss
    loss = model(ids, labels=ids).loss
    ref_loss.backward()
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)

    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for (name, block_ref), (_, block) in zip(find_moe_blocks(ref), find_moe_blocks(model)):
        moe: MoELayer = block.moe
        for key, g_ref in hf_tensors(block_ref, grad=True).items():
            torch.testing.assert_close(
                ours(moe)[key].grad, g_ref, rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}"
            )
        pairs = []
        shared_ref = getattr(block_ref, "shared_expert", None) or getattr(
            block_ref, "shared_experts", None
        )
        if shared_ref is not None:
            w_in_grad = torch.cat(
                [shared_ref.gate_proj.weight.grad, shared_ref.up_proj.weight.grad]
            )
            torch.testing.assert_close(
                moe.shared_experts.w_in.grad, w_in_grad, rtol=1e-4, atol=1e-6
            )
            pairs.append((moe.shared_experts.w_out, shared_ref.down_proj.weight))
        if getattr(block_ref, "shared_expert_gate", None) is not None:
            pairs.append((moe.shared_experts.gate, block_ref.shared_expert_gate.weight))
        for p, p_ref in pairs:
            torch.testing.assert_close(
                p.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}"
            )
        for n in [n for n in ref_grads if n.startswith(name + ".")]:
            ref_grads.pop(n)
    # Everything outside the MoE blocks keeps its name and gets the same gradient.
    grads = {n: p.grad for n, p in model.named_parameters()}
    for n, g_ref in ref_grads.items():
        torch.testing.assert_close(grads[n], g_ref, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("run_before", [False, True])
def test_router_logits_and_aux_loss_still_recorded(run_before):
    """output_router_logits=True (HF's load-balancing loss) works whether or not HF installed its
    recording hooks (first forward) before the replacement."""
    model = tiny_model("mixtral")
    model.config.router_aux_loss_coef = 0.02
    ids = token_ids(2, 7, seed=3)
    with torch.no_grad():
        expected = model(ids, output_router_logits=True)
        if not run_before:
            model = tiny_model("mixtral")
            model.config.router_aux_loss_coef = 0.02
        replace_moe_blocks(model)
        actual = model(ids, output_router_logits=True)
        plain = model(ids)
    assert len(actual.router_logits) == len(expected.router_logits) == 2
    for a, e in zip(actual.router_logits, expected.router_logits):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(actual.aux_loss, expected.aux_loss, rtol=1e-5, atol=1e-6)
    assert_logits_close(actual.logits, expected.logits)
    assert_logits_close(plain.logits, expected.logits)


def test_overrides_reach_the_layers_and_bad_ones_fail():
    model = tiny_model("deepseek_v3")
    with pytest.raises(ValueError, match="fixed by the Hugging Face weights"):
        replace_moe_blocks(model, num_experts=16)
    with pytest.raises(ValueError, match="unknown MoEConfig fields"):
        replace_moe_blocks(model, no_such_field=1)
    with pytest.raises(ValueError, match=r"\['num_chunks'\] \(num_chunks was removed in 0.2.0"):
        replace_moe_blocks(model, num_chunks=2)
    with pytest.raises(ValueError, match="aux_loss_coef=0.01 has nowhere to go"):
        replace_moe_blocks(model, aux_loss_coef=0.01)
    assert all(type(b).__name__ == "DeepseekV3MoE" for _, b in find_moe_blocks(model))  # untouched
    replace_moe_blocks(model, router_bias_update_rate=1e-3, expert_backend="loop")
    cfg = next(m for m in model.modules() if isinstance(m, HFMoEBlock)).moe.cfg
    assert (cfg.router, cfg.num_expert_groups, cfg.topk_groups, cfg.routed_scaling_factor) == (
        "sigmoid",
        4,
        2,
        2.5,
    )
    assert cfg.router_bias_update_rate == 1e-3 and cfg.expert_backend == "loop"


def test_replacement_leaves_the_global_rng_alone():
    model = tiny_model("olmoe")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    replace_moe_blocks(model)
    torch.testing.assert_close(torch.rand(3), expected)


def test_unsupported_block_class_is_named_and_model_untouched():
    config = transformers.PhimoeConfig(
        **{**COMMON, "intermediate_size": 24, "num_local_experts": 4, "num_experts_per_tok": 2}
    )
    model = transformers.PhimoeForCausalLM(config)
    with pytest.raises(
        UnsupportedMoEBlock, match=r"PhimoeSparseMoeBlock \(at 'model\.layers\.0\.mlp'\)"
    ):
        replace_moe_blocks(model)
    assert not any(isinstance(m, HFMoEBlock) for m in model.modules())


def test_custom_moe_block_is_refused_not_skipped():
    class MyTopKMoE(nn.Module):  # holds experts: looks like MoE, matches no family
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(8, 4, bias=False)
            self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    model = nn.Sequential(nn.Linear(8, 8), MyTopKMoE())
    with pytest.raises(UnsupportedMoEBlock, match="MyTopKMoE"):
        replace_moe_blocks(model)
    with pytest.raises(ValueError, match="found no sparse-MoE block in Sequential"):
        replace_moe_blocks(nn.Sequential(nn.Linear(8, 8)))


@pytest.mark.parametrize("family", ["gpt_oss", "llama4", "llama4_top2", "ernie4_5_moe"])
def test_router_matches_the_hf_router_module(family):
    """The routing MoELayer builds for a family picks the experts and weights the HF router does,
    on fresh random tokens (GPT-OSS: softmax over the top-k biased logits; Llama 4: sigmoid of the
    top-k logits; ERNIE-4.5: top-k of probabilities plus a selection bias)."""
    model = tiny_model(family, seed=4)
    name, block = find_moe_blocks(model)[0]
    x_TH = torch.randn(50, COMMON["hidden_size"], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        hf_out = hf_router(block)(x_TH)
        replace_moe_blocks(model)
        plan = model.get_submodule(name).moe.router(x_TH)
    if family in ("gpt_oss", "ernie4_5_moe"):
        _, scores_TK, idx_TK = hf_out
        assert torch.equal(plan.expert_idx_TK, idx_TK)
        torch.testing.assert_close(plan.weights_TK, scores_TK)
    else:  # dense [T, E] scores: sigmoid(logit) at the chosen experts, 0 elsewhere
        scores_TE, _ = hf_out
        ours_TE = torch.zeros_like(scores_TE).scatter_(1, plan.expert_idx_TK, plan.weights_TK)
        torch.testing.assert_close(ours_TE, scores_TE)
        assert torch.equal((scores_TE > 0).sum(-1), torch.full((50,), plan.top_k))


@pytest.mark.parametrize("family", ["gpt_oss", "llama4"])
def test_pair_returning_blocks_return_what_hf_returned(family):
    """GPT-OSS's block returns (hidden, top-k scores), Llama 4's (flat hidden, router logits)."""
    model = tiny_model(family, seed=6)
    name, block = find_moe_blocks(model)[0]
    x = torch.randn(2, 5, COMMON["hidden_size"], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = block(x)
        replace_moe_blocks(model)
        actual = model.get_submodule(name)(x)
    assert isinstance(actual, tuple) and len(actual) == 2
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt_oss", "llama4"])
def test_router_logits_recorded_for_new_families(family):
    """HF's recorder takes index 0 (GPT-OSS) or 1 (Llama 4) of its router's output: both work."""
    model = tiny_model(family)
    ids = token_ids(2, 7, seed=8)
    with torch.no_grad():
        expected = model(ids, output_router_logits=True)
        replace_moe_blocks(model)
        actual = model(ids, output_router_logits=True)
    assert len(actual.router_logits) == len(expected.router_logits) == 2
    for a, e in zip(actual.router_logits, expected.router_logits):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    if family == "gpt_oss":
        torch.testing.assert_close(actual.aux_loss, expected.aux_loss, rtol=1e-5, atol=1e-6)
