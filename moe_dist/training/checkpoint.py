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

Verified: moe_dist.json holds a CRC-32 of DCP's `.metadata` file and of every stored tensor (each
byte range DCP wrote), and a CRC-32 of its own content; load checks each before using it and raises
CheckpointCorrupt naming the checkpoint path and the tensor (or file). A rank checks the tensors it
reads. Checkpoints without checksums (format /1) are refused.

Loading never unpickles arbitrary objects: tensors load with weights_only, DCP's metadata file is
read with an unpickler that admits only DCP's own metadata classes, and moe_dist never stores
pickled objects."""

from __future__ import annotations

import io
import json
import os
import pickle
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, Shard

from moe_dist.layer import MoELayer

FORMAT = "moe_dist.training.checkpoint/2"  # /2: checksums
META_FILE = "moe_dist.json"


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the model: a missing, unexpected or differently shaped tensor."""


class CheckpointCorrupt(CheckpointMismatch):
    """A checkpoint file's bytes differ from what save wrote (checksum), or cannot be parsed."""


def _crc(data: bytes) -> str:
    return f"{zlib.crc32(data):08x}"


def _item_key(index) -> str:
    """A DCP storage index (fqn, chunk offset) as a JSON key: 'fqn' or 'fqn' (chunk at [0, 4])."""
    offset = getattr(index, "offset", None)
    return f"'{index.fqn}'" if offset is None else f"'{index.fqn}' (chunk at {list(offset)})"


def _meta_crc(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "crc32"}
    return _crc(json.dumps(body, sort_keys=True).encode())


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
    pickle.load), and, given `checksums` (moe_dist.json's), every byte range verified before use."""

    def __init__(self, path, checksums: dict | None = None):
        super().__init__(path)
        self.checksums = checksums

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            data = f.read()
        if self.checksums is not None and _crc(data) != self.checksums["metadata"]:
            raise CheckpointCorrupt(
                f"checkpoint {self.path}: {path} is corrupt (CRC-32 {_crc(data)}, saved "
                f"{self.checksums['metadata']}); the tensor index cannot be trusted"
            )
        try:
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        except pickle.UnpicklingError:
            raise
        except Exception as e:  # truncated or garbled: name the file, not just pickle's complaint
            raise CheckpointCorrupt(f"checkpoint {self.path}: cannot read {path}: {e!r}") from e
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        if self.checksums is not None:
            self._verify({item.storage_index for item in plan.items})
        return super().read_data(plan, planner)

    def _verify(self, indices) -> None:
        """Checks the CRC-32 of every byte range this rank is about to read."""
        per_file: dict[str, list] = {}
        for index in indices:
            per_file.setdefault(self.storage_data[index].relative_path, []).append(index)
        tensors = self.checksums["tensors"]
        for relative_path, file_indices in per_file.items():
            file_path = self.fs.concat_path(self.path, relative_path)
            with self.fs.create_stream(file_path, "rb") as f:
                for index in file_indices:
                    info, key = self.storage_data[index], _item_key(index)
                    f.seek(info.offset)
                    got = _crc(f.read(info.length))
                    want = tensors.get(key)
                    if want is None:
                        raise CheckpointCorrupt(
                            f"checkpoint {self.path}: tensor {key} has no saved checksum "
                            f"in {META_FILE}"
                        )
                    if got != want:
                        raise CheckpointCorrupt(
                            f"checkpoint {self.path}: tensor {key} is corrupt in {file_path} "
                            f"(CRC-32 {got}, saved {want})"
                        )


def _checksums(path: Path) -> dict:
    """CRC-32 of the .metadata file and of every stored byte range (run after DCP's save)."""
    reader = SafeFileSystemReader(path)
    metadata = reader.read_metadata()
    tensors, handles = {}, {}
    try:
        for index, info in metadata.storage_data.items():
            if info.relative_path not in handles:
                handles[info.relative_path] = open(path / info.relative_path, "rb")
            f = handles[info.relative_path]
            f.seek(info.offset)
            tensors[_item_key(index)] = _crc(f.read(info.length))
    finally:
        for f in handles.values():
            f.close()
    return {"metadata": _crc(Path(reader._get_metadata_path()).read_bytes()), "tensors": tensors}


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
            "checksums": _checksums(path),
        }
        meta["crc32"] = _meta_crc(meta)
        (path / META_FILE).write_text(json.dumps(meta, indent=1))
    if dist.is_initialized():
        dist.barrier()


def read_meta(path: str | os.PathLike) -> dict:
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a moe_dist checkpoint (no {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointCorrupt(f"checkpoint {path}: {meta_path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointCorrupt(f"checkpoint {path}: {meta_path} holds a {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointMismatch(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    missing = [
        k for k in ("experts", "param_groups", "extra", "checksums", "crc32") if k not in meta
    ]
    if missing:
        raise CheckpointCorrupt(f"checkpoint {path}: {meta_path} lacks the keys {missing}")
    if _meta_crc(meta) != meta["crc32"]:
        raise CheckpointCorrupt(
            f"checkpoint {path}: {meta_path} is corrupt (CRC-32 {_meta_crc(meta)}, saved "
            f"{meta['crc32']})"
        )
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
    reader = SafeFileSystemReader(path, meta["checksums"])
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
    try:
        dcp.load(flat, storage_reader=reader, planner=_WeightsOnlyLoadPlanner())  # in place
    except CheckpointException as e:
        # DCP gathers every rank's failure: re-raise the first one's own error, path and tensor
        first = next(iter(e.failures.values()), None)
        if isinstance(first, tuple) and isinstance(first[0], Exception):
            raise first[0] from None
        raise
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
