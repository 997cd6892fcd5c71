"""The H200 figures and README tables (`python -m benchmarks.plot_h200`) come from the committed
JSON: every figure is written with no empty panel, labelled axes and a title naming device, dtype,
torch and date; the README sections are rewritten in place, hold no empty column, and follow the
numbers of the JSON they are given (fresh random values here); the committed READMEs' sections are
what the generator makes of the committed JSON (regenerate:
`python -m benchmarks.plot_h200 --readme README.md --readme benchmarks/README.md`)."""

from __future__ import annotations

import copy
import json
import os
import random
import re
from pathlib import Path

import pytest

from benchmarks import plot, plot_h200
from tests.conftest import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REGENERATE = "python -m benchmarks.plot_h200 --readme README.md --readme benchmarks/README.md"
MARKERS = (plot_h200.LAYER_MARKERS, plot_h200.TRANSPORT_MARKERS)


def section(text: str, markers: tuple[str, str]) -> str:
    begin, end = markers
    assert text.count(begin) == 1 and text.count(end) == 1, f"{begin} / {end} not once each"
    return text[text.index(begin) + len(begin) + 1 : text.index(end)]


def tables(md: str) -> list[list[list[str]]]:
    """Each markdown table of `md` as rows of cells (header first, the --- row left out)."""
    out, current = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                current.append(cells)
        elif current:
            out.append(current)
            current = []
    return out


def columns(table: list[list[str]]) -> dict[str, list[str]]:
    head, body = table[0], table[1:]
    assert all(len(r) == len(head) for r in body), table
    return {h: [r[i] for r in body] for i, h in enumerate(head)}


def assert_no_empty_column(md: str) -> None:
    found = tables(md)
    assert found, "no table"
    for t in found:
        for name, cells in columns(t).items():
            assert any(c not in ("", "—") for c in cells), f"column {name!r} holds no value"


def number(cell: str) -> float:
    return float(re.match(r"[-\d.,]+", cell).group(0).replace(",", ""))


@pytest.fixture
def drawn(monkeypatch):
    """Every figure saved: (path, figure title, its panels)."""
    seen, save = [], plot.save
    monkeypatch.setattr(
        plot, "save", lambda fig, path: seen.append((path, fig._suptitle.get_text(), fig.axes))
        or save(fig, path)
    )  # fmt: skip
    return seen


def check_figures(seen, out: Path, layer: dict, transport: dict) -> None:
    for path, title, axes in seen:
        assert path.parent == out and path.read_bytes().startswith(PNG_MAGIC), path
        env = (layer if path.name.startswith("layer") else transport)["environment"]
        for want in (env["device"], f"torch {env['torch']}", env["date"][:10]):
            assert want in title, f"{path.name}: {want!r} not in its title {title!r}"
        assert re.search(r"bfloat16|bf16", title), f"{path.name}: no dtype in {title!r}"
        for ax in axes:
            assert ax.has_data(), f"{path.name}: an empty panel ({ax.get_title()!r})"
            assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), path.name


def test_generator_writes_figures_and_readme_sections(tmp_path, drawn):
    out, readme = tmp_path / "figs", tmp_path / "README.md"
    readme.write_text("# title\n\nhand-written text\n")
    # the second rewrite of the same file replaces the sections instead of appending others
    plot_h200.main(["--out", str(out), "--readme", str(readme), "--readme", str(readme)])
    layer, transport = plot_h200.load(plot_h200.LAYER_JSON), plot_h200.load(
        plot_h200.TRANSPORT_JSON
    )
    names = {p.name for p in out.iterdir()}
    assert names == {n for figs in (plot_h200.LAYER_FIGURES, plot_h200.TRANSPORT_FIGURES)
                     for n, *_ in figs}  # fmt: skip
    check_figures(drawn, out, layer, transport)
    text = readme.read_text()
    assert text.startswith("# title\n\nhand-written text\n")
    for markers in MARKERS:
        md = section(text, markers)
        assert_no_empty_column(md)
        for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
            assert (tmp_path / link).is_file(), f"{link}: no such figure"
    # configs measured with earlier code (if any) are marked, in the figures' titles and the table
    earlier = {n for n, r in layer["results"].items() if "earlier" in r.get("code", "")}
    rows = columns(tables(section(text, MARKERS[0]))[0])["config (T, H, F, E, k)"]
    assert {r.split(" ")[0] for r in rows if "†" in r} == earlier
    titles = [ax.get_title() for p, _, axes in drawn if p.name == "layer_h200.png" for ax in axes]
    assert {t.split(" ")[0] for t in titles if "†" in t} == earlier
    legend = [t.get_text() for p, _, axes in drawn if p.name == "layer_h200.png"
              for t in axes[0].figure.legends[0].get_texts()]  # fmt: skip
    assert any("SonicMoE" in t and "its own run" in t for t in legend), legend


@pytest.mark.parametrize("readme", ["README.md", "benchmarks/README.md"])
def test_committed_readme_sections_are_up_to_date(readme):
    path = ROOT / readme
    text = path.read_text()
    layer, transport = plot_h200.load(plot_h200.LAYER_JSON), plot_h200.load(
        plot_h200.TRANSPORT_JSON
    )
    want = plot_h200.readme_sections(layer, transport, plot_h200.RESULTS, path.parent)
    for markers, md in want.items():
        assert section(text, markers) == md, f"{readme}'s {markers[0]} is stale: run {REGENERATE}"
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", "".join(want.values())):
        assert (path.parent / link).is_file(), f"{readme} shows {link}, which is not committed"


