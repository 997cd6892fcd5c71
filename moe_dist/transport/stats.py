"""What a transport sent: per-call counters the telemetry can read (`transport.stats`).

Counts are host ints the transport already knows (the collective transport reads its split sizes on
the host anyway), so keeping them costs no sync. The backward of a dispatch sends what the forward
combine sent, and vice versa, so forward counters describe a training step's traffic as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CallCounters:
    rows: int = 0  # rows sent, own rank included: distinct (token, destination rank) pairs
    peer_rows: int = 0  # of which to other ranks (the rows that cross a link)
    payload_bytes: int = 0  # row bytes sent (fp8 rows: bytes of e4m3 plus their float32 scales)
    meta_bytes: int = 0  # per-row metadata sent beside the rows (slot experts, weights)
    calls: int = 0

    def add(self, other: "CallCounters") -> None:
        self.rows += other.rows
        self.peer_rows += other.peer_rows
        self.payload_bytes += other.payload_bytes
        self.meta_bytes += other.meta_bytes
        self.calls += other.calls


@dataclass
class TransportStats:
    """last_*: the latest call; total_*: summed since construction (or `reset()`)."""

    last_dispatch: CallCounters = field(default_factory=CallCounters)
    last_combine: CallCounters = field(default_factory=CallCounters)
    total_dispatch: CallCounters = field(default_factory=CallCounters)
    total_combine: CallCounters = field(default_factory=CallCounters)

    def record(self, kind: str, counters: CallCounters) -> None:
        counters.calls = 1
        setattr(self, f"last_{kind}", counters)
        getattr(self, f"total_{kind}").add(counters)

    def reset(self) -> None:
        self.__init__()

    def as_dict(self) -> dict:
        return {k: dict(vars(v)) for k, v in vars(self).items()}
