"""transport="nvshmem": device-initiated, one-sided all-to-all with no host synchronisation.

dispatch (one epoch):  per-expert counts and each slot's rank within its expert -> counts to every
                       peer, flag | wait all count flags | layout from the count matrix | rows ->
                       final place at each peer, flag | wait all row flags | copy peer rows out of
                       the symmetric staging
combine  (one epoch):  expert rows -> owner's slot, flag | wait all | weighted sum, reading own rows
                       in place and peers' rows from the staging
backward: the gradient of dispatch travels like a combine (rows back to their slot) and the gradient
of combine like a dispatch (to the same positions; no count exchange needed, the handle has them).
Every peer signals every peer each epoch, rows or not, so nobody waits for a message that never
comes; waits are bounded and record a PEER_TIMEOUT error instead of hanging. Errors are raised by
`check_errors()` (the layer's; synchronises), so the forward and backward themselves never sync.
Legend: T tokens, K slots/token, S = T*K, N PEs, E experts, G = E/N, C receive capacity rows, H
hidden."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

import triton

from ...errors import (
    BufferOverflow,
    DeviceErrorFlags,
    MoERuntimeError,
    PeerTimeout,
    RankFailed,
    RankMismatch,
)
from .. import handshake as HS
from ...routing import RoutingPlan
from ..base import Transport
from ..options import NvshmemOptions
from ..permute import slot_weight_grad
from ..fp8 import quantize_rows
from . import dedup_kernels as D_
from . import kernels as K_
from . import put_kernels as P_
from .device_lib import extern_libs, install_module_init_hook
from .runtime import SymmetricWorkspace, ensure_initialized, workspace

COUNT, FORWARD, RETURN = 0, 1, 2  # flag channels


SEGMENT_SPLIT = 16  # programs sharing one (source, local expert) segment of received rows
_TOGETHER = (RankFailed, RankMismatch, PeerTimeout)  # errors every PE raises already


@dataclass(frozen=True)
class NvshmemHandle:
    weights_TK: torch.Tensor
    dest_rank_S: torch.Tensor  # per slot: receiving PE (index in the EP group), -1 = not sent
    dest_pos_S: torch.Tensor  # per slot: row at the receiver
    seg_2NG: torch.Tensor  # received rows: start and length of each (source, local expert) segment
    slot_of_row_C: torch.Tensor  # per received row from a peer: the slot id at its source
    num_tokens: int
    top_k: int
    ws: SymmetricWorkspace  # the symmetric buffers of this hidden size and dtype


class NvshmemTransport(Transport):
    name = "nvshmem"

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        groups,
        device: torch.device,
        options: NvshmemOptions,
        *,
        hidden_size: int | None = None,
        dtype: torch.dtype | None = None,
        dispatch_dtype: str = "bf16",
        num_comm_sms: int | None = None,
    ):
        """Needs torch.distributed initialised (NVSHMEM's uid bootstrap rides on it; the factory,
        build_transport, starts a world of one where there is none) and options.bootstrap set.
        `groups=None`: this rank alone."""
        if not dist.is_initialized():
            raise RuntimeError(
                "NvshmemTransport needs torch.distributed initialised (build it through "
                "moe_dist.transport.build_transport, or call moe_dist.init_distributed() first)"
            )
        if options.bootstrap is None:
            raise ValueError("NvshmemOptions.bootstrap must be 'uid' or 'mpi' here, got None")
        self.num_experts = num_experts
        self.pes = [dist.get_rank()] if groups is None else groups.ep_ranks
        self.ep_size = len(self.pes)
        self.ep_rank = self.pes.index(dist.get_rank())
        self.device = device
        self.options = options
        self.max_tokens = options.max_tokens_per_rank
        self.top_k = top_k
        self.capacity = options.recv_capacity or options.max_tokens_per_rank * top_k * self.ep_size
        self.timeout_ns = int(options.peer_timeout_s * 1e9)
        self.peer_path = options.peer_path
        self.fp8 = dispatch_dtype == "fp8_e4m3"
        self.sent_rows_N = None  # dedup path: rows the latest dispatch sent to each PE (device)
        # Programs (SMs) each row-moving kernel may occupy: the rest stay free for compute.
        self.num_comm_sms = num_comm_sms  # None: no bound (kernels.DEFAULT_COMM_SMS says why)
        self._put_libs = None  # NVSHMEM's device bitcode, looked up when a workspace has put peers
        self.error_flags = DeviceErrorFlags("moe", device)
        self.calls = 0
        # the call header that travels beside the counts (transport/handshake.py): identity set
        # by the layer; the construction-time config check runs over the EP process group
        self.context = HS.CallContext()
        self._ep_group = None if groups is None else groups.ep_group
        self._timeout_s = options.peer_timeout_s
        self._header_TF = None  # the last header (reused under CUDA-graph capture)
        self._last_ws = None  # the workspace of the latest call: where a failure travels
        if self._ep_group is not None and self.ep_size > 1:
            # NVSHMEM's initialisation and symmetric allocation are collective and sized by the
            # options: ranks that disagree must fail here, all of them, not hang or corrupt there
            HS.agree_on_options("NvshmemOptions", options, self._ep_group, self._timeout_s)
        ensure_initialized(device, options.bootstrap)
        self._workspaces: dict = {}
        # Symmetric allocation is collective. With the layer's dtype known it is made here, where
        # every PE builds the layer, not in a first dispatch that a silent peer would never join
        # (that would hang instead of timing out). Without it (mixed precision casts the
        # activations) it waits for the first call: a default-dtype set made now could go unused and
        # cost gigabytes.
        if dtype is not None and hidden_size is not None:
            self.workspace(dtype, hidden_size)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    def workspace(self, dtype: torch.dtype, hidden: int) -> SymmetricWorkspace:
        """The symmetric buffers for rows of this width and dtype: made at construction for a layer
        built with a dtype, else on first use, which every PE of the group makes in the same order,
        as it makes the same calls."""
        key = (dtype, hidden)
        if key not in self._workspaces:
            ws = workspace(
                self.pes,
                self.ep_rank,
                hidden,
                self.num_experts,
                self.max_tokens,
                self.top_k,
                self.capacity,
                dtype,
                self.peer_path,
                self.options.put_peers,
                self.options.put_dedup,
            )
            if ws.any_put and self._put_libs is None:
                self._put_libs = extern_libs(torch.cuda.get_device_capability(self.device))
                install_module_init_hook()
            self._workspaces[key] = ws
        return self._workspaces[key]

    def segment_grid(self, ws: SymmetricWorkspace, H: int) -> tuple[int]:
        work = ws.n * self.num_local_experts * SEGMENT_SPLIT * K_.row_chunks(H)
        return K_.comm_grid(work, self.num_comm_sms)

    def memory_bytes_per_pe(self) -> int:
        """Symmetric memory this transport's workspaces take on every PE (see
        SymmetricWorkspace)."""
        return sum(ws.bytes_per_pe() for ws in self._workspaces.values())

    # -- public interface
    # ----------------------------------------------------------------------------
    def _dispatch(self, x_TH: torch.Tensor, plan: RoutingPlan):
        T, K = plan.expert_idx_TK.shape
        ws = self.workspace(x_TH.dtype, x_TH.shape[1])
        if T > self.max_tokens:  # this PE alone: its peers are in this call's count exchange
            self.fail_together(
                BufferOverflow(
                    f"MoE layer '{self.error_flags.layer_name}': {T} tokens on this rank exceed "
                    f"max_tokens_per_rank={self.max_tokens} that sized the nvshmem buffers"
                ),
                ws=ws,
            )
        if K != self.top_k:
            raise ValueError(
                f"plan has {K} slots per token, transport was sized for top_k={self.top_k}"
            )
        if ws.dedup:  # every peer P2P, or put_dedup: each token crosses to a PE once
            tokens, counts_G, local_w, box = _DedupDispatch.apply(x_TH, plan.weights_TK, self, plan)
            return tokens, counts_G, replace(box.handle, local_w_QK=local_w)
        if self.fp8:
            raise RuntimeError(
                f"MoE layer '{self.error_flags.layer_name}': dispatch_dtype='fp8_e4m3' on the"
                " nvshmem transport needs the deduplicated path; this EP group has put peers and"
                " NvshmemOptions(put_dedup=False), whose one-row-per-slot path sends rows in the"
                " activation dtype. Use put_dedup=True (the default), transport='collective' or"
                " dispatch_dtype='bf16'."
            )
        tokens, counts_G, handle_box = _Dispatch.apply(x_TH, self, plan)
        return tokens, counts_G, handle_box.handle

    def _combine(self, y_CH: torch.Tensor, handle) -> torch.Tensor:
        if isinstance(handle, DedupHandle):
            return _DedupCombine.apply(y_CH, handle.weights_TK, handle.local_w_QK, self, handle)
        return _Combine.apply(y_CH, handle.weights_TK, self, handle)

    # -- the steps of a call, in order
    # -----------------------------------------------------------------
    def new_call(self, ws: SymmetricWorkspace) -> int:
        """One epoch per dispatch, combine or backward step; returns the buffer parity."""
        self.calls += 1
        self._last_ws = ws
        return ws.next_epoch()

    def _signal_and_wait(
        self,
        ws: SymmetricWorkspace,
        channel: int,
        parity: int,
        first_of_call: bool,
        payload: bool | None = None,
    ) -> None:
        if ws.any_put:  # put peers' flags (after their rows; COUNT's carries this PE's row)
            self._put_signal(ws, channel, parity, first_of_call, payload)
        self._wait(ws, channel, parity, first_of_call)

    def _put_signal(
        self,
        ws: SymmetricWorkspace,
        channel: int,
        parity: int,
        first_of_call: bool,
        payload: bool | None = None,
    ) -> None:
        """payload: send this PE's count row (header and counts) with the flag; default on COUNT
        only (a failed PE's combine-time header goes with RETURN too: fail_together)."""
        row = self.count_row(ws, parity)
        P_.put_signal_kernel[(ws.n,)](
            ws.via_put,
            ws.peer_pe,
            ws.me,
            ws.epoch_dev,
            ws.flags[parity, channel].data_ptr(),
            row.data_ptr(),
            row.numel() * row.element_size(),
            BUMP=first_of_call,
            HAS_PAYLOAD=channel == COUNT if payload is None else payload,
            num_warps=1,
            extern_libs=self._put_libs,
        )

    def _wait(self, ws: SymmetricWorkspace, channel: int, parity: int, first_of_call: bool) -> None:
        """P2P peers' flags, then the bounded wait for every peer's (signal_and_wait_kernel)."""
        K_.signal_and_wait_kernel[(1,)](
            ws.flags_at[parity, channel],
            ws.flags[parity, channel],
            ws.me,
            ws.n,
            ws.epoch_dev,
            self.timeout_ns,
            self.error_flags.words,
            self.context.step,  # the layer's step names the error
            BUMP=first_of_call,
        )

    # -- the call header (PROTOCOL.md "Header")
    def agree(self) -> None:
        """The one-time configuration check at the layer's construction (host, EP group)."""
        if self._ep_group is not None and self.ep_size > 1:
            hs = HS.Handshake(self._ep_group, 0, self._timeout_s)
            hs.context = self.context
            hs.agree()

    def header(self, dtype, hidden: int, top_k: int, status: int = 0) -> torch.Tensor:
        """This call's header on the device. Deferred error bits (context.device_status) go into
        its status field without a host sync. Under CUDA-graph capture the captured header is
        replayed (a host->device copy cannot be captured)."""
        on_cuda = torch.device(self.device).type == "cuda"
        if self._header_TF is not None and on_cuda and torch.cuda.is_current_stream_capturing():
            return self._header_TF
        c = self.context
        values = [0] * HS.F
        for name, v in (
            ("layer", HS.crc32(c.layer)),
            ("step", c.step),
            ("call", self.calls),
            ("dtype", HS.dtype_code(dtype) if dtype is not None else -1),
            ("hidden", hidden),
            ("top_k", top_k),
            ("config", c.config),
            ("router", c.router_crc if self.calls <= 1 else 0),
            ("status", status),
            ("origin", self.ep_rank if status else -1),
        ):
            values[HS.FIELDS.index(name)] = v
        hdr = torch.tensor(values, dtype=torch.int64)
        if on_cuda:
            hdr = hdr.pin_memory().to(self.device, non_blocking=True)  # no host sync
        if c.device_status is not None and not status:
            bits = c.device_status.reshape(1).to(torch.int64)[0]
            hdr[HS.FIELDS.index("status")] = bits
            hdr[HS.FIELDS.index("origin")] = torch.where(bits != 0, self.ep_rank, -1)
        self._header_TF = hdr
        return hdr

    def checks_headers(self, ws: SymmetricWorkspace) -> bool:
        """Whether this call's header travels (NvshmemOptions.check_headers, on by default): on
        every path, P2P peers by stores and put peers with the counts in one putmem_signal."""
        return self.options.check_headers

    @staticmethod
    def count_row(ws: SymmetricWorkspace, parity: int) -> torch.Tensor:
        """This PE's row of the count exchange, its header then its counts (contiguous,
        symmetric): the payload of the COUNT put to each put peer."""
        return ws.count_rows[parity, ws.me]

    def _exchange_header(self, ws: SymmetricWorkspace, p: int, hdr) -> None:
        K_.send_header_kernel[(ws.n,)](hdr, ws.headers_at[p], ws.me, ws.row_ints, F=HS.F, FB=16)

    def _check_headers(self, ws: SymmetricWorkspace, p: int) -> None:
        K_.check_header_kernel[(1,)](
            ws.headers[p],
            ws.me,
            ws.n,
            ws.row_ints,
            self.error_flags.words,
            self.context.step,
            F=HS.F,
            STATUS=HS.FIELDS.index("status"),
            ORIGIN=HS.FIELDS.index("origin"),
            NB=triton.next_power_of_2(ws.n),
            FB=16,
        )

    def fail_together(
        self, exc: BaseException, phase: str = "dispatch", ws: SymmetricWorkspace | None = None
    ) -> None:
        """On a PE whose forward failed, in the call its peers are in, so that every PE records
        PEER_FAILED and its later waits do not wait; then the error is raised here (one sync).
        Before the dispatch ("dispatch": routing raised): one count exchange carrying the error
        (zero counts). After it ("combine": the experts raised): the header, status set, into
        this call's header rows and the flags of both channels the peers may wait on (RETURN in
        the combine; COUNT, should a peer be in a dispatch), without rows or waiting. Peers
        raise at their next check (eager: the end of the forward). `ws`: the workspace of the
        call the peers are in (default: that of this PE's latest call, e.g. the dispatch whose
        experts raised, as there is one per dtype and hidden size; before any call, the first
        made). Without a workspace yet, or with check_headers off, there is nothing to carry it:
        the peers time out (PeerTimeout)."""
        if ws is None:
            ws = self._last_ws or next(iter(self._workspaces.values()), None)
        if (
            ws is None
            or isinstance(exc, _TOGETHER)  # already raised on every PE: nothing to carry
            or not self.options.check_headers
        ):
            raise exc
        code = next((k for k, cls in HS._CLASSES.items() if isinstance(exc, cls)), HS.RANK_FAILED)
        if torch.device(self.device).type == "cuda":
            # This runs on the caller's stream, the layer's earlier calls maybe still on the comm
            # stream (overlap.py: the other micro-batch's dispatch or combine): they must bump
            # the epoch before this call reads it.
            torch.cuda.synchronize(self.device)
        p = self.new_call(ws)
        hdr = self.header(None, 0, 0, status=code)
        self._header_TF = None
        if phase == "dispatch":
            idx_S = torch.empty(0, dtype=torch.int64, device=self.device)
            self.route_and_layout(ws, idx_S, p, hdr)
        else:
            # the call field names this call's epoch (the BUMP below stores it): no stale row of
            # an earlier call, of this layer or a rebuilt one, is taken for it
            hdr[HS.FIELDS.index("call")] = ws.epoch_dev[0] + 1
            self._exchange_header(ws, p, hdr)
            self._check_status(ws, p, ahead=1)  # its own row: PEER_FAILED, so nothing waits
            self._signal_and_wait(ws, COUNT, p, first_of_call=True, payload=True)
            self._signal_and_wait(ws, RETURN, p, first_of_call=False, payload=True)
        try:
            self.error_flags.check()
        except MoERuntimeError as err:
            raise err from exc
        raise exc  # pragma: no cover (the header carried the error)

    def _check_status(self, ws: SymmetricWorkspace, p: int, ahead: int = 0) -> None:
        """After a RETURN wait: did a PE fail after its dispatch (fail_together)? Only its header
        row of this layer and epoch counts (check_status_kernel)."""
        K_.check_status_kernel[(1,)](
            ws.headers[p],
            ws.n,
            ws.row_ints,
            self.error_flags.words,
            self.context.step,
            ws.epoch_dev,
            HS.crc32(self.context.layer),
            F=HS.F,
            STATUS=HS.FIELDS.index("status"),
            ORIGIN=HS.FIELDS.index("origin"),
            CALL=HS.FIELDS.index("call"),
            LAYER=HS.FIELDS.index("layer"),
            NB=triton.next_power_of_2(ws.n),
            FB=16,
            AHEAD=ahead,
        )

    def route_and_layout(self, ws: SymmetricWorkspace, idx_S: torch.Tensor, p: int, hdr=None):
        """Counts and in-expert ranks of this PE's slots, the count exchange (with this call's
        header, checked on the device), and the layout every later step reads: (offs_E,
        overflow_N, counts_G, seg_2NG, rank_S)."""
        E, G = self.num_experts, self.num_local_experts
        dev = idx_S.device
        rank_S = torch.empty(idx_S.numel(), dtype=torch.int64, device=dev)
        if hdr is not None:
            self._exchange_header(ws, p, hdr)
        K_.count_and_rank_kernel[(E,)](
            idx_S, idx_S.numel(), rank_S, ws.counts_at[p], ws.me, ws.n, E, ws.row_ints, BLOCK=1024
        )
        self._signal_and_wait(ws, COUNT, p, first_of_call=True)
        if hdr is not None:
            self._check_headers(ws, p)
        offs_E = torch.empty(E, dtype=torch.int64, device=dev)
        overflow_N = torch.empty(ws.n, dtype=torch.int32, device=dev)
        counts_G = torch.empty(G, dtype=torch.int64, device=dev)
        seg_2NG = torch.empty(2, ws.n, G, dtype=torch.int64, device=dev)
        K_.layout_kernel[(1,)](
            ws.counts[p],
            ws.me,
            ws.n,
            E,
            ws.row_ints,
            G,
            ws.capacity,
            offs_E,
            overflow_N,
            counts_G,
            seg_2NG,
            self.error_flags.words,
            self.context.step,
            NB=triton.next_power_of_2(ws.n),
            EB=triton.next_power_of_2(E),
        )
        return offs_E, overflow_N, counts_G, seg_2NG, rank_S

    def push_slots(
        self,
        ws: SymmetricWorkspace,
        p: int,
        rows_TH: torch.Tensor,
        dest_rank_S: torch.Tensor,
        dest_pos_S: torch.Tensor,
        seg_2NG: torch.Tensor,
        *,
        scale_S=None,
        layout=None,
        idx_S=None,
        slot_of_row_C=None,
    ):
        """Dispatch direction: one row per slot to its receiver (final position), flag, wait, then
        rows from peers out of the staging. With `layout` the destinations are computed (and stored
        into dest_rank_S / dest_pos_S); without, they are read from them. Returns the [C, H] rows
        received."""
        rows_TH = rows_TH.to(
            ws.dtype
        ).contiguous()  # the staging holds this dtype (a gradient may differ)
        H = rows_TH.shape[1]
        out_CH = torch.empty(ws.capacity, H, device=rows_TH.device, dtype=rows_TH.dtype)
        S = dest_rank_S.numel()
        if S:
            offs_E, overflow_N, _, _, rank_S = layout if layout is not None else (dest_pos_S,) * 5
            K_.push_slots_kernel[K_.comm_grid(S * K_.row_chunks(H), self.num_comm_sms)](
                rows_TH,
                scale_S if scale_S is not None else dest_pos_S,
                idx_S if idx_S is not None else dest_pos_S,
                rank_S,
                offs_E,
                overflow_N,
                dest_rank_S,
                dest_pos_S,
                ws.fwd_rows_at[p],
                out_CH,
                ws.fwd_meta_at[p],
                ws.via_put,
                ws.me,
                self.num_local_experts,
                self.top_k,
                H,
                S,
                COMPUTE_DEST=layout is not None,
                SCALE=scale_S is not None,
                HAS_PUT=ws.any_put,
                BLOCK=K_.ROW_BLOCK,
            )
            if ws.any_put:
                P_.put_rows_kernel[K_.comm_grid(S * K_.row_chunks(H), self.num_comm_sms)](
                    rows_TH,
                    scale_S if scale_S is not None else dest_pos_S,
                    dest_rank_S,
                    dest_pos_S,
                    ws.via_put,
                    ws.peer_pe,
                    ws.send_rows.data_ptr(),
                    ws.send_meta.data_ptr(),
                    ws.fwd_rows[p].data_ptr(),
                    ws.fwd_meta[p].data_ptr(),
                    self.top_k,
                    H,
                    S,
                    SCALE=scale_S is not None,
                    HAS_META=slot_of_row_C is not None,
                    BLOCK=K_.ROW_BLOCK,
                    extern_libs=self._put_libs,
                )
        self._signal_and_wait(
            ws, FORWARD, p, first_of_call=layout is None
        )  # dispatch: COUNT came first
        if ws.n > 1:
            has_meta = slot_of_row_C is not None
            K_.copy_segments_kernel[self.segment_grid(ws, H)](
                ws.fwd_rows[p],
                out_CH,
                ws.fwd_meta[p],
                slot_of_row_C if has_meta else seg_2NG,
                seg_2NG,
                ws.me,
                ws.n,
                self.num_local_experts,
                H,
                HAS_META=has_meta,
                SPLIT=SEGMENT_SPLIT,
                BLOCK=K_.ROW_BLOCK,
            )
        return out_CH

    def return_and_reduce(
        self, rows_CH: torch.Tensor, h: NvshmemHandle, weights_TK=None, keep_slots=False
    ):
        """Combine direction: rows computed here for peers' slots go back to the owners' staging,
        flag, wait; then out[t] = sum_k w[t, k] * row(t, k) (w = 1 without weights). Returns
        (out_TH, rows of every slot [T, K, H] when keep_slots, else None)."""
        ws = h.ws
        p = self.new_call(ws)
        rows_CH = rows_CH.to(ws.dtype).contiguous()
        H = rows_CH.shape[1]
        if ws.n > 1:
            K_.return_segments_kernel[self.segment_grid(ws, H)](
                rows_CH,
                h.slot_of_row_C,
                h.seg_2NG,
                ws.ret_rows_at[p],
                ws.via_put,
                ws.me,
                ws.n,
                self.num_local_experts,
                H,
                SPLIT=SEGMENT_SPLIT,
                HAS_PUT=ws.any_put,
                BLOCK=K_.ROW_BLOCK,
            )
            if ws.any_put:
                P_.put_return_kernel[self.segment_grid(ws, H)](
                    rows_CH,
                    h.slot_of_row_C,
                    h.seg_2NG,
                    ws.via_put,
                    ws.peer_pe,
                    ws.send_rows.data_ptr(),
                    ws.ret_rows[p].data_ptr(),
                    ws.me,
                    ws.n,
                    self.num_local_experts,
                    H,
                    SPLIT=SEGMENT_SPLIT,
                    BLOCK=K_.ROW_BLOCK,
                    extern_libs=self._put_libs,
                )
        self._signal_and_wait(ws, RETURN, p, first_of_call=True)
        if self.checks_headers(ws):  # a PE whose experts raised says so here (fail_together)
            self._check_status(ws, p)
        T, K = h.num_tokens, h.top_k
        out_TH = torch.empty(T, H, device=rows_CH.device, dtype=rows_CH.dtype)
        slots_TKH = (
            torch.empty(T, K, H, device=rows_CH.device, dtype=rows_CH.dtype) if keep_slots else None
        )
        if T:
            K_.gather_reduce_kernel[K_.comm_grid(T * K_.row_chunks(H), self.num_comm_sms)](
                rows_CH,
                ws.ret_rows[p],
                h.dest_rank_S,
                h.dest_pos_S,
                weights_TK if weights_TK is not None else h.dest_pos_S,
                out_TH,
                slots_TKH if keep_slots else out_TH,
                ws.me,
                K,
                H,
                T,
                HAS_W=weights_TK is not None,
                KEEP_SLOTS=keep_slots,
                BLOCK=K_.ROW_BLOCK,
            )
        return out_TH, slots_TKH


class _HandleBox:
    """Carries the handle out of an autograd Function (Functions return tensors only)."""

    handle = None


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TH, tr: NvshmemTransport, plan: RoutingPlan):
        T, K = plan.expert_idx_TK.shape
        x_TH = x_TH.contiguous()
        ws = tr.workspace(x_TH.dtype, x_TH.shape[1])
        idx_S = plan.expert_idx_TK.reshape(-1).contiguous()
        p = tr.new_call(
            ws
        )  # the count exchange and the rows share this call's epoch (separate flags)
        hdr = tr.header(x_TH.dtype, x_TH.shape[1], K) if tr.checks_headers(ws) else None
        layout = tr.route_and_layout(ws, idx_S, p, hdr)
        counts_G, seg_2NG = layout[2], layout[3]
        dest_rank_S = torch.empty(T * K, dtype=torch.int64, device=x_TH.device)
        dest_pos_S = torch.empty(T * K, dtype=torch.int64, device=x_TH.device)
        slot_of_row_C = torch.empty(tr.capacity, dtype=torch.int64, device=x_TH.device)
        tokens_CH = tr.push_slots(
            ws,
            p,
            x_TH,
            dest_rank_S,
            dest_pos_S,
            seg_2NG,
            layout=layout,
            idx_S=idx_S,
            slot_of_row_C=slot_of_row_C,
        )
        box = _HandleBox()
        box.handle = NvshmemHandle(
            plan.weights_TK, dest_rank_S, dest_pos_S, seg_2NG, slot_of_row_C, T, K, ws
        )
        ctx.tr, ctx.handle = tr, box.handle
        ctx.mark_non_differentiable(counts_G)
        return tokens_CH, counts_G, box

    @staticmethod
    def backward(ctx, grad_tokens_CH, _grad_counts, _grad_box):
        # grad x[t] = sum over the slots of t that were sent of the gradient of their row.
        grad_TH, _ = ctx.tr.return_and_reduce(grad_tokens_CH.contiguous(), ctx.handle)
        return grad_TH, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_CH, weights_TK, tr: NvshmemTransport, h: NvshmemHandle):
        # The weights' gradient needs every slot's row; inference skips writing them.
        out_TH, y_TKH = tr.return_and_reduce(
            y_CH.contiguous(), h, weights_TK.contiguous(), keep_slots=ctx.needs_input_grad[1]
        )
        ctx.save_for_backward(y_TKH, weights_TK)
        ctx.tr, ctx.h = tr, h
        return out_TH

    @staticmethod
    def backward(ctx, grad_TH):
        y_TKH, weights_TK = ctx.saved_tensors
        tr, h = ctx.tr, ctx.h
        grad_TH = grad_TH.contiguous()
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = slot_weight_grad(y_TKH, grad_TH).to(
                weights_TK.dtype
            )  # unsent slots' rows are 0
        grad_y = tr.push_slots(
            h.ws,
            tr.new_call(h.ws),
            grad_TH,
            h.dest_rank_S,
            h.dest_pos_S,
            h.seg_2NG,
            scale_S=weights_TK.contiguous().view(-1),
        )
        return grad_y, grad_w, None, None


