"""One sweep of the MoE layer over tokens, experts, top-k, EP size and transport, with its peers
timed in the same run on the same tokens:

  moe_dist:<t>   MoELayer with transport t = local | collective | nvshmem | auto
  collective     is also the "all_to_all_single + grouped GEMM, host sync on split sizes" peer
                 (torchtitan's approach): moe_dist's transport="collective" is exactly that
  deepspeed      deepspeed.moe.layer.MoE, dropless, with moe_dist's router and expert weights
                 copied in (benchmarks/peers.py)
  a2a_vdev_2d    torch.ops.symm_mem.all_to_all_vdev_2d (PyTorch symmetric memory, NVSHMEM backend)
                 moving the same rows as moe_dist's dispatch; compared with each transport's
                 dispatch

Correct first: before a variant is timed its output (and input gradient, with --fwd-bwd) is compared
with transport="reference" on the same tokens (the first --check-tokens of each rank), and
a2a_vdev_2d's received rows with the reference dispatch, so a fast wrong variant never enters the
table. A variant that cannot run here is recorded as skipped with the reason; one that disagrees, as
failed.

One EP size per run (EP = world size). Weak scaling: --tokens are per rank; strong scaling: --tokens
are global (split evenly over the ranks). Timings: benchmarks.common.time_ms (CUDA events after
warm-up on GPU, wall clock on CPU); each rank's median, the slowest rank's reported.

    python -m benchmarks.sweep --out benchmarks/results                             # EP=1
    torchrun --standalone --nproc-per-node 2 -m benchmarks.sweep --backend gloo ... # 2 PEs, 1 GPU
    torchrun --standalone --nproc-per-node 8 -m benchmarks.sweep --out ...          # EP=8, nccl
    python -m benchmarks.sweep --smoke --out DIR                     # CPU, seconds (CI)

Legend: T tokens per rank, H hidden, F expert ffn, E experts, K top-k, N EP size, G = E/N, S = T*K.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from benchmarks.common import save_results, time_ms
from benchmarks.peers import deepspeed_like
from moe_dist import MoEConfig, MoELayer, ParallelGroups
from moe_dist.transport import NvshmemOptions, TransportOptions, nvshmem_unavailable_reason
from moe_dist.transport.permute import sort_slots_by_expert

TRANSPORTS = ("local", "collective", "nvshmem", "auto")
PEERS = ("deepspeed", "a2a_vdev_2d")
# Which moe_dist variant speedups are quoted for: what users get by default, else the fastest path.
HEADLINE = ("moe_dist:auto", "moe_dist:nvshmem", "moe_dist:local")
PEER_LABELS = {
    "deepspeed": "DeepSpeed MoE",
    "moe_dist:collective": "a2a_single + grouped GEMM (torchtitan-style)",
    "a2a_vdev_2d": "symm_mem all_to_all_vdev_2d (dispatch)",
}
SMOKE = dict(
    tokens="16,64",
    experts="4,8",
    top_k="1,2",
    hidden="32",
    ffn="64",
    mode="both",
    transports=",".join(TRANSPORTS),
    peers=",".join(PEERS),
    iters=3,
    warmup=1,
    check_tokens=0,
)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Point:
    mode: str  # "weak" | "strong"
    ep: int
    tokens_per_rank: int
    global_tokens: int
    experts: int
    top_k: int
    hidden: int
    ffn: int


@dataclass
class Ctx:
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    groups: ParallelGroups
    args: argparse.Namespace
    max_tokens: int  # per rank, over the grid: sizes nvshmem and symm_mem buffers once


# -- agreement between ranks: every rank must take the same branch, since collectives follow
# ---------
def gather(ctx: Ctx, value):
    if ctx.world == 1:
        return [value]
    out = [None] * ctx.world
    dist.all_gather_object(out, value)
    return out


def agree(ctx: Ctx, err: str | None) -> str | None:
    """The first error any rank met, on every rank (None when all succeeded)."""
    return next((e for e in gather(ctx, err) if e), None)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30)) if b.numel() else 0.0


def tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 2e-2


def timed(ctx: Ctx, fn) -> dict:
    """time_ms on every rank; median_ms is the slowest rank's median (the layer waits for it)."""
    if ctx.world > 1:
        dist.barrier()
    r = time_ms(fn, warmup=ctx.args.warmup, iters=ctx.args.iters)
    medians = gather(ctx, r["median_ms"])
    return {
        "median_ms": max(medians),
        "rank_median_ms": medians,
        "min_ms": r["min_ms"],
        "max_ms": r["max_ms"],
    }


