"""Forward+backward time, kernels per step and peak memory of one MoE layer (EP=1), against its
peers in the same run:

fused       MoELayer, transport "local", the fused expert path (experts/fused; default on CUDA)
            with its default memory setting: it keeps x and h for backward (not x's K
            expert-major copies, not a = w * silu(gate) * up: gathered and recomputed in backward)
fused_save_all  the same keeping x's expert-major rows, h and a: less work in backward, more
            memory held (the default until 2026-12-02)
previous    the same layer and weights through the unfused path (argsort, K-fold gathers, weighted
            sum): transport.fused = False
sonicmoe    SonicMoE (sonic-moe, quack / CUTLASS DSL) with the same expert weights, when installed
fused_graph the fused step captured once in a CUDA graph and replayed (CUDA, opt-in: --only): no
            host launches, so its time is the GPU's alone; the layer issues no host sync, so it
            captures (tests/gpu/test_layer_gpu.py checks replays against eager steps)
gemm_only   only the four grouped GEMMs of the layer's own routed layout (its counts, its weight
            layout) forward and backward: what the fused path is measured against
floor       the same GEMMs on a perfectly balanced layout
hf_loop     Hugging Face Mixtral-style per-expert loop (same router and weights; slow, opt-in)
deepspeed   deepspeed.moe.layer.MoE, dropless top-k, same expert shape (opt-in: --skip "")

Each variant is checked against an oracle before it is timed (moe_dist: the HF loop forward and
the previous path's gradients; SonicMoE: its own torch backend). Gradients are set to None between
steps, as a training loop does. `peak_mb`: the step's peak above what was allocated before it;
`held_for_backward_mb`: what a forward leaves allocated until its backward (grows with depth).
`median_ms` times each step alone (events around it, then a wait); `back_to_back_ms` times 5 steps
issued without a wait, per step, so host overhead overlaps queued GPU work as in training;
`host_ms`: how long the host takes to issue one step.

  python -m benchmarks.layer --out benchmarks/results          # GPU, bf16
  python -m benchmarks.layer --smoke --out DIR                 # tiny CPU run (CI)
"""

from __future__ import annotations

import argparse
import copy
import gc
import time

import torch
import torch.nn.functional as F

from benchmarks.common import (
    host_ms,
    init_single_process_group,
    peak_memory_mb,
    save_results,
    time_ms,
)
from benchmarks.peers import deepspeed_like
from moe_dist import MoEConfig, MoELayer

CONFIGS = {  # tokens, hidden, ffn, experts, top-k
    "olmoe": (16384, 2048, 1024, 64, 8),
    "e128_k8": (8192, 2048, 768, 128, 8),  # a shape the issue does not list
    "fine_grained": (16384, 2048, 1408, 64, 2),
    "mixtral": (8192, 4096, 14336, 8, 2),
}
SMOKE_CONFIGS = {"mixtral": (64, 32, 64, 4, 2), "olmoe": (96, 32, 16, 16, 8)}


