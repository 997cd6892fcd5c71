"""Dedup index math (transport/dedup.py) and the fp8 row codec against plain-torch oracles, one
process. Legend: T tokens, K slots per token, N ranks, G local experts, H hidden."""

import pytest
import torch

from moe_dist.transport.dedup import (
    count_pairs,
    expand_links,
    gather_rows,
    plan_pairs,
    reduce_rows,
    slot_experts,
    trim_links,
)
from moe_dist.transport.fp8 import dequantize_rows, quantize_rows


def random_idx(T, K, E, gen, unused=0.0):
    if T == 0:
        return torch.zeros(0, K, dtype=torch.long)
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    idx[torch.rand(T, K, generator=gen) < unused] = -1
    return idx


@pytest.mark.parametrize(
    "T,K,E,N,unused", [(13, 3, 8, 2, 0.0), (29, 4, 16, 4, 0.3), (0, 2, 4, 2, 0)]
)
def test_pairs_are_distinct_token_rank_pairs_in_rank_then_token_order(T, K, E, N, unused):
    gen = torch.Generator().manual_seed(T + K)
    idx = random_idx(T, K, E, gen, unused)
    G = E // N
    pp = plan_pairs(idx, G, N)
    expected = sorted({(int(e) // G, t) for t in range(T) for e in idx[t].tolist() if e >= 0})
    P = len(expected)
    assert int(pp.pairs_N.sum()) == P
    assert pp.pairs_N.tolist() == count_pairs(idx, G, N).tolist()
    links = trim_links(pp.links, P)
    token_P = links.owner_B // K
    dest_P = pp.dest_TK.reshape(-1)[links.owner_B]
    assert list(zip(dest_P.tolist(), token_P.tolist())) == expected
    # Every slot of a pair's token bound for the pair's rank names its local expert; no other does.
    gl_PK = slot_experts(idx, pp.dest_TK, token_P, dest_P, G)
    for p, (r, t) in enumerate(expected):
        want = [e % G if e >= 0 and e // G == r else -1 for e in idx[t].tolist()]
        assert gl_PK[p].tolist() == want
    # Each token's slots link to its pairs, once per rank.
    for t in range(T):
        linked = [int(s) for s in links.slots_AJ[t] if s < P]
        assert sorted(linked) == [p for p, (_, tt) in enumerate(expected) if tt == t]


def test_expansion_is_expert_major_then_row_then_slot():
    gen = torch.Generator().manual_seed(3)
    R, K, G = 11, 3, 4
    gl = torch.randint(-1, G, (R, K), generator=gen)
    M = int((gl >= 0).sum())
    links = expand_links(gl, G, M)
    expected = sorted((int(gl[r, k]), r, k) for r in range(R) for k in range(K) if gl[r, k] >= 0)
    owner = links.owner_B.tolist()
    assert [(int(gl[o // K, o % K]), o // K, o % K) for o in owner] == expected
    for b, o in enumerate(owner):
        assert int(links.slots_AJ[o // K, o % K]) == b


def test_gather_and_weighted_reduce_match_plain_torch_with_gradients():
    gen = torch.Generator().manual_seed(5)
    R, K, G, H = 9, 3, 3, 7
    gl = torch.randint(-1, G, (R, K), generator=gen)
    M = int((gl >= 0).sum())
    links = expand_links(gl, G, M)
    x = torch.randn(R, H, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(R, K, generator=gen, dtype=torch.float64, requires_grad=True)
    y_MH = gather_rows(x, links)
    y2 = y_MH * torch.linspace(0.5, 2.0, M, dtype=torch.float64).unsqueeze(1)  # per-row experts
    # NaN rows past the members must not leak (shape-static buffers hold garbage there).
    y_pad = torch.cat([y2, torch.full((2, H), float("nan"), dtype=torch.float64)])
    out = reduce_rows(y_pad, trim_links(links, M), w)
    g = torch.randn(R, H, generator=gen, dtype=torch.float64)
    (out * g).sum().backward()
    # The oracle: python loops.
    x0, w0 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    order = sorted((int(gl[r, k]), r, k) for r in range(R) for k in range(K) if gl[r, k] >= 0)
    scale = torch.linspace(0.5, 2.0, M, dtype=torch.float64)
    ref = [torch.zeros(H, dtype=torch.float64) for _ in range(R)]
    for b, (_, r, k) in enumerate(order):
        ref[r] = ref[r] + w0[r, k] * x0[r] * scale[b]
    ref = torch.stack(ref)
    (ref * g).sum().backward()
    torch.testing.assert_close(out, ref.to(out.dtype))
    torch.testing.assert_close(x.grad, x0.grad)
    torch.testing.assert_close(w.grad, w0.grad)


def test_fp8_rows_error_is_bounded_per_128_channel_block():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 256, generator=gen) * torch.logspace(-3, 3, 6).unsqueeze(1)
    x[2, :128] = 0.0  # an all-zero block
    q, scales = quantize_rows(x)
    assert q.dtype == torch.uint8 and q.shape == x.shape and scales.shape == (6, 2)
    back = dequantize_rows(q, scales, torch.float32)
    assert torch.equal(back[2, :128], torch.zeros(128))
    block_scale = scales.repeat_interleave(128, 1)
    # e4m3: 3 mantissa bits (relative error <= 2^-4) above 2^-6, absolute steps of 2^-9 below.
    assert ((back - x).abs() <= x.abs() / 16 + block_scale * 2.0**-9).all()
    assert (back - x).abs().max() > 0  # it did quantise
