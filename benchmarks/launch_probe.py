"""Host cost of one Triton launch from Python, which bounds small nvshmem calls (about ten launches
per dispatch+combine): the JITFunction path every launch takes now, against the compiled kernel's
handle.

    python -m benchmarks.launch_probe        # GPU only
"""

import sys
import time

import torch

if not torch.cuda.is_available():
    sys.exit("launch_probe.py measures CUDA launches: it needs a GPU")
from moe_dist.transport.nvshmem import kernels as K_  # noqa: E402

dev = torch.device("cuda", 0)
N, E, G, K, H, T = 2, 64, 32, 8, 2048, 128
S = T * K
x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
idx = torch.randint(0, E, (S,), device=dev)
z64 = torch.zeros(S, dtype=torch.int64, device=dev)
offs = torch.zeros(E, dtype=torch.int64, device=dev)
over = torch.zeros(N, dtype=torch.int32, device=dev)
dr, dp = torch.zeros(S, dtype=torch.int64, device=dev), torch.zeros(
    S, dtype=torch.int64, device=dev
)
out = torch.empty(S * N, H, device=dev, dtype=torch.bfloat16)
addr = torch.tensor([out.data_ptr()] * N, dtype=torch.int64, device=dev)
meta = torch.empty(S * N, dtype=torch.int64, device=dev)
maddr = torch.tensor([meta.data_ptr()] * N, dtype=torch.int64, device=dev)
via = torch.zeros(N, dtype=torch.int32, device=dev)
args = (x, z64, idx, z64, offs, over, dr, dp, addr, out, maddr, via, 0, G, K, H, S)
kw = dict(COMPUTE_DEST=True, SCALE=False, HAS_PUT=False, BLOCK=1024)
grid = K_.comm_grid(S * 2, K_.DEFAULT_COMM_SMS)
k = K_.push_slots_kernel[grid](*args, **kw)
torch.cuda.synchronize()
for name, fn in [
    ("jit launch", lambda: K_.push_slots_kernel[grid](*args, **kw)),
    ("compiled handle", lambda: k[(grid[0], 1, 1)](*args, *kw.values())),
]:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(2000):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    print(f"{name}: {1e6 * (t1 - t0) / 2000:.1f} us per launch (host)", flush=True)
t0 = time.perf_counter()
for _ in range(2000):
    torch.empty(S, dtype=torch.int64, device=dev)
print(f"torch.empty: {1e6 * (time.perf_counter() - t0) / 2000:.1f} us", flush=True)
