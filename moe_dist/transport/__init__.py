"""Transports move tokens to their experts and back; one interface (base.py), several paths, built
by `build_transport(cfg, groups, TransportOptions(...))` (factory.py)."""

from __future__ import annotations

from .base import Transport, record_event, wait_event
from .collective import CollectiveTransport
from .factory import NVSHMEM_DISPATCH_DTYPES, build_transport, ep_nodes, nvshmem_unavailable_reason
from .fp8 import fp8_unsupported_reason
from .local import LocalTransport
from .options import NvshmemOptions, TransportOptions
from .permute import sort_slots_by_expert
from .reference import ReferenceTransport

__all__ = [
    "CollectiveTransport",
    "LocalTransport",
    "NVSHMEM_DISPATCH_DTYPES",
    "NvshmemOptions",
    "ReferenceTransport",
    "Transport",
    "TransportOptions",
    "build_transport",
    "ep_nodes",
    "fp8_unsupported_reason",
    "nvshmem_unavailable_reason",
    "record_event",
    "sort_slots_by_expert",
    "wait_event",
]
