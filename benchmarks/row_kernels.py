"""The fused path's row kernels against their bandwidth floor and SonicMoE's, in the same run:

reduce_rows        out[t] = sum_k y[pos[t, k]] (the combine, and dx in backward), autotuned tile
reduce_rows_vals   the same, also gathering one fp32 value per slot (backward: d(weights))
one_tile           the same kernel held to one [K, BLOCK_H] tile per program (the tile before the
                   autotuner could choose rows in flight: BLOCK_H 256/512/1024, the best one)
sonicmoe           SonicMoE's token_gather_sum kernel on the same rows (when installed)
floor              y.view(T, K, H).sum(1): the same bytes read and written, contiguously
gather_rows        x[row_slot[r] // K] for every row, against x.index_select (same bytes)

Shapes are the layer benchmark's top-k / hidden pairs plus ones it does not list (DeepSeek-like
hidden 7168, K=6, odd hidden, few tokens). Every variant is checked against the oracle
(experts/fused/reference.py) before it is timed; times are CUDA-event medians after warm-up, each
sample REPS calls back to back (so the host's launch overhead, tens of microseconds on the
autotuned ops' Python path, overlaps the kernels instead of adding to them).

  python -m benchmarks.row_kernels --out benchmarks/results    # GPU, bf16
  python -m benchmarks.row_kernels --smoke --out DIR           # Triton's interpreter on CPU (CI)
"""

from __future__ import annotations

import sys

SHAPES = {  # tokens, hidden, top-k, experts
    "olmoe": (16384, 2048, 8, 64),
    "fine_grained": (16384, 2048, 2, 64),
    "mixtral": (8192, 4096, 2, 8),
    "deepseek_like": (4096, 7168, 8, 256),
    "k6_h1536": (8192, 1536, 6, 64),
    "odd_h1000_k3": (8192, 1000, 3, 16),
    "few_tokens": (128, 7168, 8, 256),
}
SMOKE_SHAPES = {"olmoe": (24, 40, 8, 16), "odd": (13, 24, 3, 5)}
REPS = 10  # calls per timed sample on a GPU


