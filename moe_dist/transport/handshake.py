"""The count exchange's protocol: every transport call of an EP>1 layer begins with one handshake,
an all_to_all in which each rank sends every peer a fixed header followed by its counts for that
peer. The header lets the ranks check, at the cost of a few ints in an exchange that happens anyway,
that they are making the same call and that none of them has failed:

  layer   CRC-32 of the layer's name          step    the layer's forward count
  call    handshakes of this transport so far phase   0 dispatch, 1 combine
  dtype   code of the rows' dtype (DTYPES)    hidden  row width
  top_k   slots per token (0 at combine)      config  CRC-32 of the MoEConfig fields
  router  CRC-32 of the router weights (first call)
  status  0, or the error code of a rank whose forward failed (errors.py bits, RANK_FAILED)
  origin  the rank where that error began (-1: none)

At construction the layer makes one header-only exchange (`agree`): its name and config CRC, so
that ranks whose count widths would differ fail on the config check, never in a mis-sized exchange.

A rank whose forward fails before its next transport call does not raise at once: it takes part in
that call's handshake carrying the error (`fail_together`), so its peers are not left waiting, and
then every rank raises the same error naming the layer, the step and the origin rank. Dispatch and
combine handshakes have the same shape, so whichever call the peers are in, the failing rank's
handshake matches it. A header that differs between ranks raises on every rank, naming the field
and each rank's value: never a wrong output. Every rank receives every rank's header, so all ranks
reach the same verdict and the error paths' extra exchanges (the origin's message, the config
fields) are made by all of them.

Every wait is bounded: the collectives run with async_op=True and `wait_bounded` raises PeerTimeout
naming the layer, the step, the call and the group after `timeout_s`.

Host syncs (each stalls a GPU's launch queue): a call reads the device once (`read`): the received
headers, the counts and whatever else the caller needs on the host (the dispatch: its split sizes)
come back in one transfer, and the headers are checked before any count is used. The header goes
up from pinned memory without a sync of its own (`upload`).

Legend: N ranks in the EP group, C count columns per peer, F header fields.
"""

from __future__ import annotations

import dataclasses
import datetime
import zlib

import torch
import torch.distributed as dist

from ..errors import (
    BUFFER_OVERFLOW,
    HEADER_FIELDS,
    NONFINITE_LOGITS,
    PEER_TIMEOUT,
    BufferOverflow,
    MoERuntimeError,
    NonFiniteRouterLogits,
    PeerTimeout,
    RankFailed,
    RankMismatch,
)

FIELDS = HEADER_FIELDS  # the header's layout, one int64 each (named in errors.py)
F = len(FIELDS)
_I = {name: i for i, name in enumerate(FIELDS)}
RANK_FAILED = 1 << 8  # any other exception in a rank's forward
DTYPES = (
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
    torch.float8_e4m3fn,
    torch.int64,
    torch.int32,
    torch.uint8,
)
PHASES = ("dispatch", "combine")
TEXT_BYTES = 1024  # an error message travels in this many bytes (error path only)
_CLASSES = {
    NONFINITE_LOGITS: NonFiniteRouterLogits,
    BUFFER_OVERFLOW: BufferOverflow,
    PEER_TIMEOUT: PeerTimeout,
}


def crc32(data: bytes | str) -> int:
    return zlib.crc32(data.encode() if isinstance(data, str) else data)


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPES.index(dtype) if dtype in DTYPES else len(DTYPES) + crc32(str(dtype)) % 1000


