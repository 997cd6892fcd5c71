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


def train_failing(*args: str, timeout: float = 240):
    """The same, for runs expected to fail: the CompletedProcess."""
    return torchrun(2, "-m", "moe_dist.lm.train", *args, timeout=timeout)


def read_curve(path: Path) -> dict:
    result = json.loads(path.read_text())
    assert len(result["losses"]) == result["steps"] - result["start_step"], result
    return result


def test_fsdp_trainer_loss_falls_and_resume_repeats_the_curve(tmp_path):
    out = train("--ep", "2", "--backend", "fsdp", "--steps", "40", "--save", str(tmp_path / "run"),
                "--save-every", "20", "--json", str(tmp_path / "full.json"), "--val-every", "20",
                "--metrics-jsonl", str(tmp_path / "metrics.jsonl"), *FAST)
    full = read_curve(tmp_path / "full.json")
    assert f"final loss {full['final_loss']:.4f} (start {full['first_loss']:.4f}" in out, out
    assert full["final_loss"] < full["first_loss"] - 1.0, full  # bytes: ln(256) = 5.5 at the start
    last_line = next(line for line in out.splitlines() if line.startswith("step 40/40"))
    for column in ("loss", "val", "lr", "gnorm", "tok/s", "mem", "load", "dropped 0", "<00:00"):
        assert column in last_line, out
    assert "nats/byte" in out.splitlines()[1], out  # the units, stated once in the header
    # One JSONL record per log line, streamed; validation loss on held-out bytes at 20 and 40.
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30, 40], records
    assert [r["val_loss"] is not None for r in records] == [False, True, False, True], records
    assert full["val_losses"] == [[20, records[1]["val_loss"]], [40, records[3]["val_loss"]]]
    assert records[3]["val_loss"] < records[1]["val_loss"] < 5.0, records
    for r in records:
        assert r["grad_norm"] > 0 and r["mem_gib"] > 0 and r["eta_s"] >= 0 and r["lr"] > 0, r
    assert (tmp_path / "run" / "step_20" / "trainer.json").is_file()
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
    # Another backend cannot read DeepSpeed's format: one line per node, exit 2, before any
    # process group (so no traceback from the trainer; torchrun reports the exit code itself).
    bad = train_failing(*common, "--backend", "fsdp", "--resume", str(tmp_path / "ds"))
    lines = [line for line in bad.stderr.splitlines() if "moe_dist.lm.train: error" in line]
    assert bad.returncode != 0 and len(lines) == 1, bad.stderr
    assert "was written with --backend deepspeed" in lines[0] and "--backend fsdp" in lines[0]
    assert 'moe_dist/lm' not in bad.stderr  # no frame of ours in any traceback

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


def test_bad_flag_under_torchrun_is_one_line_without_traceback():
    """--ep 3 on 2 processes: local rank 0 prints one line naming the flag, both exit 2 before any
    rendezvous; torchrun then reports the failed workers (its own report, no frame of ours)."""
    proc = train_failing("--ep", "3", "--steps", "5", timeout=120)
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "moe_dist.lm.train:" in line]
    assert ours == ["python -m moe_dist.lm.train: error: --ep 3 does not divide the number of"
                    " processes (2); use a divisor of 2 (see --help)"], proc.stderr
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr, proc.stderr
    assert "moe_dist/lm" not in proc.stderr and "UnboundLocalError" not in proc.stderr


def test_resume_across_fsdp_and_replicated(tmp_path):
    """fsdp and none write the same checkpoint format (any sharding, any EP size): a checkpoint of
    one resumes under the other."""
    fast = ["--steps", "4", "--log-every", "2", "--max-bytes", "200000", "--telemetry-every", "0"]
    train("--backend", "none", *fast[:1], "2", *fast[2:], "--save", str(tmp_path / "run"))
    out = train("--backend", "fsdp", *fast, "--resume", str(tmp_path / "run"))
    assert "resumed from" in out and "at step 2" in out, out
