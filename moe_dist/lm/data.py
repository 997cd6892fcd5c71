"""Byte-level text data: every machine has the Python standard library's sources, so that is the
default.

Batches are a pure function of (seed, step): every rank draws the same global batch and keeps its
own rows, so a run's data does not depend on the world size, the EP size, or whether it was resumed.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_sources() -> list[Path]:
    """The standard library's *.py files in sorted order (installed third-party packages
    excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(root).parts))
    if not files:
        raise FileNotFoundError(f"no *.py files under the standard library directory {root}")
    return files


def text_files(path: str | Path) -> list[Path]:
    """A file, or every regular file under a directory in sorted order."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _SKIP_DIRS & set(p.parts))
        if files:
            return files
    raise FileNotFoundError(f"--data {str(path)!r} is neither a file nor a directory holding files")


class ByteCorpus:
    """All bytes of some files, concatenated in order (a 0 byte between files), as uint8."""

    def __init__(self, files: list[Path], max_bytes: int | None = None):
        chunks, total = [], 0
        for f in files:
            data = f.read_bytes() + b"\0"
            if max_bytes is not None and total + len(data) > max_bytes:
                chunks.append(data[: max_bytes - total])
                break
            chunks.append(data)
            total += len(data)
        self.data = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
        self.num_files = len(chunks)

    @classmethod
    def from_path(cls, path: str | Path | None, max_bytes: int | None = None) -> "ByteCorpus":
        return cls(stdlib_sources() if path is None else text_files(path), max_bytes)

    def split_validation(
        self, fraction: float, min_bytes: int
    ) -> tuple["ByteCorpus", "ByteCorpus"]:
        """(train, validation): the last `fraction` of the bytes (at least `min_bytes`) held out.
        Both views share this corpus's memory."""
        held = max(int(len(self) * fraction), min_bytes)
        if len(self) - held < min_bytes:
            raise ValueError(
                f"corpus has {len(self)} bytes: too few to hold out {held} for validation and"
                f" keep {min_bytes} for training"
            )
        return self._view(self.data[:-held]), self._view(self.data[-held:])

    @classmethod
    def _view(cls, data: torch.Tensor) -> "ByteCorpus":
        corpus = cls.__new__(cls)
        corpus.data, corpus.num_files = data, None
        return corpus

    def __len__(self) -> int:
        return self.data.numel()

    def global_batch(self, step: int, batch_size: int, seq_len: int, seed: int = 0) -> torch.Tensor:
        """int64 [batch_size, seq_len + 1] windows at offsets drawn from (seed, step): inputs are
        [:, :-1], next-byte targets [:, 1:]."""
        if len(self) < seq_len + 2:
            raise ValueError(
                f"corpus has {len(self)} bytes, fewer than seq_len + 2 ({seq_len + 2})"
            )
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, len(self) - seq_len - 1, (batch_size,), generator=gen)
        idx = starts[:, None] + torch.arange(seq_len + 1)
        return self.data[idx].long()


def rows_per_rank(batch_size: int, world_size: int) -> int:
    if batch_size % world_size:
        raise ValueError(
            f"global batch size ({batch_size}) must be divisible by the data-parallel "
            f"world size ({world_size})"
        )
    return batch_size // world_size


def local_rows(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This data-parallel rank's contiguous share of a global batch."""
    per_rank = rows_per_rank(batch.shape[0], world_size)
    return batch[rank * per_rank : (rank + 1) * per_rank]
