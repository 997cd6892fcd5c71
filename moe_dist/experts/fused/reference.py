"""Plain-torch oracles of the fused expert path's kernels (the CPU implementation of its custom
ops, and what the Triton kernels are tested against). Rows past ends[-1] are zero here.

Legend: T tokens, H hidden, K slots per token, S = T*K slots, R = S expert-major rows, E experts,
G groups, F ffn hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sort_slots(idx_TK: torch.Tensor, num_experts: int):
    """A stable argsort of the slots by expert; unused slots (-1) last and without a row."""
    key_S = idx_TK.reshape(-1).long()
    used_S = key_S >= 0
    key_S = torch.where(used_S, key_S, num_experts)
    order_S = torch.argsort(key_S, stable=True)
    pos_S = torch.empty_like(order_S)
    pos_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=key_S.device)
    counts.scatter_add_(0, key_S, torch.ones_like(key_S))
    counts_E = counts[:num_experts].clone()
    ends_E = torch.cumsum(counts_E, 0).to(torch.int32)
    pos_TK = torch.where(used_S, pos_S, -1).to(torch.int32).view(idx_TK.shape)
    row_slot_R = torch.where(
        torch.arange(order_S.numel(), device=key_S.device) < counts_E.sum(), order_S, 0
    ).to(torch.int32)
    return pos_TK, row_slot_R, counts_E, ends_E


def _used_rows(R: int, ends_E: torch.Tensor) -> torch.Tensor:
    total = ends_E[-1] if ends_E.numel() else torch.zeros((), dtype=torch.int32)
    return torch.arange(R, device=ends_E.device) < total


def _slots(row_slot_R, ends_E):
    """Row -> slot, with rows past the used ones (unspecified on the Triton path) sent to slot 0."""
    used = _used_rows(row_slot_R.numel(), ends_E)
    return torch.where(used, row_slot_R.long(), 0), used


def gather_rows(x_TH, row_slot_R, ends_E, k):
    slot_R, used = _slots(row_slot_R, ends_E)
    used = used.unsqueeze(-1)
    rows = x_TH.index_select(0, slot_R // k)
    return torch.where(used, rows, rows.new_zeros(()))


def reduce_rows(y_RH, pos_TK, vals_R):
    T, K = pos_TK.shape
    used_TK = pos_TK >= 0
    p = pos_TK.long().clamp(min=0).reshape(-1)
    rows = y_RH.index_select(0, p).view(T, K, y_RH.shape[1]).float()
    out = torch.where(used_TK.unsqueeze(-1), rows, 0.0).sum(1).to(y_RH.dtype)
    if vals_R is None:
        return out, y_RH.new_empty(0, dtype=torch.float32)
    vals_TK = torch.where(used_TK, vals_R.index_select(0, p).view(T, K), 0.0).to(vals_R.dtype)
    return out, vals_TK


def swiglu_rows(h_R2F, w_S, row_slot_R, ends_E):
    gate, up = h_R2F.float().chunk(2, dim=-1)
    w_R = w_S.float().index_select(0, _slots(row_slot_R, ends_E)[0]).unsqueeze(-1)
    a = (w_R * F.silu(gate) * up).to(h_R2F.dtype)
    return torch.where(_used_rows(h_R2F.shape[0], ends_E).unsqueeze(-1), a, a.new_zeros(()))


def swiglu_rows_backward(h_R2F, da_RF, w_S, row_slot_R, ends_E):
    gate, up = h_R2F.float().chunk(2, dim=-1)
    da = da_RF.float()
    w_R = w_S.float().index_select(0, _slots(row_slot_R, ends_E)[0]).unsqueeze(-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    gw = da * w_R
    dh = torch.cat([gw * up * sig * (1 + gate * (1 - sig)), gw * silu], dim=-1).to(h_R2F.dtype)
    dw = (silu * up * da).sum(-1)
    used = _used_rows(h_R2F.shape[0], ends_E)
    return torch.where(used.unsqueeze(-1), dh, dh.new_zeros(())), torch.where(used, dw, 0.0)


def grouped_mm(a_RK, b_GKN, ends_G):
    """Per-group loop (reads the row counts on the host)."""
    out = a_RK.new_zeros(a_RK.shape[0], b_GKN.shape[2])
    start = 0
    for g, end in enumerate(ends_G.tolist()):
        out[start:end] = a_RK[start:end] @ b_GKN[g]
        start = end
    return out


def grouped_mm_wgrad(a_RN, b_RK, ends_G):
    out = a_RN.new_zeros(ends_G.shape[0], a_RN.shape[1], b_RK.shape[1])
    start = 0
    for g, end in enumerate(ends_G.tolist()):
        out[g] = a_RN[start:end].t() @ b_RK[start:end]
        start = end
    return out
