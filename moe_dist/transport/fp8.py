"""FP8 (e4m3) rows for the dispatch: one float32 scale per token per 128 channels (DeepEP's layout).

A row of H channels travels as H bytes of e4m3 plus H/128 float32 scales: 1 + 4/128 bytes per
channel instead of 2 (bf16). scale = amax / 448 (e4m3's largest finite value), so no value
saturates; an all-zero block gets scale 1. Hidden sizes must be multiples of 128 (checked by
MoEConfig: we refuse rather than pad, so the scales stay aligned with the GEMM's K blocks).
Legend: B rows, H hidden, C = H / 128 scale blocks.
"""

from __future__ import annotations

import torch

FP8_BLOCK = 128
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
DISPATCH_DTYPES = ("bf16", "fp8_e4m3")


def fp8_unsupported_reason(device: torch.device | None) -> str | None:
    """Why FP8 dispatch cannot run on `device`, or None. CPU runs it (casts only, for tests)."""
    if not hasattr(torch, "float8_e4m3fn"):
        return f"torch {torch.__version__} has no float8_e4m3fn"
    if device is not None and device.type == "cuda":
        cc = torch.cuda.get_device_capability(device)
        if cc < (8, 9):
            return f"the GPU's compute capability {cc[0]}.{cc[1]} is below 8.9 (no FP8)"
    return None


def quantize_rows(x_BH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (q_BH as uint8 bytes of e4m3, scales_BC float32). The bytes travel as uint8: every
    backend moves bytes, not every backend knows float8."""
    B, H = x_BH.shape
    blocks = x_BH.float().view(B, H // FP8_BLOCK, FP8_BLOCK)
    amax = blocks.abs().amax(-1)
    scales_BC = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scales_BC.unsqueeze(-1)).to(torch.float8_e4m3fn)
    return q.view(B, H).view(torch.uint8), scales_BC


def dequantize_rows(q_BH: torch.Tensor, scales_BC: torch.Tensor, dtype) -> torch.Tensor:
    B, H = q_BH.shape
    blocks = q_BH.view(torch.float8_e4m3fn).float().view(B, H // FP8_BLOCK, FP8_BLOCK)
    return (blocks * scales_BC.unsqueeze(-1)).view(B, H).to(dtype)
