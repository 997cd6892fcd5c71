"""Drop moe_dist into Hugging Face `transformers` MoE models.

    model = AutoModelForCausalLM.from_pretrained(...)       # or built from a config
    replace_moe_blocks(model, groups)                      # every sparse-MoE block -> one MoELayer
    model(input_ids)                                       # same function, experts now
    expert-parallel

Each supported block class maps to a *family* (how it routes, what shared experts it has; the
table and the readers are in hf_families.py); the family's reader turns the block's own
attributes and weights into a MoEConfig and a MoELayer with the same weights. The replacement
module returns what the HF block returned (the hidden states tensor; GPT-OSS and Llama 4 blocks
return a pair, whose second item is recomputed from the same router). With `groups` (EP > 1) each
rank copies only its local experts' weights; the HF block, with all experts, is dropped.

Written against the fused-expert layout of transformers 5 (`experts.gate_up_proj` [E, 2F, H] with
rows [0:F] gate and [F:2F] up, `experts.down_proj` [E, H, F]), which is MoELayer's own layout.
Layouts that differ are converted when the weights are copied: `is_transposed` ([E, H, 2F] and
[E, F, H]: GPT-OSS, Llama 4) and `is_concatenated=False` (gate/up columns interleaved: GPT-OSS)
are permuted into it, and `has_bias` biases (GPT-OSS) become MoELayer's expert biases.

Know before use:
- The router runs in fp32 on every model (HF's Mixtral/Qwen/OLMoE routers run in the model dtype),
  so a bf16 model may route a near-tie differently from HF; in fp32 the function is the same.
- At EP > 1 every MoE layer is a collective: all ranks must run the same number of forward passes
  (for `generate`, pass `synced_gpus=True` or a fixed length without early stopping).
- The model's state_dict keys change under the blocks (`...mlp.moe.experts.w_in`), so HF's
  save_pretrained/from_pretrained do not round-trip; save with moe_dist's checkpointing instead.
- Blocks behind accelerate hooks (device_map offloading) or quantised experts are not supported.
Legend: T tokens, H hidden, E experts, F expert ffn hidden.
"""

from __future__ import annotations

import re
from dataclasses import fields

import torch
from torch import nn

from moe_dist import MoEConfig, MoELayer
from moe_dist.config import removed_fields_note

from .hf_families import (
    DEFAULTS,
    FAMILIES,
    FIXED_BY_WEIGHTS,
    UnsupportedMoEBlock,
    Weights,
    read_block,
)

