"""The fused expert path's Triton kernels against their plain-torch oracles
(moe_dist/experts/fused/reference.py), forward and backward, on fresh random inputs: empty experts,
one hot expert, T=0 and T=1, unused slots (top-p / capacity: expert -1), sizes that are not
multiples of 16. On a GPU in bf16; with TRITON_INTERPRET=1 on CPU tensors in fp32
(tests/unit/test_triton_kernels_cpu.py does that in CI).

Legend: T tokens, H hidden, K slots per token, E experts, R = T*K rows, F ffn hidden.
"""

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="the fused path's kernels are Triton kernels")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEV, DT = ("cpu", torch.float32) if INTERPRETED else ("cuda", torch.bfloat16)
pytestmark = pytest.mark.skipif(
    not (INTERPRETED or torch.cuda.is_available()),
    reason="Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 for CPU tensors",
)
TOL = dict(rtol=2e-2, atol=2e-2) if DT == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)

# (T, E, K, kind): kind picks the expert ids
CASES = [
    (0, 4, 2, "random"),
    (1, 4, 2, "random"),
    (37, 5, 3, "random"),
    (53, 9, 2, "empty_experts"),
    (41, 6, 4, "one_hot"),
    (29, 7, 3, "unused"),
    (80, 13, 8, "random"),  # more than one counting-sort block (640 slots)
]


def make_ids(T, E, K, kind, gen):
    if kind == "one_hot":  # one expert holds a slot of every token
        rest = torch.rand(T, E - 1, generator=gen).argsort(-1)[:, : K - 1] + 1
        idx = torch.cat([torch.zeros(T, 1, dtype=torch.int64), rest], 1)
    else:
        pool = E if kind != "empty_experts" else E // 2  # experts >= E//2 get nothing
        idx = torch.rand(T, pool, generator=gen).argsort(-1)[:, :K]
    if kind == "unused":
        drop = torch.rand(T, K, generator=gen) < 0.4
        drop[:, 0] = False
        idx = torch.where(drop, -1, idx)
    return idx.to(DEV)


@pytest.mark.parametrize("T,E,K,kind", CASES)
def test_sort_slots_is_a_stable_counting_sort(T, E, K, kind):
    from moe_dist.experts.fused import ops
    from moe_dist.experts.fused import reference as ref

    idx = make_ids(T, E, K, kind, torch.Generator().manual_seed(T * 31 + E))
    got = ops.sort_slots(idx, E)
    want = ref.sort_slots(idx, E)
    for a, b, name in zip(got, want, ("pos", "row_slot", "counts", "ends")):
        if name == "row_slot":  # rows past the used ones are unspecified
            n = int(want[3][-1]) if E else 0
            a, b = a[:n], b[:n]
        assert torch.equal(a.cpu(), b.cpu()), name