# -- the grid
# ------------------------------------------------------------------------------------------------
def ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def names(s: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    chosen = [v for v in s.split(",") if v.strip() and v != "none"]
    unknown = set(chosen) - set(allowed)
    if unknown:
        raise SystemExit(f"{flag}: unknown {sorted(unknown)}; choose from {list(allowed)}")
    return chosen


def grid(args, world: int) -> list[Point | tuple[Point, str]]:
    """Every point, or (point, why it is skipped). Strong scaling at EP=1 is weak scaling: measured
    once."""
    modes = ["weak", "strong"] if args.mode == "both" else [args.mode]
    out = []
    for mode in modes:
        for H in ints(args.hidden):
            for F in ints(args.ffn):
                for E in ints(args.experts):
                    for K in ints(args.top_k):
                        for n in ints(
                            args.tokens if mode == "weak" else args.global_tokens or args.tokens
                        ):
                            T = n if mode == "weak" else n // world
                            p = Point(mode, world, T, T * world, E, K, H, F)
                            why = (
                                f"top_k ({K}) > experts ({E})"
                                if K > E
                                else (
                                    f"experts ({E}) not divisible by EP size ({world})"
                                    if E % world
                                    else (
                                        f"global tokens ({n}) not divisible by EP size ({world})"
                                        if mode == "strong" and n % world
                                        else None
                                    )
                                )
                            )
                            out.append((p, why) if why else p)
    return out


# -- the variants
# -----------------------------------------------------------------------------------------
def build_layer(ctx: Ctx, p: Point, transport: str) -> MoELayer:
    torch.manual_seed(
        ctx.args.seed
    )  # same seed for every variant and rank: the same weights (EP-invariant init)
    cfg = MoEConfig(
        hidden_size=p.hidden,
        ffn_hidden_size=p.ffn,
        num_experts=p.experts,
        top_k=p.top_k,
        norm_topk_prob=p.top_k > 1,  # DeepSpeed's top-1 gate keeps the raw probability
        aux_loss_coef=0.0,
        transport=transport,
        error_check="deferred",
    )  # the no-sync path; an error shows as a mismatch with the reference
    options = TransportOptions(
        nvshmem=NvshmemOptions.from_env(os.environ, max_tokens_per_rank=ctx.max_tokens)
    )
    return MoELayer(
        cfg, ctx.groups, transport_options=options, device=ctx.device, dtype=ctx.dtype
    )


def deepspeed_layer(ctx: Ctx, ref: MoELayer):
    """deepspeed.moe.layer.MoE holding exactly ref's router and local experts (benchmarks.peers)."""
    ds = deepspeed_like(ref, ctx.world, ctx.device, ctx.dtype)
    return lambda x_TH: ds(x_TH.unsqueeze(0))[0].squeeze(0)


class VDev2d:
    """torch.ops.symm_mem.all_to_all_vdev_2d doing moe_dist's dispatch: sort slots by expert, pack
    the rows into the symmetric input, exchange. Out: rows grouped by local expert, then source rank
    (out_splits_offsets[0] = splits, [1] = offsets, index g*N + src), the reference order."""

    def __init__(self, ctx: Ctx, reason: str | None):
        self.ctx, self.reason, self.bufs, self.splits = ctx, reason, {}, {}
        if reason is None:
            self.reason = agree(ctx, self._setup())

    def _setup(self) -> str | None:
        try:
            os.environ.setdefault(
                "TORCH_SYMMMEM", "NVSHMEM"
            )  # older torch reads the backend from here
            import torch.distributed._symmetric_memory as symm_mem

            try:
                symm_mem.set_backend("NVSHMEM")
            except (
                Exception
            ):  # noqa: BLE001 - already chosen (by the variable above) is fine; else say so
                get = getattr(symm_mem, "get_backend", None)
                if get is not None and get(self.ctx.device) != "NVSHMEM":
                    raise
            self.symm_mem = symm_mem
            self.group_name = dist.group.WORLD.group_name  # EP = world in this sweep
            if hasattr(symm_mem, "enable_symm_mem_for_group"):
                symm_mem.enable_symm_mem_for_group(self.group_name)
            return None
        except Exception as e:  # noqa: BLE001 - the reason goes into the JSON
            return f"symmetric memory setup failed: {type(e).__name__}: {e}"

    def _symm(self, shape, dtype):
        t = self.symm_mem.empty(shape, dtype=dtype, device=self.ctx.device)
        self.symm_mem.rendezvous(t, self.group_name)
        return t

    def buffers(self, p: Point):
        """Row buffers per (H, dtype) sized for the grid's largest T and K; split buffers per E."""
        ctx, args = self.ctx, self.ctx.args
        key = (p.hidden, ctx.dtype)
        if key not in self.bufs:
            k_max, e_max = max(ints(args.top_k)), max(ints(args.experts))
            rows_in = ctx.max_tokens * k_max
            # +16 rows per local expert: the op pads every expert to major_align (at least 1 row).
            self.bufs[key] = (
                self._symm((rows_in, p.hidden), ctx.dtype),
                self._symm((rows_in * ctx.world + 16 * e_max, p.hidden), ctx.dtype),
            )
        if p.experts not in self.splits:
            self.splits[p.experts] = (
                self._symm((p.experts,), torch.int64),
                self._symm((2, p.experts), torch.int64),
            )
        return self.bufs[key] + self.splits[p.experts]

    def dispatch(self, x_TH, plan, p: Point):
        inp, out, in_splits_E, out_so_2E = self.buffers(p)
        slots = sort_slots_by_expert(plan.expert_idx_TK, p.experts)
        S = x_TH.shape[0] * p.top_k
        torch.index_select(x_TH, 0, slots.order_S // p.top_k, out=inp[:S])
        in_splits_E.copy_(slots.counts_E)
        torch.ops.symm_mem.all_to_all_vdev_2d(inp, out, in_splits_E, out_so_2E, self.group_name)
        return out, out_so_2E

    def exchange_only(self, p: Point):
        inp, out, in_splits_E, out_so_2E = self.buffers(p)
        torch.ops.symm_mem.all_to_all_vdev_2d(inp, out, in_splits_E, out_so_2E, self.group_name)


def vdev_unavailable_reason(device: torch.device, nvshmem4py_in_use: bool) -> str | None:
    if device.type != "cuda":
        return (
            "needs CUDA tensors, NCCL-capable torch and NVSHMEM symmetric memory; this run is on"
            f" {device}"
        )
    try:
        import torch.distributed._symmetric_memory as symm_mem
    except ImportError as e:
        return f"torch.distributed._symmetric_memory is not importable ({e})"
    if not hasattr(torch.ops.symm_mem, "all_to_all_vdev_2d"):
        return f"torch {torch.__version__} has no torch.ops.symm_mem.all_to_all_vdev_2d"
    if not symm_mem.is_nvshmem_available():
        return (
            "torch's symmetric memory reports NVSHMEM unavailable (symm_mem.is_nvshmem_available()"
            " is False)"
        )
    if nvshmem4py_in_use:
        return (
            "moe_dist's nvshmem transport initialises NVSHMEM through nvshmem4py in this process"
            " and torch's symmetric memory would start a second NVSHMEM runtime: time the peer in"
            " its own run (--transports collective --peers a2a_vdev_2d)"
        )
    return None


# -- one point
# ------------------------------------------------------------------------------------------------
def measure(ctx: Ctx, p: Point, vdev: VDev2d | None, ds_reason: str | None) -> dict:
    args, dev = ctx.args, ctx.device
    gen = torch.Generator().manual_seed(1000 * args.seed + 17 * ctx.rank + p.tokens_per_rank)
    x_TH = torch.randn(p.tokens_per_rank, p.hidden, generator=gen).to(dev, ctx.dtype)
    g_TH = torch.randn(p.tokens_per_rank, p.hidden, generator=gen).to(dev, ctx.dtype)
    n_check = (
        p.tokens_per_rank if args.check_tokens <= 0 else min(args.check_tokens, p.tokens_per_rank)
    )
    xc_TH, gc_TH = x_TH[:n_check], g_TH[:n_check]
    backward, tol = not args.fwd_only, tolerance(ctx.dtype)

    def fwd(run, x):
        """Output and input gradient of run(x) on a fresh leaf."""
        x = x.detach().clone().requires_grad_(backward)
        with torch.set_grad_enabled(backward):
            y = run(x)
            if backward:
                y.backward(gc_TH)
        return y.detach(), (x.grad if backward else None)

    ref = build_layer(ctx, p, "reference")
    y_ref, gx_ref = fwd(lambda x: ref(x).output, xc_TH)

    def check(run) -> tuple[str | None, float]:
        y, gx = fwd(run, xc_TH)
        err = max(rel_err(y, y_ref), rel_err(gx, gx_ref) if backward else 0.0)
        err = max(gather(ctx, err))
        return (
            None
            if err <= tol
            else f"differs from transport='reference': rel err {err:.2e} > {tol:.0e}"
        ), err

    x_full = x_TH.detach().clone().requires_grad_(backward)

    def layer_step(run):
        def step():
            with torch.set_grad_enabled(backward):
                y = run(x_full)
                if backward:
                    y.backward(g_TH)

        return step

    variants = {}
    for t in args.transport_list:
        name, entry, layer = f"moe_dist:{t}", {}, None
        try:
            layer = build_layer(ctx, p, t)
            err = None
        except Exception as e:  # noqa: BLE001 - a transport that cannot run here is a result
            err = f"{type(e).__name__}: {e}"
        err = agree(ctx, err)
        if err:
            variants[name] = {"status": "skipped", "reason": err}
            continue
        entry["resolved"] = layer.transport.name
        alias = next(
            (
                n
                for n, v in variants.items()
                if t == "auto"
                and v.get("resolved") == entry["resolved"]
                and v.get("status") == "ok"
            ),
            None,
        )
        if alias:  # auto picked a transport this point already timed: same code, same numbers
            variants[name] = {**variants[alias], "same_as": alias}
            continue
        variants[name] = entry | timed_variant(
            ctx, lambda x, layer=layer: layer(x).output, check, layer_step, layer, x_TH, p
        )
        del layer

    if "deepspeed" in args.peer_list:
        if ds_reason:
            variants["deepspeed"] = {"status": "skipped", "reason": ds_reason}
        else:
            try:
                run, err = deepspeed_layer(ctx, ref), None
            except Exception as e:  # noqa: BLE001
                run, err = None, f"{type(e).__name__}: {e}"
            err = agree(ctx, err)
            variants["deepspeed"] = (
                {"status": "skipped", "reason": err}
                if err
                else timed_variant(ctx, run, check, layer_step, None, x_TH, p)
            )
            del run

    if "a2a_vdev_2d" in args.peer_list:
        variants["a2a_vdev_2d"] = vdev_variant(ctx, vdev, p, x_TH, ref, xc_TH)

    for v in variants.values():
        if "median_ms" in v:
            v["tokens_per_s"] = p.global_tokens / (v["median_ms"] / 1e3)
    row = {
        **asdict(p),
        "dtype": str(ctx.dtype).replace("torch.", ""),
        "pass": "dispatch" if args.dispatch_only else "fwd" if args.fwd_only else "fwd_bwd",
        "checked_tokens_per_rank": n_check,
        "variants": variants,
    }
    row["speedup"] = speedups(variants)
    del ref
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def timed_variant(ctx: Ctx, run, check, layer_step, layer: MoELayer | None, x_TH, p: Point) -> dict:
    """Check against the reference, then time the layer (unless --dispatch-only) and its
    dispatch."""
    try:
        err, rel = check(run)
        if layer is not None:
            layer.check_errors()  # deferred device-side errors (nvshmem) surface here
    except Exception as e:  # noqa: BLE001
        err, rel = f"{type(e).__name__}: {e}", None
    err = agree(ctx, err)
    if err:
        return {"status": "failed", "reason": err, "rel_err": rel}
    out = {"status": "ok", "rel_err": rel}
    if not ctx.args.dispatch_only:
        out.update(timed(ctx, layer_step(run)))
    if layer is not None:
        with torch.no_grad():
            plan = layer.route(x_TH)
            out["dispatch_ms"] = timed(ctx, lambda: layer.transport.dispatch(x_TH, plan))[
                "median_ms"
            ]
        layer.check_errors()
    return out


def vdev_variant(ctx: Ctx, vdev: VDev2d | None, p: Point, x_TH, ref: MoELayer, xc_TH) -> dict:
    if vdev is None or vdev.reason:
        return {"status": "skipped", "reason": vdev.reason if vdev else "not requested"}
    try:
        with torch.no_grad():
            plan = ref.route(xc_TH)
            ref_tok, ref_counts, _ = ref.transport.dispatch(xc_TH, plan)
            out, so = vdev.dispatch(xc_TH, plan, p)
            splits, offsets = so[0].tolist(), so[1].tolist()
            rows = torch.cat([out[o : o + s] for s, o in zip(splits, offsets)])
            counts_G = torch.tensor(splits).view(-1, ctx.world).sum(1)
            ok = torch.equal(counts_G, ref_counts.cpu()) and torch.equal(rows, ref_tok)
            err = None if ok else "received rows differ from the reference dispatch"
    except Exception as e:  # noqa: BLE001
        err = f"{type(e).__name__}: {e}"
    err = agree(ctx, err)
    if err:
        return {"status": "failed", "reason": err}
    with torch.no_grad():
        plan = ref.route(x_TH)
        return {
            "status": "ok",
            "rel_err": 0.0,
            "dispatch_ms": timed(ctx, lambda: vdev.dispatch(x_TH, plan, p))["median_ms"],
            "exchange_only_ms": timed(ctx, lambda: vdev.exchange_only(p))["median_ms"],
        }


def speedups(variants: dict) -> dict:
    """Peer time / moe_dist time for the headline variant: layer time for layer peers, dispatch time
    for a2a_vdev_2d."""
    head = next((n for n in HEADLINE if variants.get(n, {}).get("status") == "ok"), None)
    if head is None:
        return {}
    out = {"moe_dist": head}
    h = variants[head]
    for peer, field in (
        ("deepspeed", "median_ms"),
        ("moe_dist:collective", "median_ms"),
        ("a2a_vdev_2d", "dispatch_ms"),
    ):
        v = variants.get(peer, {})
        same = (
            peer == head or f"moe_dist:{h.get('resolved')}" == peer
        )  # auto may be the peer itself
        if not same and v.get("status") == "ok" and field in v and field in h:
            out[peer] = v[field] / h[field]
    return out


# -- output
# ------------------------------------------------------------------------------------------------
def fmt_variant(v: dict | None, field: str = "median_ms") -> str:
    if not v:
        return "-"
    if v.get("status") == "failed":
        return "FAIL"
    if v.get("status") != "ok" or field not in v:
        return "skip"
    return f"{v[field]:.3f}"


def table(rows: list[dict], variant_names: list[str]) -> str:
    """One line per point: each variant's layer ms, then dispatch ms; columns nobody filled are left
    out."""
    cols = [(f"{n.replace('moe_dist:', '')} ms", n, "median_ms") for n in variant_names] + [
        (f"disp {n.replace('moe_dist:', '')}", n, "dispatch_ms") for n in variant_names
    ]
    cols = [c for c in cols if any(c[2] in r["variants"].get(c[1], {}) for r in rows)]
    head = (
        ["mode", "EP", "T/rank", "E", "K", "H"]
        + [c[0] for c in cols]
        + ["speedup of " + HEADLINE[0][9:] + " over"]
    )
    lines = ["  ".join(f"{c:>9}" for c in head)]
    for r in rows:
        cells = [r["mode"], r["ep"], r["tokens_per_rank"], r["experts"], r["top_k"], r["hidden"]]
        cells += [fmt_variant(r["variants"].get(n), field) for _, n, field in cols]
        sp = " ".join(
            f"{PEER_LABELS.get(k, k).split()[0]} {v:.2f}x"
            for k, v in r["speedup"].items()
            if k != "moe_dist"
        )
        lines.append("  ".join(f"{c!s:>9}" for c in cells) + "  " + sp)
    reasons = {
        f"{n}: {v['reason']}" for r in rows for n, v in r["variants"].items() if v.get("reason")
    }
    return "\n".join(lines + [f"  not timed - {why}" for why in sorted(reasons)])


def device_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    m = re.search(r"\b([A-Z]\d{2,4})\b", torch.cuda.get_device_name(device))
    return m.group(1).lower() if m else "gpu"


def parse(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true", help="tiny CPU grid, seconds (CI)")
    p.add_argument(
        "--tokens",
        default="128,512,2048",
        help="tokens per rank (weak) and, without --global-tokens, global tokens (strong)",
    )
    p.add_argument(
        "--global-tokens", default=None, help="global tokens for strong scaling (default: --tokens)"
    )
    p.add_argument("--experts", default="8,64")
    p.add_argument("--top-k", default="2,8")
    p.add_argument("--hidden", default="2048")
    p.add_argument("--ffn", default="1408")
    p.add_argument("--transports", default="local,collective,nvshmem,auto")
    p.add_argument(
        "--peers", default="deepspeed,a2a_vdev_2d", help="subset of deepspeed,a2a_vdev_2d, or none"
    )
    p.add_argument("--mode", choices=("weak", "strong", "both"), default="weak")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--fwd-bwd", dest="fwd_only", action="store_false", help="time forward + backward (default)"
    )
    g.add_argument(
        "--fwd-only", dest="fwd_only", action="store_true", help="time forward only (no grad)"
    )
    g.add_argument(
        "--dispatch-only",
        action="store_true",
        help="time only dispatch (transports and a2a_vdev_2d)",
    )
    p.set_defaults(fwd_only=False)
    p.add_argument(
        "--dtype",
        choices=("auto",) + tuple(DTYPES),
        default="auto",
        help="auto: bf16 on GPU, fp32 on CPU",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--check-tokens",
        type=int,
        default=512,
        help="tokens per rank checked against the reference transport (0 = all)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--backend",
        default=None,
        help="process-group backend (gloo for several PEs sharing one GPU)",
    )
    p.add_argument("--out", default=None, help="directory for the JSON (e.g. benchmarks/results)")
    p.add_argument(
        "--name",
        default=None,
        help=(
            "JSON file name without .json (default"
            " sweep_ep<N>_<device>[_shared][_dispatch][_smoke]; _shared: several PEs on one GPU)"
        ),
    )
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
        args.device = "cpu"
    args.transport_list = names(args.transports, TRANSPORTS, "--transports")
    args.peer_list = names(args.peers, PEERS, "--peers")
    return args


def setup(args) -> tuple[int, int, torch.device]:
    from moe_dist.parallel import init_distributed

    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda and world > torch.cuda.device_count() and args.backend != "gloo":
        raise SystemExit(
            f"{world} processes share {torch.cuda.device_count()} GPU(s): NCCL refuses two ranks on"
            " one GPU; pass --backend gloo (the nvshmem transport still moves data through"
            " NVSHMEM)"
        )
    backend = args.backend or (None if want_cuda else "gloo")
    rank, world, _ = init_distributed(backend=backend, timeout_s=180.0)
    if want_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device


def main(argv=None) -> dict:
    args = parse(argv)
    t0 = time.perf_counter()
    rank, world, device = setup(args)
    dtype = (
        DTYPES[args.dtype]
        if args.dtype != "auto"
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    points = grid(args, world)
    runnable = [p for p in points if isinstance(p, Point)]
    max_tokens = max([p.tokens_per_rank for p in runnable] or [1])
    ctx = Ctx(rank, world, device, dtype, ParallelGroups(ep_size=world), args, max_tokens)

    nvshmem_reason = nvshmem_unavailable_reason(device)
    nvshmem4py_in_use = nvshmem_reason is None and (
        "nvshmem" in args.transport_list or ("auto" in args.transport_list and world > 1)
    )
    unavailable = {"nvshmem": nvshmem_reason}
    try:
        import deepspeed  # noqa: F401

        unavailable["deepspeed"] = None
    except ImportError as e:
        unavailable["deepspeed"] = (
            f"deepspeed is not importable ({e}); pip install deepspeed==0.19.8"
        )
    vdev = None
    if "a2a_vdev_2d" in args.peer_list:
        vdev = VDev2d(ctx, vdev_unavailable_reason(device, nvshmem4py_in_use))
        unavailable["a2a_vdev_2d"] = vdev.reason
    if rank == 0:
        print(
            f"sweep: EP={world} on {device} ({dtype}), {len(runnable)} points of {len(points)}, "
            f"{'dispatch only' if args.dispatch_only else 'fwd' if args.fwd_only else 'fwd+bwd'}; "
            + "; ".join(f"{k} unavailable: {v}" for k, v in unavailable.items() if v),
            flush=True,
        )

    rows, weak_rows = [], {}
    for i, p in enumerate(points, 1):
        if not isinstance(p, Point):
            p, why = p
            rows.append({**asdict(p), "skipped": why})
            continue
        key = (p.tokens_per_rank, p.experts, p.top_k, p.hidden, p.ffn)
        if p.mode == "strong" and world == 1 and key in weak_rows:
            row = {
                **weak_rows[key],
                "mode": "strong",
                "same_as": "weak (at EP=1 strong and weak scaling coincide)",
            }
        else:
            row = measure(ctx, p, vdev, unavailable.get("deepspeed"))
        if p.mode == "weak":
            weak_rows[key] = row
        rows.append(row)
        if rank == 0:
            cells = "  ".join(
                f"{n.replace('moe_dist:', '')} "
                f"{fmt_variant(v, 'median_ms' if 'median_ms' in v else 'dispatch_ms')}"
                for n, v in row["variants"].items()
                if v.get("status") != "skipped"
            )
            print(
                f"[{i}/{len(points)}] {p.mode} EP={world} T={p.tokens_per_rank} E={p.experts}"
                f" K={p.top_k} H={p.hidden}: {cells} ms  ({time.perf_counter() - t0:.1f} s)",
                flush=True,
            )

    measured = [r for r in rows if "variants" in r]
    variant_names = list(dict.fromkeys(n for r in measured for n in r["variants"]))
    payload = {
        "benchmark": "sweep",
        "smoke": args.smoke,
        "ep_size": world,
        "world_size": world,
        "backend": dist.get_backend(),
        "device_kind": device.type,
        "note": (
            "several PEs share one GPU (time-sliced): correctness-grade timings"
            if device.type == "cuda" and world > torch.cuda.device_count()
            else None
        ),
        "config": {
            k: getattr(args, k)
            for k in (
                "tokens",
                "global_tokens",
                "experts",
                "top_k",
                "hidden",
                "ffn",
                "transports",
                "peers",
                "mode",
                "fwd_only",
                "dispatch_only",
                "iters",
                "warmup",
                "check_tokens",
                "seed",
            )
        }
        | {"dtype": str(dtype)},
        "unavailable": unavailable,
        "peer_labels": PEER_LABELS,
        "elapsed_s": time.perf_counter() - t0,
        "results": rows,
    }
    if rank == 0:
        print(table(measured, variant_names))
        name = args.name or (
            f"sweep_ep{world}_{device_tag(device)}"
            + ("_shared" if payload["note"] else "")
            + ("_dispatch" if args.dispatch_only else "")
            + ("_smoke" if args.smoke else "")
        )
        path = save_results(name, payload, args.out)
        print(
            f"{len(measured)} points in {payload['elapsed_s']:.1f} s"
            + (f"; wrote {path}" if path else ""),
            flush=True,
        )
    if world > 1:
        dist.barrier()
    return payload


if __name__ == "__main__":
    main()
