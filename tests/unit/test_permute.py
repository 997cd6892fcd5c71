"""Index math every transport shares (CPU)."""

import torch

from moe_dist.transport.permute import (
    gather_token_copies,
    permute_rows,
    sort_slots_by_expert,
    weighted_sum_of_slots,
)


def test_sort_slots_groups_by_expert_stably_unused_last():
    idx = torch.tensor([[2, 0], [-1, 2], [0, 1]])
    s = sort_slots_by_expert(idx, 3)
    assert s.counts_E.tolist() == [2, 1, 2]
    assert s.order_S.tolist() == [1, 4, 5, 0, 3, 2]  # slots of expert 0, 1, 2, then unused
    assert torch.equal(s.order_S[s.inverse_S], torch.arange(6))


def test_permute_and_gather_backward_are_exact():
    torch.manual_seed(0)
    idx = torch.randint(0, 4, (7, 2))
    s = sort_slots_by_expert(idx, 4)
    x = torch.randn(7, 3, requires_grad=True)
    rows = gather_token_copies(x, s, 2)
    torch.testing.assert_close(rows, x.detach()[s.order_S // 2])
    w = torch.rand(7, 2)
    out = weighted_sum_of_slots(rows * 2.0, s, w, None)
    torch.testing.assert_close(out, 2.0 * x.detach() * w.sum(1, keepdim=True))
    out.sum().backward()
    torch.testing.assert_close(x.grad, 2.0 * w.sum(1, keepdim=True).expand(7, 3))
    y = torch.randn(5, 2, requires_grad=True)
    perm = torch.tensor([3, 0, 4, 1, 2])
    inv = torch.argsort(perm)
    permute_rows(y, perm, inv).mul(torch.arange(5.0)[:, None]).sum().backward()
    torch.testing.assert_close(y.grad[perm], torch.arange(5.0)[:, None].expand(5, 2))