# A module that looks like a sparse-MoE block: named like one, or holding an `experts` child.
_MOE_NAME = re.compile(
    r"(SparseMoeBlock|SparseMoE|SparseMLP|MoeBlock|MoEBlock|Moe|MoE|MoeLayer|MoELayer)$"
)


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every sparse-MoE block, supported or not, outermost first;
    the inside of a block is not searched."""
    found: list[tuple[str, nn.Module]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            qualified = f"{prefix}.{name}" if prefix else name
            if _looks_like_moe(child):
                found.append((qualified, child))
            else:
                visit(child, qualified)

    visit(model, "")
    return found


def replace_moe_blocks(model: nn.Module, groups=None, **overrides) -> nn.Module:
    """Replace every sparse-MoE block of `model` (in place) by an `HFMoEBlock` around a MoELayer
    with the block's weights and routing; returns `model`.

    groups: ParallelGroups (EP > 1: each rank keeps only its local experts); None = one process.
    overrides: MoEConfig fields for the new layers (e.g. transport="collective",
    capacity_factor=1.25, router_bias_update_rate=1e-3 to continue DeepSeek-V3's aux-loss-free
    balancing). Fields the HF weights fix (sizes, activation) cannot be overridden.

    Raises UnsupportedMoEBlock naming the class of any block it cannot express exactly, before
    changing anything; ValueError when the model has no MoE block at all.
    """
    bad = sorted(set(overrides) & set(FIXED_BY_WEIGHTS))
    if bad:
        raise ValueError(
            f"replace_moe_blocks: {bad} are fixed by the Hugging Face weights and cannot be"
            " overridden"
        )
    known = {f.name for f in fields(MoEConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        note = removed_fields_note(unknown)
        raise ValueError(
            f"replace_moe_blocks: unknown MoEConfig fields {unknown}"
            + (f" ({note})" if note else "")
        )
    for name in ("aux_loss_coef", "z_loss_coef"):
        if overrides.get(name):
            raise ValueError(
                f"replace_moe_blocks: {name}={overrides[name]} has nowhere to go (HF blocks return "
                "only hidden states); use the model's output_router_logits=True for its aux loss"
            )

    blocks = find_moe_blocks(model)
    if not blocks:
        raise ValueError(f"replace_moe_blocks: found no sparse-MoE block in {type(model).__name__}")
    # Read (and so validate) every block before replacing any: an unsupported one leaves the model
    # as it was.
    plans = [(name, block, read_block(name, block, overrides)) for name, block in blocks]
    for name, block, (cfg, weights) in plans:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, _build(name, block, cfg, weights, groups))
    return model


class HFMoEBlock(nn.Module):
    """Stands where a Hugging Face sparse-MoE block stood; computes the same function through
    MoELayer.

    `router_logits` is an instance of a subclass of the HF router class, so HF's output recorder
    (`output_router_logits=True`) still finds and records router logits. They are computed only when
    something listens (a forward hook is installed on it)."""

    def __init__(
        self,
        moe: MoELayer,
        hf_class: str,
        jitter_noise: float = 0.0,
        router_logits: nn.Module | None = None,
        returns: str = "tensor",
    ):
        super().__init__()
        self.moe = moe
        self.hf_class = hf_class
        self.jitter_noise = jitter_noise
        self.router_logits = router_logits
        self.returns = returns

    def forward(self, hidden_states: torch.Tensor):
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise
            )
            hidden_states = hidden_states * noise
        x_TH = hidden_states.reshape(-1, hidden_states.shape[-1])
        recording = self.router_logits is not None and self.router_logits._forward_hooks
        # One more (small) gate GEMM, only when someone listens or the HF block returned logits.
        logits_TE = self.moe.router.logits(x_TH) if recording or self.returns != "tensor" else None
        if recording:
            self.router_logits(logits_TE)
        out = self.moe(hidden_states).output
        if self.returns == "scores":  # GPT-OSS: softmax over the top-k logits
            top_TK = logits_TE.topk(self.moe.cfg.top_k, dim=-1).values
            return out, top_TK.softmax(dim=-1).to(out.dtype)
        if self.returns == "logits":  # Llama 4: flat output, the router logits
            return out.reshape(x_TH.shape), logits_TE.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"replaces={self.hf_class}"


def _looks_like_moe(module: nn.Module) -> bool:
    name = type(module).__name__
    if name in FAMILIES:
        return True
    if name.endswith(("Model", "ForCausalLM", "PreTrainedModel")):
        return False
    return "experts" in dict(module.named_children()) or bool(_MOE_NAME.search(name))


# -- building the replacement
# ----------------------------------------------------------------------------
def _build(name: str, block: nn.Module, cfg: MoEConfig, w: Weights, groups) -> HFMoEBlock:
    device, dtype = w.gate_up.device, w.gate_up.dtype
    # MoELayer draws its (to be overwritten) initial weights from the global RNG: keep the caller's
    # stream.
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        moe = MoELayer(cfg, groups, name=name, device=device, dtype=dtype)
    first, n = moe.experts.first_expert, moe.experts.num_local
    with torch.no_grad():
        _copy(moe.router.weight, w.router_weight)
        if w.expert_bias is not None:
            moe.router.expert_bias.copy_(w.expert_bias)
        _copy(moe.experts.w_in, w.gate_up, _local_w_in(w, first, n))
        _copy(moe.experts.w_out, w.down, w.down[first : first + n])
        if w.gate_up_bias is not None:
            b_in = _gate_first(w.gate_up_bias[first : first + n], w)
            _copy(moe.experts.b_in, w.gate_up_bias, b_in)
            _copy(moe.experts.b_out, w.down_bias, w.down_bias[first : first + n])
        if w.router_bias is not None:
            _copy(moe.router.bias, w.router_bias)
        if w.shared_w_in is not None:
            shared = moe.shared_experts
            shared.w_in.copy_(w.shared_w_in)
            shared.w_in.requires_grad_(w.shared_w_in.requires_grad)
            _copy(shared.w_out, w.shared_w_out)
            if w.shared_gate is not None:
                _copy(shared.gate, w.shared_gate)
    family = FAMILIES[type(block).__name__]
    router = getattr(block, family.router)
    tap = _router_logits_tap(type(router))  # (DBRX's router: the Linear's owner, as HF hooks)
    # Recording hooks HF already installed on the old router (it has run before) move to the tap.
    tap._forward_hooks.update(router._forward_hooks)
    return HFMoEBlock(moe, type(block).__name__, w.jitter_noise, tap, family.returns)


def _gate_first(t_E2F: torch.Tensor, w: Weights) -> torch.Tensor:
    """Interleaved gate/up rows (dim 1) -> all gate rows, then all up rows."""
    return torch.cat([t_E2F[:, 0::2], t_E2F[:, 1::2]], dim=1) if w.interleaved else t_E2F


def _local_w_in(w: Weights, first: int, n: int) -> torch.Tensor:
    """This rank's experts' w_in [n, 2F, H], gate rows first (made only for the local slice)."""
    if w.up is not None:
        return torch.cat([w.gate_up[first : first + n], w.up[first : first + n]], dim=1)
    return _gate_first(w.gate_up[first : first + n], w)


def _copy(dst: nn.Parameter, src: torch.Tensor, values: torch.Tensor | None = None) -> None:
    dst.copy_(src if values is None else values)
    dst.requires_grad_(src.requires_grad)


_TAP_CLASSES: dict[type, type] = {}  # a cache of generated classes, not of state


def _router_logits_tap(router_cls: type) -> nn.Module:
    """An identity module that `isinstance`-matches the HF router class, so HF's output recorder
    (which hooks router instances and records output[0]) records the logits we hand it."""
    tap_cls = _TAP_CLASSES.get(router_cls)
    if tap_cls is None:

        def __init__(self):
            nn.Module.__init__(self)

        def forward(self, logits_TE):
            # Not a tuple: HF's recorder then records the output itself, whatever index its
            # OutputRecorder names (GPT-OSS: 0, Llama 4: 1).
            return logits_TE

        def extra_repr(self):
            return ""  # the router's own (nn.Linear's for Llama 4) reads attributes it lacks

        tap_cls = type(
            f"{router_cls.__name__}LogitsTap",
            (router_cls,),
            {"__init__": __init__, "forward": forward, "extra_repr": extra_repr},
        )
        _TAP_CLASSES[router_cls] = tap_cls
    return tap_cls()
