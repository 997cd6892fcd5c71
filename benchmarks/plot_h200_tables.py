"""The one-GPU H200 result files read for figures and README tables (`benchmarks/plot_h200.py`):
which configs ran with earlier code, which numbers come from another run, the dtype and titles,
and the markdown tables, every number read from the JSON.

layer_h200.json        `benchmarks.layer`: per config the fused path, the previous path, the
                       grouped GEMMs alone, kernels per step, peak memory, checks; SonicMoE
                       (`sonicmoe`, timed in another run beside the fused path: `from_run`,
                       `fused_same_run_ms`)
transport_1pe_h200.json  `benchmarks.transport` at one PE: dispatch+combine eager / CUDA graph,
                       bf16 / fp8 rows, collective; rows per token; SM interference"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from benchmarks.plot import RESULTS, describe, markdown_table

LAYER_JSON, TRANSPORT_JSON = RESULTS / "layer_h200.json", RESULTS / "transport_1pe_h200.json"
# Layer variants drawn and tabled: (JSON key, label, colour, hatch); SonicMoE was timed in a run of
# its own beside the fused path, so it is drawn hollow and hatched, its ratio taken in that run.
PATHS = (
    ("fused", "moe_dist fused", "C0", None),
    ("previous", "moe_dist previous path", "C3", None),
    ("gemm_only", "grouped GEMMs only", "C7", None),
    ("sonicmoe", "SonicMoE (its own run)", "C1", "//"),
)
SONIC = "sonicmoe"
# JSON key -> the knob's setting: the fused path with the other memory setting than "fused"
# (the default kept everything for backward until 2026-12-02, then only x and h)
VARIANT = {
    "fused_save_all": "fused_save_rows=fused_save_act=True",
    "fused_lowmem": "fused_save_rows=False",
}


def memory_variant(r: dict) -> str | None:
    """The key of the run's other-memory-setting variant, if it has one."""
    return next((k for k in VARIANT if isinstance(r.get(k), dict)), None)


# Transport series: (JSON key, field, label, colour, line style, marker)
TRANSPORT_SERIES = (
    ("nvshmem", "dispatch_combine_ms", "nvshmem, eager", "C0", "-", "o"),
    ("nvshmem", "dispatch_combine_graph_ms", "nvshmem, CUDA graph", "C0", "--", "o"),
    ("nvshmem_fp8", "dispatch_combine_ms", "nvshmem fp8 rows, eager", "C2", "-", "s"),
    ("nvshmem_fp8", "dispatch_combine_graph_ms", "nvshmem fp8 rows, CUDA graph", "C2", "--", "s"),
    ("collective", "dispatch_combine_ms", "collective (all_to_all_single)", "C3", "-", "^"),
    ("collective_fp8", "dispatch_combine_ms", "collective fp8 rows", "C1", "-", "v"),
)


# -- reading the JSON
# ------------------------------------------------------------------------------------------------
def load(path: Path) -> dict:
    return {"path": Path(path), **json.loads(Path(path).read_text())}


def layer_ms(r: dict, key: str) -> float | None:
    """A layer variant's median ms (an older file's figure may be a bare number)."""
    v = r.get(key)
    return v if isinstance(v, (int, float)) else (v or {}).get("median_ms")


def earlier_code(d: dict) -> set[str]:
    """Configs measured with earlier code: their `code` says "earlier", or a clause of the notes
    names them beside "earlier code"."""
    names = {n for n, r in d["results"].items() if "earlier" in str(r.get("code", ""))}
    for clause in re.split(r"(?<=\.)\s+", d.get("notes", "")):
        if "earlier code" in clause:
            names |= {n for n in d["results"] if re.search(rf"\b{re.escape(n)}\b", clause)}
    return names


def short_code(r: dict) -> str:
    return str(r.get("code", "")).split(" ")[0]


def other_run(r: dict, key: str) -> str | None:
    """The run a variant's numbers come from where it is not the config's own (`from_run`)."""
    v = r.get(key)
    return v.get("from_run") if isinstance(v, dict) else None


