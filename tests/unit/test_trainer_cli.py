"""The trainer's command line (moe_dist/lm/cli.py): every bad flag ends the run before any process
group or model exists, with one line naming the flag and exit status 2, never a traceback; under
torchrun only one rank per node prints it. --help shows each default once and every flag has help.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_dist.lm.cli import build_parser, checkpoint_backend

ROOT = Path(__file__).resolve().parents[2]
PROG = "python -m moe_dist.lm.train"


def run_trainer(*args: str, world: int = 2, timeout: float = 60) -> subprocess.CompletedProcess:
    """The trainer as a torchrun worker of a `world`-process job would start (WORLD_SIZE set, no
    process group yet): a bad flag must stop it before it tries to rendezvous."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "WORLD_SIZE": str(world),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "9",
    }  # port 9: nobody
    return subprocess.run(
        [sys.executable, "-m", "moe_dist.lm.train", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


BAD = [  # (flags, world size, words the message must contain)
    (["--steps", "0"], 2, "--steps must be >= 1, got 0"),
    (["--steps", "-1"], 2, "--steps must be >= 1, got -1"),
    (["--ep", "3"], 2, "--ep 3 does not divide the number of processes (2)"),
    (["--ep", "0"], 2, "--ep must be >= 1"),
    (["--experts", "6", "--ep", "4"], 4, "--experts (6) must be divisible by --ep (4)"),
    (["--transport", "carrier-pigeon"], 2, "argument --transport: invalid choice"),
    (["--backend", "megatron"], 2, "argument --backend: invalid choice"),
    (["--zero-stage", "3"], 2, "argument --zero-stage: invalid choice"),
    (["--top-k", "9"], 2, "--top-k (9) must be <= --experts (8)"),
    (["--heads", "5"], 2, "--d-model (64) must be divisible by --heads (5)"),
    (["--batch-size", "3"], 2, "--batch-size (3) must be divisible by the number of processes (2)"),
    (["--val-every", "15"], 2, "--val-every (15) must be a multiple of --log-every (10)"),
    (["--log-every", "0"], 2, "--log-every must be >= 1"),
    (["--capacity-factor", "0"], 2, "--capacity-factor must be > 0"),
    (["--lr", "-1"], 2, "--lr must be > 0"),
    (["--resume", "/nonexistent/run"], 2, "--resume /nonexistent/run: no such directory"),
    (["--data", "/nonexistent/text"], 2, "--data /nonexistent/text: no such file or directory"),
    (["--overlap-microbatches", "3"], 2, "argument --overlap-microbatches: invalid choice: 3"),
    (
        ["--overlap-microbatches", "2", "--coe-iterations", "2"],
        2,
        "--overlap-microbatches 2 needs MoE FFNs with a split call: --coe-iterations 2",
    ),
    (
        ["--overlap-microbatches", "2", "--capacity-factor", "1.5"],
        2,
        "--overlap-microbatches 2 needs dropless routing: --capacity-factor 1.5",
    ),
    (
        ["--overlap-microbatches", "2", "--batch-size", "2"],
        2,
        "--overlap-microbatches 2 needs at least as many sequences per rank, got 1",
    ),
    (["--nonsense"], 2, "unrecognized arguments: --nonsense"),
]


@pytest.mark.parametrize("flags,world,message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_flag_prints_one_line_and_exits_2(flags, world, message, monkeypatch, capsys):
    """In-process (fast): parse_args as a worker of a `world`-process torchrun job calls it."""
    from moe_dist.lm.cli import parse_args

    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit) as exit_info:
        parse_args(flags)
    out = capsys.readouterr()
    assert exit_info.value.code == 2
    lines = (out.out + out.err).splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{PROG}: error: "), lines
    assert message in lines[0], lines


@pytest.mark.parametrize(
    "flags,world,message", [BAD[0], BAD[2], BAD[-1]], ids=["steps", "ep", "unknown"]
)
def test_bad_flag_in_a_real_process(flags, world, message):
    """The same through `python -m moe_dist.lm.train`: one line, exit 2, no traceback."""
    proc = run_trainer(*flags, world=world)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{PROG}: error: "), lines
    assert message in lines[0], lines


def test_other_local_ranks_stay_silent_and_let_rank_0_exit_first(monkeypatch, capsys):
    """A rank that does not print waits before it exits: torchrun kills every rank once one
    exits, and a silent rank that went first took local rank 0 down before it printed (seen in
    test_deepspeed_trainer_loss_falls_and_resume_repeats_the_curve: no error line at all)."""
    from moe_dist.lm import cli

    waits = []
    monkeypatch.setattr(cli.time, "sleep", waits.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--steps", "0"])
    out = capsys.readouterr()
    assert exit_info.value.code == 2 and out.out + out.err == "", out
    assert waits == [cli.SILENT_RANK_EXIT_DELAY_S]
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit):
        cli.parse_args(["--steps", "0"])
    assert waits == [cli.SILENT_RANK_EXIT_DELAY_S], "local rank 0 prints and exits at once"


def test_tensorboard_missing_names_the_pip_line(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else real(name, *a),
    )
    from moe_dist.lm import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.validate(build_parser(), build_parser().parse_args(["--tensorboard", str(tmp_path)]), 2)
    assert exit_info.value.code == 2


def test_help_shows_each_default_once_and_every_flag_has_help():
    text = build_parser().format_help()
    assert "(default: None)" not in text
    for line in text.splitlines():
        assert line.count("(default") <= 1, line
    parser = build_parser()
    for paragraph in (parser.description, parser.epilog):  # no sentence left hanging on a colon
        assert not paragraph.rstrip().endswith(":"), paragraph
    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"
    for preset in ("tiny", "small", "medium"):
        assert f"  {preset} " in text  # the presets are spelled out
    assert "{auto,local,collective,nvshmem,reference}" in text and "nats per byte" in text


def test_overlap_microbatches_reaches_the_model_config(monkeypatch):
    from moe_dist.lm.cli import model_configs, parse_args

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert model_configs(parse_args([]), False)[0].overlap_microbatches == 1
    args = parse_args(["--overlap-microbatches", "2"])
    assert model_configs(args, False)[0].overlap_microbatches == 2


def test_ep_defaults_to_the_world_size(monkeypatch):
    from moe_dist.lm.cli import parse_args

    monkeypatch.setenv("WORLD_SIZE", "4")
    assert parse_args([]).ep == 4
    assert parse_args(["--ep", "2"]).ep == 2


def test_checkpoint_backend_is_read_from_the_record_or_the_files(tmp_path):
    (tmp_path / "a" / "step_5").mkdir(parents=True)
    (tmp_path / "a" / "latest").write_text("step_5")
    (tmp_path / "a" / "step_5" / "trainer.json").write_text('{"backend": "deepspeed", "step": 5}')
    assert checkpoint_backend(tmp_path / "a") == "deepspeed"
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "moe_dist.json").write_text("{}")
    assert checkpoint_backend(tmp_path / "b") == "fsdp"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert checkpoint_backend(tmp_path / "c") == "deepspeed"
    assert checkpoint_backend(tmp_path) is None


def test_the_launch_script_checks_the_flags_before_starting_ranks():
    """The README's main command with a bad flag: one line from the pre-check, exit 2, and no
    torchrun report (no rank was started)."""
    env = {**os.environ, "NPROC": "2"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "torchrun_single_node.sh"), "--ep", "3"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc
    assert proc.stdout == "" and proc.stderr.splitlines() == [
        f"{PROG}: error: --ep 3 does not divide the number of processes (2); use a divisor of 2"
        " (see --help)"
    ], proc.stderr
