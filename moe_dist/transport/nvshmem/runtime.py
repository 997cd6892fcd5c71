"""NVSHMEM for the whole process: one init (uid over torch.distributed, or MPI), one symmetric heap
shared by every layer, symmetric workspaces cached by shape, and teardown that frees them.

PE ids are global torch.distributed ranks, so an EP group's peers are its global ranks.
"""

from __future__ import annotations

import atexit

import torch
import torch.distributed as dist

from ..handshake import F as HEADER_INTS

_state = {"initialized": False, "workspaces": {}, "bootstrap": None}


def ensure_initialized(device: torch.device, method: str = "uid") -> None:
    """Collective over the world the first time it is called (every rank must call it). `method`:
    "uid" (a unique id broadcast over torch.distributed) or "mpi" (NvshmemOptions.bootstrap)."""
    if _state["initialized"]:
        return
    import nvshmem.core as nv
    from cuda.core import Device

    cu_dev = Device(device.index if device.index is not None else torch.cuda.current_device())
    cu_dev.set_current()
    if method == "mpi":
        from mpi4py import MPI

        nv.init(device=cu_dev, mpi_comm=MPI.COMM_WORLD, initializer_method="mpi")
    elif method == "uid":
        rank, world = dist.get_rank(), dist.get_world_size()
        uid = nv.get_unique_id(empty=rank != 0)
        box = [uid if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        nv.init(device=cu_dev, uid=box[0], rank=rank, nranks=world, initializer_method="uid")
    else:
        raise ValueError(f"the NVSHMEM bootstrap must be 'uid' or 'mpi', got {method!r}")
    if (
        dist.is_initialized() and nv.my_pe() != dist.get_rank()
    ):  # PE ids are taken to be global ranks
        raise RuntimeError(
            f"NVSHMEM gave this process PE {nv.my_pe()} but its torch.distributed rank is "
            f"{dist.get_rank()} (bootstrap {method!r}): launch so that MPI and torch ranks agree"
        )
    _state["initialized"] = True
    _state["bootstrap"] = method
    atexit.register(finalize)


def bootstrap_method() -> str | None:
    """How NVSHMEM was initialised in this process: "uid" or "mpi" (None before)."""
    return _state["bootstrap"]


def finalize() -> None:
    """Frees every workspace and the NVSHMEM runtime. Safe to call twice."""
    if not _state["initialized"]:
        return
    import nvshmem.core as nv

    torch.cuda.synchronize()
    for ws in _state["workspaces"].values():
        ws.free()
    _state["workspaces"].clear()
    nv.finalize()
    _state["initialized"] = False


class SymmetricWorkspace:
    """Symmetric staging for one (EP group, shape) combination, double-buffered by call parity.

    Per parity: count_rows [N, F + E] (int64: row src = PE src's call header of F = 11 ints,
    handshake.FIELDS, then its counts; views `headers` [N, F] and `counts` [N, E], row stride
    `row_ints`) and flags [3, N] (count / dispatch / return channels, int64 epochs, monotonic,
    never reset), then the rows' staging, by path:
    - every peer P2P (`dedup`; dedup_kernels.py): pair_rows and pair_ret [Q, H] with Q = N*T_max
      (row src*T_max + t: token t of PE src, at most once), pair_meta [Q, K+1] int64 (stamp,
      positions), pair_w and pair_ret_w [Q, K] float32, and for H % 128 == 0 pair_scales
      [Q, H/128] float32 (fp8 rows). Bytes per PE = 2 * (2*Q*H*itemsize + 8*Q*(K+1) + 8*Q*K
      + 4*Q*H/128) + 2 * (8*N*(F + E) + 24*N). With put peers and put_dedup, plus one send
      staging that puts read from: Q*H*itemsize + 8*Q*(K+1) + 4*Q*K + 4*Q*H/128 bytes.
    - with put peers (one row per slot): fwd_rows [C, H] + fwd_meta [C] (dispatch-direction rows,
      at final positions), ret_rows [T_max*K, H] (combine-direction rows, at the owner's slot).
      Bytes per PE = 2 * (C*H + T_max*K*H) * itemsize + 2 * (8*C + 8*N*(F + E) + 24*N), plus
      one send buffer that puts read from: max(C, T_max*K) * H * itemsize + 8 * T_max*K bytes.

    peer_path: "p2p" = every peer by loads and stores (an error names a peer without a P2P path);
    "put" = every other PE by NVSHMEM put-with-signal; "auto" = P2P where nvshmem_ptr gives an
    address, put elsewhere. `put_peers`: global ranks taken by puts even where P2P works (the mixed
    path on one node). `put_dedup`: the pair layout with put peers too (NvshmemOptions)."""

    def __init__(
        self,
        pes: list[int],
        me: int,
        hidden: int,
        num_experts: int,
        max_tokens: int,
        top_k: int,
        capacity: int,
        dtype: torch.dtype,
        peer_path: str = "auto",
        put_peers: frozenset[int] = frozenset(),
        put_dedup: bool = False,
    ):
        import nvshmem.core as nv

        self.pes, self.me, self.n = pes, me, len(pes)
        self.hidden, self.capacity, self.max_slots = hidden, capacity, max_tokens * top_k
        self.dtype = dtype
        self._tensors = []

        def sym(shape, dt):
            t = nv.tensor(shape, dtype=dt)
            t.zero_()
            self._tensors.append(t)
            return t

        self.max_tokens, self.top_k = max_tokens, top_k
        # One row per source PE: its call header (transport/handshake.py FIELDS), then its counts.
        # Contiguous, so a single putmem_signal carries both to a put peer (PROTOCOL.md "Header");
        # `headers` and `counts` are views of it with a row stride of `row_ints`.
        self.row_ints = HEADER_INTS + num_experts
        self.count_rows = sym((2, self.n, self.row_ints), torch.int64)
        self.headers = self.count_rows[:, :, :HEADER_INTS]
        self.counts = self.count_rows[:, :, HEADER_INTS:]
        self.flags = sym((2, 3, self.n), torch.int64)
        torch.cuda.synchronize()
        dist.barrier()  # every PE has zeroed its flags before anyone signals

        # Which peers take puts. A put peer's entries in the address tables below are this PE's own
        # buffers: the P2P kernels skip put peers, and count_and_rank's store there is the put's
        # source.
        reach = [
            i == me
            or (
                # put_peers: forced to puts under "auto" (one node testing the mixed path)
                not (peer_path == "auto" and pes[i] in put_peers)
                and self._reachable(nv, self.flags, pes[i], peer_path)
            )
            for i in range(self.n)
        ]
        self.via_put = torch.tensor(
            [0 if ok else 1 for ok in reach], dtype=torch.int32, device=self.flags.device
        )
        self.peer_pe = torch.tensor(pes, dtype=torch.int32, device=self.flags.device)
        # Every PE allocates the send buffer, or none does: symmetric allocation is collective.
        self.any_put = _any_rank(not all(reach), self.flags.device)
        # Every peer by loads and stores: each token crosses to a PE once (dedup_kernels.py, pair
        # staging); with put peers, one row per slot (the put kernels move slots), unless
        # put_dedup: pairs too, put peers' through a send staging (DEDUP.md "Put peers").
        self.dedup = not self.any_put or put_dedup
        if self.dedup:
            Q = self.n * max_tokens  # row src * T_max + t: token t of PE src
            self.pair_rows = sym((2, Q, hidden), dtype)
            self.pair_meta = sym((2, Q, top_k + 1), torch.int64)
            self.pair_w = sym((2, Q, top_k), torch.float32)
            self.pair_ret = sym((2, Q, hidden), dtype)
            self.pair_ret_w = sym((2, Q, top_k), torch.float32)
            # fp8 rows (e4m3 bytes in the first bytes of pair_rows) and their scales
            self.pair_scales = (
                sym((2, Q, hidden // 128), torch.float32) if hidden % 128 == 0 else None
            )
        else:
            self.fwd_rows = sym((2, capacity, hidden), dtype)
            self.fwd_meta = sym((2, capacity), torch.int64)
            self.ret_rows = sym((2, self.max_slots, hidden), dtype)
        if self.any_put and self.dedup:
            # pairs bound for put peers, at the peer's row of Q (dispatch: r * T_max + t; return:
            # the pair's own row q); single-buffered like send_rows (a call's puts are complete
            # before its flags go out, and the next call writes after them on the stream)
            self.pair_send_rows = sym((Q, hidden), dtype)
            self.pair_send_meta = sym((Q, top_k + 1), torch.int64)
            self.pair_send_w = sym((Q, top_k), torch.float32)  # pair_w, or pair_ret_w's gradients
            self.pair_send_scales = (
                sym((Q, hidden // 128), torch.float32) if hidden % 128 == 0 else None
            )
        elif self.any_put:
            self.send_rows = sym((max(capacity, self.max_slots), hidden), dtype)
            self.send_meta = sym((self.max_slots,), torch.int64)

        def peer_views(t):
            # Own PE: the tensor itself (get_peer_tensor on one's own PE would pin it past
            # free_tensor).
            return [
                t if i == me or not reach[i] else _peer_view(nv, t, pe, pes[me])
                for i, pe in enumerate(pes)
            ]

        def addresses(t):  # [2, N] int64: address of parity p of `t` on each EP peer
            peers = peer_views(t)
            return torch.tensor(
                [[int(p[par].data_ptr()) for p in peers] for par in range(2)],
                dtype=torch.int64,
                device=t.device,
            )

        if self.dedup:
            self.pair_rows_at, self.pair_meta_at = addresses(self.pair_rows), addresses(
                self.pair_meta
            )
            self.pair_w_at, self.pair_ret_at = addresses(self.pair_w), addresses(self.pair_ret)
            self.pair_ret_w_at = addresses(self.pair_ret_w)
            self.pair_scales_at = (
                addresses(self.pair_scales) if self.pair_scales is not None else self.pair_w_at
            )
        else:
            self.fwd_rows_at, self.fwd_meta_at = addresses(self.fwd_rows), addresses(self.fwd_meta)
            self.ret_rows_at = addresses(self.ret_rows)
        self.headers_at = addresses(self.count_rows)  # a row starts with its header
        self.counts_at = self.headers_at + HEADER_INTS * 8
        # flags: one address per (parity, channel, peer)
        peers = peer_views(self.flags)
        self.flags_at = torch.tensor(
            [[[int(p[par, ch].data_ptr()) for p in peers] for ch in range(3)] for par in range(2)],
            dtype=torch.int64,
            device=self.flags.device,
        )
        # Every PE makes the same sequence of calls, so epochs agree. The value lives on the device
        # (bumped by the first flag kernel of each call, so CUDA-graph replays advance it); parity
        # alternates on the host, and a forward or backward makes an even number of calls, so
        # replays alternate too.
        self.epoch_dev = torch.zeros(1, dtype=torch.int64, device=self.flags.device)
        self.calls = 0

    @staticmethod
    def _reachable(nv, symmetric, pe: int, peer_path: str) -> bool:
        """Whether PE `pe` takes loads and stores from here (else puts): nvshmem_ptr of a symmetric
        tensor."""
        if peer_path == "put":
            return False
        if peer_path == "p2p":
            return True  # _peer_view raises, naming both PEs, where it is not
        try:
            nv.get_peer_tensor(symmetric, pe)
            return True
        except Exception:  # noqa: BLE001 - nvshmem4py says only "Failed to retrieve peer buffer"
            return False

    def next_epoch(self) -> int:
        """Starts a call; returns the parity of the buffers it uses. (The call's first
        signal_and_wait_kernel bumps epoch_dev: one launch fewer than a separate add.)"""
        self.calls += 1
        return self.calls % 2

    def bytes_per_pe(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors)

    def free(self) -> None:
        import nvshmem.core as nv

        for t in self._tensors:
            nv.free_tensor(t)
        self._tensors.clear()


def workspace_bytes(
    n: int,
    hidden: int,
    num_experts: int,
    max_tokens: int,
    top_k: int,
    capacity: int,
    itemsize: int,
    any_put: bool,
    put_dedup: bool = False,
) -> int:
    """Symmetric bytes per PE that SymmetricWorkspace allocates (README "Symmetric memory per PE";
    the GPU worker checks it against bytes_per_pe)."""
    Q, S, SC = n * max_tokens, max_tokens * top_k, (hidden // 128 if hidden % 128 == 0 else 0)
    total = 2 * (8 * n * (HEADER_INTS + num_experts) + 24 * n)  # count rows and flags
    if not any_put or put_dedup:
        total += 2 * (2 * Q * hidden * itemsize + 8 * Q * (top_k + 1) + 8 * Q * top_k + 4 * Q * SC)
        if any_put:  # the pair send staging
            total += Q * hidden * itemsize + 8 * Q * (top_k + 1) + 4 * Q * top_k + 4 * Q * SC
    else:
        total += 2 * ((capacity + S) * hidden * itemsize + 8 * capacity)
        total += max(capacity, S) * hidden * itemsize + 8 * S  # the send buffer
    return total


def _peer_view(nv, t, pe: int, my_pe: int):
    """t on PE `pe`, addressable from here by loads and stores (nvshmem_ptr)."""
    try:
        return nv.get_peer_tensor(t, pe)
    except Exception as e:  # noqa: BLE001 - nvshmem4py says only "Failed to retrieve peer buffer"
        raise RuntimeError(
            f"NVSHMEM PE {pe} is not reachable by loads and stores from PE {my_pe} (nvshmem_ptr "
            "gave no address: no NVLink/P2P path between their GPUs), and peer_path='p2p' "
            "allows nothing else: use 'auto' (puts for such peers) or 'put'"
        ) from e


def _any_rank(flag: bool, gpu: torch.device) -> bool:
    """True on every rank when it is true on any (world-collective, like the symmetric
    allocations)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    dev = gpu if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([int(flag)], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def workspace(
    pes: list[int],
    me: int,
    hidden: int,
    num_experts: int,
    max_tokens: int,
    top_k: int,
    capacity: int,
    dtype: torch.dtype,
    peer_path: str = "auto",
    put_peers: frozenset[int] = frozenset(),
    put_dedup: bool = False,
) -> SymmetricWorkspace:
    """Shared by every layer of the same shape: consecutive layers alternate parity, and a PE cannot
    run two calls ahead of a peer (each call waits on every peer's flag), so parity p is never
    overwritten while a peer still reads it."""
    key = (
        tuple(pes),
        hidden,
        num_experts,
        max_tokens,
        top_k,
        capacity,
        dtype,
        peer_path,
        put_peers,
        put_dedup,
    )
    if key not in _state["workspaces"]:  # the key holds the shape arguments, in their order
        _state["workspaces"][key] = SymmetricWorkspace(pes, me, *key[1:])
    return _state["workspaces"][key]
