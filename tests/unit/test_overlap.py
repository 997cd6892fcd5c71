"""What moe_dist/overlap.py does off CUDA: the shared experts' wrapper adds them exactly as the plain
layer does, the overlap setting is validated, and the benchmark's smoke mode times the layer without
overlap, with the side stream and as two micro-batches. (Split calls: tests/unit/test_microbatch.py;
the streams themselves: tests/gpu/test_overlap_gpu.py.)

Legend: T tokens, H hidden, E experts.
"""

import json

import pytest
import torch

from moe_dist import MoELayer
from moe_dist.overlap import SharedExperts, StreamSet

from tests.conftest import assert_ran, config_builder, run_python

H, F, E = 16, 24, 8


cfg_for = config_builder(ffn_hidden_size=F, num_experts=E, top_k=3, num_shared_experts=1)


@pytest.mark.parametrize("overlap", [True, False])
def test_shared_experts_off_cuda_are_added_in_place(overlap):
    """Off CUDA nothing is recorded ahead: add_to computes shared(x) on the current stream, once,
    and adds it; without shared experts the routed output comes back as it is."""
    torch.manual_seed(0)
    layer = MoELayer(cfg_for(transport="local", shared_expert_gate=True))
    x, out = torch.randn(7, H), torch.randn(7, H)
    calls = []
    layer.shared_experts.register_forward_hook(lambda *a: calls.append(1))
    shared = SharedExperts(layer.shared_experts, x, StreamSet(), overlap)
    assert shared.x_ready is None and calls == []  # scheduled, not run
    torch.testing.assert_close(shared.add_to(out), out + layer.shared_experts(x))
    assert len(calls) == 2  # one in add_to, one for the expected value
    assert SharedExperts(None, x, StreamSet(), overlap).add_to(out) is out


def test_overlap_setting_is_validated():
    with pytest.raises(ValueError, match="shared_expert_overlap must be a bool, got 1"):
        cfg_for(transport="local", shared_expert_overlap=1)


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    assert_ran(run_python("-m", "benchmarks.overlap", "--smoke", "--out", tmp_path, timeout=120))
    data = json.loads((tmp_path / "overlap.json").read_text())
    rows = data["results"]
    layer_rows = [r for r in rows if r["what"] == "layer"]
    ways = [(r["mode"], r["overlap"], r["num_microbatches"]) for r in layer_rows]
    assert ways == [
        (mode, way, 2 if way == "microbatches" else 1)
        for mode in ("fwd", "fwd_bwd")
        for way in ("no_overlap", "side_stream", "microbatches")
    ], ways
    assert all(r["t_layer_ms"] > 0 for r in layer_rows)
    assert "num_chunks" not in json.dumps(data)  # the chunk sweep is gone
    for mode in ("fwd", "fwd_bwd"):
        s = data["summary"][mode]
        for key in ("t_comm_ms", "t_compute_ms", "t_routed_ms", "t_shared_ms"):
            assert s[key] > 0, (mode, key, s)
        t = s["t_layer_ms"]
        assert s["microbatches_vs_side_stream"] == t["microbatches"] / t["side_stream"]
        assert s["side_stream_vs_no_overlap"] == t["side_stream"] / t["no_overlap"]
    assert data["shared"]["ratio_side_stream_on"] > 0