def hf_loop_forward(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Mixtral's MixtralSparseMoeBlock.forward on MoELayer's weights, the weighted sum in fp32 (the
    oracle of the checks; benchmarks.peers.hf_loop_forward sums in the input dtype)."""
    probs = F.softmax(F.linear(x.float(), layer.router.weight.float()), dim=-1)
    w, idx = probs.topk(layer.cfg.top_k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(x, dtype=torch.float32)
    for e in range(layer.cfg.num_experts):
        token, slot = torch.where(idx == e)
        gate, up = F.linear(x[token], layer.experts.w_in[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, layer.experts.w_out[e]).float() * w[token, slot, None]
        out.index_add_(0, token, y)
    return out.to(x.dtype)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def layer_flops(T, H, Fh, K) -> float:
    """Expert GEMM FLOPs of forward + backward (3x the forward's 2*T*K*H*3F)."""
    return 3 * 2 * T * K * H * 3 * Fh


def build_layer(T, H, Fh, E, K, device, dtype):
    torch.manual_seed(0)
    cfg = MoEConfig(
        hidden_size=H,
        ffn_hidden_size=Fh,
        num_experts=E,
        top_k=K,
        transport="local",
        aux_loss_coef=0.0,
        check_finite=False,  # no host sync per step (SonicMoE checks nothing either)
    )
    layer = MoELayer(cfg, device=device, dtype=dtype)
    x = torch.randn(T, H, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(T, H, device=device, dtype=dtype)
    return layer, x, grad


class Step:
    """One training step of a layer, called as fn(): clear the gradients (to None, as a training
    loop does), `prepare()` (the variant's knobs), forward, backward. The parts stay reachable so
    held_for_backward_mb can stop between forward and backward."""

    def __init__(self, forward, params, grad, prepare=None):
        self.forward, self.params, self.grad, self.prepare = forward, params, grad, prepare

    def clear(self) -> None:
        for p in self.params:
            p.grad = None
        if self.prepare is not None:
            self.prepare()

    def __call__(self) -> None:
        self.clear()
        self.forward().backward(self.grad)


class GraphedStep:
    """A Step captured in a CUDA graph at its first call (after warm-up on a side stream, where
    Triton compiles and autotunes), then replayed: the gradients land in the captured buffers."""

    def __init__(self, step: Step):
        self.step, self.graph = step, None

    def __call__(self) -> None:
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.step()
            torch.cuda.current_stream().wait_stream(side)
            self.step.clear()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.step.forward().backward(self.step.grad)
        self.graph.replay()


def held_for_backward_mb(step) -> float | None:
    """MiB one forward leaves allocated until its backward (saved activations and the output):
    per layer, the memory that grows with the model's depth (None on CPU, or for a plain fn)."""
    if not torch.cuda.is_available() or not isinstance(step, Step):
        return None
    step.clear()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    out = step.forward()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    out.backward(step.grad)
    return held / 2**20


def moe_dist_step(layer, x, grad, fused: bool, save_rows: bool, save_act: bool) -> Step:
    def prepare():
        layer.transport.fused = layer.router.fused_routing = fused
        layer.transport.fused_save_rows = save_rows
        layer.transport.fused_save_act = save_act

    return Step(lambda: layer(x).output, [x, *layer.parameters()], grad, prepare)


def grads_of(fn, tensors):
    fn()
    return [t.grad.detach().clone() for t in tensors]


def check_moe_dist(layer, x, grad, device, smoke):
    """The fused path against the HF loop (forward) and the previous path (every gradient)."""
    tol = 1e-4 if x.dtype == torch.float32 else 2e-2
    with torch.no_grad():
        ref = hf_loop_forward(layer, x)
        layer.transport.fused = layer.router.fused_routing = True
        err = {"fused_out_vs_hf_loop": rel(layer(x).output, ref)}
        layer.transport.fused = layer.router.fused_routing = False
        err["previous_out_vs_hf_loop"] = rel(layer(x).output, ref)
    watched = [x, layer.router.weight, layer.experts.w_in, layer.experts.w_out]
    keep = layer.transport.fused_save_rows, layer.transport.fused_save_act
    g_prev = grads_of(moe_dist_step(layer, x, grad, False, *keep), watched)
    g_fused = grads_of(moe_dist_step(layer, x, grad, True, *keep), watched)
    for name, a, b in zip(("dx", "drouter", "dw_in", "dw_out"), g_fused, g_prev):
        err[f"fused_{name}_vs_previous"] = rel(a, b)
    bad = {k: v for k, v in err.items() if not v < tol * (5 if "drouter" in k else 1)}
    assert not bad, f"fused path disagrees with its oracles: {bad}"
    return err


def routed_gemm_only(layer, x, device, dtype, balanced: bool):
    """The layer's four grouped GEMMs, forward and backward, on its own routed counts (or a
    perfectly balanced layout), with its weight layout: nothing else."""
    E, K = layer.cfg.num_experts, layer.cfg.top_k
    T, H = x.shape
    S = T * K
    if balanced:
        counts = torch.full((E,), S // E, device=device, dtype=torch.int64)
        counts[-1] += S - counts.sum()
    else:
        with torch.no_grad():
            counts = layer.route(x).tokens_per_expert_E
    offs = torch.cumsum(counts, 0).to(torch.int32)
    w_in, w_out = layer.experts.w_in, layer.experts.w_out
    Fh = w_out.shape[2]
    xs = torch.randn(S, H, device=device, dtype=dtype, requires_grad=True)
    act = torch.randn(S, Fh, device=device, dtype=dtype, requires_grad=True)
    g_h = torch.randn(S, 2 * Fh, device=device, dtype=dtype)
    g_y = torch.randn(S, H, device=device, dtype=dtype)
    params = [xs, act, w_in, w_out]

    def run():
        for p in params:
            p.grad = None
        torch._grouped_mm(xs, w_in.transpose(-2, -1), offs=offs).backward(g_h)
        torch._grouped_mm(act, w_out.transpose(-2, -1), offs=offs).backward(g_y)

    return run


def sonic_variant(layer, x, grad):
    """SonicMoE's MoE with moe_dist's expert and router weights; checked against its own torch
    backend before timing."""
    from sonicmoe import MoE
    from sonicmoe.enums import ActivationType, KernelBackendMoE

    cfg = layer.cfg
    Fh = cfg.ffn_hidden_size
    moe = MoE(
        cfg.num_experts, cfg.top_k, cfg.hidden_size, Fh, ActivationType.SWIGLU, False, 0.02
    ).to(x.device, x.dtype)
    with torch.no_grad():
        moe.router.weight.copy_(layer.router.weight)
        w_in = layer.experts.w_in  # [E, 2F, H] = [gate | up]; SonicMoE interleaves gate, up
        moe.c_fc.weight[:, 0::2].copy_(w_in[:, :Fh])
        moe.c_fc.weight[:, 1::2].copy_(w_in[:, Fh:])
        moe.c_proj.weight.copy_(layer.experts.w_out)
    run = Step(lambda: moe(x)[0], [x, *moe.parameters()], grad)
    run()  # compiles for this shape
    with torch.no_grad():
        out = moe(x)[0]
        # its torch backend mixes fp32 and bf16 in index_add under bf16: run it on an fp32 copy
        ref_moe = copy.deepcopy(moe).float()
        ref = ref_moe(x.float(), kernel_backend_moe=KernelBackendMoE.torch)[0]
        del ref_moe
    err = rel(out, ref)
    # bf16 router logits flip near-tied top-k picks against the fp32 copy (about 0.1 relative on
    # these shapes): a bound that catches garbage (~1.4), recorded in the results
    assert err < 0.25, f"SonicMoE disagrees with its torch backend: {err}"
    return run, err


def deepspeed_variant(layer, x, grad):
    """benchmarks.peers' DeepSpeed MoE holding this layer's router and expert weights."""
    init_single_process_group()
    ds = deepspeed_like(layer, 1, x.device, x.dtype)
    return Step(lambda: ds(x.unsqueeze(0))[0].squeeze(0), [x, *ds.parameters()], grad)


def kernels_per_step(fn, device) -> dict:
    """One profiled call of fn: kernels launched, the top kernels by time, and where the GPU idles.

    The idle figures tell a slow host (many short gaps) from a hidden sync (a few long gaps next
    to a synchronising host call, counted in host_syncs).
    """
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    events = prof.events()
    kern = [e for e in events if e.device_type == cuda]
    if not kern:  # older profilers list device events only as the CPU ops' kernels
        kern = [k for e in events for k in getattr(e, "kernels", [])]
    by_name: dict[str, list] = {}
    for e in kern:
        d = by_name.setdefault(e.name[:90], [0, 0.0])
        d[0] += 1
        d[1] += getattr(e, "device_time", getattr(e, "duration", 0.0)) / 1e3
    top = sorted(([n, c, round(t, 4)] for n, (c, t) in by_name.items()), key=lambda r: -r[2])
    out = {"kernels_per_step": len(kern), "top_kernels": top[:25]}
    spans = sorted(  # (the older profilers' kernel records have no time range)
        (r.start, r.end, e.name[:60]) for e in kern if (r := getattr(e, "time_range", None))
    )
    if spans:
        busy, gaps, end, last = 0.0, [], spans[0][0], spans[0][2]
        for start, stop, name in spans:
            if start > end:
                gaps.append((start - end, last, name))
            busy += max(0.0, stop - max(start, end))
            if stop > end:
                end, last = stop, name
        span = end - spans[0][0]
        gaps.sort(reverse=True)
        out["gpu_span_ms"] = round(span / 1e3, 4)
        out["gpu_busy_ms"] = round(busy / 1e3, 4)
        out["gpu_gaps"] = len(gaps)
        out["largest_gaps"] = [[round(g / 1e3, 4), a, b] for g, a, b in gaps[:8]]
    syncs: dict[str, int] = {}
    for e in events:  # CUDA runtime calls that wait for the GPU (an .item() is one of these)
        if e.device_type != cuda and ("Synchronize" in e.name or e.name == "cudaMemcpy"):
            syncs[e.name] = syncs.get(e.name, 0) + 1
    out["host_syncs"] = syncs  # the trailing torch.cuda.synchronize() is one of them
    return out


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true", help="tiny shapes, fp32, CPU (CI)")
    p.add_argument("--configs", default=None, help="comma-separated names (default: all)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--skip", default="hf_loop,deepspeed", help="comma-separated variants to skip")
    p.add_argument(
        "--only", default=None, help="comma-separated variants to run (checks still run)"
    )
    p.add_argument("--out", default=None, help="directory for layer_h200.json / layer_smoke.json")
    p.add_argument("--name", default=None, help="result file name (default layer_<device>)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    table = SMOKE_CONFIGS if args.smoke else CONFIGS
    iters, warmup = (2, 1) if args.smoke else (args.iters, args.warmup)
    skip = set(args.skip.split(","))
    only = set(args.only.split(",")) if args.only else None
    results = {}
    for name in (args.configs or ",".join(table)).split(","):
        T, H, Fh, E, K = table[name]
        layer, x, grad = build_layer(T, H, Fh, E, K, device, dtype)
        row = {
            "config": dict(tokens=T, hidden=H, ffn=Fh, experts=E, top_k=K, dtype=str(dtype)),
            "checks": check_moe_dist(layer, x, grad, device, args.smoke),
        }
        log(f"{name}: checked {row['checks']}")
        keep = layer.transport.fused_save_rows, layer.transport.fused_save_act  # the defaults
        variants = {
            "fused": moe_dist_step(layer, x, grad, True, *keep),
            # the fused path keeping all it can for backward: faster, more memory held
            "fused_save_all": moe_dist_step(layer, x, grad, True, save_rows=True, save_act=True),
            "previous": moe_dist_step(layer, x, grad, False, *keep),
            "gemm_only": routed_gemm_only(layer, x, device, dtype, balanced=False),
            "floor": routed_gemm_only(layer, x, device, dtype, balanced=True),
            "hf_loop": lambda: hf_loop_forward(layer, x).backward(grad),
        }
        if device.type == "cuda" and only is not None and "fused_graph" in only:
            variants["fused_graph"] = GraphedStep(moe_dist_step(layer, x, grad, True, *keep))
        if "deepspeed" not in skip and (only is None or "deepspeed" in only):
            try:
                variants["deepspeed"] = deepspeed_variant(layer, x, grad)
            except Exception as e:  # noqa: BLE001 - reported; the other variants still run
                print(f"[{name}] deepspeed unavailable: {type(e).__name__}: {e}")
        if (
            device.type == "cuda"
            and "sonicmoe" not in skip
            and (only is None or "sonicmoe" in only)
        ):
            try:
                variants["sonicmoe"], row["checks"]["sonicmoe_vs_its_torch_backend"] = (
                    sonic_variant(layer, x, grad)
                )
            except ImportError as e:
                print(f"[{name}] sonicmoe unavailable: {e}")
            log(f"{name}: sonicmoe compiled and checked")
        flops = layer_flops(T, H, Fh, K)
        for vname, fn in variants.items():
            if vname in skip or (only is not None and vname not in only):
                continue
            r = row[vname] = time_ms(fn, warmup=warmup, iters=iters)
            r["tflops"] = flops / (r["median_ms"] * 1e-3) / 1e12
            r["peak_mb"] = peak_memory_mb(fn)
            r["held_for_backward_mb"] = held_for_backward_mb(fn)
            r["host_ms"] = host_ms(fn, iters)
            # 5 steps issued without a wait, per step (None on CPU, where nothing runs ahead)
            r["back_to_back_ms"] = (
                time_ms(fn, warmup=0, iters=iters, calls=5)["median_ms"]
                if device.type == "cuda"
                else None
            )
            if device.type == "cuda":
                try:
                    r.update(kernels_per_step(fn, device))
                except Exception as e:  # noqa: BLE001 - a profiler failure must not lose timings
                    r["kernels_per_step"] = None
                    log(f"{name}: {vname} profiler failed: {type(e).__name__}: {e}")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            log(f"{name}: {vname} {r['median_ms']:.3f} ms, {r.get('kernels_per_step')} kernels")
        base = row["fused"]["median_ms"] if "fused" in row else None
        for other in ("previous", "sonicmoe", "gemm_only", "floor", "fused_graph"):
            if other in row and base is not None:
                row[f"fused_over_{other}"] = base / row[other]["median_ms"]
                b2b = row["fused"].get("back_to_back_ms"), row[other].get("back_to_back_ms")
                if None not in b2b:
                    row[f"fused_over_{other}_back_to_back"] = b2b[0] / b2b[1]
        results[name] = row
        print(f"== {name} T={T} H={H} F={Fh} E={E} k={K} {dtype}  checks {row['checks']}")
        for vname in variants:
            if vname in row:
                r = row[vname]
                print(
                    f"   {vname:10s} {r['median_ms']:9.3f} ms {r['tflops']:7.1f} TFLOP/s"
                    + (f"  peak {r['peak_mb']:9.1f} MiB" if r["peak_mb"] is not None else "")
                    + (f"  {r['kernels_per_step']:4d} kernels" if "kernels_per_step" in r else "")
                    + (
                        f"  held {r['held_for_backward_mb']:.0f} MiB"
                        if r.get("held_for_backward_mb") is not None
                        else ""
                    )
                    + (f"  host {r['host_ms']:.2f} ms" if r.get("host_ms") is not None else "")
                    + (
                        f"  gpu idle {r['gpu_span_ms'] - r['gpu_busy_ms']:.2f} ms"
                        f" in {r['gpu_gaps']} gaps"
                        if "gpu_span_ms" in r
                        else ""
                    )
                    + (
                        f"  back-to-back {r['back_to_back_ms']:.3f} ms"
                        if r.get("back_to_back_ms") is not None
                        else ""
                    )
                )
        print("   " + "  ".join(f"{k} {v:.3f}" for k, v in row.items() if "_over_" in k))
        del layer, x, grad, variants
        gc.collect()
        out_name = args.name or ("layer_smoke" if args.smoke else "layer_h200")
        save_results(out_name, {"results": results}, args.out)  # after each config: partial runs
    return results


if __name__ == "__main__":
    main()
