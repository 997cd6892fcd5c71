"""The example MoE language model (moe_dist.lm) and its byte-level data (moe_dist.lm.data), one
process."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from moe_dist import MoEConfig, MoELayer
from moe_dist.extensions.coe import ChainOfExperts
from moe_dist.lm.data import ByteCorpus, local_rows, stdlib_sources
from moe_dist.lm import ModelConfig, MoETransformer

CFG = ModelConfig(d_model=16, n_layers=2, n_heads=2, max_seq_len=10)
MOE = MoEConfig(hidden_size=16, ffn_hidden_size=24, num_experts=4, top_k=2, aux_loss_coef=0.1)


def make(seed: int = 0, **kw) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(CFG, MOE, **kw)


def test_d_model_must_equal_the_moe_hidden_size():
    with pytest.raises(
        ValueError, match=r"ModelConfig.d_model \(16\) must equal MoEConfig.hidden_size \(32\)"
    ):
        MoETransformer(CFG, MOE.replace(hidden_size=32))


def test_model_config_is_validated():
    with pytest.raises(ValueError, match=r"d_model \(10\) must be divisible by n_heads \(4\)"):
        ModelConfig(d_model=10, n_heads=4)
    with pytest.raises(ValueError, match=r"n_layers must be a positive int, got 0"):
        ModelConfig(n_layers=0)
    with pytest.raises(ValueError, match=r"coe_iterations must be a positive int, got 0"):
        ModelConfig(coe_iterations=0)


def test_outputs_loss_and_expert_counts():
    model = make()
    tokens = torch.randint(0, 256, (3, CFG.max_seq_len + 1))
    out = model(tokens[:, :-1], tokens[:, 1:])
    assert out.logits.shape == (3, CFG.max_seq_len, 256)
    ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 256), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(out.ce_loss, ce)
    torch.testing.assert_close(out.loss, ce + out.aux_loss)
    assert out.aux_loss > 0  # the load-balancing loss is part of the objective
    assert [int(c.sum()) for c in out.tokens_per_expert] == [
        3 * CFG.max_seq_len * MOE.top_k
    ] * CFG.n_layers
    assert model(tokens[:, :-1]).loss is None


def test_attention_is_causal():
    model = make().eval()
    tokens = torch.randint(0, 256, (2, CFG.max_seq_len))
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 256
    a, b = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_longer_than_max_seq_len_fails():
    with pytest.raises(ValueError, match=r"sequence length \(11\) exceeds max_seq_len \(10\)"):
        make()(torch.zeros(1, 11, dtype=torch.long))


@pytest.fixture
def one_thread():
    """Tiny matrices gain nothing from threads, and OpenMP threads on a busy shared CPU spin-wait
    badly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_same_seed_same_model_and_it_learns(one_thread):
    assert all(
        torch.equal(a, b)
        for a, b in zip(make(3).state_dict().values(), make(3).state_dict().values())
    )
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.arange(CFG.max_seq_len + 1).repeat(4, 1) * 7 % 256  # a pattern to memorise
    losses = []
    for _ in range(30):
        loss = model(tokens[:, :-1], tokens[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_coe_iterations_make_chain_of_experts_ffns():
    """ModelConfig.coe_iterations (the trainer's --coe-iterations): every FFN a ChainOfExperts over
    one MoELayer's experts with an extra router per extra pass; 1 is the plain model, parameter for
    parameter. """
    from moe_dist.training.fsdp import default_units

    plain = make(5)
    torch.manual_seed(5)
    coe = MoETransformer(dataclasses.replace(CFG, coe_iterations=3), MOE)
    assert all(isinstance(m, MoELayer) for m in plain.moe_layers())
    assert all(isinstance(m, ChainOfExperts) and m.iterations == 3 for m in coe.moe_layers())
    n_plain, n_coe = (sum(p.numel() for p in m.parameters()) for m in (plain, coe))
    assert n_coe == n_plain + CFG.n_layers * 2 * MOE.num_experts * MOE.hidden_size
    # The first pass of each CoE layer is the plain layer, drawn from the same seed stream.
    torch.testing.assert_close(coe.layers[0].moe.moe.experts.w_in, plain.layers[0].moe.experts.w_in)
    tokens = torch.randint(0, 256, (2, CFG.max_seq_len + 1))
    out = coe(tokens[:, :-1], tokens[:, 1:])
    assert [int(c.sum()) for c in out.tokens_per_expert] == [
        2 * CFG.max_seq_len * MOE.top_k * 3
    ] * CFG.n_layers
    assert not torch.allclose(out.logits, plain(tokens[:, :-1]).logits)
    out.loss.backward()
    assert all(
        r.weight.grad is not None and r.weight.grad.abs().sum() > 0
        for m in coe.moe_layers()
        for r in m.routers
    )  # every pass's router is trained
    # FSDP2 units are the blocks only: a CoE's router list must stay inside its block's unit.
    assert default_units(coe) == list(coe.layers)


class DenseFFN(nn.Module):
    """Stand-in for another MoE implementation: returns (output, aux_loss, counts) like MoELayer."""

    def __init__(self):
        super().__init__()
        self.ff = nn.Linear(16, 16)

    def forward(self, x):
        return self.ff(x), x.new_zeros(()), torch.zeros(1, dtype=torch.long)


def test_moe_factory_swaps_the_ffn():
    model = make(moe_factory=lambda i: DenseFFN())
    assert all(isinstance(m, DenseFFN) for m in model.moe_layers())
    out = model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    assert torch.isfinite(out.loss) and out.aux_loss == 0


def test_stdlib_corpus_is_sorted_and_excludes_installed_packages():
    files = stdlib_sources()
    assert files == sorted(files) and any(f.name == "os.py" for f in files)
    assert not any("site-packages" in f.parts for f in files)


def test_batches_are_a_function_of_seed_and_step(tmp_path):
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(range(256)) * 4)
    corpus = ByteCorpus.from_path(text)
    assert len(corpus) == 1025  # the file and its 0 separator
    a, b = corpus.global_batch(5, 4, 8), corpus.global_batch(5, 4, 8)
    assert torch.equal(a, b) and a.shape == (4, 9) and a.dtype == torch.long
    assert not torch.equal(a, corpus.global_batch(6, 4, 8))
    assert bool(
        ((a[:, 1:] - a[:, :-1]) % 256 == 1).all()
    )  # windows of consecutive bytes of the file
    assert torch.equal(torch.cat([local_rows(a, r, 2) for r in range(2)]), a)
    with pytest.raises(
        ValueError,
        match=r"global batch size \(4\) must be divisible by the data-parallel world "
        r"size \(3\)",
    ):
        local_rows(a, 0, 3)
    with pytest.raises(FileNotFoundError, match="neither a file nor a directory"):
        ByteCorpus.from_path(tmp_path / "missing")
