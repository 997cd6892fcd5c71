"""Helpers shared by the tests, and the test tiers.

Import the helpers by name (`from tests.conftest import fwd_bwd, run_distributed`):

- `ROOT`, `free_port()`: the repository root; a TCP port free on localhost now.
- `run_distributed(fn, world_size, *args)`: fn on N CPU processes over gloo (real process groups).
- `run_command(cmd)`, `run_python(*args)`, `torchrun(nproc, *args)`: a fresh process started from
  the repository root with this tree first on PYTHONPATH, output captured; `assert_ran(proc)` fails
  with the command and the tail of its output (from the first traceback) unless it exited 0;
  `concurrent_runs(jobs)`: such runs as many at a time as there are cores.
- `config_builder(**defaults)`: a function that makes a tiny `MoEConfig` from defaults + overrides.
- `fwd_bwd(layer, x, g)`, `assert_fwd_bwd_close(a, b, label)`: one forward + backward and
  everything a comparison needs (output, aux loss, counts, input and parameter gradients).
- `dense_expert(x, w_in, w_out, activation)`: one expert in plain torch (the oracle).
- `stamp(x, source)`, `assert_same_rows(got, want, label)`: tokens that carry (source rank, token
  index) in their first two columns, so a misplaced row says where it came from (STYLE.md 6).

Tiers: every test under tests/dist/ (processes over gloo, seconds each) is marked `slow` here;
elsewhere tests that start processes (benchmark smoke runs, torchrun launches) carry
`@pytest.mark.slow`. `python -m pytest -q -m "not slow"` is the fast unit tier; plain
`python -m pytest -q` (what .ci/run runs) runs everything.

Legend: T tokens, H hidden, F expert FFN width.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import socket
import subprocess
import sys
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest

# torch loads inside the helpers: the launcher and install tests run where it is not installed.
ROOT = Path(__file__).resolve().parents[1]
_DIST_DIR = ROOT / "tests" / "dist"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _DIST_DIR in Path(item.path).parents:
            item.add_marker(pytest.mark.slow)


# -- processes ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, world_size, port, fn, args, errors):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    exit_code = 1
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120)
        )
        fn(*args)
        dist.barrier()
        exit_code = 0
    except BaseException:
        errors.put((rank, traceback.format_exc()))
    finally:
        # Drop what fn left behind (a caught exception's frames can hold gloo work objects) while
        # the interpreter is whole, then leave without its finalisation: gloo threads torn down
        # there abort the process now and then ("terminate called without an active exception",
        # CI, 2026-12-01) after fn has passed.
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)


def run_distributed(fn, world_size: int, *args, timeout_s: float = 300.0) -> None:
    """Runs fn(*args) on `world_size` spawned processes over gloo. fn must live at module level in
    an importable module (the children import it). A child's exception fails the caller with the
    child's traceback; a hang fails it after `timeout_s`."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(r, world_size, port, fn, args, errors), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    for p in procs:
        p.join(max(0.0, (deadline - datetime.datetime.now()).total_seconds()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    if failures:
        # A crash on one rank makes its peers fail with 'connection closed': root cause first.
        failures.sort(key=lambda f: ("closed by peer" in f[1] or "Connection reset" in f[1], f[0]))
        text = "\n".join(f"--- rank {r} of {world_size}:\n{tb}" for r, tb in failures)
        raise AssertionError(
            f"{len(failures)} rank(s) failed; first the likely root cause:\n{text}"
        )
    if hung:
        raise AssertionError(f"ranks {hung} of {world_size} did not finish within {timeout_s}s")
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise AssertionError(f"processes exited with codes {bad}")


def run_command(
    cmd: list, timeout: float, env: dict | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    """cmd from `cwd` (the repository root), this tree first on PYTHONPATH, output captured."""
    path = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}), "PYTHONPATH": path}
    cmd = [str(c) for c in cmd]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_python(*args, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python ARGS` (e.g. "-m", "benchmarks.layer", "--smoke") in a fresh process."""
    return run_command([sys.executable, *args], timeout, env)


def torchrun(
    nproc: int, *args, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node NPROC ARGS` (ARGS: a script or -m module, then its
    arguments)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return run_python(*launcher, *args, timeout=timeout, env=env)


@contextlib.contextmanager
def concurrent_runs(jobs: dict):
    """{name: Future} of jobs (callables that each run one process and wait for it), as many at
    once as there are cores (two at least), started in the order given: put the longest first. A
    module of single-process runs then takes about half their sum on two cores instead of the
    sum (pytest itself runs one test at a time, leaving a core idle)."""
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures: dict[str, Future] = {name: pool.submit(job) for name, job in jobs.items()}
        yield futures


def assert_ran(proc: subprocess.CompletedProcess, marker: str | None = None) -> str:
    """Fails unless proc exited 0 (and printed `marker`); returns its stdout."""
    out = proc.stdout + proc.stderr
    if proc.returncode == 0 and (marker is None or marker in out):
        return proc.stdout
    first_error = out.find("Traceback")
    shown = out[first_error:][:6000] if first_error >= 0 else out[-6000:]
    want = f" and did not print {marker!r}" if marker and marker not in out else ""
    raise AssertionError(f"{' '.join(proc.args)} exited {proc.returncode}{want}:\n{shown}")


# -- layers ------------------------------------------------------------------------------------
def config_builder(**defaults):
    """make(**overrides) -> MoEConfig(**{**TINY, **defaults, **overrides}); TINY is a 4-expert
    top-2 layer with H=16, F=32."""
    from moe_dist import MoEConfig

    tiny = dict(hidden_size=16, ffn_hidden_size=32, num_experts=4, top_k=2)

    def make(**overrides):
        return MoEConfig(**{**tiny, **defaults, **overrides})

    return make


class FwdBwd(NamedTuple):
    output: torch.Tensor  # fp32, detached
    aux: torch.Tensor
    counts: torch.Tensor
    grad_x: torch.Tensor
    grads: dict  # parameter name -> fp32 gradient (parameters that got one)


def fwd_bwd(layer, x, g) -> FwdBwd:
    """layer(x), then the backward of (output * g).sum() + aux; results in fp32, copied."""
    x = x.clone().requires_grad_(True)
    out, aux, counts = layer(x)
    ((out.float() * g).sum() + aux).backward()
    grads = {n: p.grad.float().clone() for n, p in layer.named_parameters() if p.grad is not None}
    return FwdBwd(out.detach().float(), aux.detach().float(), counts, x.grad.float(), grads)


def assert_fwd_bwd_close(
    got: FwdBwd, want: FwdBwd, label: str, rtol: float | None = 1e-5, atol: float = 1e-6
) -> None:
    """Counts equal; output, aux, input and parameter gradients close. rtol None (bf16): each
    relative norm error < 1e-2, since the order of bf16 sums may change."""
    import torch

    assert torch.equal(got.counts, want.counts), (label, got.counts, want.counts)
    assert got.grads.keys() == want.grads.keys(), (label, got.grads.keys(), want.grads.keys())
    pairs = [("output", got.output, want.output), ("aux", got.aux, want.aux)]
    pairs += [("grad x", got.grad_x, want.grad_x)]
    pairs += [(f"grad {n}", got.grads[n], want.grads[n]) for n in want.grads]
    for what, u, v in pairs:
        if rtol is None:
            rel = ((u - v).norm() / v.norm().clamp(min=1e-30)).item()
            assert rel < 1e-2, f"{label} {what}: relative error {rel:.3g}"
        else:
            torch.testing.assert_close(
                u, v, rtol=rtol, atol=atol, msg=lambda m: f"{label} {what}: {m}"
            )


def stamp(x_TH, source: int):
    """Writes (source, token index) into columns 0 and 1 of x_TH in place; returns x_TH."""
    import torch

    x_TH[:, 0] = source
    x_TH[:, 1] = torch.arange(x_TH.shape[0], dtype=x_TH.dtype, device=x_TH.device)
    return x_TH


def assert_same_rows(got_RH, want_RH, label: str) -> None:
    """The same rows in the same order; on failure both sides' (source, token) stamps."""
    import torch

    assert torch.equal(got_RH, want_RH), (
        f"{label}: rows (source, token) {got_RH[:, :2].tolist()} "
        f"!= expected {want_RH[:, :2].tolist()}"
    )


def dense_expert(x_TH, w_in, w_out, activation: str = "swiglu"):
    """One expert in plain torch: w_in [2F or F, H], w_out [H, F]."""
    import torch.nn.functional as F

    h = F.linear(x_TH, w_in)
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
    else:
        h = F.gelu(h)
    return F.linear(h, w_out)
