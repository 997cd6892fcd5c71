"""The nvshmem transport on a real GPU with 1, 2 and 4 NVSHMEM PEs sharing it (runs tests/gpu/nvshmem_worker.py
under torchrun). Multi-PE runs on one GPU are time-sliced: they prove correctness, not speed."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_dist.transport import nvshmem_unavailable_reason

ROOT = Path(__file__).resolve().parents[2]
reason = nvshmem_unavailable_reason(torch.device("cuda", 0) if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(reason is not None, reason=f"nvshmem transport cannot run here: {reason}")


@pytest.mark.parametrize("pes", [1, 2, 4])
def test_nvshmem_matches_reference(pes):
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={pes}",
                           str(ROOT / "tests/gpu/nvshmem_worker.py")], env=env, capture_output=True, text=True,
                          timeout=180)
    out = proc.stdout + proc.stderr
    first_error = out.find("Traceback")
    assert proc.returncode == 0 and f"NVSHMEM WORKER OK {pes}" in out, out[max(0, first_error):][:6000]
