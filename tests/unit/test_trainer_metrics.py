"""The trainer's reporting (moe_dist/lm/metrics.py): the log line's columns, the JSONL stream
(readable line by line while the run goes on), TensorBoard scalars, and the FLOP count behind MFU
checked against a count of the model's parameters."""

from __future__ import annotations

import json
import random

import pytest
import torch

from moe_dist import MoEConfig
from moe_dist.lm import ModelConfig, MoETransformer
from moe_dist.lm.metrics import MetricsSink, flops_per_token, format_line


def interval(step: int, val: float | None = None) -> dict:
    rng = random.Random(step)
    return {
        "step": step,
        "total_steps": 100,
        "loss": rng.uniform(1, 5),
        "val_loss": val,
        "lr": rng.uniform(1e-4, 1e-2),
        "grad_norm": rng.uniform(0.1, 3),
        "tokens_per_s": rng.uniform(1e3, 1e5),
        "mfu": None,
        "mem_gib": rng.uniform(0.1, 80),
        "load_imbalance": rng.uniform(1, 3),
        "dropped": rng.randrange(10),
        "elapsed_s": 3725.0,
        "eta_s": 61.0,
    }


def test_log_line_has_every_column():
    m = interval(40, val=2.5)
    line = format_line(m)
    for part in (
        " 40/100",
        f"loss {m['loss']:.4f}",
        "val 2.5000",
        f"lr {m['lr']:.2e}",
        f"gnorm {m['grad_norm']:.3f}",
        "tok/s",
        f"mem {m['mem_gib']:.2f} GiB",
        f"load {m['load_imbalance']:.2f}",
        f"dropped {m['dropped']}",
        "1:02:05<01:01",
    ):
        assert part in line, (part, line)
    assert "MFU" not in line  # no GPU, no MFU
    assert "MFU 41.0%" in format_line({**m, "mfu": 0.41})


def test_jsonl_is_streamed_one_record_per_interval(tmp_path, capsys):
    path = tmp_path / "sub" / "metrics.jsonl"
    sink = MetricsSink(active=True, total_steps=100, start_step=0, progress="off", jsonl=str(path))
    for step in (10, 20):
        sink.log(interval(step, val=None if step == 10 else 2.0))
        records = [json.loads(line) for line in path.read_text().splitlines()]  # before close
        assert [r["step"] for r in records] == list(range(10, step + 1, 10))
    sink.close()
    assert records[1]["val_loss"] == 2.0 and records[0]["val_loss"] is None
    assert len(capsys.readouterr().out.splitlines()) == 2  # one line per interval on stdout


def test_inactive_sink_writes_nothing(tmp_path, capsys):
    sink = MetricsSink(active=False, total_steps=10, start_step=0, jsonl=str(tmp_path / "m.jsonl"))
    sink.log(interval(10))
    sink.say("hello")
    sink.close()
    assert not (tmp_path / "m.jsonl").exists() and capsys.readouterr().out == ""


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (install.sh --dev)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = MetricsSink(
        active=True, total_steps=100, start_step=0, progress="off", tensorboard=str(tmp_path)
    )
    logged = [interval(10), interval(20, val=1.5)]
    for m in logged:
        sink.log(m)
    sink.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("train/loss")] == [
        (m["step"], m["loss"]) for m in logged
    ]
    assert [e.value for e in events.Scalars("val/loss")] == [1.5]


@pytest.mark.parametrize("coe,shared", [(1, 0), (2, 1)])
def test_flops_per_token_counts_the_active_parameters(coe, shared):
    """6 x (active weights) + attention scores: compare with the parameters of a real model, the
    experts counted top_k x iterations times out of num_experts."""
    cfg = ModelConfig(d_model=32, n_layers=3, n_heads=4, max_seq_len=16, coe_iterations=coe)
    moe = MoEConfig(
        hidden_size=32, ffn_hidden_size=24, num_experts=6, top_k=2, num_shared_experts=shared
    )
    model = MoETransformer(cfg, moe)
    params = dict(model.named_parameters())
    by_kind = {"experts.": 0, "shared_experts.": 0, "router": 0, "dense": 0}
    for name, p in params.items():
        if "embed" in name or "norm" in name:
            continue  # lookups and scales, no matmul
        kind = next((k for k in ("shared_experts.", "experts.", "router") if k in name), "dense")
        by_kind[kind] += p.numel()
    assert by_kind["router"] == coe * moe.num_experts * cfg.d_model * cfg.n_layers
    active = (
        by_kind["dense"]
        + by_kind["router"]
        + coe * by_kind["shared_experts."]
        + by_kind["experts."] * moe.top_k * coe / moe.num_experts
    )
    attention = 12 * cfg.n_layers * cfg.d_model * cfg.max_seq_len
    assert flops_per_token(cfg, moe) == pytest.approx(6 * active + attention, rel=1e-9)
