"""Errors the runtime raises, and device-side error flags for paths that must not synchronise.

A no-sync path (CUDA-graph capture, the nvshmem transport) cannot raise from inside a kernel, so it
ORs a bit into a small device tensor; `check()` reads it at a point where the host waits anyway and
raises naming the layer, the step and what went wrong."""

from __future__ import annotations

import torch


class MoERuntimeError(RuntimeError):
    """A runtime condition that would otherwise corrupt results or hang: raised, never ignored."""


class NonFiniteRouterLogits(MoERuntimeError, FloatingPointError):
    pass


class BufferOverflow(MoERuntimeError):
    pass


class PeerTimeout(MoERuntimeError):
    """A peer did not answer within the transport's time limit (peer_timeout_s)."""


class RankFailed(MoERuntimeError):
    """The forward of a layer failed on one rank of the EP group; every rank raises this, naming
    the layer, the step and the rank where it began (its exception chained on that rank)."""

    origin_rank: int = -1


class RankMismatch(MoERuntimeError):
    """The ranks of an EP group disagree on a call (layer, step, dtype, hidden size, top_k,
    configuration or router weights); every rank raises it before any token moves."""


# The call header's fields (transport/handshake.py writes and compares them): named here, beside
# the status bits it carries, so a recorded RANK_MISMATCH can say which field differed.
HEADER_FIELDS = (
    "layer",
    "step",
    "call",
    "phase",
    "dtype",
    "hidden",
    "top_k",
    "config",
    "router",
    "status",
    "origin",
)
NONFINITE_LOGITS = 1
BUFFER_OVERFLOW = 2
PEER_TIMEOUT = 4
RANK_MISMATCH = 8  # nvshmem: a peer's count-row header differs (detail: field * 65536 + PE)
PEER_FAILED = 16  # nvshmem: a peer's header carried an error (detail: origin * 65536 + status)
_MESSAGES = {
    NONFINITE_LOGITS: (NonFiniteRouterLogits, "router logits (or expert_bias) held NaN or Inf"),
    BUFFER_OVERFLOW: (
        BufferOverflow,
        "more tokens were routed than the transport's receive buffer holds",
    ),
    PEER_TIMEOUT: (PeerTimeout, "a peer's signal did not arrive before the timeout"),
    RANK_MISMATCH: (RankMismatch, "the PEs of the EP group disagree"),
    PEER_FAILED: (RankFailed, "the forward failed on a PE"),
}


class DeviceErrorFlags:
    """int32 words on the device: word 0 holds error bits, word 1 the step, word 2 a detail (e.g.
    peer)."""

    def __init__(self, layer_name: str, device: torch.device | str):
        self.layer_name = layer_name
        self.words = torch.zeros(3, dtype=torch.int32, device=device)

    def record(
        self, code: int, failed: torch.Tensor, step: int, detail: torch.Tensor | int = -1
    ) -> None:
        """Sets `code` where the 0-dim bool tensor `failed` is true. Stays on the device."""
        failed = failed.to(torch.int32)
        first = failed * (self.words[0] == 0).to(
            torch.int32
        )  # keep the first error's step and detail
        self.words[0] |= failed * code
        self.words[1] += first * (step - self.words[1])
        self.words[2] += first * (detail - self.words[2])  # int or device tensor: no host copy

    def check(self) -> None:
        """Raises the first recorded error. Synchronises with the device (that is its job)."""
        bits, step, detail = (int(v) for v in self.words.tolist())
        if bits == 0:
            return
        self.words.zero_()
        for code in (PEER_FAILED, RANK_MISMATCH, *_MESSAGES):  # a peer's failure explains the rest
            exc, text = _MESSAGES[code]
            if bits & code:
                where = f" (peer {detail})" if code == PEER_TIMEOUT and detail >= 0 else ""
                if code == PEER_FAILED:
                    origin, status = divmod(detail, 65536)
                    exc = next((c for k, (c, _) in _MESSAGES.items() if k == status), RankFailed)
                    where = (
                        f" (PE {origin} of the EP group, status {status:#x}); every PE raises this"
                    )
                elif code == RANK_MISMATCH:
                    field, pe = divmod(detail, 65536)
                    known = 0 <= field < len(HEADER_FIELDS)
                    name = HEADER_FIELDS[field] if known else f"field {field}"
                    where = f" on {name} (PE {pe} differs from this PE); nothing was received"
                raise exc(f"MoE layer '{self.layer_name}', step {step}: {text}{where}")
        raise MoERuntimeError(f"MoE layer '{self.layer_name}', step {step}: error bits {bits:#x}")
