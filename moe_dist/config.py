"""MoEConfig: the model math of one MoE layer and its execution knobs, validated at
construction. Reads no environment. How tokens travel is sized and tuned apart, in
moe_dist.transport.TransportOptions (NVSHMEM buffers, peer path, timeouts, bootstrap).

Each field's comment is its documentation: `field_docs()` reads them from this file, and
`python -m moe_dist.config --markdown` prints the README's reference table (`--update-readme`
rewrites it in place; tests/unit/test_config_docs.py fails when the README drifts)."""

from __future__ import annotations

import ast
import functools
import inspect
import io
import math
import tokenize
from dataclasses import MISSING, dataclass, fields

ROUTERS = ("softmax", "sigmoid", "group_limited", "top_p")
ACTIVATIONS = ("swiglu", "gelu", "clamped_swiglu")
TRANSPORTS = ("auto", "local", "collective", "nvshmem", "reference")
EXPERT_BACKENDS = ("auto", "grouped_mm", "loop")
ERROR_CHECKS = ("eager", "deferred")
_TOP_P_DEFAULT = 0.5
DISPATCH_DTYPES = ("bf16", "fp8_e4m3")  # transport/fp8.py
# Fields earlier versions had: passing one (a kwarg, an old config's dict) says why it went and
# what to use instead, rather than Python's bare "unexpected keyword argument".
REMOVED_FIELDS = {
    "num_chunks": (
        "num_chunks was removed in 0.2.0: the chunked pipeline never beat one chunk "
        "(benchmarks/results/overlap_*.json); overlap with ModelConfig.overlap_microbatches=2 "
        "(MoELayer.start / run_experts / finish) or shared experts (shared_expert_overlap=True, "
        "the default: a side stream) instead, and drop num_chunks from the config"
    ),
}


def removed_fields_note(names) -> str:
    """Why each removed MoEConfig field among `names` went ("" if none is one)."""
    return "; ".join(REMOVED_FIELDS[n] for n in sorted(REMOVED_FIELDS.keys() & set(names)))


