"""Overlap of communication with expert compute: a chunked pipeline of dispatch / experts / combine,
and the shared experts on a side stream. Results equal the unchunked layer up to fp reordering.

Legend: T tokens on this rank, H hidden, K slots/token, E experts (global), M rows received by local
experts, G local experts, C chunks.

Streams on CUDA (a StreamSet, owned by the layer; see StreamSet below):
  compute  the caller's current stream: routing, experts (grouped GEMM), the final concatenation.
  comm     every transport call (dispatch and combine of every chunk), in one fixed order on every
           rank: d0, d1, c0, d2, c1, ..., c(C-1) (`issue_order`). One stream keeps collective calls
           (NCCL) and nvshmem epochs/buffer parities in the same order on every rank, across layers
           too.
  side     the shared experts: they need only x, so they run while tokens are routed and travel.

What waits on what (forward), through the transport's events (transport/base.py):
  dispatch_0 (comm)  previous_event = "x and the plan are ready", recorded on compute at entry;
  experts_i (compute) waits the event dispatch_i returned (async_finish=True);
  combine_i (comm)   previous_event = the event recorded on compute after experts_i;
  side               waits an event recorded on compute at the layer's entry, nothing else;
  compute            waits the last combine's event, and side's before adding the shared output.
So while chunk i's experts run, the dispatch of chunk i+1 and the combine of chunk i-1 are in
flight.
Backward: autograd runs each node's backward on the stream its forward ran on and makes a consumer
stream wait for the producer's (the engine records the producer stream's event and calls
record_stream on gradients it hands across streams). The engine runs the backward nodes of one
device in decreasing creation order, so the transport backward calls run on comm in the reverse of
the forward order, the same on every rank: c(C-1)', ..., d2', c0', d1', d0' (' = backward), while
the experts' backward runs on compute and the shared experts' backward on side: the same overlap.
Caching allocator: every tensor made on one stream and used on another is `record_stream`ed to the
user (inputs and plan -> comm, received tokens -> compute, expert outputs -> comm, combined rows ->
compute, x -> side, shared output -> compute), so its memory is not reused before that use is done.

CPU (gloo, or no CUDA): the same chunk loop in the same order, without streams; that is what the CPU
tests exercise. With observers attached (telemetry, calibration) the layer runs unchunked: observers
expect one call per forward with rows grouped by expert over the whole batch.

Why num_chunks defaults to 1: each chunk pays the transport's fixed costs (count exchange, kernel
launches, and for collective transports a host sync), so chunking pays only when both communication
and expert compute are long (many tokens, EP > 1); benchmarks/overlap.py measures where it does.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .routing import RoutingPlan
from .transport.base import record_event


class StreamSet:
    """The side streams of one runtime, per (device, role), made on first use: "comm" (transport
    calls, high priority: short kernels on the next chunk's critical path) and "side" (shared
    experts). A layer owns one (MoELayer(streams=...) shares one between layers: then transport
    calls of different layers are also issued in one order on one stream, as the nvshmem workspace,
    its epochs and parities, are shared by layers of one shape). Copies share the streams."""

    ROLES = ("comm", "side")

    def __init__(self):
        self._streams: dict[tuple[int, str], "torch.cuda.Stream"] = {}

    def get(self, device: torch.device, role: str) -> "torch.cuda.Stream":
        if role not in self.ROLES:
            raise ValueError(f"role must be one of {self.ROLES}, got {role!r}")
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (index, role)
        if key not in self._streams:
            priority = -1 if role == "comm" else 0
            self._streams[key] = torch.cuda.Stream(device=index, priority=priority)
        return self._streams[key]

    def comm(self, device: torch.device) -> "torch.cuda.Stream":
        return self.get(device, "comm")

    def side(self, device: torch.device) -> "torch.cuda.Stream":
        return self.get(device, "side")

    def __deepcopy__(self, memo) -> "StreamSet":
        return self  # streams are not model state: a deep-copied model shares them


def _use(t, stream) -> None:
    """Tells the caching allocator that `stream` uses t (no-op off CUDA)."""
    if stream is not None and isinstance(t, torch.Tensor) and t.is_cuda:
        t.record_stream(stream)


# -- chunking (pure, tested on CPU)
# ----------------------------------------------------------------------
def issue_order(num_chunks: int) -> list[tuple[str, int]]:
    """The order in which the host issues the phases of C chunks: experts_i is issued before
    dispatch_(i+1), so a dispatch that syncs the host (collective transport) finds the GPU busy.
    Transport calls, in this order, are d0, d1, c0, d2, c1, ..., c(C-1) on every rank."""
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    order = [("dispatch", 0)]
    for i in range(num_chunks):
        order.append(("experts", i))
        if i + 1 < num_chunks:
            order.append(("dispatch", i + 1))
        order.append(("combine", i))
    return order


def _slots_per_expert(expert_idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    # scatter_add into an overflow bin for unused slots (-1): no host sync, unlike bincount.
    key_S = expert_idx_TK.reshape(-1)
    key_S = torch.where(key_S >= 0, key_S, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=key_S.device)
    return counts.scatter_add_(0, key_S, torch.ones_like(key_S))[:num_experts]


def split_plan(plan: RoutingPlan, num_chunks: int) -> list[RoutingPlan]:
    """The plan of C contiguous token chunks (torch.tensor_split: uneven T, T < C and T == 0 all
    give exactly C chunks, some maybe empty). A chunk plan carries its own slot counts; its aux loss
    and dropped count are zero: those belong to the whole batch and the layer returns the full
    plan's."""
    E = plan.tokens_per_expert_E.numel()
    zero_loss = torch.zeros((), dtype=plan.aux_loss.dtype, device=plan.aux_loss.device)
    zero_dropped = torch.zeros(
        (), dtype=plan.dropped_tokens.dtype, device=plan.dropped_tokens.device
    )
    return [
        dataclasses.replace(
            plan,
            expert_idx_TK=idx_TK,
            weights_TK=w_TK,
            tokens_per_expert_E=_slots_per_expert(idx_TK, E),
            aux_loss=zero_loss,
            dropped_tokens=zero_dropped,
        )
        for idx_TK, w_TK in zip(
            torch.tensor_split(plan.expert_idx_TK, num_chunks),
            torch.tensor_split(plan.weights_TK, num_chunks),
        )
    ]


