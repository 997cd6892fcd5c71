"""Grouped GEMM over experts: y[rows of e] = x[rows of e] @ w[e]^T for every local expert e.

Rows arrive grouped by expert (counts_G rows for group 0, then group 1, ...). Rows past the last
group (unused slots a transport kept to stay shape-static) are not computed: callers mask them.
Legend: M rows, K in-features, N out-features, G groups (local experts). """

from __future__ import annotations

import torch


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, *dims: int) -> tuple[bool, str]:
    """Whether torch._grouped_mm runs for these operands; the reason when it does not."""
    if not hasattr(torch, "_grouped_mm"):
        return False, f"torch {torch.__version__} has no torch._grouped_mm"
    # CUDA: only bf16 has a real grouped kernel (other dtypes fall back to a per-group loop that
    # reads the offsets on the host). CPU: float32.
    ok_dtypes = (torch.bfloat16,) if device.type == "cuda" else (torch.float32,)
    if dtype not in ok_dtypes:
        return False, f"torch._grouped_mm on {device.type} supports {ok_dtypes}, not {dtype}"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        return False, "torch._grouped_mm needs compute capability 9.0 or newer"
    align = 16 // (torch.finfo(dtype).bits // 8)
    bad = [d for d in dims if d % align]
    if bad:
        return (
            False,
            (
                f"torch._grouped_mm needs sizes divisible by {align} for {dtype} (16-byte strides),"
                f" got {bad}"
            ),
        )
    return True, ""


def grouped_mm(x_MK: torch.Tensor, w_GNK: torch.Tensor, counts_G: torch.Tensor) -> torch.Tensor:
    """Fast path: one torch._grouped_mm launch; counts stay on the device (no host sync)."""
    offs_G = torch.cumsum(counts_G, 0, dtype=torch.int32)
    return torch._grouped_mm(x_MK, w_GNK.transpose(-2, -1), offs=offs_G)


def loop_mm(x_MK: torch.Tensor, w_GNK: torch.Tensor, counts_G: torch.Tensor) -> torch.Tensor:
    """Oracle: one matmul per expert (Hugging Face Mixtral style). Reads counts on the host.
    Every expert joins the autograd graph, even with no rows: a rank whose experts got nothing must
    still run the transport's backward calls, which are collective (its peers wait for them)."""
    pieces, start = [], 0
    for g, n in enumerate(counts_G.tolist()):
        pieces.append(x_MK[start : start + n] @ w_GNK[g].t())
        start += n
    pieces.append(
        x_MK.new_zeros(x_MK.shape[0] - start, w_GNK.shape[1])
    )  # rows past the groups: unused
    return torch.cat(pieces)
