"""Every benchmark's tiny CPU mode (`python -m benchmarks.X --smoke`) runs to completion and writes
its JSON, so none can rot unseen; the sweep's plot step turns that JSON into PNGs and README tables,
and the sweep runs under torchrun. Processes of several seconds each: the slow tier."""

import json
from pathlib import Path

import pytest

from tests.conftest import assert_ran, concurrent_runs, run_python, torchrun

pytestmark = pytest.mark.slow
# longest first: the runs share the machine's cores (the smoke fixture)
BENCHMARKS = [
    "row_kernels",
    "gather_gemm",
    "compression_report",
    "coe_compare",
    "sweep",
    "train_throughput",
    "layer",
    "transport",
    "host_profile",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """name -> (process, DIR) of `python -m benchmarks.<name> --smoke --out DIR`: every benchmark
    starts at the module's first test, as many at once as there are cores (concurrent_runs)."""
    outs = {name: tmp_path_factory.mktemp(name) for name in BENCHMARKS}

    def job(name):
        return lambda: run_python("-m", f"benchmarks.{name}", "--smoke", "--out", outs[name])

    with concurrent_runs({name: job(name) for name in BENCHMARKS}) as runs:
        yield lambda name: (runs[name].result(), outs[name])


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_smoke(name, smoke):
    proc, out = smoke(name)
    assert_ran(proc)
    written = list(out.rglob("*.json"))
    assert written, f"benchmarks.{name} --smoke --out wrote no JSON"
    for path in written:
        assert json.loads(path.read_text()), f"{path} is empty"


def test_transport_smoke_reports_host_syncs(smoke):
    """The collective transport's rows carry its device->host reads per call: one per dispatch,
    one per combine (issue 15; tests/dist/test_collective_syncs.py counts them independently)."""
    proc, out = smoke("transport")
    assert_ran(proc)
    (path,) = out.rglob("transport_*.json")
    rows = json.loads(path.read_text())["results"]
    for row in rows:
        for name in ("collective", "collective_fp8"):
            got = (row[name]["host_syncs_per_dispatch"], row[name]["host_syncs_per_combine"])
            assert got == (1, 1), f"{name} at T={row['tokens_per_rank']}: host syncs d/c {got}"


def _check_sweep_json(path: Path, ep: int) -> dict:
    d = json.loads(path.read_text())
    assert d["ep_size"] == ep and d["environment"]["torch"] and d["config"]["tokens"]
    rows = [r for r in d["results"] if "variants" in r]
    assert rows and {r["mode"] for r in rows} == {"weak", "strong"}
    for r in rows:
        v = r["variants"]
        # the collective path (a2a + grouped GEMM) and DeepSpeed run on CPU, checked against the
        # reference
        for name in ("moe_dist:collective", "moe_dist:auto", "deepspeed"):
            assert v[name]["status"] == "ok", (name, v[name])
            assert v[name]["rel_err"] <= 1e-4 and v[name]["median_ms"] > 0
        assert v["a2a_vdev_2d"]["status"] == "skipped" and "cpu" in v["a2a_vdev_2d"]["reason"]
        assert v["moe_dist:nvshmem"]["status"] == "skipped" and v["moe_dist:nvshmem"]["reason"]
    assert d["unavailable"]["a2a_vdev_2d"], "the JSON says why the symm_mem peer was not run"
    return d


def _check_pngs(out: Path, n: int = 4) -> None:
    pngs = sorted(out.glob("sweep_*.png"))
    assert len(pngs) == n, pngs
    for png in pngs:
        data = png.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), f"{png} is not a PNG"


def test_sweep_plot_and_readme(smoke, tmp_path, monkeypatch):
    proc, out = smoke("sweep")
    assert_ran(proc)
    (json_path,) = out.glob("sweep_*.json")
    d = _check_sweep_json(json_path, ep=1)
    assert all(
        r["variants"]["moe_dist:local"]["status"] == "ok" for r in d["results"] if "variants" in r
    )
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nhand-written text\n")
    for _ in range(2):  # the second run replaces the section instead of appending another
        args = [json_path, "--out", tmp_path / "figs", "--readme", readme]
        assert_ran(run_python("-m", "benchmarks.plot", *args, timeout=120))
    _check_pngs(tmp_path / "figs", n=3)  # one EP size: no scaling figure
    text = readme.read_text()
    assert text.startswith("# title\n\nhand-written text") and text.count("sweep:begin") == 1
    assert "CPU smoke" in text and "figs/sweep_latency.png" in text and "| 64 |" in text
    assert "|  |" not in text, "a table column with no value"
    from benchmarks import plot

    drawn, save = [], plot.save
    monkeypatch.setattr(plot, "save", lambda fig, path: drawn.append(fig.axes) or save(fig, path))
    plot.main([str(json_path), "--out", str(tmp_path / "figs2")])
    assert drawn and all(ax.has_data() for axes in drawn for ax in axes), "an empty panel"
    assert all(ax.get_title() and ax.get_xlabel() for axes in drawn for ax in axes)


def test_sweep_torchrun_two_processes(tmp_path, smoke):
    """EP=2 over gloo with 2 CPU processes, then the plot step over EP=1 and EP=2 (scaling
    curves)."""
    stdout = assert_ran(
        torchrun(2, "-m", "benchmarks.sweep", "--smoke", "--out", tmp_path, timeout=180)
    )
    (json_path,) = tmp_path.glob("sweep_ep2_*.json")
    d = _check_sweep_json(json_path, ep=2)
    assert d["backend"] == "gloo" and d["world_size"] == 2
    rows = [r for r in d["results"] if "variants" in r]
    assert all(len(r["variants"]["moe_dist:collective"]["rank_median_ms"]) == 2 for r in rows)
    assert all("local" in r["variants"]["moe_dist:local"]["reason"] for r in rows)
    assert "[16/16]" in stdout, "a progress line per point"
    ep1_proc, ep1_out = smoke("sweep")
    assert_ran(ep1_proc)
    args = [json_path, *ep1_out.glob("sweep_*.json"), "--out", tmp_path / "figs"]
    assert_ran(run_python("-m", "benchmarks.plot", *args, timeout=120))
    _check_pngs(tmp_path / "figs")


WRONG_VARIANT = """
import torch
from benchmarks import sweep
build = sweep.build_layer

def wrong(ctx, p, transport):  # a 'fast' collective path whose expert weights are off by 1%
    layer = build(ctx, p, transport)
    if transport == "collective":
        with torch.no_grad():
            layer.experts.w_out.mul_(1.01)
    return layer

sweep.build_layer = wrong
d = sweep.main("--device cpu --tokens 32 --experts 4 --top-k 2 --hidden 16 --ffn 32 --peers none "
               "--transports local,collective --iters 1 --warmup 0".split())
v = d["results"][0]["variants"]
assert v["moe_dist:local"]["status"] == "ok", v
bad = v["moe_dist:collective"]
assert bad["status"] == "failed" and "reference" in bad["reason"] and "median_ms" not in bad, bad
print("WRONG VARIANT REJECTED")
"""


def test_sweep_rejects_a_wrong_variant():
    """A variant that disagrees with transport='reference' is recorded as failed and never timed."""
    assert_ran(run_python("-c", WRONG_VARIANT, timeout=120), "WRONG VARIANT REJECTED")