# -- the pipeline
# ----------------------------------------------------------------------------------------
def pipelined_moe(
    transport,
    experts,
    x_TH: torch.Tensor,
    plan: RoutingPlan,
    num_chunks: int,
    streams: StreamSet | None = None,
) -> torch.Tensor:
    """Routed experts over `num_chunks` token chunks: dispatch / experts / combine of neighbouring
    chunks overlapped on CUDA (transport calls on streams.comm, experts on the caller's stream).
    Returns out_TH (without shared experts). Every rank must call it with the same num_chunks
    (transport calls are collective). `streams`: the layer's StreamSet (None: a new one)."""
    C = num_chunks
    tr = transport
    x_chunks = torch.tensor_split(x_TH, C)
    plans = split_plan(plan, C)
    tokens, counts, handles, ys, outs = [None] * C, [None] * C, [None] * C, [None] * C, [None] * C

    if not x_TH.is_cuda:
        for op, i in issue_order(C):
            if op == "dispatch":
                tokens[i], counts[i], handles[i] = tr.dispatch(x_chunks[i], plans[i])
            elif op == "experts":
                ys[i] = experts(tokens[i], counts[i])
                tokens[i] = None
            else:
                outs[i] = tr.combine(ys[i], handles[i])
                ys[i] = handles[i] = None
        return torch.cat(outs)

    streams = streams if streams is not None else StreamSet()
    compute, comm = torch.cuda.current_stream(x_TH.device), streams.comm(x_TH.device)
    ready = record_event(x_TH.device)  # x and the plan (routing ran on compute)
    for t in (x_TH, plan.expert_idx_TK, plan.weights_TK, *(p.tokens_per_expert_E for p in plans)):
        _use(t, comm)
    dispatched, computed, combined = [None] * C, [None] * C, None  # events
    for op, i in issue_order(C):
        if op == "dispatch":
            with torch.cuda.stream(comm):
                tokens[i], counts[i], handles[i], dispatched[i] = tr.dispatch(
                    x_chunks[i],
                    plans[i],
                    previous_event=ready if i == 0 else None,
                    async_finish=True,
                )
        elif op == "experts":
            compute.wait_event(dispatched[i])
            _use(tokens[i], compute)
            _use(counts[i], compute)
            ys[i] = experts(tokens[i], counts[i])
            computed[i] = record_event(x_TH.device)
            tokens[i] = None  # autograd keeps what backward needs; record_stream guards the rest
        else:
            with torch.cuda.stream(comm):
                _use(ys[i], comm)
                outs[i], combined = tr.combine(
                    ys[i], handles[i], previous_event=computed[i], async_finish=True
                )
            ys[i] = handles[i] = None
    compute.wait_event(combined)  # comm runs in order: after the last combine, every chunk is ready
    for out in outs:
        _use(out, compute)
    return torch.cat(outs)


# -- shared experts on a side stream
# ----------------------------------------------------------------------
class SharedExperts:
    """The shared-expert output of one forward, added to the routed output by `add_to`.

    On CUDA (overlap=True) the event `x_ready` is recorded on compute when the forward starts, and
    `add_to` launches the shared experts on streams.side waiting only for that event: on the GPU
    they start as soon as x exists and run beside routing, dispatch, experts and combine. They are
    launched last on the host on purpose: autograd runs backward nodes newest first, so their
    backward is issued first and runs on side during the whole routed backward (launched first, it
    would be issued last and overlap only the tail). Off CUDA, or with overlap off, they are
    computed inside `add_to` on the current stream, exactly as the plain layer does."""

    def __init__(
        self,
        shared: nn.Module | None,
        x_TH: torch.Tensor,
        streams: StreamSet | None,
        overlap: bool = True,
    ):
        self.shared, self.x_TH, self.streams, self.x_ready = shared, x_TH, streams, None
        if shared is not None and overlap and streams is not None and x_TH.is_cuda:
            self.x_ready = record_event(x_TH.device)

    def add_to(self, out_TH: torch.Tensor) -> torch.Tensor:
        if self.shared is None:
            return out_TH
        if self.x_ready is None:
            return out_TH + self.shared(self.x_TH)
        side = self.streams.side(out_TH.device)
        side.wait_event(self.x_ready)
        _use(self.x_TH, side)
        with torch.cuda.stream(side):
            y_TH = self.shared(self.x_TH)
            done = record_event(out_TH.device)
        torch.cuda.current_stream(out_TH.device).wait_event(done)
        _use(y_TH, torch.cuda.current_stream(out_TH.device))
        return out_TH + y_TH
