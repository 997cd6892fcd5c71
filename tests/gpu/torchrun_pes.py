"""Shared by the multi-PE GPU tests: start a worker under torchrun (test side), and set up one
NVSHMEM PE in the worker (worker side). One GPU: every PE shares it (time-sliced, correctness only);
several GPUs: one PE per GPU, peers over NVLink. The process group is gloo, since NCCL refuses two
ranks on one GPU."""

from __future__ import annotations

import datetime
import os
import sys

from tests.conftest import assert_ran, run_command, torchrun

# Never NVLink multicast on the lent machines (it can take a shared host's GPUs out of service).
NO_MULTICAST = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def run_worker(
    script: str,
    pes: int,
    ok_marker: str,
    timeout: int = 180,
    mpirun: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> None:
    """Runs the module tests.gpu.<script without .py> with `pes` processes, under torchrun or
    (given its path) Open MPI's mpirun; fails with the first traceback unless it printed
    ok_marker."""
    env = {**NO_MULTICAST, **(extra_env or {})}
    module = ["-m", f"tests.gpu.{script.removesuffix('.py')}"]
    if mpirun:
        names = [n for n in ("PATH", "LD_LIBRARY_PATH") if n in os.environ]
        names += ["PYTHONPATH", *env]  # run_command sets PYTHONPATH
        exported = [a for n in names for a in ("-x", n)]
        launcher = [mpirun, "-np", pes, "--oversubscribe", "--bind-to", "none"]
        launcher += ["--allow-run-as-root", *exported, sys.executable]
        proc = run_command([*launcher, *module], timeout, env)
    else:
        proc = torchrun(pes, *module, timeout=timeout, env=env)
    assert_ran(proc, ok_marker)


def setup_pe():
    """In a worker: (rank, world, device, groups) with a gloo process group and EP over the whole
    world."""
    import torch
    import torch.distributed as dist

    from moe_dist import ParallelGroups

    from moe_dist.parallel.bootstrap import launcher_environment

    env = launcher_environment()  # torchrun's variables, or Open MPI's translated
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    os.environ.update({k: env[k] for k in names if k in env})
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    return rank, world, dev, ParallelGroups(ep_size=world)