def config_fields(cfg) -> dict[str, str]:
    """{field: repr(value)} of a MoEConfig (or any dataclass); what the config check compares."""
    return {f.name: repr(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def config_crc(cfg) -> int:
    return crc32(repr(sorted(config_fields(cfg).items())))


def tensor_crc(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes (one device->host copy: used once per layer)."""
    t = t.detach()
    if hasattr(t, "full_tensor"):  # an FSDP shard: ranks hold different pieces
        return 0
    flat = t.contiguous().view(-1)
    if flat.numel() == 0:
        return 0
    # a copy: numpy on the parameter's own storage would pin it (FSDP2 resizes that storage)
    return crc32(flat.view(torch.uint8).to("cpu", copy=True).numpy().tobytes())


@dataclasses.dataclass
class CallContext:
    """Who calls the transport, set by the layer at each forward (defaults: a bare transport).
    `config`/`config_text`: the layer's config CRC and fields; `router_crc`: the router weights'
    CRC, sent once; `device_status`: a device int tensor of error bits recorded without a host
    sync (deferred error checks), sent with the next dispatch."""

    layer: str = "transport"
    step: int = 0
    config: int = 0
    config_text: dict | None = None
    router_crc: int = 0
    device_status: torch.Tensor | None = None
    on_device_error: object = None  # callable: clears the layer's device flags once raised


class Handshake:
    """The handshake state of one transport (one per layer): the context, the call counter, the
    group and the time limit. `exchange` is the whole protocol; transports call it first thing in
    dispatch and combine (and `fail_together` instead, on a rank that has failed)."""

    def __init__(self, group, count_cols: int, timeout_s: float):
        self.group = group
        self.count_cols = count_cols
        self.timeout_s = float(timeout_s)
        self.context = CallContext()
        self.calls = 0
        self.ranks = dist.get_process_group_ranks(group)
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.device: torch.device | None = None  # where the group's tensors live (first call's)
        self.host_reads = 0  # device->host transfers so far (benchmarks report them per call)

    def _device(self) -> torch.device:
        if self.device is None:
            nccl = dist.get_backend(self.group) == "nccl"
            self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else None
        return self.device or torch.device("cpu")

    # -- what every call does
    def where(self, phase: str | None = None) -> str:
        c = self.context
        at = f", {phase} call {self.calls}" if phase in PHASES else ""
        at = ", construction" if phase == "construction" else at
        return f"MoE layer '{c.layer}', step {c.step}{at}"

    def header(self, phase: str, dtype, hidden: int, top_k: int, status: int = 0) -> torch.Tensor:
        c = self.context
        values = [0] * F
        values[_I["layer"]] = crc32(c.layer)
        values[_I["step"]] = c.step
        values[_I["call"]] = self.calls
        values[_I["phase"]] = PHASES.index(phase)
        values[_I["dtype"]] = dtype_code(dtype) if dtype is not None else -1
        values[_I["hidden"]] = hidden
        values[_I["top_k"]] = top_k
        values[_I["config"]] = c.config
        values[_I["router"]] = c.router_crc if self.calls == 0 else 0
        values[_I["status"]] = status
        values[_I["origin"]] = self.ranks[self.rank] if status else -1
        return torch.tensor(values, dtype=torch.int64)

    def exchange(
        self,
        counts_NC: torch.Tensor,
        phase: str,
        dtype: torch.dtype,
        hidden: int,
        top_k: int,
        extra: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[list[int]], list[int]]:
        """One handshake. Returns (recv_NC, recv_host, extra_host): recv_NC[src], the counts src
        sent this rank, on the device; the same as host ints; and `extra` (ints of this rank the
        caller also needs on the host, e.g. its send sizes) as a host list. Headers, counts and
        `extra` reach the host in ONE transfer; the headers are checked before anything returns:
        if any rank carried an error or the headers disagree, every rank raises."""
        self.device = counts_NC.device
        hdr_F = self.upload(self.header(phase, dtype, hidden, top_k), counts_NC.device)
        if phase == "dispatch" and self.context.device_status is not None:
            # deferred error bits travel without a host sync of their own
            status = self.context.device_status.reshape(1).to(torch.int64)
            hdr_F[_I["status"]] = status[0]
            hdr_F[_I["origin"]] = torch.where(status[0] != 0, self.ranks[self.rank], -1)
        recv_NW = self._all_to_all(hdr_F, counts_NC.to(torch.int64), phase)
        N, W = recv_NW.shape
        flat = recv_NW.reshape(-1)
        if extra is not None:
            flat = torch.cat([flat, extra.reshape(-1).to(torch.int64)])
        host = self.read(flat)
        rows_NW = [host[r * W : (r + 1) * W] for r in range(N)]
        try:
            self._check([row[:F] for row in rows_NW], phase)
        finally:
            self.calls += 1  # every rank reached the same verdict: the counters stay equal
        return recv_NW[:, F:], [row[F:] for row in rows_NW], host[N * W :]

    def agree(self) -> None:
        """The one-time check at the layer's construction: the headers alone (layer name, config
        CRC), an exchange of one shape whatever the configs, so that ranks whose count widths
        would differ (num_experts) fail on the config check instead of in a mis-sized exchange."""
        hdr_F = self.header("dispatch", None, 0, 0)
        hdr_F[_I["router"]] = 0  # weights may still be loaded: the first call compares them
        hdr_F = self.upload(hdr_F, self._device())
        send_NF = hdr_F.reshape(1, F).expand(self.size, F).contiguous()
        recv_NF = torch.empty_like(send_NF)
        work = dist.all_to_all_single(recv_NF, send_NF, group=self.group, async_op=True)
        self.wait(work, "configuration check at construction")
        self._check(self.read(recv_NF), "construction")

    def fail_together(self, exc: BaseException, phase: str = "dispatch") -> None:
        """Called on a rank whose forward raised `exc` before its next transport call: makes that
        call's handshake carrying the error, then raises what every rank raises."""
        code = next((k for k, cls in _CLASSES.items() if isinstance(exc, cls)), RANK_FAILED)
        hdr_F = self.upload(self.header(phase, None, 0, 0, status=code), self._device())
        counts = torch.zeros(self.size, self.count_cols, dtype=torch.int64, device=self._device())
        recv_NW = self._all_to_all(hdr_F, counts, phase, own_error=exc)
        try:
            self._check(self.read(recv_NW[:, :F]), phase, own_error=exc)
        finally:
            self.calls += 1
        raise AssertionError("unreachable: the handshake carried an error")  # pragma: no cover

    # -- the exchange and its verdict
    def _all_to_all(self, hdr_F, counts_NC, phase, own_error=None):
        N, C = self.size, self.count_cols
        send_NW = torch.cat([hdr_F.expand(N, F), counts_NC], 1).contiguous()
        recv_NW = torch.empty_like(send_NW)
        work = dist.all_to_all_single(recv_NW, send_NW, group=self.group, async_op=True)
        self.wait(work, f"{phase} handshake", cause=own_error)
        return recv_NW

    def read(self, t: torch.Tensor) -> list:
        """t as host ints: the call's one device->host transfer (a host sync on a GPU)."""
        self.host_reads += 1
        return t.tolist()

    @staticmethod
    def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A host-built tensor onto `device`. A plain .to(cuda) from pageable memory waits for the
        stream (torch syncs after such copies); from pinned memory the copy is stream-ordered."""
        if device.type != "cuda":
            return t.to(device)
        return t.pin_memory().to(device, non_blocking=True)

    def wait(self, work, what: str, cause: BaseException | None = None) -> None:
        wait_bounded(work, self.timeout_s, f"{self.where()}: {what}", self.ranks, cause)

    def wait_rows(self, work, what: str) -> None:
        """The rows' exchange. NCCL: a stream-ordered wait (a wait with a limit would block the
        host and end the overlap; the handshake before it, which syncs anyway, is bounded, and
        NCCL's watchdog covers the rest); other backends (gloo): bounded like the handshake."""
        if self._device().type == "cuda":
            work.wait()
        else:
            self.wait(work, what)

    def _check(self, h: list[list[int]], phase: str, own_error=None) -> None:
        """h[r]: rank r's header (F host ints). Raises on every rank alike (all hold all h)."""
        failed = [r for r in range(self.size) if h[r][_I["status"]] != 0]
        if failed:
            self._raise_failure(h, failed, own_error)
        for name in FIELDS[: _I["status"]]:
            values = [row[_I[name]] for row in h]
            if name == "router" and 0 in values:
                continue  # not a first call everywhere, or an FSDP shard: nothing to compare
            if len(set(values)) > 1:
                self._raise_mismatch(name, values, phase)

    def _raise_failure(self, h, failed, own_error) -> None:
        first = failed[0]
        code, origin = h[first][_I["status"]], h[first][_I["origin"]]
        step = h[first][_I["step"]]
        # The origin's own message travels in a second exchange (error path only).
        mine = "" if own_error is None else f"{type(own_error).__name__}: {own_error}"
        texts = self._gather_text(mine)
        text = texts[first] or _default_text(code)
        others = (
            f" (also failed: ranks {[self.ranks[r] for r in failed[1:]]})" if failed[1:] else ""
        )
        cls = _CLASSES.get(code, RankFailed)
        err = cls(
            f"MoE layer '{self.context.layer}', step {step}: the forward failed on rank {origin}"
            f"{others}; every rank of the EP group (ranks {self.ranks}) raises this. "
            f"Rank {origin}: {text}"
        )
        err.origin_rank = origin
        if code and self.context.on_device_error is not None:
            self.context.on_device_error()
        raise err from own_error

    def _raise_mismatch(self, name: str, values: list[int], phase: str) -> None:
        shown = values
        if name == "dtype":
            shown = [str(DTYPES[v]) if 0 <= v < len(DTYPES) else f"code {v}" for v in values]
        elif name == "phase":
            shown = [PHASES[v] for v in values]
        elif name == "config" and self.context.config_text is not None:
            name, shown = self._config_difference()
        elif name in ("layer", "config", "router"):
            shown = [f"{v:08x}" for v in values]
        per_rank = ", ".join(f"rank {r}: {v}" for r, v in zip(self.ranks, shown))
        what = {
            "layer": "which MoE layer is called (CRC-32 of its name)",
            "step": "the layer's step (forward calls so far)",
            "call": "the number of transport calls so far",
            "hidden": "the hidden size of the rows",
            "router": "the router weights (CRC-32)",
        }.get(name, name)
        raise RankMismatch(
            f"{self.where(phase)}: the ranks of the EP group disagree on {what}: {per_rank}. "
            "Every rank must run the same layers with the same configuration, weights and input "
            "shapes; no token has moved"
        )

    def _config_difference(self) -> tuple[str, list[str]]:
        """Names the first MoEConfig field whose value differs (all ranks gather all fields)."""
        name, values = self._field_difference(self.context.config_text, "error report")
        return (f"MoEConfig.{name}", values) if name else ("the MoEConfig", values)

    def _field_difference(self, fields: dict, what: str) -> tuple[str | None, list[str]]:
        """The first of `fields` ({name: repr of the value}) whose value differs across the
        ranks, with each rank's value (one gather of every rank's fields); None if none does."""
        import ast

        texts = self._gather_text(repr(sorted(fields.items())), 16 * TEXT_BYTES, what)
        per_rank = []
        for t in texts:
            try:
                per_rank.append(dict(ast.literal_eval(t)))
            except (ValueError, SyntaxError):
                per_rank.append({})
        for name in fields:
            values = [d.get(name, "?") for d in per_rank]
            if len(set(values)) > 1:
                return name, values
        return None, ["?"] * len(texts)

    def _gather_text(self, text: str, size: int = TEXT_BYTES, what="error report") -> list[str]:
        data = text.encode()[:size]
        buf = torch.zeros(size + 8, dtype=torch.uint8)
        buf[:8] = torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8)
        if data:
            buf[8 : 8 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        buf = buf.to(self._device())
        out = [torch.empty_like(buf) for _ in range(self.size)]
        work = dist.all_gather(out, buf, group=self.group, async_op=True)
        self.wait(work, what)
        texts = []
        for b in out:
            b = b.cpu()
            n = int(b[:8].view(torch.int64))
            texts.append(bytes(b[8 : 8 + n].tolist()).decode(errors="replace"))
        return texts


def _default_text(code: int) -> str:
    cls = _CLASSES.get(code)
    return f"{cls.__name__} (recorded on the device)" if cls else f"error bits {code:#x}"


def agree_on_options(what: str, options, group, timeout_s: float) -> None:
    """Before anything collective is sized by them (symmetric memory): the ranks of `group`
    compare every field of the `options` dataclass (one bounded all_gather of their texts); a
    difference raises RankMismatch on every rank, naming the first differing field and each
    rank's value. `what` names the options in the message (e.g. "NvshmemOptions")."""
    hs = Handshake(group, 0, timeout_s)
    name, values = hs._field_difference(config_fields(options), f"{what} check")
    if name is not None:
        shown = ", ".join(f"rank {r}: {v}" for r, v in zip(hs.ranks, values))
        raise RankMismatch(
            f"the ranks of the EP group disagree on {what}.{name}: {shown}. Every rank must "
            f"build its layers with the same {what} (they size memory that all ranks allocate "
            "together); nothing was allocated"
        )


def wait_bounded(
    work, timeout_s: float, what: str, ranks: list[int], cause: BaseException | None = None
) -> None:
    """work.wait with a limit: raises PeerTimeout naming `what` and the group. The collective may
    still be pending in the backend afterwards: the process group is not reusable, so this error
    ends the run (as the backend's own timeout would, only sooner and with a name)."""
    try:
        work.wait(timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as e:
        if isinstance(e, MoERuntimeError):
            raise
        text = str(e).lower()
        me = dist.get_rank()
        peers = [r for r in ranks if r != me]
        if "closed" in text or "reset" in text or "broken pipe" in text:
            raise RankFailed(
                f"{what}: a peer of the EP group {peers} closed its connection (this is rank "
                f"{me}): that process crashed or was killed; see its log for the cause"
            ) from e
        if "timed out" not in text and "timeout" not in text:
            raise
        raise PeerTimeout(
            f"{what}: no answer within {timeout_s:g} s from the EP group's other ranks {peers} "
            f"(this is rank {me}); a peer failed, stalled or took another path"
        ) from (cause or e)