# -- the deduplicated path (every peer P2P, or put_dedup): dedup_kernels.py, DEDUP.md -------------


@dataclass(frozen=True)
class DedupHandle:
    weights_TK: torch.Tensor
    local_w_QK: torch.Tensor | None  # per staged pair: its slots' weights (autograd: to weights_TK)
    dest_rank_S: torch.Tensor  # per slot: receiving PE, -1 = not sent
    dest_pos_S: torch.Tensor  # per slot: expert-major row at the receiver
    local_meta_QK: torch.Tensor  # per staged pair received: its slots' rows here, -1 = none
    num_tokens: int
    top_k: int
    ws: SymmetricWorkspace


def _send_addrs(ws):
    """Addresses of the put peers' send staging (rows, scales, meta, weights); 0 without put
    peers (the kernels then never take them)."""
    if not ws.any_put:
        return 0, 0, 0, 0
    scales = ws.pair_send_scales if ws.pair_send_scales is not None else ws.pair_send_w
    return (ws.pair_send_rows.data_ptr(), scales.data_ptr(), ws.pair_send_meta.data_ptr(),
            ws.pair_send_w.data_ptr())  # fmt: skip


def _dedup_push(tr, ws, p, src, own_src, scales, w_TK, h_rank, h_pos, own_out, *, meta, scale_own,
                ahead):  # fmt: skip
    """Dispatch direction: pairs to P2P peers' staging, own slots in place; with put peers, their
    pairs into the send staging, then put_pairs_kernel carries those rows (DEDUP.md "Put peers").
    The flag (put_signal's quiet first) comes after, in the caller."""
    T, H = own_src.shape
    sent = torch.zeros(ws.n, dtype=torch.int64, device=own_src.device)
    if T:
        send_rows, send_scales, send_meta, send_w = _send_addrs(ws)
        D_.push_pairs_kernel[K_.comm_grid(T * K_.row_chunks(H), tr.num_comm_sms)](
            src, own_src, scales if scales is not None else w_TK, w_TK, h_rank, h_pos,
            ws.pair_rows_at[p], ws.pair_scales_at[p], ws.pair_meta_at[p], ws.pair_w_at[p],
            own_out, ws.epoch_dev, sent, ws.via_put, send_rows, send_scales, send_meta, send_w,
            ws.me, T, tr.top_k, H, ws.max_tokens,
            EPOCH_AHEAD=ahead, HAS_SCALES=scales is not None, HAS_META=meta, SCALE_OWN=scale_own,
            HAS_PUT=ws.any_put, KB=triton.next_power_of_2(tr.top_k), BLOCK=K_.ROW_BLOCK,
        )  # fmt: skip
        if ws.any_put:
            has_scales = scales is not None
            P_.put_pairs_kernel[K_.comm_grid(T, tr.num_comm_sms)](
                h_rank, ws.via_put, ws.peer_pe, send_rows, send_scales, send_meta, send_w,
                ws.pair_rows[p].data_ptr(),
                ws.pair_scales[p].data_ptr() if has_scales else 0,
                ws.pair_meta[p].data_ptr(), ws.pair_w[p].data_ptr(),
                ws.me, T, tr.top_k, H, ws.max_tokens, H * src.element_size(),
                HAS_SCALES=has_scales, HAS_META=meta, KB=triton.next_power_of_2(tr.top_k),
                extern_libs=tr._put_libs,
            )  # fmt: skip
    return sent