def main(argv=None):
    from benchmarks.common import kernel_bench_cli, save_results

    args, cuda, dev, dt, per_call = kernel_bench_cli(__doc__, argv, iters=20, warmup=5, reps=REPS)
    import torch

    from moe_dist.experts.fused import ops
    from moe_dist.experts.fused import reference as ref
    from moe_dist.experts.fused.kernels import reduce_rows_kernel

    table = SMOKE_SHAPES if args.smoke else SHAPES
    sonic = _sonic_gather_sum() if cuda else None
    results = {}
    for name in (args.shapes or ",".join(table)).split(","):
        T, H, K, E = table[name]
        gen = torch.Generator(device=dev).manual_seed(T + H + K)
        idx = torch.rand(T, E, device=dev, generator=gen).argsort(-1)[:, :K]
        pos, row_slot, _, ends = ops.sort_slots(idx, E)
        y = torch.randn(T * K, H, device=dev, generator=gen).to(dt)
        x = torch.randn(T, H, device=dev, generator=gen).to(dt)
        vals = torch.randn(T * K, device=dev, generator=gen)
        want, want_vals = ref.reduce_rows(y, pos, vals)
        tol = dict(rtol=2e-2, atol=2e-2) if cuda else dict(rtol=1e-5, atol=1e-5)
        check = lambda got: torch.testing.assert_close(got.float(), want.float(), **tol)  # noqa

        def one_tile(block):
            out = torch.empty_like(x)
            KP = max(ops._pow2(K), 2)
            meta = dict(BLOCK_K=KP, BLOCK_H=block, COLS=block)
            reduce_rows_kernel[(T, -(-H // block))](
                y, pos, out, out, out, H, K=K, KP=KP, HAS_VALS=False, **meta
            )
            return out

        variants = {
            "reduce_rows": lambda: ops.reduce_rows(y, pos, None)[0],
            "reduce_rows_vals": lambda: ops.reduce_rows(y, pos, vals)[0],
            "floor": lambda: y.view(T, K, H).sum(1),
        }
        blocks = (256, 512, 1024) if cuda else (16,)
        for b in blocks:
            variants[f"one_tile_{b}"] = lambda b=b: one_tile(b)
        if sonic is not None:
            perm = pos.reshape(-1).contiguous()
            offsets = torch.arange(0, T * K + 1, K, device=dev, dtype=torch.int32)

            def sonic_sum():
                out = torch.empty_like(x)
                sonic(y, None, out, perm, offsets, T, K, H, False)
                return out

            variants["sonicmoe"] = sonic_sum
        row = {"shape": dict(tokens=T, hidden=H, top_k=K, experts=E, dtype=str(dt))}
        moved = (T * K * H + T * H) * y.element_size()
        for vname, fn in variants.items():
            if vname != "floor":
                check(fn())
            r = row[vname] = per_call(fn)
            r["GB_per_s"] = moved / (r["median_ms"] * 1e-3) / 1e9
        got_vals = ops.reduce_rows(y, pos, vals)[1]
        torch.testing.assert_close(got_vals, want_vals, rtol=0, atol=0)
        best_tile = min((f"one_tile_{b}" for b in blocks), key=lambda v: row[v]["median_ms"])
        row["one_tile"] = dict(row[best_tile], tile=best_tile)
        for b in blocks:
            del row[f"one_tile_{b}"]
        # the tuner's best_config is that of its latest call: HAS_VALS is in its key, so each
        # variant is read right after a call of its own
        for label, v in (("reduce_rows_vals_config", vals), ("reduce_rows_config", None)):
            ops.reduce_rows(y, pos, v)
            tuned = getattr(ops._TUNED.get("reduce"), "best_config", None)
            row[label] = str(tuned) if tuned is not None else None
        # gather_rows: K copies of each token row, expert-major
        want_rows = ref.gather_rows(x, row_slot, ends, K)
        tok = (row_slot.long() // K).contiguous()
        torch.testing.assert_close(ops.gather_rows(x, row_slot, ends, K), want_rows, **tol)
        for vname, fn in (
            ("gather_rows", lambda: ops.gather_rows(x, row_slot, ends, K)),
            ("gather_floor", lambda: x.index_select(0, tok)),
        ):
            r = row[vname] = per_call(fn)
            r["GB_per_s"] = moved / (r["median_ms"] * 1e-3) / 1e9
        for other in ("one_tile", "sonicmoe", "floor"):
            if other in row:
                row[f"reduce_rows_over_{other}"] = (
                    row["reduce_rows"]["median_ms"] / row[other]["median_ms"]
                )
        row["gather_rows_over_floor"] = (
            row["gather_rows"]["median_ms"] / row["gather_floor"]["median_ms"]
        )
        results[name] = row
        print(
            f"== {name} T={T} H={H} K={K}: "
            + "  ".join(
                f"{v} {row[v]['median_ms']:.3f} ms ({row[v]['GB_per_s']:.0f} GB/s)"
                for v in ("reduce_rows", "reduce_rows_vals", "one_tile", "sonicmoe", "floor")
                if v in row
            )
            + f"  [{row['reduce_rows_config']}]"
            + f"\n   gather_rows {row['gather_rows']['median_ms']:.3f} ms,"
            f" index_select {row['gather_floor']['median_ms']:.3f} ms",
            flush=True,
        )
        name_out = "row_kernels_smoke" if args.smoke else "row_kernels_h200"
        save_results(name_out, {"reps_per_sample": args.reps, "results": results}, args.out)
    return results


def _sonic_gather_sum():
    try:
        from sonicmoe.functional.reduction_over_k_gather import (
            token_gather_and_sum_varlen_K_triton,
        )
    except ImportError as e:
        print(f"sonicmoe unavailable: {e}", file=sys.stderr)
        return None
    return token_gather_and_sum_varlen_K_triton


if __name__ == "__main__":
    main()
