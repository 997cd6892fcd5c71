"""Run a function on N CPU processes over gloo (real torch.distributed, real process boundaries).

The function must live at module level in an importable module (spawned children import it).
A child's exception fails the test with the child's traceback; a hang fails it after `timeout_s`.
"""
from __future__ import annotations

import datetime
import os
import socket
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, world_size, port, fn, args, errors):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=120))
        fn(*args)
        dist.barrier()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout_s: float = 300.0) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(r, world_size, port, fn, args, errors), daemon=True)
             for r in range(world_size)]
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
        # A crash on one rank makes its peers fail with 'connection closed': show the root cause
        # first.
        failures.sort(key=lambda f: ("closed by peer" in f[1] or "Connection reset" in f[1], f[0]))
        text = "\n".join(f"--- rank {r} of {world_size}:\n{tb}" for r, tb in failures)
        raise AssertionError(f"{len(failures)} rank(s) failed; first the likely root cause:\n{text}")
    if hung:
        raise AssertionError(f"ranks {hung} of {world_size} did not finish within {timeout_s}s")
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise AssertionError(f"processes exited with codes {bad}")
