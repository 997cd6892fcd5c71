"""Routing telemetry: what the routers of a model did, accumulated on the device.

    tel = RoutingTelemetry(model, segment_length=16)   # attaches to every MoELayer (add_observer)
    ...train or evaluate... log(tel.summary())                                  # one line; reads
    the device (call at log steps) report = tel.reduce(group)                          # every rank
    calls: all_reduce over `group` report.to_json("routing.json"); report.plot("plots/")

Per layer, every forward adds (device tensors, no host sync): slots routed per expert, dropped
slots, the per-step load imbalance (max/mean), expert co-activation counts, sums of gate scores (the
combine weights) and of expert-output L2 norms, and two local-routing-consistency statistics from
Liang et al., "Not All Models Suit Expert Offloading" (arXiv 2505.16056, code
github.com/ljcleo/moe-lrc):

  SRP (segment routing best performance), segment length m. Over every window of m consecutive
  tokens
    of a sequence (all start positions), let c_e be how many of its tokens route to expert e. Serve
    the whole window with the fixed expert set {e : c_e >= rho}; against the real routing that makes
    m * |set| predictions of which sum(c_e over the set) are right, out of sum(c_e) activations. SRP
    = max over rho of the F1 = 2 * matches / (predictions + activations), micro-averaged over all
    windows and experts of the layer. Kept as a histogram of c_e (additive over steps and ranks).
  SCH (segment cache best hit rate), lookahead m and cache size C. A cache of C experts that knows
  the
    next m tokens: on a miss it evicts the cached expert with the fewest uses in the window of the
    current token and the m - 1 after it (uses already served subtracted), ties to the least
    recently used. Hits are judged per token before its experts are loaded; an expert seen for the
    first time hits while the cache still has a free slot (the paper's convention). The policy is a
    stack algorithm (Mattson et al. 1970), so one pass yields the hit rate of every cache size at
    once: we keep the histogram of stack depths. (Version 1 of the paper defined SCH as the best
    static cache of each window; versions 3-4 and the released code use this lookahead cache, so we
    do too.)

Token order: the observer sees x flattened to [T, H]. A [B, S, H] input is taken as B sequences of S
tokens (a forward pre-hook reads the shape); otherwise `seq_len`, else the whole batch is one
sequence. Windows never cross sequences. SCH is a sequential scan (O(S * K) small kernels per layer
and step): `lrc_every` computes SRP/SCH on every n-th forward only.

Legend: T tokens, K slots per token, E experts (global), G local experts, M rows received by local
experts, B sequences, S tokens per sequence, W windows.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from moe_dist import MoELayer

_INT_KEYS = (
    "tokens",
    "slots_E",
    "dropped",
    "coact_EE",
    "rows_E",
    "steps",
    "lrc_steps",
    "srp_hist",
    "sch_depth_hist",
    "sch_accesses",
)
_FLOAT_KEYS = ("gate_sum_E", "out_norm_sum_E", "step_imbalance_sum")


# -- local routing consistency: pure functions on routing ids
# --------------------------------------------
def _one_hot_counts(idx_BSK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 [B, S, E]: how many slots of each token route to each expert (-1 = unrouted,
    ignored)."""
    B, S, _ = idx_BSK.shape
    key = torch.where(idx_BSK >= 0, idx_BSK, num_experts)
    out = torch.zeros(B, S, num_experts + 1, dtype=torch.int64, device=idx_BSK.device)
    out.scatter_add_(2, key, torch.ones_like(key))
    return out[..., :num_experts]


def segment_count_histogram(
    idx_BSK: torch.Tensor, num_experts: int, segment_length: int
) -> torch.Tensor:
    """int64 [m + 1]: over every (window of m tokens, expert), how often the expert is used c
    times."""
    m = segment_length
    hist = torch.zeros(m + 1, dtype=torch.int64, device=idx_BSK.device)
    B, S, _ = idx_BSK.shape
    if S < m or B == 0:
        return hist
    counts_BSE = _one_hot_counts(idx_BSK, num_experts)
    csum = torch.cat([counts_BSE.new_zeros(B, 1, num_experts), counts_BSE.cumsum(1)], dim=1)
    window_BWE = csum[:, m:] - csum[:, :-m]
    return hist.scatter_add_(0, window_BWE.reshape(-1), torch.ones_like(window_BWE.reshape(-1)))


