"""Routing telemetry against plain-Python reference counts, and SRP / SCH against brute force."""

import json
import math

import pytest
import torch

from moe_dist import MoEConfig, MoELayer
from moe_dist.extensions.telemetry import (
    RoutingTelemetry,
    cache_depth_histogram,
    sch_from_histogram,
    segment_count_histogram,
    srp_from_histogram,
)

from tests.conftest import dense_expert


# -- brute-force references (sets and loops, straight from the definitions)
# ----------------------------
def srp_reference(seqs, num_experts, m):
    """seqs: list of sequences, each a list of tokens, each a list of expert ids (-1 = unrouted)."""
    best = -1.0
    for rho in range(m + 1):
        matches = predictions = activations = 0
        for seq in seqs:
            for start in range(len(seq) - m + 1):
                window = seq[start : start + m]
                count = [sum(tok.count(e) for tok in window) for e in range(num_experts)]
                chosen = [e for e in range(num_experts) if count[e] >= rho]
                matches += sum(count[e] for e in chosen)
                predictions += m * len(chosen)
                activations += sum(count)
        if activations:
            best = max(best, 2 * matches / (predictions + activations))
    return best


def sch_reference(seqs, num_experts, lookahead, cache_size):
    """Direct simulation of one cache size: evict the fewest uses in the lookahead window, then
    LRU."""
    hits = total = 0
    for seq in seqs:
        S = len(seq)
        future = [0] * num_experts
        for tok in seq[:lookahead]:
            for e in tok:
                if e >= 0:
                    future[e] += 1
        cache, seen, last, clock = set(), set(), [0] * num_experts, 0
        for i, tok in enumerate(seq):
            experts = [e for e in tok if e >= 0]
            n_seen = len(seen)
            for e in experts:  # judged before this token loads anything
                total += 1
                if e in cache:
                    hits += 1
                elif e not in seen:
                    hits += n_seen < cache_size  # a free slot: the first use hits
                    n_seen += 1
            for e in experts:
                clock += 1
                if e not in cache:
                    if len(cache) >= cache_size:
                        cache.remove(min(cache, key=lambda c: (future[c], last[c])))
                    cache.add(e)
                seen.add(e)
                future[e] -= 1
                last[e] = clock
            if i + lookahead < S:
                for e in seq[i + lookahead]:
                    if e >= 0:
                        future[e] += 1
    return hits / total


def random_routing(B, S, K, E, seed, drop=0.2):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(B * S)]).view(B, S, K)
    repeat = (
        torch.rand(B, S, 1, generator=gen) < 0.5
    )  # some locality: often reuse the previous token's experts
    idx[:, 1:] = torch.where(repeat[:, 1:], idx[:, :-1], idx[:, 1:])
    idx[torch.rand(B, S, K, generator=gen) < drop] = -1
    return idx


# -- SRP / SCH
# ---------------------------------------------------------------------------------------
def test_srp_sch_hand_case():
    # Sequence 0 0 1 1 0, one expert per token, windows of 2: counts per window (2,0,0) (1,1,0)
    # (0,2,0) (1,1,0); threshold 1 serves each window with its used experts: 8 matches of 12
    # predictions and 8 activations, F1 = 16 / 20.
    idx = torch.tensor([0, 0, 1, 1, 0]).view(1, 5, 1)
    hist = segment_count_histogram(idx, 3, 2)
    assert hist.tolist() == [6, 4, 2]
    srp, rho, f1 = srp_from_histogram(hist)
    assert rho == 1 and srp == pytest.approx(0.8) and f1 == pytest.approx([0.5, 0.8, 8 / 12])
    # 0 1 2 0 0 0 1, cache of 2 (first uses of 0 and 1 fill free slots and hit; 2 misses): with 3
    # tokens of lookahead, 1 (unused in the window) makes way for 2, then only the last token
    # misses; with 1 token of lookahead the tie goes LRU, 0 is evicted and token 3 misses too.
    idx = torch.tensor([0, 1, 2, 0, 0, 0, 1]).view(1, 7, 1)
    assert sch_from_histogram(cache_depth_histogram(idx, 3, 3))[1] == pytest.approx(5 / 7)
    assert sch_from_histogram(cache_depth_histogram(idx, 3, 1))[1] == pytest.approx(4 / 7)
    assert sch_from_histogram(cache_depth_histogram(idx, 3, 1))[2] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(4))
def test_srp_sch_match_brute_force(seed):
    E, K = [(4, 1), (6, 2), (8, 3), (5, 2)][seed]
    idx = random_routing(3, 17, K, E, seed)
    seqs = [[tok.tolist() for tok in seq] for seq in idx]
    for m in (1, 3, 4, 16):
        srp, _, _ = srp_from_histogram(segment_count_histogram(idx, E, m))
        ref = srp_reference(seqs, E, m)
        assert (math.isnan(srp) and ref < 0) or srp == pytest.approx(ref)
        curve = sch_from_histogram(cache_depth_histogram(idx, E, m))
        assert curve == pytest.approx([sch_reference(seqs, E, m, c) for c in range(1, E + 1)])


# -- the telemetry object against reference counts
# ------------------------------------------------------
def expert_output(layer, e, x_H):
    return dense_expert(x_H, layer.experts.w_in[e], layer.experts.w_out[e], layer.cfg.activation)


