"""Checkpoints on torch.distributed.checkpoint (DCP) that reload at any EP size, FSDP2-sharded or
not.

Layout of a checkpoint directory:
  DCP files      every tensor; experts stored one key per *global* expert index:
                   model.<layer>.experts.w_in.<e>, optimizer.state.<layer>.experts.w_in.<e>.exp_avg,
                   ...
                 everything else under its own name (FSDP shards reshard through DCP's DTensor
                 support)
  moe_dist.json  what is not a tensor: format version, experts per MoE layer, optimizer
  hyperparameters,
                 the caller's `extra` dict

A rank stores, and on load asks for, exactly the experts it holds: at EP=P rank r holds global
experts [r*E/P, (r+1)*E/P) (and, under FSDP, its EDP shard of those), so a checkpoint written at
EP=4 reads back at EP=2 or EP=1 without any conversion step.

Loading never unpickles arbitrary objects: tensors load with weights_only, DCP's metadata file is
read with an unpickler that admits only DCP's own metadata classes, and moe_dist never stores
pickled objects. """

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, Shard

from moe_dist.layer import MoELayer

FORMAT = "moe_dist.training.checkpoint/1"
META_FILE = "moe_dist.json"


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the model: a missing, unexpected or differently shaped tensor."""


# -- which rows of an expert tensor are which global experts
# --------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    """A DeepSpeed engine -> the model it wraps (its `.module`), whose names carry no engine
    prefix."""
    is_engine = any(cls.__module__.startswith("deepspeed.") for cls in type(model).__mro__)
    return (
        model.module
        if is_engine and isinstance(getattr(model, "module", None), nn.Module)
        else model
    )


def _expert_tensors(model: nn.Module) -> dict[str, MoELayer]:
    """FQN of every expert weight ('layers.0.moe.experts.w_in') -> its MoELayer."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            for weight in ("w_in", "w_out"):
                out[f"{name}.experts.{weight}" if name else f"experts.{weight}"] = module
    return out


def _local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's rows of an expert tensor, index of the first among the EP rank's local
    experts)."""
    if isinstance(t, DTensor):
        if any(isinstance(p, Shard) and p.dim != 0 for p in t.placements):
            raise ValueError(
                f"expert tensors must be sharded on the expert dim (0) only, got {t.placements}"
            )
        chunks = t.__create_chunk_list__()  # where DCP itself reads a DTensor shard's offsets
        offset = chunks[0].offsets[0] if chunks else 0
        return t.to_local(), int(offset)
    return t, 0


def _split_experts(key: str, t: torch.Tensor, layer: MoELayer) -> dict[str, torch.Tensor]:
    """{key.<global expert>: view of that expert's rows} for the experts this rank holds."""
    local, offset = _local_rows(t)
    first = layer.experts.first_expert + offset
    return {f"{key}.{first + g}": local[g] for g in range(local.shape[0])}


# -- state <-> flat dict of tensors
# ----------------------------------------------------------------------------
def _flat_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict, dict | None]:
    """(flat {key: tensor} with experts split per global index, the optimizer's state dict or
    None)."""
    experts = _expert_tensors(model)
    flat = {}
    for fqn, t in get_model_state_dict(model).items():
        if fqn in experts:
            flat.update({f"model.{k}": v for k, v in _split_experts(fqn, t, experts[fqn]).items()})
        else:
            flat[f"model.{fqn}"] = t
    if optimizer is None:
        return flat, None
    osd = get_optimizer_state_dict(model, optimizer)
    for fqn, state in osd["state"].items():
        for name, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"optimizer state {fqn}.{name} is a {type(t).__name__}, not a tensor"
                )
            if fqn in experts and t.dim() > 0:
                flat.update(
                    {
                        f"optimizer.state.{k}.{name}": v
                        for k, v in _split_experts(fqn, t, experts[fqn]).items()
                    }
                )
            else:
                flat[f"optimizer.state.{fqn}.{name}"] = t
    return flat, osd


def _expected_model_keys(model: nn.Module) -> set[str]:
    """Every model key a checkpoint of this model holds, whatever rank wrote it (all experts)."""
    experts = _expert_tensors(model)
    keys = set()
    for fqn in get_model_state_dict(model):
        if fqn in experts:
            keys.update(f"model.{fqn}.{e}" for e in range(experts[fqn].cfg.num_experts))
        else:
            keys.add(f"model.{fqn}")
    return keys


