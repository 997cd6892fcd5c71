"""Does a Triton grouped GEMM that reads token rows by index and runs the SwiGLU in its epilogue
beat `torch._grouped_mm` (CUTLASS) plus the separate row kernels? The issue asks measurement to
decide. Per shape, in the same run:

forward (up projection):
  unfused       gather_rows + grouped_mm(w_in) + swiglu_rows      (the fused path today)
  triton        gather_swiglu_mm: one kernel, rows read by index, SwiGLU in the epilogue
  gemm_only     grouped_mm(w_in) on rows gathered beforehand (the CUTLASS GEMM alone)
backward (down projection's dgrad + SwiGLU backward):
  unfused       grouped_mm(dy_rows, w_out) + swiglu_rows_backward (dy_rows already gathered)
  triton_rows   mm_swiglu_bwd on dy_rows (the layer needs dy_rows anyway for dW_out)
  triton_gather mm_swiglu_bwd reading dout by token (would need a gathering dW_out GEMM too)
  gemm_only     grouped_mm(dy_rows, w_out)

Each candidate is checked against the unfused path before it is timed. Times are CUDA-event
medians, each sample REPS calls back to back.

  python -m benchmarks.gather_gemm --out benchmarks/results    # GPU, bf16
  python -m benchmarks.gather_gemm --smoke                      # Triton's interpreter on CPU (CI)
"""

from __future__ import annotations


SHAPES = {  # tokens, hidden, ffn, experts, top-k
    "olmoe": (16384, 2048, 1024, 64, 8),
    "fine_grained": (16384, 2048, 1408, 64, 2),
    "e128_k8": (16384, 2048, 768, 128, 8),
    "mixtral": (8192, 4096, 14336, 8, 2),
    "unlisted_k6_h1536": (8192, 1536, 768, 48, 6),
}
SMOKE_SHAPES = {"odd": (13, 40, 24, 5, 3), "skewed": (9, 32, 16, 6, 2)}  # skewed: empty experts
REPS = 5


def main(argv=None):
    from benchmarks.common import kernel_bench_cli, save_results

    args, cuda, dev, dt, timed = kernel_bench_cli(__doc__, argv, iters=15, warmup=3, reps=REPS)
    import torch

    from benchmarks import gather_gemm_kernels as gg
    from moe_dist.experts.fused import ops

    table = SMOKE_SHAPES if args.smoke else SHAPES
    results = {}
    for name in (args.shapes or ",".join(table)).split(","):
        T, H, F, E, K = table[name]
        gen = torch.Generator(device=dev).manual_seed(T + H + F)
        idx = torch.rand(T, E, device=dev, generator=gen).argsort(-1)[:, :K]
        if name == "skewed":  # every token on experts 0..K-1: the others hold no rows
            idx = torch.arange(K, device=dev).expand(T, K).contiguous()
        pos, row_slot, _, ends = ops.sort_slots(idx, E)
        R = T * K
        x = torch.randn(T, H, device=dev, generator=gen).to(dt)
        w_in = (torch.randn(E, 2 * F, H, device=dev, generator=gen) / H**0.5).to(dt)
        w_out = (torch.randn(E, H, F, device=dev, generator=gen) / F**0.5).to(dt)
        w_S = torch.rand(R, device=dev, generator=gen).to(dt)
        dout = torch.randn(T, H, device=dev, generator=gen).to(dt)
        x_rows = ops.gather_rows(x, row_slot, ends, K)
        dy_rows = ops.gather_rows(dout, row_slot, ends, K)
        interp = not cuda

        def fwd_unfused():
            rows = ops.gather_rows(x, row_slot, ends, K)
            h = ops.grouped_mm(rows, w_in.transpose(1, 2), ends)
            return h, ops.swiglu_rows(h, w_S, row_slot, ends)

        h_ref, a_ref = fwd_unfused()
        h_tri, a_tri = gg.gather_swiglu_mm(x, row_slot, ends, w_in, w_S, K, interpret=interp)
        tol = dict(rtol=2e-2, atol=2e-2) if cuda else dict(rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(h_tri, h_ref, **tol)
        torch.testing.assert_close(a_tri, a_ref, **tol)

        def bwd_unfused():
            da = ops.grouped_mm(dy_rows, w_out, ends)
            return ops.swiglu_rows_backward(h_ref, da, w_S, row_slot, ends)

        dh_ref, dw_ref = bwd_unfused()
        dh_buf = torch.empty_like(h_ref)
        for gather in (False, True):
            dy = dout if gather else dy_rows
            dh, a, dw_part = gg.mm_swiglu_bwd(
                dy, row_slot, ends, w_out, w_S, h_ref, K, gather, dh=dh_buf, interpret=interp
            )
            torch.testing.assert_close(dh, dh_ref, **tol)
            torch.testing.assert_close(a, a_ref, **tol)
            torch.testing.assert_close(dw_part.sum(1), dw_ref, **tol)

        w_in_t = w_in.transpose(1, 2)
        fwd = {
            "unfused": fwd_unfused,
            "triton": lambda: gg.gather_swiglu_mm(
                x, row_slot, ends, w_in, w_S, K, interpret=interp
            ),
            "gemm_only": lambda: ops.grouped_mm(x_rows, w_in_t, ends),
        }
        if cuda:  # the weights through TMA descriptors (device-built: GPU only)
            h_tma, a_tma = gg.gather_swiglu_mm(x, row_slot, ends, w_in, w_S, K, tma=True)
            torch.testing.assert_close(h_tma, h_ref, **tol)
            torch.testing.assert_close(a_tma, a_ref, **tol)
            fwd["triton_tma"] = lambda: gg.gather_swiglu_mm(
                x, row_slot, ends, w_in, w_S, K, tma=True
            )
        bwd = {
            "unfused": bwd_unfused,
            "triton_rows": lambda: gg.mm_swiglu_bwd(
                dy_rows, row_slot, ends, w_out, w_S, h_ref, K, False, dh_buf, interp
            ),
            "triton_gather": lambda: gg.mm_swiglu_bwd(
                dout, row_slot, ends, w_out, w_S, h_ref, K, True, dh_buf, interp
            ),
            "gemm_only": lambda: ops.grouped_mm(dy_rows, w_out, ends),
        }
        row = {"shape": dict(tokens=T, hidden=H, ffn=F, experts=E, top_k=K, dtype=str(dt))}
        flop = {"fwd": 2 * R * H * 2 * F, "bwd": 2 * R * H * F}
        for part, variants in (("fwd", fwd), ("bwd", bwd)):
            for vname, fn in variants.items():
                r = row[f"{part}_{vname}"] = timed(fn)
                r["tflops"] = flop[part] / (r["median_ms"] * 1e-3) / 1e12
        for part in ("fwd", "fwd_tma", "bwd"):
            tuned = gg._TUNED.get(part)
            row[f"{part}_config"] = str(getattr(tuned, "best_config", None))
        results[name] = row
        print(
            f"== {name} T={T} H={H} F={F} E={E} K={K}\n  "
            + "  ".join(
                f"{k} {v['median_ms']:.3f} ms ({v['tflops']:.0f} TF/s)"
                for k, v in row.items()
                if isinstance(v, dict) and "median_ms" in v
            )
            + f"\n  fwd {row['fwd_config']}  tma {row['fwd_tma_config']}  bwd {row['bwd_config']}",
            flush=True,
        )
        out_name = "gather_gemm_smoke" if args.smoke else "gather_gemm_h200"
        save_results(out_name, {"reps_per_sample": args.reps, "results": results}, args.out)
    return results


if __name__ == "__main__":
    main()
