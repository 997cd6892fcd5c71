"""Fused SwiGLU for CUDA: one pass forward (h -> silu(gate) * up), one pass backward (h, grad ->
dh), no [rows, F] temporaries. Rows are [gate | up] halves of the first grouped GEMM's output."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_fwd(h_ptr, out_ptr, rows_used_ptr, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = (offs < F) & (row < tl.load(rows_used_ptr))
    gate = tl.load(h_ptr + row * 2 * F + offs, mask=m).to(tl.float32)
    up = tl.load(h_ptr + row * 2 * F + F + offs, mask=m).to(tl.float32)
    silu = gate * tl.sigmoid(gate)
    tl.store(out_ptr + row * F + offs, (silu * up).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd(h_ptr, g_ptr, dh_ptr, rows_used_ptr, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = (offs < F) & (row < tl.load(rows_used_ptr))
    gate = tl.load(h_ptr + row * 2 * F + offs, mask=m).to(tl.float32)
    up = tl.load(h_ptr + row * 2 * F + F + offs, mask=m).to(tl.float32)
    g = tl.load(g_ptr + row * F + offs, mask=m).to(tl.float32)
    sig = tl.sigmoid(gate)
    d_gate = g * up * sig * (1.0 + gate * (1.0 - sig))
    d_up = g * gate * sig
    tl.store(dh_ptr + row * 2 * F + offs, d_gate.to(dh_ptr.dtype.element_ty), mask=m)
    tl.store(dh_ptr + row * 2 * F + F + offs, d_up.to(dh_ptr.dtype.element_ty), mask=m)


def _grid(rows, F, block):
    return (rows, triton.cdiv(F, block))


class SwiGLUTriton(torch.autograd.Function):
    """rows_used (a device scalar, default all): only rows [0, rows_used) are computed; the rest are
    left unwritten. A shape-static transport hands the experts a buffer sized for the worst case
    (nvshmem: every rank's tokens), of which the received rows are a fraction; the grouped GEMMs
    skip the rest already, and so does this."""

    @staticmethod
    def forward(ctx, h, rows_used=None):
        h = h.contiguous()
        rows, F = h.shape[0], h.shape[1] // 2
        if rows_used is None:
            rows_used = torch.full((), rows, dtype=torch.int64, device=h.device)
        out = torch.empty(rows, F, device=h.device, dtype=h.dtype)
        if rows:
            _swiglu_fwd[_grid(rows, F, 1024)](h, out, rows_used, F, BLOCK=1024)
        ctx.save_for_backward(h, rows_used)
        return out

    @staticmethod
    def backward(ctx, grad):
        h, rows_used = ctx.saved_tensors
        rows, F = h.shape[0], h.shape[1] // 2
        dh = torch.empty_like(h)
        if rows:
            _swiglu_bwd[_grid(rows, F, 1024)](h, grad.contiguous(), dh, rows_used, F, BLOCK=1024)
        return dh, None
