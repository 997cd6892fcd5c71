"""EP>1 over torch.distributed: all_to_all_single of token rows (NCCL on GPUs, gloo on CPU), each
token sent once per destination rank (dedup.py).

Dispatch: (1) pairs = distinct (token, destination rank), in (destination, token) order; (2)
exchange per rank [rows per local expert..., pairs] (one all_to_all of N*(G+1) ints); (3) read the
received headers and counts and this rank's pairs per rank on the host in one transfer (the one
sync a dispatch needs, which the nvshmem transport removes); (4) all_to_all one row per pair, and
beside it per slot the local expert (-1: not here) and the combine weight; (5) the receiver
expands each row to its local experts, expert-major (the reference order). Combine: the expert
rank sums each received row's expert outputs, weighted, in float32, sends that one row back, and
the sender sums its rows from every rank. Autograd: the backward of an
all_to_all is the reverse all_to_all; the backward of the expansion is a reduce at the expert rank.
dispatch_dtype="fp8_e4m3": rows travel as e4m3 with a float32 scale per 128 channels (fp8.py); the
gradients of the backward travel in the activation dtype.
Every dispatch and combine begins with a handshake (handshake.py): the count exchange carries a
header per peer (layer, step, call, dtype, hidden, top_k, config, error status), the combine the
same header without counts, so a failed or disagreeing rank makes every rank raise, and every wait
is bounded (PeerTimeout after peer_timeout_s). Host syncs: one per dispatch, one per combine (see
`combine` for why the combine keeps its own).
Legend: T tokens, K slots/token, N ranks in the EP group, G local experts, P pairs (rows) sent, R
rows received, M expanded rows, H hidden, C metadata columns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..routing import RoutingPlan
from .base import Transport, record_event, wait_event
from .dedup import (
    RowLinks,
    expand_links,
    gather_rows,
    plan_pairs,
    reduce_rows,
    slot_experts,
    trim_links,
)
from .fp8 import dequantize_rows, quantize_rows
from .handshake import Handshake
from .stats import CallCounters, TransportStats


def _all_to_all(out, x, out_splits, in_splits, group, waiter, what: str) -> None:
    if waiter is None:
        dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
        return
    work = dist.all_to_all_single(out, x, out_splits, in_splits, group=group, async_op=True)
    waiter.wait_rows(work, what)  # gloo: bounded, PeerTimeout naming the layer and the step


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group, waiter=None, what="rows"):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        ctx.waiter, ctx.what = waiter, what
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        _all_to_all(out, x.contiguous(), recv_splits, send_splits, group, waiter, what)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        grad_in = grad.new_empty((sum(send_splits),) + tuple(grad.shape[1:]))
        _all_to_all(
            grad_in,
            grad.contiguous(),
            send_splits,
            recv_splits,
            ctx.group,
            ctx.waiter,
            f"backward of the {ctx.what}",
        )
        return grad_in, None, None, None, None, None


def all_to_all_rows(
    x, send_splits: list[int], recv_splits: list[int], group, waiter=None, what: str = "rows"
) -> torch.Tensor:
    return _AllToAllRows.apply(x, send_splits, recv_splits, group, waiter, what)


class _Fp8AllToAllRows(torch.autograd.Function):
    """Rows out as e4m3 + scales, back in x's dtype; the gradient travels in x's dtype (straight
    through the quantisation)."""

    @staticmethod
    def forward(ctx, x_PH, send_splits, recv_splits, group, waiter=None, what="rows"):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        ctx.waiter, ctx.what = waiter, what
        q_PH, scales_PC = quantize_rows(x_PH)
        q_RH = q_PH.new_empty((sum(recv_splits), q_PH.shape[1]))
        _all_to_all(q_RH, q_PH, recv_splits, send_splits, group, waiter, what)
        scales_RC = scales_PC.new_empty((sum(recv_splits), scales_PC.shape[1]))
        _all_to_all(scales_RC, scales_PC, recv_splits, send_splits, group, waiter, what)
        return dequantize_rows(q_RH, scales_RC, x_PH.dtype)

    @staticmethod
    def backward(ctx, grad):
        return _AllToAllRows.backward(ctx, grad)


@dataclass(frozen=True)
class CollectiveHandle:
    send_links: RowLinks  # owners: this rank's tokens [T, K]; members: the pairs it sent
    recv_links: RowLinks  # owners: rows received [R, K]; members: expanded expert-major rows
    weights_RK: torch.Tensor  # combine weight of each received row's slots (0: not here)
    send_splits: list[int]
    recv_splits: list[int]


class CollectiveTransport(Transport):
    name = "collective"

    def __init__(
        self,
        num_experts: int,
        ep_group: dist.ProcessGroup,
        dispatch_dtype: str = "bf16",
        peer_timeout_s: float = 60.0,
    ):
        self.num_experts = num_experts
        self.ep_group = ep_group
        self.ep_size = dist.get_world_size(ep_group)
        self.ep_rank = dist.get_rank(ep_group)
        self.dispatch_dtype = dispatch_dtype  # "bf16" = the activation dtype, or "fp8_e4m3"
        self.stats = TransportStats()
        assert num_experts % self.ep_size == 0, "validated by MoELayer"
        # Every collective of this transport waits at most peer_timeout_s (PeerTimeout after);
        # the count exchange sends per peer [rows per local expert..., pairs]: G + 1 columns.
        self.handshake = Handshake(ep_group, self.num_local_experts + 1, peer_timeout_s)

    @property
    def context(self):
        """The caller's identity (layer name, step, config CRC) carried in each header."""
        return self.handshake.context

    def agree(self) -> None:
        """The one-time configuration check (the layer calls it at construction)."""
        self.handshake.agree()

    def fail_together(self, exc: BaseException, phase: str = "dispatch") -> None:
        """On a rank whose forward failed: the next handshake carries the error; raises on every
        rank of the EP group. (Dispatch and combine handshakes have one shape: the phase only
        labels the message.)"""
        self.handshake.fail_together(exc, phase)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    def exchange_counts(
        self,
        counts_NC: torch.Tensor,
        dtype: torch.dtype,
        hidden: int,
        top_k: int,
        extra: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[list[int]], list[int]]:
        """counts_NC[r]: the C ints this rank tells rank r -> (recv_NC[src] on the device: what src
        told this rank; the same as host ints; `extra` as host ints), all read in one transfer.
        (Dispatch sends, per rank, rows per local expert then pairs.) The dispatch handshake:
        raises on every rank if a rank failed or the ranks disagree (handshake.py)."""
        return self.handshake.exchange(counts_NC, "dispatch", dtype, hidden, top_k, extra)

    def _dispatch(self, x_TH: torch.Tensor, plan: RoutingPlan):
        N, G, me = self.ep_size, self.num_local_experts, self.ep_rank
        idx_TK = plan.expert_idx_TK
        T, K = idx_TK.shape
        dev = x_TH.device
        pp = plan_pairs(idx_TK, G, N)
        valid_S = idx_TK.reshape(-1) >= 0
        counts_E = torch.zeros(self.num_experts + 1, dtype=torch.int64, device=dev)
        counts_E.scatter_add_(
            0, torch.where(valid_S, idx_TK.reshape(-1), self.num_experts), valid_S.long()
        )
        send_NC = torch.cat([counts_E[:-1].view(N, G), pp.pairs_N.unsqueeze(1)], 1)
        # The one host sync: headers (checked first), received counts and this rank's own send
        # sizes come back together.
        recv_NC, recv_host, send_splits = self.exchange_counts(
            send_NC, x_TH.dtype, x_TH.shape[-1], K, extra=pp.pairs_N
        )
        recv_NG = recv_NC[:, :G]
        recv_splits = [row[G] for row in recv_host]
        M = sum(sum(row[:G]) for row in recv_host)
        P = sum(send_splits)

        send_links = trim_links(pp.links, P)
        token_P = torch.div(send_links.owner_B, K, rounding_mode="floor")
        dest_P = pp.dest_TK.reshape(-1).index_select(0, send_links.owner_B)
        gl_PK = slot_experts(idx_TK, pp.dest_TK, token_P, dest_P, G)
        w_PK = plan.weights_TK.float().index_select(0, token_P) * (gl_PK >= 0)
        meta_PC = torch.cat([w_PK, gl_PK.float()], 1)  # small ints are exact in float32
        rows_PH = gather_rows(x_TH, send_links)
        move = _Fp8AllToAllRows if self.dispatch_dtype == "fp8_e4m3" else _AllToAllRows
        hs = self.handshake
        received_RH = move.apply(
            rows_PH, send_splits, recv_splits, self.ep_group, hs, "dispatch rows"
        )
        meta_RC = all_to_all_rows(
            meta_PC, send_splits, recv_splits, self.ep_group, hs, "dispatch metadata"
        )

        recv_links = expand_links(meta_RC[:, K:].long(), G, M)
        tokens_MH = gather_rows(received_RH, recv_links)
        self.stats.record("dispatch", self._counters(x_TH, send_splits, meta_PC.shape[1]))
        handle = CollectiveHandle(send_links, recv_links, meta_RC[:, :K], send_splits, recv_splits)
        return tokens_MH, recv_NG.sum(0), handle

    def combine(self, y_MH, handle, *, previous_event=None, async_finish: bool = False):
        """Transport.combine, with the handshake made BEFORE the stream waits on previous_event.

        Why the combine keeps a handshake and its host sync: a rank whose experts raised has no
        rows to send and, called from the layer's except block, no handle. The one collective it
        can match whatever the peers do next is this fixed-shape header exchange (fail_together),
        and the healthy ranks must read its verdict before they post the rows: a rows exchange
        posted against a failed rank would pair with that rank's next collective (a hang, or rows
        mixed into another call). Checking later (at the next sync point) would return an output
        built without the failed rank's rows, and raise late or never (the last layer of a run).
        Why before previous_event: the header is known on the host (a rank here has no error), so
        the sync waits for earlier communication only, not for this call's expert compute; the
        experts of the next micro-batch are then issued while these still run (overlap.py)."""
        self._combine_handshake(y_MH)
        wait_event(previous_event, y_MH.device)
        out_TH = self._combine_rows(y_MH, handle)
        if not async_finish:
            return out_TH
        return out_TH, record_event(y_MH.device)

    def _combine(self, y_MH: torch.Tensor, h: CollectiveHandle) -> torch.Tensor:
        self._combine_handshake(y_MH)
        return self._combine_rows(y_MH, h)

    def _combine_handshake(self, y_MH: torch.Tensor) -> None:
        # A rank whose experts failed carries the error in this exchange instead (fail_together).
        no_counts = torch.zeros(
            self.ep_size, self.handshake.count_cols, dtype=torch.int64, device=y_MH.device
        )
        self.handshake.exchange(no_counts, "combine", y_MH.dtype, y_MH.shape[-1], 0)

    def _combine_rows(self, y_MH: torch.Tensor, h: CollectiveHandle) -> torch.Tensor:
        partial_RH = reduce_rows(y_MH[: h.recv_links.num_members], h.recv_links, h.weights_RK)
        returned_PH = all_to_all_rows(
            partial_RH, h.recv_splits, h.send_splits, self.ep_group, self.handshake, "combine rows"
        )
        self.stats.record("combine", self._counters(y_MH, h.recv_splits, 0, fp8=False))
        return reduce_rows(returned_PH, h.send_links)

    def _counters(self, rows, splits: list[int], meta_cols: int, fp8=None) -> CallCounters:
        fp8 = self.dispatch_dtype == "fp8_e4m3" if fp8 is None else fp8
        H = rows.shape[1]
        row_bytes = H + 4 * (H // 128) if fp8 else H * rows.element_size()
        n = sum(splits)
        return CallCounters(
            rows=n,
            peer_rows=n - splits[self.ep_rank],
            payload_bytes=n * row_bytes,
            meta_bytes=n * meta_cols * 4,
        )
