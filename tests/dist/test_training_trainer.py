"""`python -m moe_dist.lm.train` under a real torchrun (two gloo processes): the loss falls, the run
ends with its summary line and exit 0, and a run resumed from a mid-run checkpoint repeats the
uninterrupted curve; --coe-iterations 2 trains the example model with Chain-of-Experts FFNs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import assert_ran, torchrun

FAST = ["--max-bytes", "2000000", "--log-every", "10"]


def train(*args: str, timeout: float = 240) -> str:
    """`torchrun --nproc-per-node 2 -m moe_dist.lm.train ARGS`; its stdout."""
    return assert_ran(torchrun(2, "-m", "moe_dist.lm.train", *args, timeout=timeout))


def read_curve(path: Path) -> dict:
    result = json.loads(path.read_text())
    assert len(result["losses"]) == result["steps"] - result["start_step"], result
    return result


def test_fsdp_trainer_loss_falls_and_resume_repeats_the_curve(tmp_path):
    out = train("--ep", "2", "--backend", "fsdp", "--steps", "40", "--save", str(tmp_path / "run"),
                   "--save-every", "20", "--json", str(tmp_path / "full.json"), *FAST)
    full = read_curve(tmp_path / "full.json")
    assert f"final loss {full['final_loss']:.4f} (start {full['first_loss']:.4f}" in out, out
    assert full["final_loss"] < full["first_loss"] - 1.0, full  # bytes: ln(256) = 5.5 at the start
    assert "expert load %" in out and "tok/s" in out and "dropped 0" in out, out
    assert (tmp_path / "run" / "step_20" / "moe_dist.json").is_file()
    assert (tmp_path / "run" / "latest").read_text() == "step_40"

    train("--ep", "2", "--backend", "fsdp", "--steps", "40", "--resume", str(tmp_path / "run" / "step_20"),
             "--json", str(tmp_path / "resumed.json"), *FAST)
    resumed = read_curve(tmp_path / "resumed.json")
    assert resumed["start_step"] == 20
    assert resumed["losses"] == pytest.approx(full["losses"][20:], rel=1e-5, abs=1e-5)


def test_deepspeed_trainer_loss_falls_and_resume_repeats_the_curve(tmp_path):
    common = ["--ep", "2", "--backend", "deepspeed", "--zero-stage", "2", "--steps", "30", *FAST]
    train(*common, "--save", str(tmp_path / "ds"), "--save-every", "15", "--json", str(tmp_path / "full.json"))
    full = read_curve(tmp_path / "full.json")
    assert full["final_loss"] < full["first_loss"] - 1.0, full
    assert (tmp_path / "ds" / "step_15" / "layer_0_expert_7_mp_rank_00_model_states.pt").is_file()

    train(*common, "--resume", str(tmp_path / "ds" / "step_15"), "--json", str(tmp_path / "resumed.json"))
    resumed = read_curve(tmp_path / "resumed.json")
    assert resumed["start_step"] == 15
    assert resumed["losses"] == pytest.approx(full["losses"][15:], rel=1e-5, abs=1e-5)


def test_trainer_selects_chain_of_experts_and_its_loss_falls(tmp_path):
    """--coe-iterations 2 builds Chain-of-Experts FFNs (FSDP2, EP=2: the extra routers stay inside
    their block's FSDP unit), says so, records it in the JSON, and trains."""
    out = train("--ep", "2", "--backend", "fsdp", "--steps", "20", "--coe-iterations", "2",
                   "--json", str(tmp_path / "coe.json"), *FAST)
    run = read_curve(tmp_path / "coe.json")
    assert run["coe_iterations"] == 2 and run["args"]["coe_iterations"] == 2, run
    assert run["moe_layer"] == "ChainOfExperts", run
    assert "Chain-of-Experts FFNs (2 iterations x top-2)" in out, out
    assert "dropped 0" in out, out
    # Routing telemetry sees every pass: 2 layers x 2 passes x 20 steps x 2 ranks forwards, no slot
    # dropped.
    assert run["routing"].startswith("routing 2 layers 80 steps") and "dropped 0.00%" in run["routing"], run
    assert run["routing"] in out, out
    assert run["final_loss"] < run["first_loss"] - 1.0, run