def _refuses_removed_fields(cls):
    """Wraps the dataclass __init__: a removed field raises TypeError, as any unknown keyword
    does, with removed_fields_note's explanation. (functools.wraps keeps the signature.)"""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        removed = sorted(REMOVED_FIELDS.keys() & kwargs.keys())
        if removed:
            raise TypeError(
                f"{cls.__name__}.__init__() got an unexpected keyword argument {removed[0]!r}: "
                f"{removed_fields_note(removed)}"
            )
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@_refuses_removed_fields
@dataclass(frozen=True)
class MoEConfig:
    hidden_size: int  # model width H: tokens enter and leave the layer as [T, H]
    ffn_hidden_size: int  # hidden width F of each routed expert
    num_experts: int  # routed experts E (divisible by the EP size)
    top_k: int = 2  # experts each token is routed to

    # Shared (always-on) experts, DeepSeekMoE style: one dense FFN of num_shared_experts * shared
    # size.
    num_shared_experts: int = 0  # always-on experts every token passes through
    shared_ffn_hidden_size: int | None = None  # None: ffn_hidden_size
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x @ w_gate) scales the shared output

    # Routing.
    router: str = "softmax"  # scoring and selection of the experts (routing/)
    norm_topk_prob: bool = True  # renormalise the chosen experts' weights to sum to 1
    routed_scaling_factor: float = 1.0  # multiplies the routed experts' weights (DeepSeek-V3)
    num_expert_groups: int = 1  # group-limited routing: experts split into groups...
    topk_groups: int = 1  # ...and each token may only use experts of its best topk_groups groups
    top_p: float = _TOP_P_DEFAULT  # router="top_p": take experts until their mass reaches top_p
    router_bias_update_rate: float = 1e-3  # sigmoid: bias step per optimizer step (0 disables)
    aux_loss_coef: float = 1e-2  # load-balancing loss weight (Switch/GShard style)
    z_loss_coef: float = 0.0  # router z-loss weight (ST-MoE): keeps router logits small
    capacity_factor: float | None = None  # None = dropless; per rank: ceil(factor * T * K / E)

    # Experts and execution.
    activation: str = "swiglu"  # the experts' FFN activation
    expert_backend: str = "auto"  # auto: torch._grouped_mm where it runs, else the loop oracle
    transport: str = "auto"  # auto: local at EP=1, nvshmem in one GPU node, else collective
    shared_expert_overlap: bool = True  # CUDA: shared experts on a side stream while tokens travel
    check_finite: bool = True  # NaN/Inf router logits raise instead of routing garbage
    error_check: str = (
        "eager"  # "deferred": record errors on device, raise at the next check (no sync)
    )
    init_seed_offset: int = 0  # added to the seed of the layer's init (distinct layers, one seed)
    # Transport v2 (these move to the transport options object with the other transport knobs).
    dispatch_dtype: str = "bf16"  # "bf16": rows in the activation dtype; "fp8_e4m3": e4m3 + scales
    num_comm_sms: int | None = None  # nvshmem: most programs a comm kernel runs (None: no bound)

    # Families of Hugging Face models (extensions/interop/hf.py); the defaults change nothing.
    router_bias: bool = False  # GPT-OSS: a learned bias on the router logits (selects and weighs)
    expert_ffn_bias: bool = False  # GPT-OSS: the routed experts' two linear maps carry biases
    swiglu_alpha: float = 1.702  # activation="clamped_swiglu": glu = gate * sigmoid(alpha * gate)
    swiglu_limit: float = 7.0  # activation="clamped_swiglu": gate <= limit, |up| <= limit
    scale_expert_input: bool = False  # Llama 4: weight scales each expert's input, not its output
    softmax_selection_bias: bool = False  # ERNIE-4.5: softmax picks top-k of probs + expert_bias
    shared_expert_scale: float = 1.0  # the shared experts' output times this (Cohere2-MoE: 0.5)

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "ffn_hidden_size",
            "num_experts",
            "top_k",
            "num_expert_groups",
            "topk_groups",
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("num_shared_experts", "init_seed_offset"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"{name} must be an int, got {getattr(self, name)!r}")
        for name in (
            "shared_expert_overlap",
            "shared_expert_gate",
            "check_finite",
            "norm_topk_prob",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in (
            "routed_scaling_factor",
            "top_p",
            "router_bias_update_rate",
            "aux_loss_coef",
            "z_loss_coef",
        ):
            _finite_float(name, getattr(self, name))
        if self.capacity_factor is not None:
            _finite_float("capacity_factor", self.capacity_factor, " (or None: dropless)")
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.shared_ffn_hidden_size is not None and (
            not _is_int(self.shared_ffn_hidden_size) or self.shared_ffn_hidden_size < 1
        ):
            raise ValueError(
                f"shared_ffn_hidden_size must be a positive int or None, "
                f"got {self.shared_ffn_hidden_size!r}"
            )
        if not self.routed_scaling_factor > 0:
            raise ValueError(f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
        _one_of("router", self.router, ROUTERS)
        _one_of("activation", self.activation, ACTIVATIONS)
        _one_of("transport", self.transport, TRANSPORTS)
        _one_of("expert_backend", self.expert_backend, EXPERT_BACKENDS)
        _one_of("error_check", self.error_check, ERROR_CHECKS)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.num_experts % self.num_expert_groups:
            raise ValueError(
                f"num_experts ({self.num_experts}) must be divisible by "
                f"num_expert_groups ({self.num_expert_groups})"
            )
        if self.topk_groups > self.num_expert_groups:
            raise ValueError(
                f"topk_groups ({self.topk_groups}) must be <= "
                f"num_expert_groups ({self.num_expert_groups})"
            )
        experts_reachable = self.topk_groups * (self.num_experts // self.num_expert_groups)
        if self.top_k > experts_reachable:
            raise ValueError(
                f"top_k ({self.top_k}) exceeds the {experts_reachable} experts reachable "
                f"in topk_groups ({self.topk_groups}) groups of "
                f"{self.num_experts // self.num_expert_groups}"
            )
        if self.router == "group_limited" and self.num_expert_groups == 1:
            raise ValueError("router='group_limited' needs num_expert_groups > 1")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(
                f"capacity_factor must be > 0 or None (dropless), got {self.capacity_factor}"
            )
        _one_of("dispatch_dtype", self.dispatch_dtype, DISPATCH_DTYPES)
        if self.dispatch_dtype == "fp8_e4m3" and self.hidden_size % 128:
            raise ValueError(
                f"dispatch_dtype='fp8_e4m3' needs hidden_size divisible by 128 (one scale per 128"
                f" channels; not padded), got hidden_size={self.hidden_size}"
            )
        if self.num_comm_sms is not None and (
            not _is_int(self.num_comm_sms) or self.num_comm_sms < 1
        ):
            raise ValueError(
                f"num_comm_sms must be a positive int or None, got {self.num_comm_sms!r}"
            )
        for name in (
            "router_bias",
            "expert_ffn_bias",
            "scale_expert_input",
            "softmax_selection_bias",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.softmax_selection_bias and self.router != "softmax":
            raise ValueError(
                f"softmax_selection_bias=True needs router='softmax', got router={self.router!r}"
            )
        for name in ("swiglu_alpha", "swiglu_limit", "shared_expert_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
            default = type(self).__dataclass_fields__[name].default
            if (
                name.startswith("swiglu")
                and self.activation != "clamped_swiglu"
                and value != default
            ):
                raise ValueError(
                    f"activation={self.activation!r} ignores {name}={value}: remove it or use "
                    "activation='clamped_swiglu'"
                )
        for name in ("aux_loss_coef", "z_loss_coef", "router_bias_update_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        _check_router_settings(self)

    @property
    def shared_hidden(self) -> int:
        """Width of the fused shared-expert FFN (0 when there is none)."""
        return self.num_shared_experts * (self.shared_ffn_hidden_size or self.ffn_hidden_size)

    def replace(self, **changes) -> "MoEConfig":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        unknown = set(changes) - set(values)
        if unknown:
            note = removed_fields_note(unknown)
            raise ValueError(
                f"unknown MoEConfig fields: {sorted(unknown)}" + (f" ({note})" if note else "")
            )
        values.update(changes)
        return MoEConfig(**values)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_float(name: str, value, also: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number{also}, got {value!r}")


def _check_router_settings(cfg: "MoEConfig") -> None:
    """Settings the chosen router would ignore are errors, not silent no-ops. (The sigmoid
    router's router_bias_update_rate is ignored by the other routers: its non-zero default makes
    it undetectable; documented on the field.)"""
    ignored = []
    if cfg.router in ("softmax", "top_p"):
        ignored += [
            f"{name}={getattr(cfg, name)}"
            for name in ("num_expert_groups", "topk_groups")
            if getattr(cfg, name) != 1
        ]
    if cfg.router != "top_p" and cfg.top_p != _TOP_P_DEFAULT:
        ignored.append(f"top_p={cfg.top_p}")
    if ignored:
        raise ValueError(
            f"router={cfg.router!r} ignores {', '.join(ignored)}: remove "
            f"{'it' if len(ignored) == 1 else 'them'} or choose a router that uses "
            f"{'it' if len(ignored) == 1 else 'them'}"
        )


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


# -- the field reference: generated from the comments above
# --------------------------------------------
CHOICES = {
    "router": ROUTERS,
    "activation": ACTIVATIONS,
    "transport": TRANSPORTS,
    "expert_backend": EXPERT_BACKENDS,
    "error_check": ERROR_CHECKS,
}
README_BEGIN = "<!-- MoEConfig fields: generated by `python -m moe_dist.config --update-readme` -->"
README_END = "<!-- end of MoEConfig fields -->"


def field_docs() -> dict[str, dict[str, str]]:
    """{field: {"type", "default", "doc", "section"}} in declaration order. The doc is the comment
    on the field's line(s); the section is the last comment line standing alone above it."""
    source = inspect.getsource(MoEConfig)
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    body = ast.parse(source).body[0].body
    statements = [n for n in body if isinstance(n, ast.AnnAssign)]
    defaults = {f.name: f.default for f in fields(MoEConfig)}
    docs, section, previous_end = {}, "", body[0].lineno - 1
    for node in statements:
        name = node.target.id
        above = [comments[i] for i in range(previous_end + 1, node.lineno) if i in comments]
        if above:
            section = " ".join(above)
        own = [comments[i] for i in range(node.lineno, node.end_lineno + 1) if i in comments]
        doc = " ".join(own).strip()
        if doc and not doc.endswith("."):
            doc += "."
        if name in CHOICES:
            doc += f" One of {', '.join(repr(c) for c in CHOICES[name])}."
        default = defaults[name]
        docs[name] = {
            "type": ast.unparse(node.annotation),
            "default": "required" if default is MISSING else repr(default),
            "doc": doc.strip(),
            "section": section,
        }
        previous_end = node.end_lineno
    return docs


def markdown_table() -> str:
    """The README's MoEConfig reference: one row per field, grouped by the source's sections."""
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    section = None
    for name, d in field_docs().items():
        if d["section"] != section and d["section"]:
            section = d["section"]
            rows.append(f"| **{section.rstrip('.')}** | | | |")
        doc, typ = (d[k].replace("|", "\\|") for k in ("doc", "type"))
        rows.append(f"| `{name}` | `{typ}` | `{d['default']}` | {doc} |")
    return "\n".join(rows)


def readme_block() -> str:
    return f"{README_BEGIN}\n{markdown_table()}\n{README_END}"


def _main(argv=None) -> int:
    import argparse
    import re
    from pathlib import Path

    p = argparse.ArgumentParser(
        prog="python -m moe_dist.config", description="The MoEConfig field reference."
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--markdown", action="store_true", help="print the markdown table")
    what.add_argument(
        "--update-readme",
        nargs="?",
        const="README.md",
        metavar="PATH",
        help="rewrite the table between the markers in PATH (default: README.md)",
    )
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown_table())
        return 0
    path = Path(args.update_readme)
    text = path.read_text()
    pattern = re.compile(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        p.error(f"{path} has no '{README_BEGIN}' ... '{README_END}' block to rewrite")
    path.write_text(pattern.sub(lambda _: readme_block(), text, count=1))
    print(f"rewrote the MoEConfig table in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