def _dedup_expand(tr, ws, p, out, local_meta, local_w, *, fp8=False, keep=False, scale=False,
                  y=None, grad_lw=None):  # fmt: skip
    H = out.shape[1]
    Q = ws.n * ws.max_tokens
    staged = ws.pair_rows[p].view(torch.float8_e4m3fn) if fp8 else ws.pair_rows[p]
    blocks = triton.cdiv(Q - ws.max_tokens, D_.ROW_SCAN)
    D_.expand_pairs_kernel[K_.comm_grid(blocks, tr.num_comm_sms)](
        staged, ws.pair_scales[p] if fp8 else local_w, ws.pair_meta[p], ws.pair_w[p], out,
        local_meta, local_w, y if y is not None else out,
        grad_lw if grad_lw is not None else local_w, ws.epoch_dev,
        ws.me, tr.top_k, H, ws.max_tokens, Q,
        HAS_SCALES=fp8, KEEP_META=keep, SCALE=scale, DOTS=grad_lw is not None,
        KB=triton.next_power_of_2(tr.top_k), RB=D_.ROW_SCAN, BLOCK=K_.ROW_BLOCK,
    )  # fmt: skip


def _dedup_return(tr, h: DedupHandle, rows_CH, *, w_QK=None, grad_lw=None, weights_TK=None,
                  grad_w=None):  # fmt: skip
    """Combine direction: one (weighted) partial row per staged pair back to its owner (with the
    pair's weight gradients when grad_lw is given), flag, wait; then the owner's sum. Returns
    out_TH (and fills grad_w's peer slots when given)."""
    ws = h.ws
    p = tr.new_call(ws)
    H = rows_CH.shape[1]
    Q = ws.n * ws.max_tokens
    KB = triton.next_power_of_2(tr.top_k)
    blocks = triton.cdiv(Q - ws.max_tokens, D_.ROW_SCAN)
    send_rows, _, _, send_w = _send_addrs(ws)
    D_.reduce_pairs_kernel[K_.comm_grid(blocks, tr.num_comm_sms)](
        rows_CH, h.local_meta_QK, w_QK if w_QK is not None else h.local_meta_QK,
        ws.pair_ret_at[p], grad_lw if grad_lw is not None else h.local_meta_QK,
        ws.pair_ret_w_at[p], ws.via_put, send_rows, send_w, ws.me, tr.top_k, H, ws.max_tokens, Q,
        HAS_W=w_QK is not None, SEND_W=grad_lw is not None, HAS_PUT=ws.any_put, KB=KB,
        RB=D_.ROW_SCAN, BLOCK=K_.ROW_BLOCK,
    )  # fmt: skip
    if ws.any_put:  # the partial rows reduce_pairs left in the send staging for put owners
        P_.put_pair_returns_kernel[K_.comm_grid(blocks, tr.num_comm_sms)](
            h.local_meta_QK, ws.via_put, ws.peer_pe, send_rows, send_w,
            ws.pair_ret[p].data_ptr(), ws.pair_ret_w[p].data_ptr(), ws.me, tr.top_k, H,
            ws.max_tokens, Q, H * rows_CH.element_size(), SEND_W=grad_lw is not None, KB=KB,
            RB=D_.ROW_SCAN, extern_libs=tr._put_libs,
        )  # fmt: skip
    tr._signal_and_wait(ws, RETURN, p, first_of_call=True)
    if tr.checks_headers(ws):  # a PE whose experts raised says so here (fail_together)
        tr._check_status(ws, p)
    T = h.num_tokens
    out_TH = torch.empty(T, H, device=rows_CH.device, dtype=rows_CH.dtype)
    if T:
        D_.gather_pairs_kernel[K_.comm_grid(T * K_.row_chunks(H), tr.num_comm_sms)](
            rows_CH, ws.pair_ret[p], h.dest_rank_S, h.dest_pos_S,
            weights_TK if weights_TK is not None else h.dest_pos_S, out_TH, ws.pair_ret_w[p],
            grad_w if grad_w is not None else out_TH, ws.me, T, tr.top_k, H, ws.max_tokens,
            HAS_W=weights_TK is not None, GATHER_W=grad_w is not None, KB=KB, BLOCK=K_.ROW_BLOCK,
        )  # fmt: skip
    return out_TH


