"""How a transport is built: its own options, apart from MoEConfig's model math.

    TransportOptions(kind=None, nvshmem=NvshmemOptions(...))

`kind=None` takes MoEConfig.transport (the execution knob kept in the config: "auto" | "local" |
"collective" | "nvshmem" | "reference"). NvshmemOptions sizes and tunes the nvshmem transport only:
the other transports ignore it. Nothing here reads the environment; `NvshmemOptions.from_env` is for
callers (launch scripts export MOE_DIST_NVSHMEM_BOOTSTRAP) that want to honour it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

TRANSPORT_KINDS = ("auto", "local", "collective", "nvshmem", "reference")
PEER_PATHS = ("auto", "p2p", "put")
BOOTSTRAPS = ("uid", "mpi")
BOOTSTRAP_ENV = "MOE_DIST_NVSHMEM_BOOTSTRAP"


@dataclass(frozen=True)
class NvshmemOptions:
    # Tokens one rank may pass per call; sizes the symmetric buffers (README: memory per PE).
    max_tokens_per_rank: int = 16384
    # Rows a PE can receive; None = the worst case max_tokens_per_rank * top_k * ep_size.
    recv_capacity: int | None = None
    # "auto": loads/stores to P2P-reachable peers, put-with-signal to others; "p2p"; "put".
    peer_path: str = "auto"
    # A wait on a peer longer than this records a PeerTimeout error (raised by check_errors).
    peer_timeout_s: float = 60.0
    # How NVSHMEM initialises: "uid" (a unique id broadcast over torch.distributed) or "mpi"
    # (mpi4py); None: the launcher's choice, MOE_DIST_NVSHMEM_BOOTSTRAP, read by build_transport.
    bootstrap: str | None = None
    # peer_path="auto" only: global ranks reached by puts even where P2P works (tests the mixed
    # path on one node).
    put_peers: frozenset[int] = frozenset()
    # The per-call header beside the counts (PROTOCOL.md "Header"), on every path (P2P, put,
    # mixed): a disagreeing PE makes every PE raise RankMismatch, a failing one (fail_together)
    # its own error, with no timeout. Off, nothing is compared and a failing PE's peers end with
    # PeerTimeout after peer_timeout_s (not a hang); every PE of a group must set it alike.
    check_headers: bool = True
    # With put peers: each token crosses to a PE once (DEDUP.md, "Put peers"; fp8 rows possible)
    # instead of one row per slot, through a send staging (README: memory per PE, smaller than the
    # slot path's). False: the one-row-per-slot put path. Without put peers it is always dedup.
    put_dedup: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.put_dedup, bool):
            raise ValueError(f"put_dedup must be a bool, got {self.put_dedup!r}")
        if not isinstance(self.check_headers, bool):
            raise ValueError(f"check_headers must be a bool, got {self.check_headers!r}")
        if not isinstance(self.max_tokens_per_rank, int) or self.max_tokens_per_rank < 1:
            raise ValueError(
                f"max_tokens_per_rank must be a positive int, got {self.max_tokens_per_rank!r}"
            )
        if self.recv_capacity is not None and (
            not isinstance(self.recv_capacity, int) or self.recv_capacity < 1
        ):
            raise ValueError(f"recv_capacity must be >= 1 or None, got {self.recv_capacity!r}")
        if self.peer_path not in PEER_PATHS:
            raise ValueError(f"peer_path must be 'auto', 'p2p' or 'put', got {self.peer_path!r}")
        if not self.peer_timeout_s > 0:
            raise ValueError(f"peer_timeout_s must be > 0, got {self.peer_timeout_s}")
        if self.bootstrap is not None and self.bootstrap not in BOOTSTRAPS:
            raise ValueError(f"bootstrap must be 'uid', 'mpi' or None, got {self.bootstrap!r}")
        object.__setattr__(self, "put_peers", frozenset(self.put_peers))

    @classmethod
    def from_env(cls, env: Mapping[str, str], **options) -> "NvshmemOptions":
        """Options with the bootstrap the launcher chose (MOE_DIST_NVSHMEM_BOOTSTRAP, default
        "uid"); pass os.environ explicitly."""
        options.setdefault("bootstrap", env.get(BOOTSTRAP_ENV) or "uid")
        return cls(**options)


@dataclass(frozen=True)
class TransportOptions:
    kind: str | None = None  # None: MoEConfig.transport
    nvshmem: NvshmemOptions = field(default_factory=NvshmemOptions)
    # collective transport: the longest any of its waits may take before PeerTimeout (the nvshmem
    # transport's own limit is NvshmemOptions.peer_timeout_s)
    peer_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if isinstance(self.peer_timeout_s, bool) or not self.peer_timeout_s > 0:
            raise ValueError(f"peer_timeout_s must be > 0, got {self.peer_timeout_s!r}")
        if self.kind is not None and self.kind not in TRANSPORT_KINDS:
            raise ValueError(f"kind must be one of {TRANSPORT_KINDS} or None, got {self.kind!r}")
        if not isinstance(self.nvshmem, NvshmemOptions):
            raise ValueError(
                f"nvshmem must be an NvshmemOptions, got {type(self.nvshmem).__name__}"
            )