def srp_from_histogram(hist: torch.Tensor) -> tuple[float, int, list[float]]:
    """(SRP, best threshold rho, F1 for every rho = 0..m) from `segment_count_histogram`s
    (summed)."""
    hist = hist.double().cpu()
    m = hist.numel() - 1
    c = torch.arange(m + 1, dtype=torch.float64)
    matches = (c * hist).flip(0).cumsum(0).flip(0)
    predictions = m * hist.flip(0).cumsum(0).flip(0)
    activations = matches[0]
    if activations <= 0:
        return float("nan"), 0, [float("nan")] * (m + 1)
    f1 = 2 * matches / (predictions + activations).clamp(min=1)
    best = int(f1.argmax())
    return float(f1[best]), best, f1.tolist()


def cache_depth_histogram(idx_BSK: torch.Tensor, num_experts: int, lookahead: int) -> torch.Tensor:
    """int64 [E]: stack depth of every routed slot under the lookahead cache of the module
    docstring; a slot at depth d hits every cache of more than d experts. Device-only: no host
    synchronisation. """
    B, S, K = idx_BSK.shape
    E, dev = num_experts, idx_BSK.device
    hist = torch.zeros(E + 1, dtype=torch.int64, device=dev)
    if B == 0 or S == 0:
        return hist[:E]
    counts_BSE = _one_hot_counts(idx_BSK, E)
    csum = torch.cat([counts_BSE.new_zeros(B, 1, E), counts_BSE.cumsum(1)], dim=1)
    valid_BSK = idx_BSK >= 0
    x_BSK = idx_BSK.clamp(min=0)
    pos = torch.arange(E, device=dev)
    pos_BE = pos.expand(B, E)
    stack_BE = pos_BE.clone()  # position -> expert; seen experts first, in priority order
    seen_BE = torch.zeros(B, E, dtype=torch.bool, device=dev)
    n_seen_B = torch.zeros(B, dtype=torch.int64, device=dev)
    last_use_BE = torch.zeros(B, E, dtype=torch.int64, device=dev)
    unseen_priority_E = -1 - pos  # below every seen expert, distinct
    for s in range(S):
        future_BE = csum[:, min(s + lookahead, S)] - csum[:, s]  # uses in tokens [s, s + m)
        depth_of_BE = torch.empty_like(stack_BE).scatter_(1, stack_BE, pos_BE)
        new_before_B = torch.zeros_like(n_seen_B)
        for k in range(K):  # hits are judged before any of this token's experts is loaded
            x_B, v_B = x_BSK[:, s, k], valid_BSK[:, s, k]
            seen_x = seen_BE.gather(1, x_B[:, None])[:, 0]
            depth_B = torch.where(
                seen_x, depth_of_BE.gather(1, x_B[:, None])[:, 0], n_seen_B + new_before_B
            )
            hist.scatter_add_(0, torch.where(v_B, depth_B, E), torch.ones_like(depth_B))
            new_before_B += (v_B & ~seen_x).long()
        for k in range(K):  # Mattson's update: x to the top; above x's old depth the running
            x_B, v_B = x_BSK[:, s, k], valid_BSK[:, s, k]  # lowest-priority expert moves down
            priority_BE = torch.where(seen_BE, future_BE * 2**32 + last_use_BE, unseen_priority_E)
            _, argmin_BE = priority_BE.gather(1, stack_BE).cummin(dim=1)
            carried = stack_BE.gather(1, argmin_BE)  # lowest-priority expert of positions [0, i]
            carried_before = torch.cat([x_B[:, None], carried[:, :-1]], dim=1)
            delta_B = (stack_BE == x_B[:, None]).long().argmax(dim=1, keepdim=True)
            moved = torch.where(argmin_BE == pos, carried_before, stack_BE)
            new_stack = torch.where(
                pos < delta_B, moved, torch.where(pos == delta_B, carried_before, stack_BE)
            )
            stack_BE = torch.where(v_B[:, None], new_stack, stack_BE)
            hit_x = (pos_BE == x_B[:, None]) & v_B[:, None]
            n_seen_B += (hit_x & ~seen_BE).any(1).long()
            seen_BE |= hit_x
            last_use_BE = torch.where(hit_x, s * K + k + 1, last_use_BE)
            future_BE = future_BE - hit_x.long()
    return hist[:E]