@pytest.mark.parametrize("T,E,K,kind", CASES)
@pytest.mark.parametrize("block", [5, 48, 512])
def test_sort_slots_from_a_given_histogram(T, E, K, kind, block):
    """The rank kernel alone, from a histogram counted elsewhere (the routing kernel's), in
    blocks that are not powers of two, smaller than a rank chunk, or several chunks long."""
    from moe_dist.experts.fused import ops
    from moe_dist.experts.fused import reference as ref
    from moe_dist.routing.kernels import _reference_hist

    idx = make_ids(T, E, K, kind, torch.Generator().manual_seed(T * 17 + E + block))
    shape = (-(-T * K // block), ops.slot_bins(E))
    hist = _reference_hist(idx.cpu(), E, block, shape).to(DEV)
    got = ops.sort_slots(idx, E, hist, block)
    want = ref.sort_slots(idx, E)
    n = int(want[3][-1]) if E else 0
    for a, b, name in zip(got, want, ("pos", "row_slot", "counts", "ends")):
        if name == "row_slot":
            a, b = a[:n], b[:n]
        assert torch.equal(a.cpu(), b.cpu()), (name, block)
    with pytest.raises(ValueError, match="histogram"):
        ops.sort_slots(idx, E, hist[:, :-1].contiguous(), block)


@pytest.mark.parametrize("T,E,K,kind", CASES)
def test_row_kernels_match_the_oracle(T, E, K, kind):
    from moe_dist.experts.fused import ops
    from moe_dist.experts.fused import reference as ref

    gen = torch.Generator().manual_seed(T + 7 * E + K)
    H, F = 40, 24  # not multiples of 16
    idx = make_ids(T, E, K, kind, gen)
    pos, row_slot, _, ends = ops.sort_slots(idx, E)
    n = int(ends[-1])
    x = torch.randn(T, H, generator=gen).to(DEV, DT)
    w = torch.rand(T * K, generator=gen).to(DEV)
    h = torch.randn(T * K, 2 * F, generator=gen).to(DEV, DT)
    da = torch.randn(T * K, F, generator=gen).to(DEV, DT)
    y = torch.randn(T * K, H, generator=gen).to(DEV, DT)
    y[n:] = float("nan")  # rows past the used ones must never be read
    vals = torch.randn(T * K, generator=gen).to(DEV)

    def close(a, b):
        torch.testing.assert_close(a.float().cpu(), b.float().cpu(), **TOL)

    close(ops.gather_rows(x, row_slot, ends, K)[:n], ref.gather_rows(x, row_slot, ends, K)[:n])
    for v in (None, vals):
        got, want = ops.reduce_rows(y, pos, v), ref.reduce_rows(y, pos, v)
        close(got[0], want[0])
        close(got[1], want[1])
    close(ops.swiglu_rows(h, w, row_slot, ends)[:n], ref.swiglu_rows(h, w, row_slot, ends)[:n])
    got = ops.swiglu_rows_backward(h, da, w, row_slot, ends)
    want = ref.swiglu_rows_backward(h, da, w, row_slot, ends)
    close(got[0][:n], want[0][:n])
    close(got[1][:n], want[1][:n])
    # in place: dh over h, a recomputed as the forward computed it
    want_a = ref.swiglu_rows(h, w, row_slot, ends)
    h_in_place = h.clone()
    dw, a = ops.swiglu_rows_backward_in_place(h_in_place, da, w, row_slot, ends)
    close(h_in_place[:n], want[0][:n])
    close(dw[:n], want[1][:n])
    close(a[:n], want_a[:n])


@pytest.mark.parametrize("T,K,H", [(3, 6, 300), (2, 3, 1100)])
def test_reduce_rows_kernel_matches_the_oracle_with_every_tuned_tile(T, K, H):
    """Every [BLOCK_K, BLOCK_H] / COLS config the autotuner may pick (ops._reduce_configs), not
    only the one it picked: K not a power of two (BLOCK_K < KP leaves a masked slot block), H not
    a multiple of BLOCK_H, one tile or the whole row per program; out starts NaN so an unwritten
    column shows. The interpreter runs the smaller tiles only (same loops, less time)."""
    from moe_dist.experts.fused import ops
    from moe_dist.experts.fused import reference as ref
    from moe_dist.experts.fused.kernels import reduce_rows_kernel

    gen = torch.Generator().manual_seed(T * K + H)
    R = T * K + 3
    y = torch.randn(R, H, generator=gen).to(DEV, DT)
    vals = torch.randn(R, generator=gen).to(DEV)
    pos = torch.randperm(R, generator=gen)[: T * K].view(T, K)
    pos[0, -1] = pos[-1, 0] = -1  # unused slots read nothing
    pos = pos.to(torch.int32).to(DEV)
    want, want_vals = ref.reduce_rows(y, pos, vals)
    KP = max(ops._pow2(K), 2)
    configs = [c for c in ops._reduce_configs() if c.kwargs["BLOCK_K"] <= KP]
    if INTERPRETED:
        configs = [c for c in configs if c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_H"] <= 2048]
    for c in configs:
        for has_vals in (False, True):
            out = torch.full((T, H), float("nan"), device=DEV, dtype=DT)
            vals_out = torch.full((T, K), float("nan"), device=DEV)
            grid = (T, triton.cdiv(H, c.kwargs["COLS"]))
            reduce_rows_kernel[grid](
                y,
                pos,
                out,
                vals if has_vals else out,
                vals_out if has_vals else out,
                H,
                K=K,
                KP=KP,
                HAS_VALS=has_vals,
                num_warps=c.num_warps,
                **c.kwargs,
            )
            torch.testing.assert_close(out.float().cpu(), want.float().cpu(), **TOL, msg=str(c))
            if has_vals:
                assert torch.equal(vals_out.cpu(), want_vals.cpu()), c


@pytest.mark.parametrize("save_rows,save_act", [(True, True), (False, False)])
@pytest.mark.parametrize("T,E,K,kind", [c for c in CASES if c[0] not in (80, 53)])
def test_fused_experts_forward_backward_match_a_per_token_loop(T, E, K, kind, save_rows, save_act):
    """The whole fused path (kernels + grouped GEMMs + autograd) against a per-slot loop in fp32;
    also keeping x instead of its rows and recomputing a (dh written over h)."""
    import torch.nn.functional as F_

    from moe_dist.experts.fused import fused_experts

    gen = torch.Generator().manual_seed(100 + T + E)
    H, F = 32, 24
    idx = make_ids(T, E, K, kind, gen)
    x = torch.randn(T, H, generator=gen).to(DEV, DT).requires_grad_()
    w = torch.rand(T, K, generator=gen).to(DEV).requires_grad_()
    w_in = (torch.randn(E, 2 * F, H, generator=gen) / H**0.5).to(DEV, DT).requires_grad_()
    w_out = (torch.randn(E, H, F, generator=gen) / F**0.5).to(DEV, DT).requires_grad_()
    g = torch.randn(T, H, generator=gen).to(DEV, DT)
    out = fused_experts(x, w, w_in, w_out, idx, save_rows=save_rows, save_act=save_act)
    out.backward(g)
    leaves = [x, w, w_in, w_out]
    got = [out.detach()] + [t.grad for t in leaves]
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    xr, wr, w_in_r, w_out_r = ref_leaves
    ref = torch.zeros(T, H, device=DEV)
    for t in range(T):
        for k in range(K):
            e = int(idx[t, k])
            if e >= 0:
                gate, up = (w_in_r[e] @ xr[t]).chunk(2)
                ref[t] += wr[t, k] * (w_out_r[e] @ (F_.silu(gate) * up))
    ref = ref + 0.0 * sum(t.sum() for t in ref_leaves)  # T=0: gradients are zeros
    ref.backward(g.float())
    want = [ref.detach()] + [t.grad for t in ref_leaves]
    tol = 2e-2 if DT == torch.bfloat16 else 1e-5  # relative error norm (bf16 rounds h and da)
    for a, b, name in zip(got, want, ("out", "dx", "dw", "dw_in", "dw_out")):
        a, b = a.float().cpu(), b.float().cpu()
        assert a.shape == b.shape and torch.isfinite(a).all(), name
        assert (a - b).norm() <= tol * b.norm() + 1e-6, (name, (a - b).norm() / b.norm())
