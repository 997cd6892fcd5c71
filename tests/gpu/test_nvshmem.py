"""The nvshmem transport on a real GPU with 1, 2 and 4 NVSHMEM PEs sharing it (runs
tests/gpu/nvshmem_worker.py under torchrun). Multi-PE runs on one GPU are time-sliced: they prove
correctness, not speed."""

import shutil

import pytest
import torch

from moe_dist.transport import nvshmem_unavailable_reason

from .torchrun_pes import run_worker

reason = nvshmem_unavailable_reason(torch.device("cuda", 0) if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(
    reason is not None, reason=f"nvshmem transport cannot run here: {reason}"
)


@pytest.mark.parametrize("pes", [1, 2, 4])
def test_nvshmem_matches_reference(pes):
    # a cold Triton cache compiles the put kernels linked with NVSHMEM per PE id (~4 s each):
    # the put_dedup section alone adds ~2 min per process
    run_worker("nvshmem_worker.py", pes, f"NVSHMEM WORKER OK {pes}", timeout=540)


def test_nvshmem_bootstraps_over_mpi():
    """Launched by mpirun with MOE_DIST_NVSHMEM_BOOTSTRAP=mpi: NVSHMEM initialises over MPI
    (mpi4py), and the same checks pass."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("Open MPI's mpirun is not installed")
    pytest.importorskip("mpi4py", reason="the MPI bootstrap needs mpi4py")
    run_worker(
        "nvshmem_worker.py",
        2,
        "NVSHMEM WORKER OK 2 (bootstrap mpi)",
        mpirun=mpirun,
        extra_env={"MOE_DIST_NVSHMEM_BOOTSTRAP": "mpi"},
    )
