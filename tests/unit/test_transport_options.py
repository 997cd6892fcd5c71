"""The transport seam: TransportOptions / NvshmemOptions, build_transport, a transport given to the
layer, and the event plumbing of dispatch/combine (events are None on CPU)."""

from __future__ import annotations

import pytest
import torch

from moe_dist import MoEConfig, MoELayer
from moe_dist.overlap import StreamSet, combine_async, compute_experts, dispatch_async, landed
from moe_dist.transport import (
    LocalTransport,
    NvshmemOptions,
    ReferenceTransport,
    TransportOptions,
    build_transport,
)

H, E = 16, 8


def make(**kw) -> MoEConfig:
    return MoEConfig(**{**dict(hidden_size=H, ffn_hidden_size=12, num_experts=E, top_k=2), **kw})


def test_options_validate_with_the_values():
    with pytest.raises(ValueError, match=r"peer_path must be 'auto', 'p2p' or 'put', got 'ib'"):
        NvshmemOptions(peer_path="ib")
    with pytest.raises(ValueError, match=r"max_tokens_per_rank must be a positive int, got 0"):
        NvshmemOptions(max_tokens_per_rank=0)
    with pytest.raises(ValueError, match=r"recv_capacity must be >= 1 or None, got 0"):
        NvshmemOptions(recv_capacity=0)
    with pytest.raises(ValueError, match=r"peer_timeout_s must be > 0, got 0"):
        NvshmemOptions(peer_timeout_s=0)
    with pytest.raises(ValueError, match=r"bootstrap must be 'uid', 'mpi' or None, got 'tcp'"):
        NvshmemOptions(bootstrap="tcp")
    with pytest.raises(ValueError, match=r"put_dedup must be a bool, got 1"):
        NvshmemOptions(put_dedup=1)
    with pytest.raises(ValueError, match=r"kind must be one of .* got 'ucx'"):
        TransportOptions(kind="ucx")
    assert NvshmemOptions(put_peers={1, 3}).put_peers == frozenset({1, 3})


def test_bootstrap_from_an_explicit_environment():
    assert NvshmemOptions.from_env({}).bootstrap == "uid"
    env = {"MOE_DIST_NVSHMEM_BOOTSTRAP": "mpi"}
    nv = NvshmemOptions.from_env(env, max_tokens_per_rank=64)
    assert (nv.bootstrap, nv.max_tokens_per_rank) == ("mpi", 64)
    with pytest.raises(ValueError, match="got 'tcp'"):
        NvshmemOptions.from_env({"MOE_DIST_NVSHMEM_BOOTSTRAP": "tcp"})


def test_nvshmem_sizing_left_the_config():
    for name in ("max_tokens_per_rank", "nvshmem_recv_capacity", "nvshmem_peer_path"):
        with pytest.raises(TypeError):
            make(**{name: 1})


def test_factory_kinds_on_one_process():
    assert isinstance(build_transport(make()), LocalTransport)
    tr = build_transport(make(transport="collective"), None, TransportOptions(kind="reference"))
    assert isinstance(tr, ReferenceTransport)  # options.kind overrides cfg.transport
    with pytest.raises(RuntimeError, match="transport='nvshmem' cannot run: it needs CUDA"):
        build_transport(make(transport="nvshmem"), device="cpu")


def test_layer_takes_a_built_transport_and_equals_the_default():
    cfg = make(num_shared_experts=1)
    torch.manual_seed(0)
    built = MoELayer(cfg)
    torch.manual_seed(0)
    given = MoELayer(cfg, transport=ReferenceTransport(E))
    assert isinstance(given.transport, ReferenceTransport)
    x = torch.randn(11, H)
    torch.testing.assert_close(given(x).output, built(x).output)
    with pytest.raises(ValueError, match=r"among 4 experts over ep_size 1.*num_experts \(8\)"):
        MoELayer(cfg, transport=LocalTransport(4))
    with pytest.raises(ValueError, match="not both"):
        MoELayer(cfg, transport=LocalTransport(E), transport_options=TransportOptions())


@pytest.mark.parametrize("transport", [LocalTransport(E), ReferenceTransport(E)])
def test_dispatch_combine_events_on_cpu(transport):
    torch.manual_seed(1)
    layer = MoELayer(make(), transport=transport)
    x = torch.randn(9, H)
    plan = layer.route(x)
    tokens, counts, handle = transport.dispatch(x, plan)
    t2, c2, h2, event = transport.dispatch(x, plan, previous_event=None, async_finish=True)
    assert event is None  # no streams off CUDA: results are ready in host order
    torch.testing.assert_close(t2, tokens)
    assert torch.equal(c2, counts)
    y = layer.experts(tokens, counts)
    out = transport.combine(y, handle)
    out2, event = transport.combine(y, h2, previous_event=None, async_finish=True)
    assert event is None
    torch.testing.assert_close(out2, out)


def test_overlap_phases_take_transport_and_experts():
    """The phases of one token set in flight need a transport and experts, no layer; each drops
    what it consumed (off CUDA: no events, host order)."""
    torch.manual_seed(2)
    layer = MoELayer(make())  # no shared experts: the layer's output is the routed output
    x = torch.randn(13, H)
    plan = layer.route(x)
    streams = StreamSet()
    flight = dispatch_async(layer.transport, x, plan, streams)
    assert flight.dispatched is None and flight.tokens_MH is not None
    compute_experts(flight, layer.experts)
    assert flight.tokens_MH is None and flight.computed is None
    combine_async(layer.transport, flight, streams)
    assert flight.y_MH is None and flight.handle is None
    out_TH = landed(flight)
    assert flight.out_TH is None
    torch.testing.assert_close(out_TH, layer(x).output)
    with pytest.raises(ValueError, match="role must be one of"):
        streams.get(torch.device("cpu"), "bogus")
    import copy

    assert copy.deepcopy(layer).streams is layer.streams  # streams are not model state
