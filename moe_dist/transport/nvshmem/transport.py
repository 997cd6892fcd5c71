"""transport="nvshmem": device-initiated, one-sided all-to-all with no host synchronisation.

dispatch (one epoch):  counts -> every peer, flag | wait all count flags | positions from the count
                       matrix | rows -> final place at each peer, flag | wait all row flags | copy peer
                       rows out of the symmetric staging
combine  (one epoch):  expert rows -> owner's slot, flag | wait all | copy out | weighted sum
backward: the gradient of dispatch travels like a combine (rows back to their slot) and the gradient
of combine like a dispatch (to the same positions; no count exchange needed, the handle has them).
Every peer signals every peer each epoch, rows or not, so nobody waits for a message that never comes;
waits are bounded and record a PEER_TIMEOUT error instead of hanging. Errors are raised by
`check_errors()` (the layer's; synchronises), so the forward and backward themselves never sync.
Legend: T tokens, K slots/token, S = T*K, N PEs, E experts, G = E/N, C receive capacity rows, H hidden.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ...errors import BUFFER_OVERFLOW, BufferOverflow, DeviceErrorFlags
from ...parallel.groups import all_reduce_sum
from ...routing import RoutingPlan
from ..permute import SlotOrder, slot_weight_grad, sort_slots_by_expert, sum_weighted_slots
from . import kernels as K_
from .layout import send_positions, sources_of_rows
from .runtime import ensure_initialized, workspace

COUNT, FORWARD, RETURN = 0, 1, 2  # flag channels


@dataclass(frozen=True)
class NvshmemHandle:
    slots: SlotOrder
    weights_TK: torch.Tensor
    dest_rank_S: torch.Tensor  # per sorted slot: receiving PE index in the EP group, -1 = not sent
    dest_pos_S: torch.Tensor  # per sorted slot: row at the receiver
    rank_of_slot_S: torch.Tensor  # per slot id (unsorted): same as dest_rank_S
    src_of_row_C: torch.Tensor  # per received row: source PE index, -1 past the end
    slot_of_row_C: torch.Tensor  # per received row: the slot id at its source
    num_tokens: int
    top_k: int


class NvshmemTransport:
    name = "nvshmem"

    def __init__(self, num_experts: int, groups, device: torch.device, cfg):
        self.num_experts = num_experts
        if groups is None:
            self.pes = [dist.get_rank() if dist.is_initialized() else 0]
        else:
            self.pes = groups.ep_ranks
        self.load_group = None if groups is None else groups.dp_group
        self.ep_size = len(self.pes)
        me_global = dist.get_rank() if dist.is_initialized() else 0
        self.ep_rank = self.pes.index(me_global)
        self.device = device
        self.max_tokens = cfg.max_tokens_per_rank
        self.top_k = cfg.top_k
        self.capacity = cfg.nvshmem_recv_capacity or cfg.max_tokens_per_rank * cfg.top_k * self.ep_size
        self.timeout_ns = int(cfg.peer_timeout_s * 1e9)
        self.error_flags = DeviceErrorFlags("moe", device)
        self.calls = 0
        if not dist.is_initialized() and self.ep_size == 1:
            from ...parallel import init_distributed
            init_distributed()  # NVSHMEM's uid bootstrap rides on a (world of one) process group
        ensure_initialized(device)
        self._ws = None

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    def workspace(self, dtype: torch.dtype):
        if self._ws is None:
            self._ws = workspace(self.pes, self.ep_rank, self._hidden, self.num_experts, self.max_tokens,
                                 self.top_k, self.capacity, dtype)
        return self._ws

    def memory_bytes_per_pe(self) -> int:
        """Symmetric memory this transport's workspace takes on every PE (see SymmetricWorkspace)."""
        return 0 if self._ws is None else self._ws.bytes_per_pe()

    # -- public interface ----------------------------------------------------------------------------
    def dispatch(self, x_TH: torch.Tensor, plan: RoutingPlan):
        T, K = plan.expert_idx_TK.shape
        if T > self.max_tokens:
            raise BufferOverflow(f"MoE layer '{self.error_flags.layer_name}': {T} tokens on this rank exceed "
                                 f"max_tokens_per_rank={self.max_tokens} that sized the nvshmem buffers")
        if K != self.top_k:
            raise ValueError(f"plan has {K} slots per token, transport was sized for top_k={self.top_k}")
        self._hidden = x_TH.shape[1]
        tokens, counts_G, handle_box = _Dispatch.apply(x_TH, self, plan)
        return tokens, counts_G, handle_box.handle

    def combine(self, y_CH: torch.Tensor, handle: NvshmemHandle) -> torch.Tensor:
        return _Combine.apply(y_CH, handle.weights_TK, self, handle)

    def global_load(self, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(tokens_per_expert_E.clone(), self.load_group)

    # -- the two directions rows travel ---------------------------------------------------------------
    def new_call(self) -> int:
        """One epoch per dispatch, combine or backward step; returns the buffer parity."""
        self.calls += 1
        return self._ws.next_epoch()

    def _signal_and_wait(self, channel: int, parity: int) -> None:
        ws = self._ws
        K_.signal_peers_kernel[(ws.n,)](ws.flags_at[parity, channel], ws.me, ws.epoch_dev)
        K_.wait_flags_kernel[(1,)](ws.flags[parity, channel], ws.n, ws.epoch_dev, self.timeout_ns,
                                   self.error_flags.words, self.calls)

    def exchange_counts(self, counts_E: torch.Tensor, p: int) -> torch.Tensor:
        ws = self._ws
        n, E = ws.n, counts_E.numel()
        peers = torch.arange(n, device=counts_E.device)
        me = torch.full((n,), ws.me, device=counts_E.device, dtype=torch.int64)
        zero = torch.zeros(n, device=counts_E.device, dtype=torch.int64)
        K_.push_rows_kernel[K_.row_grid(n, E, K_.pick_block(E))](
            counts_E.view(1, E), zero, peers, me, ws.counts_at[p], ws.counts[p], zero, zero, zero, ws.me, E,
            HAS_META=False, BLOCK=K_.pick_block(E))
        self._signal_and_wait(COUNT, p)
        return ws.counts[p].clone()  # parity p is rewritten two calls from now

    def push_forward(self, p: int, rows: torch.Tensor, src_row: torch.Tensor, dest_rank: torch.Tensor,
                     dest_pos: torch.Tensor, src_of_row_C: torch.Tensor, meta: torch.Tensor | None = None):
        """Rows to their receivers' final positions. Returns (out_CH, out_meta_C or None)."""
        ws = self._ws
        H = rows.shape[1]
        block = K_.pick_block(H)
        out = torch.empty(ws.capacity, H, device=rows.device, dtype=rows.dtype)
        out_meta = torch.empty(ws.capacity, device=rows.device, dtype=torch.int64) if meta is not None else None
        has_meta = meta is not None
        dummy = dest_rank
        if src_row.numel():
            K_.push_rows_kernel[K_.row_grid(src_row.numel(), H, block)](
                rows, src_row, dest_rank, dest_pos, ws.fwd_rows_at[p], out,
                meta if has_meta else dummy, ws.fwd_meta_at[p], out_meta if has_meta else dummy, ws.me, H,
                HAS_META=has_meta, BLOCK=block)
        self._signal_and_wait(FORWARD, p)
        K_.copy_from_peers_kernel[K_.row_grid(ws.capacity, H, block)](
            ws.fwd_rows[p], out, src_of_row_C, ws.fwd_meta[p], out_meta if has_meta else dummy, ws.me, H,
            HAS_META=has_meta, BLOCK=block)
        return out, out_meta

    def push_return(self, rows_CH: torch.Tensor, src_of_row_C: torch.Tensor, slot_of_row_C: torch.Tensor,
                    rank_of_slot_S: torch.Tensor, num_slots: int) -> torch.Tensor:
        """Row r goes back to PE src_of_row[r], into slot slot_of_row[r]. Returns [S, H] in slot order
        (rows of slots that were never sent are left unwritten: callers mask them)."""
        ws = self._ws
        p = self.new_call()
        H = rows_CH.shape[1]
        block = K_.pick_block(H)
        out = torch.empty(num_slots, H, device=rows_CH.device, dtype=rows_CH.dtype)
        rows_idx = torch.arange(ws.capacity, device=rows_CH.device)
        K_.push_rows_kernel[K_.row_grid(ws.capacity, H, block)](
            rows_CH, rows_idx, src_of_row_C, slot_of_row_C, ws.ret_rows_at[p], out,
            rows_idx, rows_idx, rows_idx, ws.me, H, HAS_META=False, BLOCK=block)
        self._signal_and_wait(RETURN, p)
        if num_slots:
            K_.copy_from_peers_kernel[K_.row_grid(num_slots, H, block)](
                ws.ret_rows[p], out, rank_of_slot_S, rows_idx, rows_idx, ws.me, H, HAS_META=False, BLOCK=block)
        return out


class _HandleBox:
    """Carries the handle out of an autograd Function (Functions return tensors only)."""
    handle: NvshmemHandle = None


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TH, tr: NvshmemTransport, plan: RoutingPlan):
        T, K = plan.expert_idx_TK.shape
        E = tr.num_experts
        ws = tr.workspace(x_TH.dtype)
        slots = sort_slots_by_expert(plan.expert_idx_TK, E)
        p = tr.new_call()  # the count exchange and the rows share this call's epoch (separate flags)
        counts_NE = tr.exchange_counts(slots.counts_E, p)
        sorted_e_S = torch.where(plan.expert_idx_TK.reshape(-1) >= 0, plan.expert_idx_TK.reshape(-1), E)[slots.order_S]
        dest_rank_S, dest_pos_S, overflow_R = send_positions(counts_NE, ws.me, sorted_e_S, ws.capacity)
        tr.error_flags.record(BUFFER_OVERFLOW, overflow_R.any(), tr.calls)
        src_of_row_C = sources_of_rows(counts_NE, ws.me, ws.capacity)
        slot_ids_S = slots.order_S  # sorted position j carries slot order_S[j]
        tokens_CH, slot_of_row_C = tr.push_forward(p, x_TH, slot_ids_S // K, dest_rank_S, dest_pos_S,
                                                   src_of_row_C, meta=slot_ids_S)
        slot_of_row_C = torch.where(src_of_row_C >= 0, slot_of_row_C, 0)
        rank_of_slot_S = torch.empty_like(dest_rank_S)
        rank_of_slot_S[slots.order_S] = dest_rank_S
        G = tr.num_local_experts
        counts_G = torch.where(overflow_R[ws.me], 0, counts_NE[:, ws.me * G:(ws.me + 1) * G].sum(0))
        box = _HandleBox()
        box.handle = NvshmemHandle(slots, plan.weights_TK, dest_rank_S, dest_pos_S, rank_of_slot_S,
                                   src_of_row_C, slot_of_row_C, T, K)
        ctx.tr, ctx.handle = tr, box.handle
        ctx.mark_non_differentiable(counts_G)
        return tokens_CH, counts_G, box

    @staticmethod
    def backward(ctx, grad_tokens_CH, _grad_counts, _grad_box):
        h, tr = ctx.handle, ctx.tr
        grad_S = tr.push_return(grad_tokens_CH.contiguous(), h.src_of_row_C, h.slot_of_row_C, h.rank_of_slot_S,
                                h.num_tokens * h.top_k)
        sent = (h.rank_of_slot_S >= 0).view(h.num_tokens, h.top_k, 1)
        grad_TKH = torch.where(sent, grad_S.view(h.num_tokens, h.top_k, -1), grad_S.new_zeros(()))
        return grad_TKH.sum(1), None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_CH, weights_TK, tr: NvshmemTransport, h: NvshmemHandle):
        T, K = h.num_tokens, h.top_k
        y_S = tr.push_return(y_CH.contiguous(), h.src_of_row_C, h.slot_of_row_C, h.rank_of_slot_S, T * K)
        sent_TK = (h.rank_of_slot_S >= 0).view(T, K)
        y_TKH = torch.where(sent_TK.unsqueeze(-1), y_S.view(T, K, -1), y_S.new_zeros(()))
        ctx.save_for_backward(y_TKH, weights_TK, sent_TK)
        ctx.tr, ctx.h = tr, h
        return sum_weighted_slots(y_TKH, weights_TK)

    @staticmethod
    def backward(ctx, grad_TH):
        y_TKH, weights_TK, sent_TK = ctx.saved_tensors
        tr, h = ctx.tr, ctx.h
        grad_TH = grad_TH.contiguous()
        grad_w = slot_weight_grad(y_TKH, grad_TH).to(weights_TK.dtype) * sent_TK
        rows_SH = (weights_TK.to(grad_TH.dtype).unsqueeze(-1) * grad_TH.unsqueeze(1)).reshape(-1, grad_TH.shape[1])
        grad_y, _ = tr.push_forward(tr.new_call(), rows_SH, h.slots.order_S, h.dest_rank_S, h.dest_pos_S, h.src_of_row_C)
        return grad_y, grad_w, None, None