# -- safe reading
# -------------------------------------------------------------------------------------------
_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # maps a layout's name to the torch.layout
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
}  # checkpoint id


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"checkpoint metadata refers to {module}.{name}, which a DCP metadata "
            "file never holds; refusing to load it"
        )


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's reader with its metadata unpickled through an allow-list (DCP uses plain
    pickle.load)."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value):
        raise CheckpointMismatch(
            f"checkpoint entry '{read_item.dest_index.fqn}' is a pickled object; "
            "moe_dist checkpoints hold tensors only"
        )


# -- public API
# -----------------------------------------------------------------------------------------------
def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict | None = None,
) -> None:
    """Collective: every rank calls it with its part of the model (FSDP2-sharded or not, any EP
    size)."""
    model = _unwrap(model)
    path = Path(path)
    flat, osd = _flat_state(model, optimizer)
    dcp.save(flat, storage_writer=dcp.FileSystemWriter(path))
    if not dist.is_initialized() or dist.get_rank() == 0:
        meta = {
            "format": FORMAT,
            "experts": {
                fqn: layer.cfg.num_experts for fqn, layer in _expert_tensors(model).items()
            },
            "param_groups": None if osd is None else _jsonable(osd["param_groups"]),
            "extra": extra or {},
        }
        (path / META_FILE).write_text(json.dumps(meta, indent=1))
    if dist.is_initialized():
        dist.barrier()


def read_meta(path: str | os.PathLike) -> dict:
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a moe_dist checkpoint (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointMismatch(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    strict: bool = True,
) -> dict:
    """Loads in place; returns the `extra` dict given to save. Collective, like save.

    Raises CheckpointMismatch (a ValueError) naming the tensor when a shape differs, a tensor is
    missing, or (strict) the checkpoint holds model tensors this model has no place for."""
    model = _unwrap(model)
    meta = read_meta(path)
    reader = SafeFileSystemReader(path)
    saved = reader.read_metadata().state_dict_metadata
    if optimizer is not None and meta["param_groups"] is None:
        raise CheckpointMismatch(
            f"checkpoint {path} holds no optimizer state; load it without optimizer="
        )
    flat, osd = _flat_state(model, optimizer)
    for key, t in flat.items():
        want = tuple(t.shape)  # a DTensor's shape is the global one, as DCP stores it
        if key not in saved:
            raise CheckpointMismatch(
                f"checkpoint {path} has no tensor '{key}' (model shape {list(want)}); "
                "was it saved from another model?"
            )
        saved_shape = tuple(getattr(saved[key], "size", ()))
        if saved_shape != want:
            raise CheckpointMismatch(
                f"checkpoint tensor '{key}' has shape {list(saved_shape)}, but the model "
                f"expects {list(want)}"
            )
    if strict:
        expected = _expected_model_keys(model)
        unexpected = sorted(k for k in saved if k.startswith("model.") and k not in expected)
        if unexpected:
            more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
            raise CheckpointMismatch(
                f"checkpoint {path} holds tensors the model has no place for: "
                f"{unexpected[:5]}{more}"
            )
    dcp.load(
        flat, storage_reader=reader, planner=_WeightsOnlyLoadPlanner()
    )  # in place, into the views above
    if optimizer is not None:
        osd["param_groups"] = _restore_groups(meta["param_groups"], osd["param_groups"])
        set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(strict=True))
    return meta["extra"]


def _jsonable(param_groups: list[dict]) -> list[dict]:
    out = []
    for group in param_groups:
        clean = {}
        for k, v in group.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            if isinstance(v, tuple):
                v = list(v)
            clean[k] = v
        out.append(clean)
    return out


def _restore_groups(saved: list[dict], current: list[dict]) -> list[dict]:
    if len(saved) != len(current):
        raise CheckpointMismatch(
            f"checkpoint optimizer has {len(saved)} parameter groups, this one {len(current)}"
        )
    restored = []
    for s, c in zip(saved, current):
        group = dict(c)
        for k, v in s.items():
            if k == "params":
                continue
            group[k] = tuple(v) if isinstance(c.get(k), tuple) else v
        restored.append(group)
    return restored