def fresh(d: dict, rng: random.Random) -> dict:
    """`d` with every time, rate and memory figure replaced by a fresh random value (counts,
    shapes and the bytes the routing implies kept)."""

    def walk(v, key=""):
        if isinstance(v, dict):
            return {k: walk(x, k) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x, key) for x in v]
        if isinstance(v, float) and re.search(r"ms|tflops|mb|GBps|slowdown|fraction", key):
            return rng.uniform(0.01, 50.0) * (100 if "mb" in key or "GBps" in key else 1)
        return v

    return walk(copy.deepcopy(d))


def test_tables_follow_fresh_json(tmp_path, drawn):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    layer = fresh(json.loads(plot_h200.LAYER_JSON.read_text()), rng)
    transport = fresh(json.loads(plot_h200.TRANSPORT_JSON.read_text()), rng)
    for r in layer["results"].values():  # no SonicMoE figure anywhere: its column goes
        r.pop("sonicmoe", None)
    first, *rest = layer["results"]
    layer["results"][first]["code"] = "abc1234 (earlier: a test)"
    layer["results"][rest[0]]["code"] = "abc0000"  # marked through the notes only
    layer["notes"] = f"Other configs: final code. {rest[0]}: earlier code (abc0000)."
    for r in rest[1:]:
        layer["results"][r]["code"] = "def5678 (final)"
    transport["sm_interference"] = None  # not measured: no figure, no table
    for name, d in (("layer.json", layer), ("transport.json", transport)):
        (tmp_path / name).write_text(json.dumps(d))
    out, readme = tmp_path / "figs", tmp_path / "README.md"
    (out / "transport_h200_sm.png").parent.mkdir()
    (out / "transport_h200_sm.png").write_bytes(PNG_MAGIC)  # left over from an earlier run
    args = [
        "--layer",
        str(tmp_path / "layer.json"),
        "--transport",
        str(tmp_path / "transport.json"),
    ]
    plot_h200.main(args + ["--out", str(out), "--readme", str(readme)])
    assert not (out / "transport_h200_sm.png").exists(), "a figure without data was left behind"
    check_figures(drawn, out, layer, transport)
    text = readme.read_text()
    md = section(text, MARKERS[0])
    assert_no_empty_column(md)
    cols = columns(tables(md)[0])
    assert not any("SonicMoE" in c for c in cols), f"an empty SonicMoE column (seed {seed})"
    for i, (name, r) in enumerate(layer["results"].items()):
        fused, prev = r["fused"]["median_ms"], r["previous"]["median_ms"]
        assert number(cols["fused ms (TFLOP/s)"][i]) == pytest.approx(fused, rel=6e-3), seed
        assert number(cols["previous ms"][i]) == pytest.approx(prev, rel=6e-3), seed
        assert number(cols["fused / previous"][i]) == pytest.approx(
            fused / prev, rel=6e-3, abs=6e-3
        )
        peak = cols["peak MiB fused / previous"][i].split(" / ")
        assert number(peak[0]) == pytest.approx(r["fused"]["peak_mb"], rel=6e-3, abs=0.6)
        assert cols["kernels/step fused (previous)"][i] == (
            f"{r['fused']['kernels_per_step']} ({r['previous']['kernels_per_step']})"
        )
        marked = "†" in cols["config (T, H, F, E, k)"][i]
        assert marked == (name in (first, rest[0])), (name, marked, seed)
    md = section(text, MARKERS[1])
    assert_no_empty_column(md)
    assert "SMs" not in md and "transport_h200_sm" not in md
    cols = columns(tables(md)[0])
    for i, r in enumerate(
        sorted(transport["results"], key=lambda r: (r["hidden"], r["tokens_per_rank"]))
    ):
        nv = r["nvshmem"]
        assert number(cols["nvshmem, eager ms"][i]) == pytest.approx(
            nv["dispatch_combine_ms"], rel=6e-3
        )
        graph = cols["nvshmem, CUDA graph ms"][i]
        assert number(graph) == pytest.approx(nv["dispatch_combine_graph_ms"], rel=6e-3), seed


def test_sonicmoe_ratio_is_taken_within_its_own_run(tmp_path):
    """SonicMoE timed in a run of its own: its column shows its time, and fused / SonicMoE uses
    the fused time of that run (`fused_same_run_ms`), not the config's own fused time."""
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    layer = fresh(json.loads(plot_h200.LAYER_JSON.read_text()), rng)
    with_sonic = [n for n, r in layer["results"].items() if isinstance(r.get("sonicmoe"), dict)]
    assert with_sonic, "the committed JSON has SonicMoE figures"
    layer["path"] = tmp_path / "layer.json"
    md = plot_h200.layer_markdown(layer, [], tmp_path, tmp_path)
    cols = columns(tables(md)[0])
    for i, (name, r) in enumerate(layer["results"].items()):
        cell = cols["fused / SonicMoE (in its run)"][i]
        if name not in with_sonic:
            assert cell == "—", (name, cell)
            continue
        s = r["sonicmoe"]
        assert number(cols["SonicMoE ms (its run)"][i]) == pytest.approx(s["median_ms"], rel=6e-3)
        want = s["fused_same_run_ms"] / s["median_ms"]
        assert number(cell) == pytest.approx(want, rel=6e-3, abs=6e-3), (name, cell, want)
