"""DeepSpeed (ZeRO stage 0, 1, 2) for models holding moe_dist MoELayers.

What DeepSpeed needs to treat our layers as MoE, and how it gets it here: - its group registry
(deepspeed.utils.groups) holds, under the name "ep_size_N", the expert-parallel and
  expert-data-parallel groups; DeepSpeed creates its own only where a name is missing, so
  `register_groups` puts moe_dist's there first and DeepSpeed uses our groups and rank order;
- expert parameters carry allreduce=False and group_name="ep_size_N" (MoELayer tags them);
- the optimizer gets separate MoE parameter groups (`moe_param_groups`), which ZeRO partitions over
  the EDP group, and whose gradients it reduces over the EDP group only;
- the engine must know the model has MoE layers. DeepSpeed only recognises its own MoE class, so the
  engine built here is a small subclass that also recognises MoELayer and stores our experts in
  DeepSpeed's one-file-per-expert checkpoint layout (by global expert index, so a DeepSpeed
  checkpoint's weights reload at another EP size). `initialize` has deepspeed.initialize build that
  subclass;
- under ZeRO-0 in fp32 DeepSpeed clips with the mean of per-rank norms, which is not the global norm
when
  ranks hold different experts; the subclass clips with moe_dist.clip_grad_norm_ (ZeRO-1/2 and the
  bf16 optimizer already sum expert norms over the EP group).

Loading is safe: `engine.load_checkpoint` on an engine built here reads every file (model states,
ZeRO optimizer states, expert files) with torch.load(weights_only=True), allow-listing only the
few plain classes DeepSpeed stores (`DEEPSPEED_SAFE_GLOBALS`: its loss scaler, the ZeRO stage enum,
the fragment_address tuple). A file holding anything else is refused with UnsafeCheckpoint naming
the file and the global, never unpickled. DeepSpeed's universal checkpoints (which it reads with
weights_only=False in its own modules) are refused.

- the sigmoid router's aux-loss-free bias moves once per optimizer step: the engine's step() runs
  a RouterBiasUpdater at each gradient-accumulation boundary (training/router_bias.py).

DeepSpeed divides expert gradients by the whole data-parallel degree after summing them over EDP,
which is what EP=N == EP=1 needs (fsdp.py has the arithmetic)."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import pickle
import re
import threading

import torch
from torch import nn

from moe_dist.layer import MoELayer, is_expert_param
from moe_dist.training.router_bias import RouterBiasUpdater

_ENGINE_SWAP_LOCK = threading.Lock()


# -- safe loading
# -------------------------------------------------------------------------------------------
# (module, name) of every non-tensor type DeepSpeed 0.19 writes into its checkpoint files
DEEPSPEED_SAFE_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


class UnsafeCheckpoint(pickle.UnpicklingError):
    """A DeepSpeed checkpoint file holds an object that weights_only loading does not admit."""


def _safe_globals() -> list:
    import importlib

    out = []
    for module, name in DEEPSPEED_SAFE_GLOBALS:
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass  # another DeepSpeed version: that type cannot occur in its files
    return out


def safe_load(path, map_location=None):
    """torch.load(weights_only=True) with DeepSpeed's allow-listed types; refuses anything else."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(Unsupported global: GLOBAL [\w.]+|Unsupported operand \S+)", str(e))
        why = found.group(1) if found else str(e).splitlines()[0]
        raise UnsafeCheckpoint(
            f"DeepSpeed checkpoint file {path} cannot be loaded safely ({why}); moe_dist loads "
            "DeepSpeed checkpoints with weights_only=True and refuses to unpickle other objects"
        ) from None


class _SafeCheckpointEngine:
    """DeepSpeed's checkpoint engine with `load` replaced by `safe_load`; the rest delegated."""

    def __init__(self, inner):
        self._inner = inner

    def load(self, path, map_location=None):
        return safe_load(path, map_location=map_location)

    def __getattr__(self, name):
        return getattr(self._inner, name)


# -- groups
# -------------------------------------------------------------------------------------------------
def group_name(groups) -> str:
    return f"ep_size_{groups.ep_size}"


def register_groups(groups) -> str:
    """Registers groups.ep_group / groups.edp_group in DeepSpeed's registry; returns the name used.
    An entry already there under the same name is replaced: DeepSpeed must reduce over our groups.
    """
    from deepspeed.utils import groups as ds_groups

    name = group_name(groups)
    ds_groups._EXPERT_PARALLEL_GROUP[name] = groups.ep_group
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = groups.ep_ranks
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = groups.edp_group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = groups.edp_ranks
    return name


def unregister_groups(groups) -> None:
    """Removes this EP size's entries (e.g. between runs at different EP sizes in one process)."""
    from deepspeed.utils import groups as ds_groups

    name = group_name(groups)
    for registry in (
        ds_groups._EXPERT_PARALLEL_GROUP,
        ds_groups._EXPERT_PARALLEL_GROUP_RANKS,
        ds_groups._EXPERT_DATA_PARALLEL_GROUP,
        ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
    ):
        registry.pop(name, None)


