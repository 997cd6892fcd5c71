"""The one interface every transport implements (subclass Transport, write _dispatch/_combine).

    tokens_MH, counts_G, handle = transport.dispatch(x_TH, plan)
    out_TH = transport.combine(y_MH, handle)

`tokens_MH` holds the rows this rank's local experts must process, grouped by local expert
(`counts_G` rows each, on the device); rows past sum(counts_G) may exist (shape-static transports)
and are ignored. `handle` is immutable and carries everything combine needs: transports keep no
per-call state, so several dispatches may be in flight at once (micro-batches).

Events (DeepEP's shape). A transport runs its work on the caller's *current* stream; to overlap, the
caller makes a communication stream current (overlap.py does). Both calls take
`previous_event`: the current stream waits on it before the call's first kernel (e.g. "x is ready"
recorded on the compute stream). With `async_finish=True` they return one more value, the event
recorded on the current stream after the call's last kernel: wait on it (from the stream that uses
the result) before reading the result:

    tokens_MH, counts_G, handle, event = transport.dispatch(x_TH, plan, async_finish=True)
    out_TH, event = transport.combine(y_MH, handle, previous_event=ev, async_finish=True)

Like torch.distributed's `async_op`, the flag adds the event to what is returned; off CUDA the event
is None (everything runs in host order). Collective transports may still sync the host inside a call
(the count exchange); the nvshmem transport never does.
Legend: T tokens on this rank, H hidden, M received rows, G local experts.
"""

from __future__ import annotations

from typing import Any

import torch

from ..routing import RoutingPlan


def wait_event(event, device: torch.device) -> None:
    """The current stream of `device` waits on `event` (None, or off CUDA: nothing to wait on)."""
    if event is not None and device.type == "cuda":
        torch.cuda.current_stream(device).wait_event(event)


def record_event(device: torch.device):
    """An event recorded now on the current stream of `device`; None off CUDA."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


class Transport:
    name: str
    ep_size: int
    ep_rank: int
    num_experts: int

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    def dispatch(
        self,
        x_TH: torch.Tensor,
        plan: RoutingPlan,
        *,
        previous_event=None,
        async_finish: bool = False,
    ) -> tuple:
        """(tokens_MH, counts_G, handle), plus the finish event with async_finish=True."""
        wait_event(previous_event, x_TH.device)
        tokens_MH, counts_G, handle = self._dispatch(x_TH, plan)
        if not async_finish:
            return tokens_MH, counts_G, handle
        return tokens_MH, counts_G, handle, record_event(x_TH.device)

    def combine(
        self, y_MH: torch.Tensor, handle: Any, *, previous_event=None, async_finish: bool = False
    ):
        """out_TH, or (out_TH, finish event) with async_finish=True."""
        wait_event(previous_event, y_MH.device)
        out_TH = self._combine(y_MH, handle)
        if not async_finish:
            return out_TH
        return out_TH, record_event(y_MH.device)

    def _dispatch(
        self, x_TH: torch.Tensor, plan: RoutingPlan
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        raise NotImplementedError

    def _combine(self, y_MH: torch.Tensor, handle: Any) -> torch.Tensor:
        raise NotImplementedError