def sch_from_histogram(depth_hist: torch.Tensor) -> list[float]:
    """Hit rate for cache sizes 1..E from `cache_depth_histogram`s (summed)."""
    hist = depth_hist.double().cpu()
    total = hist.sum()
    if total <= 0:
        return [float("nan")] * hist.numel()
    return (hist.cumsum(0) / total).tolist()


# -- the telemetry object
# ------------------------------------------------------------------------------
class RoutingTelemetry:
    """Routing statistics of every MoELayer in `model`, keyed by module path.

    segment_length: m of SRP and SCH (the paper reports 4..256; 16 is its headline). cache_size: C
    at which summary() reports SCH; None = 2 * top_k of each layer (the paper's finding:
        about twice the active experts balances hit rate and memory). JSON holds every C.
    seq_len: tokens per sequence when inputs arrive flattened; see the module docstring.
    lrc_every: compute SRP/SCH on every n-th forward of a layer (SCH is a sequential scan).
    Every forward that reaches the observers counts: under activation checkpointing the recomputed
    forward is observed too, so detach() around it or divide counts by two.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        segment_length: int = 16,
        cache_size: int | None = None,
        seq_len: int | None = None,
        lrc_every: int = 1,
    ):
        for name, value in (("segment_length", segment_length), ("lrc_every", lrc_every)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if cache_size is not None and (not isinstance(cache_size, int) or cache_size < 1):
            raise ValueError(f"cache_size must be a positive int or None, got {cache_size!r}")
        if seq_len is not None and (not isinstance(seq_len, int) or seq_len < 1):
            raise ValueError(f"seq_len must be a positive int or None, got {seq_len!r}")
        # Keyed by module path (the layer's own name when the model is the layer itself).
        self.layers = {
            name or m.name: m for name, m in model.named_modules() if isinstance(m, MoELayer)
        }
        if not self.layers:
            raise ValueError(f"{type(model).__name__} holds no MoELayer to observe")
        self.segment_length, self.cache_size, self.seq_len, self.lrc_every = (
            segment_length,
            cache_size,
            seq_len,
            lrc_every,
        )
        self.num_experts = {n: m.cfg.num_experts for n, m in self.layers.items()}
        self.top_k = {n: m.cfg.top_k for n, m in self.layers.items()}
        self._input_shape: dict[str, tuple[int, ...]] = {}
        self._calls = {n: 0 for n in self.layers}
        self._hooks, self._observers = [], []
        for name, layer in self.layers.items():
            observer = _Observer(self, name)
            layer.add_observer(observer)
            self._observers.append((layer, observer))
            self._hooks.append(layer.register_forward_pre_hook(_ShapeHook(self, name)))
        self.stats: dict[str, dict[str, torch.Tensor]] = {}
        self.reset()

    # -- lifecycle
    # -------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Zeroes every accumulator (e.g. after warm-up, or after each logged interval)."""
        for name, layer in self.layers.items():
            E, dev = self.num_experts[name], layer.router.weight.device
            i64 = dict(dtype=torch.int64, device=dev)
            f64 = dict(dtype=torch.float64, device=dev)
            self.stats[name] = {
                "tokens": torch.zeros((), **i64),
                "slots_E": torch.zeros(E, **i64),
                "dropped": torch.zeros((), **i64),
                "coact_EE": torch.zeros(E, E, **i64),
                "rows_E": torch.zeros(E, **i64),
                "steps": torch.zeros((), **i64),
                "lrc_steps": torch.zeros((), **i64),
                "srp_hist": torch.zeros(self.segment_length + 1, **i64),
                "sch_depth_hist": torch.zeros(E, **i64),
                "sch_accesses": torch.zeros((), **i64),
                "gate_sum_E": torch.zeros(E, **f64),
                "out_norm_sum_E": torch.zeros(E, **f64),
                "step_imbalance_sum": torch.zeros((), **f64),
            }

    def detach(self) -> None:
        """Stops observing (the accumulated statistics stay readable)."""
        for layer, observer in self._observers:
            layer.remove_observer(observer)
        for hook in self._hooks:
            hook.remove()
        self._observers, self._hooks = [], []

    def __enter__(self) -> "RoutingTelemetry":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- accumulation (runs inside the layer's forward)
    # ---------------------------------------------------
    @torch.no_grad()
    def observe(
        self,
        name: str,
        layer: MoELayer,
        x_TH: torch.Tensor,
        plan,
        counts_G: torch.Tensor,
        y_MH: torch.Tensor,
    ) -> None:
        st, E = self.stats[name], self.num_experts[name]
        idx_TK, T = plan.expert_idx_TK, x_TH.shape[0]
        routed_TK = idx_TK >= 0
        key_S = torch.where(routed_TK, idx_TK, E).reshape(-1)

        slots_E = plan.tokens_per_expert_E
        st["tokens"] += T
        st["slots_E"] += slots_E
        st["dropped"] += plan.dropped_tokens
        st["steps"] += 1
        mean = slots_E.sum().double() / E
        st["step_imbalance_sum"] += torch.where(
            mean > 0, slots_E.max().double() / mean.clamp(min=1e-30), torch.zeros_like(mean)
        )
        used_TE = torch.zeros(T, E + 1, dtype=torch.float32, device=idx_TK.device)
        used_TE.scatter_(1, torch.where(routed_TK, idx_TK, E), 1.0)
        used_TE = used_TE[:, :E]
        st["coact_EE"] += (used_TE.t() @ used_TE).round().long()  # exact: integers below 2**24
        gate_E1 = torch.zeros(E + 1, dtype=torch.float64, device=idx_TK.device)
        st["gate_sum_E"] += gate_E1.scatter_add_(
            0, key_S, plan.weights_TK.reshape(-1).double().detach()
        )[:E]

        # Output norms of this rank's experts: rows grouped by local expert, counts_G rows each;
        # rows past sum(counts_G) were never computed (may hold NaN) and are masked, not multiplied.
        G, first = counts_G.numel(), layer.experts.first_expert
        ends_G = counts_G.cumsum(0)
        group_M = torch.searchsorted(
            ends_G, torch.arange(y_MH.shape[0], device=y_MH.device), right=True
        )
        norm_M = torch.where(group_M < G, y_MH.detach().float().norm(dim=-1), 0.0).double()
        norm_G1 = torch.zeros(G + 1, dtype=torch.float64, device=y_MH.device).scatter_add_(
            0, group_M, norm_M
        )
        st["out_norm_sum_E"][first : first + G] += norm_G1[:G]
        st["rows_E"][first : first + G] += counts_G.long()

        self._calls[name] += 1
        if (self._calls[name] - 1) % self.lrc_every == 0:
            idx_BSK = idx_TK.view(*self._sequences(name, T), idx_TK.shape[1])
            st["lrc_steps"] += 1
            st["srp_hist"] += segment_count_histogram(idx_BSK, E, self.segment_length)
            st["sch_depth_hist"] += cache_depth_histogram(idx_BSK, E, self.segment_length)
            st["sch_accesses"] += routed_TK.sum()

    def _sequences(self, name: str, T: int) -> tuple[int, int]:
        """(B, S) with B * S == T: how this forward's tokens split into sequences."""
        shape = self._input_shape.get(name)
        if shape is not None and len(shape) >= 2 and math.prod(shape) == T:  # [B, S, H] input
            return math.prod(shape[:-1]), shape[-1]
        if self.seq_len is not None and T % self.seq_len == 0:
            return T // self.seq_len, self.seq_len
        return 1, T

    # -- across ranks
    # ---------------------------------------------------------------------------------------
    def reduce(self, group=None) -> "RoutingTelemetry":
        """A detached copy summed over `group` (default: the world when torch.distributed is up).
        Collective: every rank of the group must call it. Two all_reduces in all."""
        out = self.snapshot()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            names = sorted(out.stats)
            for keys in (_INT_KEYS, _FLOAT_KEYS):
                tensors = [out.stats[n][k] for n in names for k in keys]
                flat = torch.cat([t.reshape(-1) for t in tensors])
                dist.all_reduce(flat, group=group)
                for t, piece in zip(tensors, flat.split([t.numel() for t in tensors])):
                    t.copy_(piece.view_as(t))
        return out

    def snapshot(self) -> "RoutingTelemetry":
        """A detached copy of the statistics, attached to nothing."""
        out = object.__new__(RoutingTelemetry)
        out.__dict__.update(
            {
                k: v
                for k, v in self.__dict__.items()
                if k not in ("stats", "layers", "_hooks", "_observers", "_input_shape", "_calls")
            }
        )
        out.layers, out._hooks, out._observers, out._input_shape = {}, [], [], {}
        out._calls = dict(self._calls)
        out.stats = {n: {k: t.clone() for k, t in st.items()} for n, st in self.stats.items()}
        return out

    # -- reading (these synchronise with the device)
    # ---------------------------------------------------------
    def metrics(self) -> dict[str, dict]:
        """Per layer: plain Python numbers and lists (what to_json writes)."""
        out = {}
        for name, st in self.stats.items():
            s = {k: v.cpu() for k, v in st.items()}
            E = self.num_experts[name]
            slots_E = s["slots_E"].double()
            total = float(slots_E.sum())
            steps = int(s["steps"])
            srp, rho, f1 = srp_from_histogram(s["srp_hist"])
            sch_curve = sch_from_histogram(s["sch_depth_hist"])
            cache = min(self.cache_size or 2 * self.top_k[name], E)
            out[name] = {
                "num_experts": E,
                "top_k": self.top_k[name],
                "steps": steps,
                "tokens": int(s["tokens"]),
                "slots": int(total),
                "tokens_per_expert": s["slots_E"].tolist(),
                "load_fraction": (slots_E / total).tolist() if total else [0.0] * E,
                "imbalance": float(slots_E.max() / (total / E)) if total else float("nan"),
                "mean_step_imbalance": (
                    float(s["step_imbalance_sum"]) / steps if steps else float("nan")
                ),
                "dropped_slots": int(s["dropped"]),
                "dropped_fraction": (
                    int(s["dropped"]) / (total + int(s["dropped"])) if total else 0.0
                ),
                "dead_experts": [e for e in range(E) if s["slots_E"][e] == 0],
                "coactivation": s["coact_EE"].tolist(),
                "gate_sum": s["gate_sum_E"].tolist(),
                "gate_mean": (s["gate_sum_E"] / slots_E.clamp(min=1)).tolist(),
                "output_norm_sum": s["out_norm_sum_E"].tolist(),
                "output_norm_mean": (
                    (s["out_norm_sum_E"] / s["rows_E"].double().clamp(min=1)).tolist()
                ),
                "segment_length": self.segment_length,
                "lrc_steps": int(s["lrc_steps"]),
                "srp": srp,
                "srp_threshold": rho,
                "srp_f1_by_threshold": f1,
                "cache_size": cache,
                "sch": sch_curve[cache - 1],
                "sch_by_cache_size": sch_curve,
            }
        return out

    def summary(self) -> str:
        """One line for a training log."""
        m = self.metrics()
        if not m:
            return "routing: no layers"
        first = next(iter(m.values()))
        worst = max(m, key=lambda n: _nan_low(m[n]["imbalance"]))
        dropped = sum(v["dropped_slots"] for v in m.values())
        slots = sum(v["slots"] for v in m.values())
        dead = sum(len(v["dead_experts"]) for v in m.values())
        parts = [
            f"routing {len(m)} layers {first['steps']} steps {first['tokens']} tok",
            (
                f"imbalance mean {_mean(v['imbalance'] for v in m.values()):.3f} "
                f"max {m[worst]['imbalance']:.3f} ({worst})"
            ),
            f"dropped {dropped / max(1, dropped + slots):.2%}",
            f"dead experts {dead}",
            f"SRP@{self.segment_length} {_mean(v['srp'] for v in m.values()):.3f}",
            (
                f"SCH@{self.segment_length},"
                f"C={'2k' if self.cache_size is None else self.cache_size}"
                f" {_mean(v['sch'] for v in m.values()):.3f}"
            ),
        ]
        return " | ".join(parts)

    def to_json(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "segment_length": self.segment_length,
            "cache_size": self.cache_size,
            "lrc_every": self.lrc_every,
            "summary": self.summary(),
            "layers": self.metrics(),
        }
        path.write_text(json.dumps(doc, indent=1, allow_nan=True))
        return path

    def plot(self, out_dir, prefix: str = "routing") -> list[Path]:
        """One PNG per layer: load, co-activation, gate/output-norm means, SRP and SCH curves."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, v in self.metrics().items():
            E = v["num_experts"]
            fig, ax = plt.subplots(2, 2, figsize=(11, 8))
            ax[0, 0].bar(range(E), v["tokens_per_expert"])
            ax[0, 0].axhline(v["slots"] / E, color="k", ls="--", lw=1)
            ax[0, 0].set(
                title=f"slots per expert (imbalance {v['imbalance']:.2f})", xlabel="expert"
            )
            im = ax[0, 1].imshow(v["coactivation"], cmap="viridis")
            fig.colorbar(im, ax=ax[0, 1])
            ax[0, 1].set(title="co-activation (tokens)", xlabel="expert", ylabel="expert")
            bars = ax[1, 0].bar(
                [e - 0.2 for e in range(E)], v["gate_mean"], width=0.4, label="mean gate score"
            )
            twin = ax[1, 0].twinx()
            twin_bars = twin.bar(
                [e + 0.2 for e in range(E)],
                v["output_norm_mean"],
                width=0.4,
                color="C1",
                label="mean output norm",
            )
            ax[1, 0].set(title="per expert", xlabel="expert", ylabel="gate score")
            twin.set_ylabel("output norm")
            ax[1, 0].legend(handles=[bars, twin_bars], loc="lower right", fontsize=8)
            ax[1, 1].plot(
                range(1, E + 1),
                v["sch_by_cache_size"],
                marker=".",
                label=f"SCH (m={v['segment_length']})",
            )
            ax[1, 1].axvline(v["top_k"], color="k", ls=":", lw=1)
            ax[1, 1].set(
                title=(
                    f"SRP {v['srp']:.3f} (rho={v['srp_threshold']}), SCH@{v['cache_size']} "
                    f"{v['sch']:.3f}"
                ),
                xlabel="cache size (experts)",
                ylabel="hit rate",
                ylim=(0, 1.02),
            )
            ax[1, 1].legend()
            fig.suptitle(name)
            fig.tight_layout()
            path = out_dir / f"{prefix}_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
            fig.savefig(path, dpi=80)
            plt.close(fig)
            paths.append(path)
        return paths


class _Observer:
    """The callable handed to MoELayer.add_observer (a class, so remove_observer finds it by
    identity)."""

    def __init__(self, telemetry: RoutingTelemetry, name: str):
        self.telemetry, self.name = telemetry, name

    def __call__(self, layer, x_TH, plan, counts_G, y_MH) -> None:
        self.telemetry.observe(self.name, layer, x_TH, plan, counts_G, y_MH)


class _ShapeHook:
    def __init__(self, telemetry: RoutingTelemetry, name: str):
        self.telemetry, self.name = telemetry, name

    def __call__(self, module, args) -> None:
        if args and isinstance(args[0], torch.Tensor):
            self.telemetry._input_shape[self.name] = tuple(args[0].shape[:-1])


def _nan_low(v: float) -> float:
    return -math.inf if math.isnan(v) else v


def _mean(values) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")