# -- optimizer parameter groups
# -------------------------------------------------------------------------------
def moe_param_groups(model: nn.Module, **options) -> list[dict]:
    """Parameter groups for the optimizer: the dense parameters, then one MoE group per "ep_size_N"
    (options such as lr or weight_decay apply to every group)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    return split_params_into_different_moe_groups_for_optimizer(
        {"params": params, "name": "dense", **options}
    )


# -- config
# ------------------------------------------------------------------------------------------------
def checked_config(config: dict | str) -> dict:
    """A copy of the DeepSpeed config with the MoE requirements checked and defaults filled in."""
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            config = json.load(f)
    config = copy.deepcopy(config)
    zero = config.setdefault("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if stage == 3:
        raise ValueError(
            "zero_optimization.stage 3 is not supported for models with MoE layers: DeepSpeed "
            "refuses native MoE under ZeRO-3. Use stage 0, 1 or 2, or shard with FSDP2 "
            "(moe_dist.training.fsdp.shard), which shards experts over the EDP mesh."
        )
    if stage not in (0, 1, 2):
        raise ValueError(f"zero_optimization.stage must be 0, 1 or 2, got {zero.get('stage')!r}")
    if stage == 2:
        # DeepSpeed's MoE support under ZeRO-2 needs both (it asserts, without saying which config
        # key).
        for key in ("contiguous_gradients", "reduce_scatter"):
            if zero.get(key) is False:
                raise ValueError(
                    f"zero_optimization.{key} must be true for MoE under ZeRO stage 2, got false"
                )
            zero[key] = True
    if config.get("hybrid_engine", {}).get("enabled"):
        raise ValueError("hybrid_engine is not supported with moe_dist MoE layers")
    return config


# -- the engine
# ------------------------------------------------------------------------------------------------
def _moe_layers(module: nn.Module) -> list[tuple[str, MoELayer]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, MoELayer)]


def _expert_keys(layer_name: str, layer: MoELayer) -> list[str]:
    prefix = f"{layer_name}.experts." if layer_name else "experts."
    return [prefix + "w_in", prefix + "w_out"]


@functools.cache
def _engine_class():
    from deepspeed.runtime.engine import DeepSpeedEngine

    class MoEDistEngine(DeepSpeedEngine):
        """DeepSpeedEngine that knows moe_dist's MoELayer: MoE gradient reduction and ZeRO MoE
        groups switch on, and checkpoints store each expert in its own file under its global
        index."""

        def _configure_distributed_model(self, model):
            super()._configure_distributed_model(model)
            layers = _moe_layers(self.module)
            if layers:
                self.has_moe_layers = True
                self.num_experts.extend(layer.cfg.num_experts for _, layer in layers)

        def step(self, *args, **kwargs):
            # The sigmoid router's bias moves once per optimizer step, from the load of every
            # micro-batch since the last one: at the gradient-accumulation boundary.
            boundary = self.is_gradient_accumulation_boundary()
            super().step(*args, **kwargs)
            router_bias = getattr(self, "moe_dist_router_bias", None)
            if boundary and router_bias is not None:
                router_bias.step()

        def clip_fp32_gradients(self):
            # ZeRO-0 fp32: DeepSpeed averages the per-rank norms over the DP group, which is not the
            # global norm when ranks hold different experts; ours sums expert norms over the EP
            # group.
            from .clip import clip_grad_norm_

            self._global_grad_norm = float(
                clip_grad_norm_(
                    self.module.parameters(), self.gradient_clipping(), self.moe_dist_groups
                )
            )

        # Checkpoints: DeepSpeed's non-expert file must not carry our experts (it is written by DP
        # rank 0 alone and read by every rank), so they go to
        # layer_{L}_expert_{e}_mp_rank_00_model_states.pt.
        def _get_non_moe_state_dict(self, full_state_dict):
            full_state_dict = super()._get_non_moe_state_dict(full_state_dict)
            for name, layer in _moe_layers(self.module):
                for key in _expert_keys(name, layer):
                    full_state_dict.pop(key, None)
            return full_state_dict

        def _save_moe_checkpoint(
            self, save_dir, tag, client_state={}, exclude_frozen_parameters=False
        ):
            from deepspeed.utils import groups as ds_groups

            for layer_id, (name, layer) in enumerate(_moe_layers(self.module)):
                group = layer_group_name(layer)
                if ds_groups._get_expert_data_parallel_rank(group) != 0:
                    continue  # EDP replicas hold the same experts; one of them writes
                first = layer.experts.first_expert
                for local in range(layer.experts.num_local):
                    state = {
                        key: getattr(layer.experts, key.rsplit(".", 1)[1])[local].detach().clone()
                        for key in _expert_keys(name, layer)
                    }
                    path = self._get_expert_ckpt_name(
                        save_dir,
                        layer_id,
                        first + local,
                        tag,
                        checkpoint_mp_rank=self.checkpoint_mp_rank,
                    )
                    self.checkpoint_engine.save(state, path)
            super()._save_moe_checkpoint(
                save_dir,
                tag,
                client_state=client_state,
                exclude_frozen_parameters=exclude_frozen_parameters,
            )

        def load_checkpoint(self, *args, **kwargs):
            """DeepSpeed's load_checkpoint, every file read with weights_only=True (see the
            module docstring); raises UnsafeCheckpoint rather than unpickle anything else."""
            if self.load_universal_checkpoint():
                raise ValueError(
                    "DeepSpeed universal checkpoints are read with weights_only=False inside "
                    "DeepSpeed; moe_dist refuses them (load a regular DeepSpeed checkpoint)"
                )
            original = self.checkpoint_engine
            self.checkpoint_engine = _SafeCheckpointEngine(original)
            try:
                return super().load_checkpoint(*args, **kwargs)
            finally:
                self.checkpoint_engine = original

        def _load_checkpoint(self, load_dir, tag, *args, **kwargs):
            self._moe_dist_loading = (load_dir, tag)
            try:
                return super()._load_checkpoint(load_dir, tag, *args, **kwargs)
            finally:
                self._moe_dist_loading = None

        def load_module_state_dict(self, checkpoint, *args, **kwargs):
            loading = getattr(self, "_moe_dist_loading", None)
            if loading is not None:
                checkpoint["module"].update(self._read_expert_files(*loading))
            return super().load_module_state_dict(checkpoint, *args, **kwargs)

        def _read_expert_files(self, load_dir, tag) -> dict[str, torch.Tensor]:
            """This rank's experts, stacked from their per-expert files (weights_only loading)."""
            out = {}
            for layer_id, (name, layer) in enumerate(_moe_layers(self.module)):
                per_key = {key: [] for key in _expert_keys(name, layer)}
                for e in range(
                    layer.experts.first_expert, layer.experts.first_expert + layer.experts.num_local
                ):
                    path = self._get_expert_ckpt_name(
                        load_dir, layer_id, e, tag, checkpoint_mp_rank=self.checkpoint_mp_rank
                    )
                    if not os.path.exists(path):
                        raise FileNotFoundError(
                            f"DeepSpeed checkpoint {load_dir!r} (tag {tag!r}) has no file for "
                            f"expert {e} of MoE layer '{name}': {path}"
                        )
                    state = safe_load(path, map_location="cpu")
                    for key in per_key:
                        per_key[key].append(state[key])
                out.update({key: torch.stack(tensors) for key, tensors in per_key.items()})
            return out

    return MoEDistEngine


