"""The fused expert path: routed slots -> expert-major token rows -> SwiGLU experts -> each token's
weighted sum, with no K-fold passes besides the ones the GEMMs need. Forward:

    x_RH = gather_rows(x_TH)                 one kernel (row r = token of the r-th sorted slot)
    h    = x_RH @ w_in[e]^T                  torch._grouped_mm
    a    = w_slot * silu(gate) * up          one kernel: the combine weight is folded in here
    y    = a @ w_out[e]^T                    torch._grouped_mm
    out  = sum_k y[pos[t, k]]                one gather-reduce kernel, fp32 accumulation

Backward: dy = gather_rows(dout) (the combine's backward is a plain gather), two grouped GEMMs,
the SwiGLU backward (which also yields d(weight) per row as <silu(gate) * up, da>), two grouped
GEMMs, and one gather-reduce for dx that also collects d(weights) in [T, K] order.

Legend: T tokens, H hidden, K slots per token, R = T*K expert-major rows, E experts, F ffn hidden.
"""

from __future__ import annotations

import torch

from . import ops


class _FusedExperts(torch.autograd.Function):
    """Eager backward frees each activation as soon as it is used: h and a ride on ctx (not
    save_for_backward, whose tensors live until the backward returns), so a second backward of the
    same graph (retain_graph=True) is refused. Under torch.compile they are saved normally."""

    @staticmethod
    def forward(ctx, x_TH, w_TK, w_in, w_out, pos_TK, row_slot_R, ends_E, save_rows, save_act):
        K = pos_TK.shape[1]
        w_S = w_TK.reshape(-1)
        x_RH = ops.call(ops.gather_rows, x_TH, row_slot_R, ends_E, K)
        h_R2F = ops.call(ops.grouped_mm, x_RH, w_in.transpose(1, 2), ends_E)
        # Saving x_TH instead of x_RH trades one gather in backward for K copies of x in memory.
        x_saved = x_RH if save_rows else x_TH
        del x_RH
        a_RF = ops.call(ops.swiglu_rows, h_R2F, w_S, row_slot_R, ends_E)
        y_RH = ops.call(ops.grouped_mm, a_RF, w_out.transpose(1, 2), ends_E)
        out_TH, _ = ops.call(ops.reduce_rows, y_RH, pos_TK, None)
        del y_RH
        index = (w_S, w_in, w_out, pos_TK, row_slot_R, ends_E)
        if torch.compiler.is_compiling():
            ctx.save_for_backward(x_saved, h_R2F, a_RF, *index)
            ctx.stash = None
        else:
            ctx.save_for_backward(x_saved, *index)
            # without a: the SwiGLU backward recomputes it and writes dh over h
            ctx.stash = [h_R2F, a_RF] if save_act else [h_R2F, None]
        del a_RF
        ctx.save_rows = save_rows
        return out_TH

    @staticmethod
    def backward(ctx, dout_TH):
        if ctx.stash is None:
            x, h_R2F, a_RF, w_S, w_in, w_out, pos_TK, row_slot_R, ends_E = ctx.saved_tensors
        else:
            x, w_S, w_in, w_out, pos_TK, row_slot_R, ends_E = ctx.saved_tensors
            if not ctx.stash:
                raise RuntimeError(
                    "the fused expert path frees its activations during backward: a second "
                    "backward through it (retain_graph=True) is not supported"
                )
            h_R2F, a_RF = ctx.stash
            ctx.stash.clear()
        K = pos_TK.shape[1]
        need_x, need_w, need_in, need_out = ctx.needs_input_grad[:4]
        dy_RH = ops.call(ops.gather_rows, dout_TH.contiguous(), row_slot_R, ends_E, K)
        if a_RF is not None:
            # dW_out before dA: a is freed before dA is allocated, a off the peak dy and dA set
            dw_out = ops.call(ops.grouped_mm_wgrad, dy_RH, a_RF, ends_E) if need_out else None
            del a_RF
            da_RF = ops.call(ops.grouped_mm, dy_RH, w_out, ends_E)
            del dy_RH
            dh_R2F, dw_R = ops.call(ops.swiglu_rows_backward, h_R2F, da_RF, w_S, row_slot_R, ends_E)
            del da_RF
        else:  # a was not kept: recomputed beside dh, which takes h's memory
            da_RF = ops.call(ops.grouped_mm, dy_RH, w_out, ends_E)
            dw_R, a_RF = ops.swiglu_rows_backward_in_place(h_R2F, da_RF, w_S, row_slot_R, ends_E)
            dh_R2F = h_R2F
            del da_RF
            dw_out = ops.call(ops.grouped_mm_wgrad, dy_RH, a_RF, ends_E) if need_out else None
            del dy_RH, a_RF
        del h_R2F
        dx_TH = dw_TK = None
        if need_x or need_w:
            dx_RH = ops.call(ops.grouped_mm, dh_R2F, w_in, ends_E)
            dx_TH, dw_TK = ops.call(ops.reduce_rows, dx_RH, pos_TK, dw_R)
            dw_TK = dw_TK.to(w_S.dtype)
            del dx_RH
        del dw_R  # [R] fp32: not held through dW_in's gather and GEMM
        dw_in = None
        if need_in:
            x_RH = x if ctx.save_rows else ops.call(ops.gather_rows, x, row_slot_R, ends_E, K)
            dw_in = ops.call(ops.grouped_mm_wgrad, dh_R2F, x_RH, ends_E)
        return dx_TH, dw_TK, dw_in, dw_out, None, None, None, None, None


def fused_experts(
    x_TH: torch.Tensor,
    weights_TK: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    expert_idx_TK: torch.Tensor,
    save_rows: bool = True,
    save_act: bool = True,
    slot_hist=None,
) -> torch.Tensor:
    """out[t] = sum_k weights[t, k] * expert_{idx[t, k]}(x[t]) for SwiGLU experts stored like
    GroupedExperts (w_in [E, 2F, H] = [gate | up], w_out [E, H, F]); slots with expert -1 add 0.
    slot_hist: the routing kernel's SlotHistogram (routing/plan.py), used only if it counts
    expert_idx_TK itself: the sort then skips its histogram pass."""
    hist = slot_hist.for_ids(expert_idx_TK) if slot_hist is not None else None
    sort_args = (hist.counts, hist.block) if hist is not None else ()
    pos_TK, row_slot_R, _, ends_E = ops.call(
        ops.sort_slots, expert_idx_TK, w_in.shape[0], *sort_args
    )
    return _FusedExperts.apply(
        x_TH, weights_TK, w_in, w_out, pos_TK, row_slot_R, ends_E, save_rows, save_act
    )