def fused_over(r: dict, key: str) -> float | None:
    """The fused path's time over a variant's, both from the variant's run: a variant timed in
    another run carries the fused time of that run (`fused_same_run_ms`)."""
    v = r.get(key)
    fused = v.get("fused_same_run_ms") if isinstance(v, dict) else None
    return ratio(fused or layer_ms(r, "fused"), layer_ms(r, key))


def config_name(name: str, r: dict, earlier: set[str]) -> str:
    return name + (" †" if name in earlier else "")


def shape(r: dict) -> str:
    c = r["config"]
    return f"T={c['tokens']} H={c['hidden']} F={c['ffn']} E={c['experts']} k={c['top_k']}"


def layer_title(d: dict, what: str, earlier: set[str]) -> str:
    earlier_env = d.get("environment_earlier_run") if earlier else None
    envs = [d["environment"]] + ([earlier_env] if earlier_env else [])
    dtypes = {r["config"]["dtype"].replace("torch.", "") for r in d["results"].values()}
    return describe(what, {e["device"] for e in envs}, dtypes, {"fwd+bwd"}, envs)


def transport_dtype(d: dict) -> str:
    """The activation dtype, from the bytes per token the unquantised collective path sent (the
    transport JSON records no dtype field)."""
    for row in d["results"]:
        c = row.get("collective", {})
        if c.get("dispatch_bytes_per_token") and c.get("rows_per_token"):
            size = c["dispatch_bytes_per_token"] / c["rows_per_token"] / row["hidden"]
            return {2: "bf16", 4: "fp32"}.get(round(size), f"{size:g} B/element")
    return "dtype unrecorded"


def transport_title(d: dict, what: str, fp8: bool = True) -> str:
    has_fp8 = fp8 and any(k.endswith("_fp8") for row in d["results"] for k in row)
    dtypes = {transport_dtype(d)} | ({"fp8 e4m3 rows"} if has_fp8 else set())
    pes = {row["pes"] for row in d["results"]} or {d.get("gpus")}
    where = f"{'/'.join(map(str, sorted(pes)))} PE"
    env = d["environment"]
    return describe(what, {env["device"]}, dtypes, {where}, [env])


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def value(row: dict, key: str, field: str) -> float | None:
    return (row.get(key) or {}).get(field)


def joined(cfgs: list[dict], key: str) -> str:
    return "/".join(map(str, sorted({c[key] for c in cfgs})))


def routing_name(c: dict) -> str:
    return f"top-{c['top_k']} of {c['experts']}, {c['ranks']} ranks"


def kind_name(kind: str) -> str:
    """`k_copies_bf16` -> `K copies bf16`, `dedup_fp8_e4m3` -> `dedup fp8 e4m3`."""
    return kind.replace("_", " ").replace("k copies", "K copies")


def earlier_notes(d: dict) -> list[str]:
    """One line per earlier code version the configs marked † were measured with."""
    earlier = [n for n in d["results"] if n in earlier_code(d)]  # in the JSON's order
    code = {n: d["results"][n].get("code", "earlier") for n in earlier}
    return [
        f"† {', '.join(n for n in earlier if code[n] == c)}: code {c}, not re-measured"
        for c in dict.fromkeys(code.values())
    ]


# -- README tables
# ------------------------------------------------------------------------------------------------
def num(x: float | None) -> str:
    """A measured value: 3 significant digits (trailing zeros kept), whole numbers from 100 up."""
    if x is None:
        return "—"
    if isinstance(x, int):  # counts (kernels, tokens) stay whole
        return f"{x:,}"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:#.3g}"


