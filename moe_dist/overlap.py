"""Overlap of communication with compute: the shared experts on a side stream, and micro-batches:
several layer calls in flight at once through MoELayer's split call (start / run_experts / finish),
which is how the LM overlaps one micro-batch's communication with the other's attention and
experts. Results equal the plain layer up to fp reordering. The phases of one token set in flight
(`InFlight`: dispatch_async, compute_experts, combine_async, landed) serve the split call and the
plain forward alike. (A chunked pipeline within one call, MoEConfig.num_chunks, was removed in
0.2.0: it never beat one chunk, benchmarks/results/overlap_*.json.)

Legend: T tokens on this rank, H hidden, K slots/token, E experts (global), M rows received by local
experts, G local experts.

Streams on CUDA (a StreamSet, owned by the layer; see StreamSet below):
  compute  the caller's current stream: routing, experts (grouped GEMM), the final sum.
  comm     the transport calls of split calls (dispatch and combine), in the order the host issues
           them, which is the same on every rank: one stream keeps collective calls (NCCL) and
           nvshmem epochs/buffer parities in the same order on every rank, across layers too.
  side     the shared experts: they need only x, so they run while tokens are routed and travel.
A plain forward (MoELayer.forward) makes its transport calls on the current stream: with one call
in flight nothing could run beside them but the shared experts, and those have the side stream.

What waits on what (forward), through the transport's events (transport/base.py):
  dispatch (comm)    previous_event = "x and the plan are ready", recorded on compute after routing;
  experts (compute)  waits the event the dispatch returned (async_finish=True);
  combine (comm)     previous_event = the event recorded on compute after the experts;
  side               waits an event recorded on compute at the layer's entry, nothing else;
  compute            waits the combine's event, and side's before adding the shared output.
Backward: autograd runs each node's backward on the stream its forward ran on and makes a consumer
stream wait for the producer's (the engine records the producer stream's event and calls
record_stream on gradients it hands across streams). The engine runs the backward nodes of one
device in decreasing creation order, so the transport backward calls run on comm in the reverse of
the forward order, the same on every rank, while the experts' backward runs on compute and the
shared experts' backward on side: the same overlap.
Caching allocator: every tensor made on one stream and used on another is `record_stream`ed to the
user (inputs and plan -> comm, received tokens -> compute, expert outputs -> comm, combined rows ->
compute, x -> side, shared output -> compute), so its memory is not reused before that use is done.

Two micro-batches (moe_dist/lm/model.py, overlap_microbatches=2): each block issues, on the host,

  attn(A); start(A); attn(B); start(B); run_experts(A); run_experts(B); finish(A); finish(B)

  start(X)        compute: routing of X, then an event "X routed"; comm: dispatch_X waits for that
                  event (previous_event) and returns its own (async_finish); start returns at once
                  (the collective transport still syncs the host on its split sizes; nvshmem does
                  not). The shared experts of X are only scheduled: their input event is recorded.
  run_experts(X)  compute waits dispatch_X's event, runs X's experts, records "X computed"; comm:
                  combine_X waits for it.
  finish(X)       side waits "X's input ready", runs X's shared experts; compute waits combine_X's
                  event and side's, then adds the two.
So the comm stream runs d_A, d_B, c_A, c_B (in that order on every rank, each call's handshake
naming its call's step) while compute runs attn(B) under d_A, experts(A) under d_B and experts(B)
under c_A; only c_B is waited on before the next block's attention. The caller must make the same
calls in the same order on every rank (transport calls are collective). Backward: as above, each
node on its forward's stream, transport calls in the reverse creation order (c_B', c_A', d_B', d_A'
per block), the same on every rank.

CPU (gloo, or no CUDA): the same calls in the same order, without streams; that is what the CPU
tests exercise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .routing import RoutingPlan
from .transport.base import record_event


class StreamSet:
    """The side streams of one runtime, per (device, role), made on first use: "comm" (transport
    calls, high priority: short kernels on the other micro-batch's critical path) and "side" (shared
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


# -- one token set in flight: the phases of every pass
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class InFlight:
    """One token set between its dispatch and its combine (a layer call between MoELayer.start and
    finish, or one routed pass): what each phase leaves for the next, with the event
    that says it is ready (None off CUDA or when run on the current stream). Each phase drops
    what it consumed, so memory is freed as early as autograd allows."""

    handle: Any
    tokens_MH: torch.Tensor | None
    counts_G: torch.Tensor | None
    dispatched: Any = None  # event: tokens_MH and counts_G landed (comm)
    y_MH: torch.Tensor | None = None
    computed: Any = None  # event: y_MH computed (compute)
    out_TH: torch.Tensor | None = None
    combined: Any = None  # event: out_TH landed (comm)


def dispatch_async(
    transport, x_TH: torch.Tensor, plan: RoutingPlan, streams: StreamSet | None, ready=None
) -> InFlight:
    """transport.dispatch of x_TH. On CUDA with `streams`: issued on streams.comm after `ready`
    (default: an event recorded now on the current stream, i.e. after routing); returns at once.
    Otherwise on the current stream, in host order."""
    if streams is None or not x_TH.is_cuda:
        tokens_MH, counts_G, handle = transport.dispatch(x_TH, plan)
        return InFlight(handle, tokens_MH, counts_G)
    ready = ready if ready is not None else record_event(x_TH.device)
    comm = streams.comm(x_TH.device)
    for t in (x_TH, plan.expert_idx_TK, plan.weights_TK, plan.tokens_per_expert_E):
        _use(t, comm)
    with torch.cuda.stream(comm):
        tokens_MH, counts_G, handle, event = transport.dispatch(
            x_TH, plan, previous_event=ready, async_finish=True
        )
    return InFlight(handle, tokens_MH, counts_G, event)


def compute_experts(flight: InFlight, experts) -> None:
    """experts(tokens_MH, counts_G) on the current (compute) stream, after the dispatch landed."""
    if flight.dispatched is not None:
        compute = torch.cuda.current_stream(flight.tokens_MH.device)
        compute.wait_event(flight.dispatched)
        _use(flight.tokens_MH, compute)
        _use(flight.counts_G, compute)
    flight.y_MH = experts(flight.tokens_MH, flight.counts_G)
    if flight.dispatched is not None:
        flight.computed = record_event(flight.y_MH.device)
    flight.tokens_MH = None  # autograd keeps what backward needs; record_stream guards the rest


def combine_async(transport, flight: InFlight, streams: StreamSet | None) -> None:
    """transport.combine of the expert outputs: on streams.comm after the experts' event when the
    dispatch ran there, else on the current stream."""
    if flight.computed is None:
        flight.out_TH = transport.combine(flight.y_MH, flight.handle)
    else:
        comm = streams.comm(flight.y_MH.device)
        _use(flight.y_MH, comm)
        with torch.cuda.stream(comm):
            flight.out_TH, flight.combined = transport.combine(
                flight.y_MH, flight.handle, previous_event=flight.computed, async_finish=True
            )
    flight.y_MH = flight.handle = None


def landed(flight: InFlight) -> torch.Tensor:
    """The combined rows, usable on the current stream (which waits for the combine)."""
    out_TH = flight.out_TH
    if flight.combined is not None:
        compute = torch.cuda.current_stream(out_TH.device)
        compute.wait_event(flight.combined)
        _use(out_TH, compute)
    flight.out_TH = None
    return out_TH


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