@pytest.mark.parametrize("capacity", [None, 0.8])
def test_counts_equal_reference_on_random_routing(capacity):
    E, K, H = 8, 2, 16
    torch.manual_seed(0)
    layer = MoELayer(
        MoEConfig(
            hidden_size=H,
            ffn_hidden_size=24,
            num_experts=E,
            top_k=K,
            capacity_factor=capacity,
            expert_backend="loop",
        )
    )
    tel = RoutingTelemetry(layer, segment_length=4, cache_size=3)
    plans = []
    layer.add_observer(lambda lyr, x, plan, counts, y: plans.append((x.detach().clone(), plan)))
    shapes = [(3, 20, H), (50, H), (2, 9, H)]
    for shape in shapes:
        layer(torch.randn(*shape))

    slots, coact = [0] * E, [[0] * E for _ in range(E)]
    gate, norm, dropped, tokens, step_imb = [0.0] * E, [0.0] * E, 0, 0, 0.0
    for x, plan in plans:
        tokens += x.shape[0]
        dropped += int(plan.dropped_tokens)
        step = [0] * E
        for t, row in enumerate(plan.expert_idx_TK.tolist()):
            used = [e for e in row if e >= 0]
            for k, e in enumerate(row):
                if e >= 0:
                    slots[e] += 1
                    step[e] += 1
                    gate[e] += float(plan.weights_TK[t, k].detach())
                    norm[e] += float(expert_output(layer, e, x[t]).detach().norm())
            for a in used:
                for b in used:
                    coact[a][b] += 1
        step_imb += max(step) / (sum(step) / E)
    m = tel.metrics()["moe"]
    assert m["tokens"] == tokens and m["tokens_per_expert"] == slots and m["slots"] == sum(slots)
    assert m["dropped_slots"] == dropped and (dropped > 0) == (capacity is not None)
    assert m["coactivation"] == coact
    assert m["gate_sum"] == pytest.approx(gate, rel=1e-6)
    assert m["output_norm_sum"] == pytest.approx(norm, rel=1e-5)
    assert m["imbalance"] == pytest.approx(max(slots) / (sum(slots) / E))
    assert m["mean_step_imbalance"] == pytest.approx(step_imb / len(shapes))
    assert m["steps"] == len(shapes)

    # LRC: [B, S, H] inputs are B sequences; a [T, H] input is one sequence.
    seqs = []
    for (_, plan), shape in zip(plans, shapes):
        B = shape[0] if len(shape) == 3 else 1
        seqs += [[tok.tolist() for tok in seq] for seq in plan.expert_idx_TK.view(B, -1, K)]
    assert m["srp"] == pytest.approx(srp_reference(seqs, E, 4))
    assert m["sch"] == pytest.approx(sch_reference(seqs, E, 4, 3))
    assert m["cache_size"] == 3


def test_lrc_every_seq_len_reset_detach(tmp_path):
    torch.manual_seed(1)
    layer = MoELayer(
        MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=1, expert_backend="loop")
    )
    tel = RoutingTelemetry(layer, segment_length=2, seq_len=6, lrc_every=2)
    xs = [torch.randn(12, 8) for _ in range(3)]
    plans = []
    layer.add_observer(lambda lyr, x, plan, c, y: plans.append(plan.expert_idx_TK.clone()))
    for x in xs:
        layer(x)
    m = tel.metrics()["moe"]
    assert m["lrc_steps"] == 2  # forwards 1 and 3
    expected = sum(cache_depth_histogram(plans[i].view(2, 6, 1), 4, 2) for i in (0, 2))
    assert m["sch_by_cache_size"] == pytest.approx(sch_from_histogram(expected))

    line = tel.summary()
    assert "\n" not in line and "SRP@2" in line and "SCH@2" in line and "imbalance" in line
    doc = json.loads(tel.to_json(tmp_path / "t.json").read_text())
    assert doc["layers"]["moe"]["tokens"] == 36
    paths = tel.plot(tmp_path / "plots")
    assert len(paths) == 1 and paths[0].stat().st_size > 1000

    snap = tel.reduce()  # no process group: a detached copy
    tel.reset()
    assert tel.metrics()["moe"]["tokens"] == 0 and snap.metrics()["moe"]["tokens"] == 36
    tel.detach()
    layer(xs[0])
    assert tel.metrics()["moe"]["tokens"] == 0


def test_model_with_several_layers_and_bad_arguments():
    torch.manual_seed(2)
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2, expert_backend="loop")
    model = torch.nn.Sequential(MoELayerBlock(cfg), MoELayerBlock(cfg))
    with RoutingTelemetry(model) as tel:
        model(torch.randn(2, 5, 8))
        assert sorted(tel.metrics()) == ["0.moe", "1.moe"]
    with pytest.raises(ValueError, match="segment_length"):
        RoutingTelemetry(model, segment_length=0)
    with pytest.raises(ValueError, match="no MoELayer"):
        RoutingTelemetry(torch.nn.Linear(2, 2))


class MoELayerBlock(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.moe = MoELayer(cfg)

    def forward(self, x):
        return x + self.moe(x).output


def test_observer_never_reads_the_device(monkeypatch):
    """The per-step path must not synchronise: call it with every host read of a tensor made to
    fail."""
    torch.manual_seed(3)
    layer = MoELayer(
        MoEConfig(
            hidden_size=8,
            ffn_hidden_size=8,
            num_experts=4,
            top_k=2,
            capacity_factor=1.0,
            expert_backend="loop",
        )
    )
    calls = []
    layer.add_observer(lambda *args: calls.append(args))
    layer(torch.randn(2, 7, 8))
    tel = RoutingTelemetry(layer, segment_length=3)
    tel.detach()

    def no_sync(*_, **__):
        raise AssertionError("host read of a device tensor in the per-step path")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    tel._input_shape["moe"] = (2, 7)
    tel.observe("moe", *calls[0])
    monkeypatch.undo()
    assert tel.metrics()["moe"]["tokens"] == 14 and tel.metrics()["moe"]["lrc_steps"] == 1