def layer_group_name(layer: MoELayer) -> str:
    return layer.experts.w_in.group_name


@contextlib.contextmanager
def _engine_class_swapped(engine_cls):
    """deepspeed.initialize builds `deepspeed.DeepSpeedEngine`; for the length of one call that is
    ours."""
    import deepspeed

    with _ENGINE_SWAP_LOCK:
        original = deepspeed.DeepSpeedEngine
        deepspeed.DeepSpeedEngine = engine_cls
        try:
            yield
        finally:
            deepspeed.DeepSpeedEngine = original


def initialize(model: nn.Module, groups, config: dict | str, **kwargs):
    """deepspeed.initialize for a model holding MoELayers built with `groups`; the same return:
    (engine, optimizer, training_dataloader, lr_scheduler).

    Without `model_parameters` and without an optimizer object, the optimizer named in the config
    gets `moe_param_groups(model)`. An optimizer object you pass must already hold MoE groups (build
    it on `moe_param_groups(model)`)."""
    import deepspeed

    config = checked_config(config)
    layers = _moe_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} holds no moe_dist MoELayer; call deepspeed.initialize directly"
        )
    for layer_name, layer in layers:
        if layer_group_name(layer) != group_name(groups):
            raise ValueError(
                f"MoE layer '{layer_name}' was built for {layer_group_name(layer)}, but groups has "
                f"ep_size {groups.ep_size} ({group_name(groups)})"
            )
    register_groups(groups)
    optimizer = kwargs.get("optimizer")
    if isinstance(optimizer, torch.optim.Optimizer):
        if not any(g.get("moe") for g in optimizer.param_groups) and any(
            is_expert_param(p) for g in optimizer.param_groups for p in g["params"]
        ):
            raise ValueError(
                "the optimizer passed to initialize mixes expert and dense parameters in one group;"
                " build it on moe_dist.training.deepspeed.moe_param_groups(model)"
            )
    elif kwargs.get("model_parameters") is None:
        kwargs["model_parameters"] = moe_param_groups(model)
    with _engine_class_swapped(_engine_class()):
        engine, *rest = deepspeed.initialize(model=model, config=config, **kwargs)
    engine.moe_dist_groups = groups
    engine.moe_dist_router_bias = RouterBiasUpdater(model, groups)  # engine.step() calls it
    return (engine, *rest)