def times(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def source(d: dict, readme_dir: Path, what: str) -> str:
    rel = os.path.relpath(d["path"], readme_dir)
    return f"{what} (`{rel}`)"


def images(names: list[str], fig_dir: Path, readme_dir: Path) -> list[str]:
    return [f"![{Path(n).stem}]({os.path.relpath(fig_dir / n, readme_dir)})" for n in names]


def layer_markdown(d: dict, figures: list[str], fig_dir: Path, readme_dir: Path) -> str:
    earlier, results = earlier_code(d), d["results"]
    lines = [source(d, readme_dir, layer_title(d, "One MoE layer, EP=1, median ms", earlier)), ""]
    head = ["config (T, H, F, E, k)", "fused ms (TFLOP/s)", "previous ms"]
    head += ["GEMMs only ms", "SonicMoE ms (its run)", "fused / previous", "fused / GEMMs only"]
    has_sonic = any(layer_ms(r, SONIC) is not None for r in results.values())
    head += ["fused / SonicMoE (in its run)"]
    head += [f"kernels/step fused (previous{', SonicMoE' if has_sonic else ''})"]
    head += ["peak MiB fused / previous", "other memory setting: ms, MiB", "largest rel. error"]
    body, runs = [], {}
    for name, r in results.items():
        c, ms = r["config"], {key: layer_ms(r, key) for key, *_ in PATHS}
        shape_ = ", ".join(str(c[k]) for k in ("tokens", "hidden", "ffn", "experts", "top_k"))
        run = other_run(r, "gemm_only")
        if run:
            runs[run] = "‡" * (len(runs) + 1) if run not in runs else runs[run]
        other = memory_variant(r)
        f, p, low = (r.get(k) or {} for k in ("fused", "previous", other))
        body.append(
            [
                f"{config_name(name, r, earlier)} ({shape_})",
                pair(ms["fused"], f.get("tflops"), " ({})"),
                num(ms["previous"]),
                num(ms["gemm_only"]) + (runs[run] if run and ms["gemm_only"] else ""),
                num(ms[SONIC]),
                times(ratio(ms["fused"], ms["previous"])),
                times(ratio(ms["fused"], ms["gemm_only"])),
                times(fused_over(r, SONIC)),
                kernels_cell(f, p, r.get(SONIC)),
                pair(f.get("peak_mb"), p.get("peak_mb"), " / {}"),
                (f"{VARIANT[other]}: " if other else "")
                + pair(low.get("median_ms"), low.get("peak_mb"), ", {}"),
                num(max(ours(r["checks"]).values())) if ours(r.get("checks", {})) else "",
            ]
        )
    lines += markdown_table(head, body, align="---")
    lines += [""] + [f"- {n}." for n in earlier_notes(d)]
    lines += [f"- {mark} timed in run {run}." for run, mark in runs.items()]
    for name, r in results.items():
        for key, v in r.items():
            if key.startswith("earlier_run_") and isinstance(v, dict):
                was = ", ".join(f"{VARIANT.get(k, k)} {num(ms)} ms" for k, ms in v.items())
                lines.append(f"- {name} in run {key.removeprefix('earlier_run_')}: {was}.")
    checks = sorted({k for r in results.values() for k in ours(r.get("checks", {}))})
    lines += [
        "- Ratios: fused time / the other path's time (below 1: the fused path is faster). "
        "Largest rel. error: the largest ‖a − b‖ / ‖b‖ of the checks run before timing "
        f"({', '.join(f'`{k}`' for k in checks)}).",
        "",
        f"Notes recorded with the run: {d['notes']}" if d.get("notes") else "",
        "",
    ]
    lines += images(figures, fig_dir, readme_dir)
    return "\n".join(lines).rstrip() + "\n"


def ours(checks: dict) -> dict:
    """moe_dist's checks (a peer's check against its own reference is in the notes)."""
    return {k: v for k, v in checks.items() if not k.startswith("sonicmoe")}


def kernels_cell(fused: dict, previous: dict, sonic) -> str:
    """ "36 (103, 44)": the fused path's kernels per step, then the previous path's and
    SonicMoE's where measured."""
    others = [v.get("kernels_per_step") for v in (previous, sonic) if isinstance(v, dict)]
    others = ", ".join(num(c) for c in others if c is not None)
    return pair(fused.get("kernels_per_step"), others or None, " ({})")


def pair(a, b, join: str) -> str:
    """`a` then `b` formatted into `join` ("36 (121)", "1,542 / 1,608"); blank without `a`."""
    b = b if b is None or isinstance(b, str) else num(b)
    return "—" if a is None else num(a) + ("" if b is None else join.format(b))


def transport_markdown(d: dict, figures: list[str], fig_dir: Path, readme_dir: Path) -> str:
    lines = [source(d, readme_dir, transport_title(d, "Transport")), ""]
    series = [s for s in TRANSPORT_SERIES if any(value(r, s[0], s[1]) for r in d["results"])]
    head = ["tokens", "hidden", "E", "k"] + [f"{s[2]} ms" for s in series]
    head += ["nvshmem dispatch ms", "nvshmem GB/s (eager)", "of copy bandwidth"]
    body = []
    for r in sorted(d["results"], key=lambda r: (r["hidden"], r["tokens_per_rank"])):
        cells = [str(r[k]) for k in ("tokens_per_rank", "hidden", "experts", "top_k")]
        cells += [num(value(r, key, field)) for key, field, *_ in series]
        frac = value(r, "nvshmem", "fraction_of_copy_bw")
        cells += [num(value(r, "nvshmem", "dispatch_ms")), num(value(r, "nvshmem", "GBps"))]
        cells += ["—" if frac is None else f"{frac:.1%}"]
        body.append(cells)
    lines += ["**Dispatch+combine, median ms**", ""] + markdown_table(head, body)
    note = f" ({d['note']})" if d.get("note") else ""
    copy = d.get("copy_bandwidth_GBps")
    lines += [
        "",
        f"One process{note}. GB/s counts the nominal all-to-all traffic of K copies "
        "(4·T·K·H·itemsize per round trip) whatever the transport moved"
        + (f"; the device's copy bandwidth in the same run: {num(copy)} GB/s." if copy else "."),
        "",
    ]
    if d.get("rows_per_token"):
        lines += ["**Rows and bytes each token sends (counted from the routing)**", ""]
        lines += rows_table(d["rows_per_token"]) + [""]
    if d.get("sm_interference"):
        lines += ["**A grouped GEMM beside dispatch+combine bounded to N SMs**", ""]
        head = ["comm SMs", "GEMM alone ms", "GEMM beside ms", "GEMM slowdown"]
        head += ["transport alone ms", "transport beside GEMM ms"]
        body = [
            [str(s["num_comm_sms"]), num(s["gemm_alone_ms"]), num(s["gemm_beside_transport_ms"])]
            + [times(s["gemm_slowdown"]), num(s["transport_alone_ms"])]
            + [num(s["transport_beside_gemm_ms"])]
            for s in sorted(d["sm_interference"], key=lambda s: s["num_comm_sms"])
        ]
        lines += markdown_table(head, body) + [""]
    lines += images(figures, fig_dir, readme_dir)
    return "\n".join(lines).rstrip() + "\n"


def rows_table(cfgs: list[dict]) -> list[str]:
    kinds = list(dict.fromkeys(k for c in cfgs for k in c["dispatch_bytes_per_token"]))
    head = ["routing", "tokens", "rows/token K copies", "rows/token dedup (expected)"]
    head += ["to other ranks K copies", "to other ranks dedup", "K copies / dedup"]
    head += [f"dispatch bytes/token {kind_name(k)}" for k in kinds]
    body = []
    for c in cfgs:
        body.append(
            [routing_name(c), str(c["tokens"]), num(c["k_copies_rows_per_token"])]
            + [f"{num(c['dedup_rows_per_token'])} ({num(c['dedup_rows_per_token_expected'])})"]
            + [num(c["k_copies_peer_rows_per_token"]), num(c["dedup_peer_rows_per_token"])]
            + [times(c["k_copies_over_dedup"])]
            + [num(c["dispatch_bytes_per_token"].get(k)) for k in kinds]
        )
    return markdown_table(head, body) + [
        "",
        f"Hidden size {joined(cfgs, 'hidden')}; dedup sends each token once per destination "
        "rank; expected: N·(1 − C(E − E/N, K) / C(E, K)) for uniform routing.",
    ]