class _DedupDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TH, weights_TK, tr: NvshmemTransport, plan: RoutingPlan):
        T, K = plan.expert_idx_TK.shape
        x_TH = x_TH.contiguous()
        dev, H = x_TH.device, x_TH.shape[1]
        ws = tr.workspace(x_TH.dtype, H)
        idx_S = plan.expert_idx_TK.reshape(-1).contiguous()
        p = tr.new_call(ws)  # the count exchange and the rows share this call's epoch
        # the call header travels with the counts (NvshmemOptions.check_headers)
        hdr = tr.header(x_TH.dtype, H, K) if tr.checks_headers(ws) else None
        offs_E, overflow_N, counts_G, _, rank_S = tr.route_and_layout(ws, idx_S, p, hdr)
        dest_rank_S = torch.empty(T * K, dtype=torch.int64, device=dev)
        dest_pos_S = torch.empty(T * K, dtype=torch.int64, device=dev)
        if T:
            D_.slot_destinations_kernel[K_.comm_grid(T * K, tr.num_comm_sms)](
                idx_S, rank_S, offs_E, overflow_N, dest_rank_S, dest_pos_S,
                tr.num_local_experts, T * K,
            )  # fmt: skip
        src, scales = x_TH, None
        if tr.fp8 and T:
            q, scales = quantize_rows(x_TH)  # e4m3 + float32 scales; own slots get x exactly
            src = q.view(torch.float8_e4m3fn)
        w_TK = weights_TK.detach().float().contiguous()
        out_CH = torch.empty(ws.capacity, H, device=dev, dtype=x_TH.dtype)
        # rows sent to each PE (device counter, no sync): distinct (token, peer) pairs
        tr.sent_rows_N = _dedup_push(tr, ws, p, src, x_TH, scales, w_TK, dest_rank_S, dest_pos_S,
                                     out_CH, meta=True, scale_own=False, ahead=False)  # fmt: skip
        tr._signal_and_wait(ws, FORWARD, p, first_of_call=False)
        Q = ws.n * ws.max_tokens
        local_meta = torch.full((Q, K), -1, dtype=torch.int64, device=dev)
        local_w = torch.zeros(Q, K, dtype=torch.float32, device=dev)
        _dedup_expand(tr, ws, p, out_CH, local_meta, local_w, fp8=tr.fp8, keep=True)
        box = _HandleBox()
        box.handle = DedupHandle(weights_TK, None, dest_rank_S, dest_pos_S, local_meta, T, K, ws)
        ctx.tr, ctx.handle = tr, box.handle
        ctx.mark_non_differentiable(counts_G)
        return out_CH, counts_G, local_w, box

    @staticmethod
    def backward(ctx, grad_tokens_CH, _grad_counts, grad_local_w, _grad_box):
        # grad x[t] = sum over t's sent slots of their rows' gradients: reduced at the expert PE,
        # one row per (token, PE) back; the weights' gradients of peer slots travel beside.
        tr, h = ctx.tr, ctx.handle
        rows = grad_tokens_CH.to(h.ws.dtype).contiguous()
        want_w = ctx.needs_input_grad[1] and grad_local_w is not None
        grad_w = (
            torch.zeros(h.num_tokens, h.top_k, dtype=torch.float32, device=rows.device)
            if want_w
            else None
        )
        glw = grad_local_w.float().contiguous() if want_w else None
        grad_x = _dedup_return(tr, h, rows, grad_lw=glw, grad_w=grad_w)
        if grad_w is not None:
            grad_w = grad_w.to(h.weights_TK.dtype)
        return grad_x, grad_w, None, None


