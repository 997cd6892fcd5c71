"""Chunked pipeline (moe_dist/overlap.py) on CPU: pipelined == unpipelined in outputs, aux loss,
counts and every gradient; the chunk and issue-order logic; the benchmark's smoke mode.

Legend: T tokens, H hidden, K slots/token, E experts, C chunks.
"""

import json

import pytest
import torch

from moe_dist import MoELayer
from moe_dist.overlap import issue_order, pipelined_moe, split_plan

from tests.conftest import assert_fwd_bwd_close, assert_ran, config_builder, fwd_bwd, run_python

H, F, E = 16, 24, 8


cfg_for = config_builder(ffn_hidden_size=F, num_experts=E, top_k=3, num_shared_experts=1)


@pytest.mark.parametrize("transport", ["local", "reference"])
@pytest.mark.parametrize("chunks,tokens", [(2, 37), (3, 37), (7, 37), (9, 5), (4, 0), (3, 1)])
def test_pipelined_equals_unpipelined(transport, chunks, tokens):
    # unused slots (-1) cross chunk boundaries too
    cfg = cfg_for(transport=transport, router="top_p", top_p=0.7)
    torch.manual_seed(chunks * 100 + tokens)
    plain = MoELayer(cfg)
    torch.manual_seed(chunks * 100 + tokens)
    piped = MoELayer(cfg.replace(num_chunks=chunks))
    x = torch.randn(tokens, H)
    g = torch.randn(tokens, H)
    expected = fwd_bwd(plain, x, g)
    assert_fwd_bwd_close(fwd_bwd(piped, x, g), expected, f"{transport} C={chunks} T={tokens}")
    if tokens:  # the weights really got gradients (a test that compares zeros proves nothing)
        assert expected.grads["experts.w_in"].abs().sum() > 0 and expected.output.abs().sum() > 0


@pytest.mark.parametrize("router,capacity", [("softmax", 0.5), ("sigmoid", None)])
def test_pipelined_equals_unpipelined_routers_3d_input(router, capacity):
    cfg = cfg_for(
        transport="local",
        router=router,
        capacity_factor=capacity,
        shared_expert_gate=True,
        router_bias_update_rate=0.0,
    )
    torch.manual_seed(3)
    plain = MoELayer(cfg)
    torch.manual_seed(3)
    piped = MoELayer(cfg.replace(num_chunks=3))
    x, g = torch.randn(2, 11, H), torch.randn(2, 11, H)
    label = f"{router} capacity={capacity}"
    assert_fwd_bwd_close(fwd_bwd(piped, x, g), fwd_bwd(plain, x, g), label)


def test_chunks_are_really_used():
    """The pipelined path makes one dispatch and one combine per chunk, in the issue order."""
    torch.manual_seed(0)
    layer = MoELayer(cfg_for(transport="local", num_chunks=3))
    calls, tr = [], layer.transport
    dispatch, combine = tr.dispatch, tr.combine
    tr.dispatch = lambda x, plan: calls.append(("d", x.shape[0], plan.num_tokens)) or dispatch(
        x, plan
    )
    tr.combine = lambda y, h: calls.append(("c", h.weights_TK.shape[0])) or combine(y, h)
    layer(torch.randn(10, H))
    assert calls == [("d", 4, 4), ("d", 3, 3), ("c", 4), ("d", 3, 3), ("c", 3), ("c", 3)], calls


def test_issue_order():
    assert issue_order(1) == [("dispatch", 0), ("experts", 0), ("combine", 0)]
    order = issue_order(4)
    comm = [f"{op[0]}{i}" for op, i in order if op != "experts"]
    assert comm == ["d0", "d1", "c0", "d2", "c1", "d3", "c2", "c3"]
    for i in range(4):  # each chunk: dispatch, then experts, then combine, each exactly once
        phases = [op for op, j in order if j == i]
        assert phases == ["dispatch", "experts", "combine"], (i, phases)
    # while chunk i computes, chunk i+1's dispatch is issued before chunk i's combine
    for i in range(3):
        assert order.index(("dispatch", i + 1)) < order.index(("combine", i))
    with pytest.raises(ValueError, match="num_chunks must be >= 1, got 0"):
        issue_order(0)


@pytest.mark.parametrize("tokens,chunks", [(10, 3), (2, 5), (0, 3)])
def test_split_plan(tokens, chunks):
    torch.manual_seed(1)
    layer = MoELayer(cfg_for(transport="local", router="top_p", top_p=0.6))
    plan = layer.router(torch.randn(tokens, H))
    parts = split_plan(plan, chunks)
    assert len(parts) == chunks
    assert [p.num_tokens for p in parts] == [
        t.shape[0] for t in torch.tensor_split(torch.empty(tokens), chunks)
    ]
    assert torch.equal(torch.cat([p.expert_idx_TK for p in parts]), plan.expert_idx_TK)
    assert torch.equal(torch.cat([p.weights_TK for p in parts]), plan.weights_TK)
    assert torch.equal(sum(p.tokens_per_expert_E for p in parts), plan.tokens_per_expert_E)
    for p in parts:
        routed = p.expert_idx_TK[p.expert_idx_TK >= 0]
        assert torch.equal(p.tokens_per_expert_E, torch.bincount(routed, minlength=E))
        assert float(p.aux_loss) == 0.0 and int(p.dropped_tokens) == 0


def test_observers_see_whole_batch():
    torch.manual_seed(2)
    layer = MoELayer(cfg_for(transport="local", num_chunks=4))
    seen = []
    layer.add_observer(lambda lay, x, plan, counts, y: seen.append((x.shape[0], int(counts.sum()))))
    layer(torch.randn(9, H))
    assert seen == [(9, 27)], seen


def test_pipelined_moe_direct_call_and_config_validation():
    torch.manual_seed(4)
    layer = MoELayer(cfg_for(transport="local", num_shared_experts=0))
    x = torch.randn(13, H)
    plan = layer.router(x)
    torch.testing.assert_close(
        pipelined_moe(layer.transport, layer.experts, x, plan, 5, layer.streams),
        layer.routed_pass(x, plan)[0],
    )
    with pytest.raises(ValueError, match="num_chunks must be a positive int, got 0"):
        cfg_for(transport="local", num_chunks=0)
    with pytest.raises(ValueError, match="shared_expert_overlap must be a bool, got 1"):
        cfg_for(transport="local", shared_expert_overlap=1)


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    assert_ran(run_python("-m", "benchmarks.overlap", "--smoke", "--out", tmp_path, timeout=120))
    data = json.loads((tmp_path / "overlap.json").read_text())
    rows = data["results"]
    assert {r["num_chunks"] for r in rows if r["what"] == "layer"} == {1, 2, 4, 8}
    for key in ("t_comm_ms", "t_compute_ms", "efficiency"):
        assert key in data["summary"]["fwd"], data["summary"]
    assert "ratio_side_stream_on" in data["shared"]
    micro = [r for r in rows if r["what"] == "microbatches"]
    assert [(r["mode"], r["num_microbatches"]) for r in micro] == [("fwd", 2), ("fwd_bwd", 2)]
    assert all(r["t_layer_ms"] > 0 for r in micro)
    assert data["summary"]["fwd_bwd"]["microbatches_vs_best_chunks"] > 0
