"""The routing kernel (moe_dist/routing/kernels.py) against select.py + Router semantics, forward
and backward, on fresh random logits: softmax, sigmoid + bias, top-p (unused slots), with and
without normalisation and scaling, T=0 and T=1, E not a power of two. Ties are improbable on
random fp32 logits; where a top-k margin is a near-tie the decisions are not compared. On a GPU;
with TRITON_INTERPRET=1 on CPU tensors (tests/unit/test_triton_kernels_cpu.py runs it in CI).

Legend: T tokens, E experts, K slots per token.
"""

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="the routing kernel is a Triton kernel")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cpu" if INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(
    not (INTERPRETED or torch.cuda.is_available()),
    reason="Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 for CPU tensors",
)


def reference(logits, bias, k, mode, norm, top_p, scale):
    from moe_dist.routing import select

    if mode == "softmax":
        idx, w, probs = select.softmax_topk(logits, k, norm)
    elif mode == "sigmoid":
        idx, w, probs = select.sigmoid_topk(logits, bias, k, 1, 1, norm)
    else:
        idx, w, probs = select.top_p_select(logits, k, top_p, norm)
    return idx, w * scale, probs


@pytest.mark.parametrize(
    "T,E,K,mode,norm,scale",
    [
        (0, 8, 2, "softmax", True, 1.0),
        (1, 8, 2, "softmax", True, 1.0),
        (37, 13, 3, "softmax", False, 2.5),
        (50, 64, 8, "softmax", True, 1.0),
        (150, 8, 2, "softmax", True, 1.0),  # 3 blocks of 64 tokens: 3 rows of block sums
        (70, 200, 4, "softmax", False, 1.0),  # 16 tokens a block
        (33, 20, 4, "sigmoid", True, 1.0),
        (33, 20, 4, "sigmoid", False, 1.5),
        (45, 16, 6, "top_p", True, 1.0),
        (45, 16, 6, "top_p", False, 1.0),
        (130, 16, 6, "top_p", True, 1.0),
    ],
)
def test_route_topk_matches_select(T, E, K, mode, norm, scale):
    from moe_dist.routing.kernels import _block_sums, _meta, route_topk_fused

    gen = torch.Generator().manual_seed(T * 7 + E + K)
    logits = (torch.randn(T, E, generator=gen) * 2).to(DEV)
    bias = (torch.randn(E, generator=gen) * 0.1).to(DEV)
    dw = torch.randn(T, K, generator=gen).to(DEV)
    BT = _meta(E)[1]  # the kernel's probabilities come summed over blocks of BT tokens
    dp = torch.randn(-(-T // BT), E, generator=gen).to(DEV)
    lk = logits.clone().requires_grad_()
    lr = logits.clone().requires_grad_()
    idx, w, probs, counts, _ = route_topk_fused(lk, bias, K, mode, norm, 0.6, scale, True)
    ridx, rw, rprobs = reference(lr, bias, K, mode, norm, 0.6, scale)
    rprobs = _block_sums(rprobs, BT)
    # decisions: compare rows whose top-k margins are not near-ties
    sel = (logits.sigmoid() + bias) if mode == "sigmoid" else logits
    top = sel.topk(min(K + 1, E), dim=-1).values
    clear = (top[:, :-1] - top[:, 1:]).abs().min(-1).values > 1e-4 if T else torch.ones(0).bool()
    assert torch.equal(idx[clear].cpu(), ridx[clear].cpu())
    want_counts = torch.zeros(E, dtype=torch.int64)
    used = idx.cpu() >= 0
    want_counts.scatter_add_(0, idx.cpu()[used], torch.ones(int(used.sum()), dtype=torch.int64))
    assert torch.equal(counts.cpu(), want_counts)  # the kernel's own ids, counted
    assert clear.float().mean() > 0.9 if T else True
    torch.testing.assert_close(w[clear], rw[clear], rtol=1e-5, atol=1e-6)
    if mode != "sigmoid":  # sigmoid probs for the aux loss are normalised affinities: not served
        torch.testing.assert_close(probs, rprobs, rtol=1e-5, atol=1e-6)
    grads = [dw] + ([dp] if mode != "sigmoid" else [])
    (w * dw).sum().add((probs * dp).sum() if mode != "sigmoid" else 0).backward()
    (rw * dw).sum().add((rprobs * dp).sum() if mode != "sigmoid" else 0).backward()
    assert grads
    if T:
        torch.testing.assert_close(lk.grad[clear], lr.grad[clear], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("T,E", [(0, 8), (1, 8), (77, 20)])
def test_split_hi_lo_carries_fp32_through_two_bf16_halves(T, E):
    from moe_dist.routing.kernels import split_hi_lo

    g = (torch.randn(T, E, generator=torch.Generator().manual_seed(T + E)) * 1e-3).to(DEV)
    hl = split_hi_lo(g)
    assert hl.shape == (T, 2 * E) and hl.dtype == torch.bfloat16
    back = hl[:, :E].float() + hl[:, E:].float()
    assert ((back - g).abs() <= 3e-5 * 1e-3 * 5).all()  # |g| < 5e-3


@pytest.mark.parametrize("mode,check", [("softmax", True), ("sigmoid", False), ("top_p", True)])
def test_gate_folded_into_the_routing_node_matches_gate_then_route(mode, check):
    """gate_route_topk_fused(x, w) (logits recomputed in backward, never held) against the gate
    then route_topk_fused: the same ids, weights, probabilities, counts, finiteness flag and
    gradients of x and w (bf16 tensor-core gate on a GPU, fp32 in the interpreter)."""
    from moe_dist.routing.kernels import (
        _meta,
        bf16_gate_supported,
        gate_logits,
        gate_route_topk_fused,
        route_topk_fused,
    )

    T, H, E, K = 70, 96, 24, 4
    dtype = torch.float32 if INTERPRETED else torch.bfloat16
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(T, H, generator=gen).to(DEV, dtype)
    w = (torch.randn(E, H, generator=gen) * 0.2).to(DEV, dtype)
    bias = (torch.randn(E, generator=gen) * 0.1).to(DEV)
    dw = torch.randn(T, K, generator=gen).to(DEV)
    dp = torch.randn(-(-T // _meta(E)[1]), E, generator=gen).to(DEV)  # block sums' gradient
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    bf16 = bf16_gate_supported(x, w)
    args = (bias, K, mode, True, 0.6, 1.5, mode != "sigmoid")
    idx, wt, probs, counts, finite, _ = gate_route_topk_fused(xa, wa, *args, check_finite=check)

    class Gate(torch.autograd.Function):  # the unfolded gate, with the same math
        @staticmethod
        def forward(ctx, x_, w_):
            ctx.save_for_backward(x_, w_)
            return gate_logits(x_, w_, bf16)

        @staticmethod
        def backward(ctx, g):
            from moe_dist.routing.kernels import gate_backward

            return gate_backward(*ctx.saved_tensors, g, True, True, bf16)

    ridx, rwt, rprobs, rcounts, _ = route_topk_fused(Gate.apply(xb, wb), *args)
    assert torch.equal(idx, ridx) and torch.equal(counts, rcounts)
    torch.testing.assert_close(wt, rwt, rtol=0, atol=0)
    assert (finite is None) != check and (finite is None or bool(finite))
    loss = (wt * dw).sum() + ((probs * dp).sum() if probs is not None else 0)
    rloss = (rwt * dw).sum() + ((rprobs * dp).sum() if rprobs is not None else 0)
    loss.backward()
    rloss.backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wa.grad, wb.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["softmax", "sigmoid", "top_p"])
def test_non_finite_logits_still_route_to_experts_in_range(mode):
    """Rows with NaN or Inf logits (and a NaN selection bias) get K distinct ids in [0, E) (or -1
    for top-p's unused slots), counted: nothing downstream indexes out of range before the
    layer's finiteness check raises."""
    from moe_dist.routing.kernels import route_topk_fused

    T, E, K = 6, 5, 3
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(5)).to(DEV)
    logits[1, 2] = float("nan")
    logits[2] = float("nan")
    logits[3, 0] = float("inf")
    logits[4, 4] = float("-inf")
    bias = torch.zeros(E, device=DEV)
    if mode == "sigmoid":
        bias[3] = float("nan")
    idx, _, _, counts, _ = route_topk_fused(
        logits, bias, K, mode, True, 0.6, 1.0, mode != "sigmoid"
    )
    used = idx >= 0
    assert bool(((idx < E) & (idx >= -1)).all()), idx
    assert bool(used[:, 0].all()), idx
    for row in idx.tolist():
        picked = [i for i in row if i >= 0]
        assert len(set(picked)) == len(picked), idx
    want = torch.bincount(idx[used].cpu(), minlength=E)
    assert torch.equal(counts.cpu(), want)


def test_layer_with_nan_logits_raises_non_finite_through_the_routing_kernel():
    """The default eager check on the kernel's path: NonFiniteRouterLogits naming the rows, not an
    index error (or a device-side assert) from the aux loss or the dispatch."""
    from moe_dist import MoEConfig, MoELayer, NonFiniteRouterLogits

    for router in ("softmax", "top_p", "sigmoid"):
        extra = {"top_p": 0.7} if router == "top_p" else {}
        cfg = MoEConfig(hidden_size=16, ffn_hidden_size=32, num_experts=4, top_k=2, router=router)
        layer = MoELayer(cfg.replace(**extra), device=DEV)
        layer.router.fused_routing = True
        x = torch.randn(6, 16, device=DEV)
        x[1, 0] = float("nan")
        with pytest.raises(NonFiniteRouterLogits, match="1 of 6 tokens"):
            layer(x)


@pytest.mark.parametrize(
    "T,E,K,mode",
    [
        (0, 8, 2, "softmax"),
        (1, 8, 2, "softmax"),
        (150, 8, 3, "softmax"),  # 3 blocks of 64 tokens: 192 slots a block, not a power of two
        (130, 13, 6, "top_p"),  # unused slots (bin E) and 384-slot blocks
        (70, 200, 4, "sigmoid"),  # 16 tokens a block: 5 blocks, 256 bins
    ],
)
def test_routing_kernel_histogram_drives_the_counting_sort(T, E, K, mode):
    """The histogram the routing kernel writes for the sort counts its own ids block by block,
    and the sort from it (the rank kernel alone) equals a stable argsort of those ids."""
    from moe_dist.experts.fused import ops
    from moe_dist.experts.fused import reference as ref
    from moe_dist.routing.kernels import _reference_hist, route_topk_fused, slot_hist_block

    gen = torch.Generator().manual_seed(T + 3 * E + K)
    logits = (torch.randn(T, E, generator=gen) * 2).to(DEV)
    bias = (torch.randn(E, generator=gen) * 0.1).to(DEV)
    idx, _, _, counts, hist = route_topk_fused(
        logits, bias, K, mode, True, 0.6, 1.0, write_hist=True
    )
    block = slot_hist_block(T, E, K)
    assert hist is not None and block > 0
    want = _reference_hist(idx.cpu(), E, block, tuple(hist.shape))
    assert hist.shape[0] == -(-T * K // block)
    assert torch.equal(hist.cpu(), want)
    assert torch.equal(hist[:, :E].sum(0).long().cpu(), counts.cpu())
    got = ops.sort_slots(idx, E, hist, block)
    expect = ref.sort_slots(idx.cpu(), E)
    n = int(expect[3][-1]) if E else 0
    for a, b, name in zip(got, expect, ("pos", "row_slot", "counts", "ends")):
        if name == "row_slot":  # rows past the used ones are unspecified
            a, b = a[:n], b[:n]
        assert torch.equal(a.cpu(), b.cpu()), name


def test_a_routed_plan_carries_the_histogram_of_its_own_ids_only():
    """The router's plan holds the kernel's histogram for its ids; the fused path takes it for
    those ids and sorts from scratch for any other (capacity drops, chunks, Llama 4's rows), and
    the layer's output is the same either way."""
    from moe_dist import MoEConfig, MoELayer

    cfg = MoEConfig(hidden_size=24, ffn_hidden_size=40, num_experts=6, top_k=3)
    layer = MoELayer(cfg, device=DEV)
    layer.router.fused_routing = True
    x = torch.randn(45, 24, generator=torch.Generator().manual_seed(2)).to(DEV)
    plan = layer.router(x)
    assert plan.slot_hist is not None
    assert plan.slot_hist.for_ids(plan.expert_idx_TK) is plan.slot_hist
    assert plan.slot_hist.for_ids(plan.expert_idx_TK.clone()) is None
    capped = layer.router.__class__(cfg.replace(capacity_factor=1.0), device=DEV)
    capped.fused_routing = True
    assert capped(x).slot_hist is None  # capacity may drop slots after the kernel counted them

    def run(fused: bool):
        layer.transport.fused = layer.router.fused_routing = fused
        xg = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        out = layer(xg).output
        out.backward(torch.ones_like(out))
        return [out, xg.grad, *(p.grad for p in layer.parameters())]

    tol = dict(rtol=2e-2, atol=2e-2) if DEV == "cuda" else dict(rtol=1e-5, atol=1e-5)
    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, **tol)
