"""The collective transport over NCCL makes one host sync per dispatch and one per combine (issue
15), counted by CUDA's sync debug mode in tests/gpu/collective_syncs_worker.py: one process per GPU
(NCCL refuses two ranks on one GPU), so 1 process on a one-GPU machine (EP=1 over a one-rank NCCL
group: the same handshake and reads) and 2 on a machine with two or more."""

import pytest
import torch

from .torchrun_pes import run_worker

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL; CUDA's sync debug mode)"
)


@pytest.mark.parametrize("ranks", [1, 2])
def test_collective_transport_host_syncs(ranks):
    if torch.cuda.device_count() < ranks:
        pytest.skip(f"{ranks} ranks need {ranks} GPUs, found {torch.cuda.device_count()}")
    run_worker("collective_syncs_worker.py", ranks, "COLLECTIVE SYNCS OK", timeout=240)