class _DedupCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_CH, weights_TK, local_w_QK, tr: NvshmemTransport, h: DedupHandle):
        rows = y_CH.to(h.ws.dtype).contiguous()
        w_TK = weights_TK.detach().float().contiguous()
        out_TH = _dedup_return(tr, h, rows, w_QK=local_w_QK.detach().contiguous(), weights_TK=w_TK)
        ctx.save_for_backward(rows, weights_TK, local_w_QK)
        ctx.tr, ctx.h = tr, h
        return out_TH

    @staticmethod
    def backward(ctx, grad_TH):
        rows_CH, weights_TK, local_w_QK = ctx.saved_tensors
        tr, h = ctx.tr, ctx.h
        ws = h.ws
        g = grad_TH.to(ws.dtype).contiguous()
        T, K = h.num_tokens, h.top_k
        # Dispatch direction: g[t] once per (token, PE), each slot's row scaled by its weight at
        # the expert PE, where <y(t, k), g[t]> (the weight's gradient) is also taken.
        p = tr.new_call(ws)
        grad_y = torch.empty(ws.capacity, g.shape[1], device=g.device, dtype=ws.dtype)
        w_TK = weights_TK.detach().float().contiguous()
        _dedup_push(tr, ws, p, g, g, None, w_TK, h.dest_rank_S, h.dest_pos_S, grad_y,
                    meta=False, scale_own=True, ahead=True)  # fmt: skip
        tr._signal_and_wait(ws, FORWARD, p, first_of_call=True)
        grad_lw = torch.zeros_like(local_w_QK, dtype=torch.float32)
        _dedup_expand(tr, ws, p, grad_y, h.local_meta_QK, local_w_QK.detach().contiguous(),
                      scale=True, y=rows_CH, grad_lw=grad_lw)  # fmt: skip
        grad_w = None
        if ctx.needs_input_grad[1]:  # own slots' weights: their rows are here
            own_TK = (h.dest_rank_S == ws.me).view(T, K)
            pos_S = torch.where(own_TK.reshape(-1), h.dest_pos_S, 0)
            y_TKH = rows_CH.index_select(0, pos_S).view(T, K, rows_CH.shape[1])
            dots = (y_TKH.float() * g.float().unsqueeze(1)).sum(-1)
            grad_w = torch.where(own_TK, dots, 0.0).to(weights_TK.dtype)
        return grad_y, grad_w, grad_lw if ctx.needs_input_grad[2] else None, None, None
