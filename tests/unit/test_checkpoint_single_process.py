"""moe_dist.training.checkpoint in one process: round trip with optimizer state, errors that name
the tensor, and loading that refuses to unpickle anything but DCP's own metadata classes.
(Resharding across EP sizes and FSDP2 is tested over four processes in
tests/dist/test_training_checkpoint.py.)"""

from __future__ import annotations

import json
import pickle
import zlib

import pytest
import torch
import torch.distributed.checkpoint as dcp

from moe_dist import MoEConfig
from moe_dist.training import checkpoint
from moe_dist.training.router_bias import RouterBiasUpdater
from moe_dist.lm import ModelConfig, MoETransformer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

CFG = ModelConfig(d_model=16, n_layers=2, n_heads=2, max_seq_len=8)
MOE = MoEConfig(hidden_size=16, ffn_hidden_size=24, num_experts=4, top_k=2, router="sigmoid")


def make(seed: int, moe: MoEConfig = MOE, cfg: ModelConfig = CFG) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(cfg, moe)


def train_step(model, opt, step: int) -> float:
    tokens = torch.randint(
        0, 256, (2, CFG.max_seq_len + 1), generator=torch.Generator().manual_seed(step)
    )
    loss = model(tokens[:, :-1], tokens[:, 1:]).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def test_round_trip_with_optimizer_continues_the_curve(tmp_path):
    model = make(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    RouterBiasUpdater(model).attach(opt)  # the sigmoid router's bias moves at each step
    for step in range(2):
        train_step(model, opt, step)
    checkpoint.save(model, tmp_path / "ck", optimizer=opt, extra={"step": 2, "note": "x"})
    assert (
        not model.layers[0].moe.router.expert_bias.eq(0).all()
    )  # the sigmoid router's bias moved...
    expected = [train_step(model, opt, step) for step in (2, 3)]

    other = make(1)
    other_opt = torch.optim.AdamW(other.parameters(), lr=5.0, betas=(0.1, 0.1))
    RouterBiasUpdater(other).attach(other_opt)
    assert checkpoint.load(other, tmp_path / "ck", optimizer=other_opt) == {"step": 2, "note": "x"}
    assert (
        other_opt.param_groups[0]["betas"] == (0.8, 0.9) and other_opt.param_groups[0]["lr"] == 1e-2
    )
    torch.testing.assert_close(  # ...and is restored, as a buffer
        other.layers[0].moe.router.expert_bias, make_trained_bias(tmp_path / "ck")
    )
    assert [train_step(other, other_opt, step) for step in (2, 3)] == pytest.approx(
        expected, rel=1e-6
    )


def make_trained_bias(path) -> torch.Tensor:
    fresh = make(5)
    checkpoint.load(fresh, path)
    return fresh.layers[0].moe.router.expert_bias


def test_experts_are_stored_one_key_per_global_expert(tmp_path):
    model = make(0)
    checkpoint.save(model, tmp_path / "ck")
    keys = checkpoint.SafeFileSystemReader(tmp_path / "ck").read_metadata().state_dict_metadata
    assert {f"model.layers.1.moe.experts.w_out.{e}" for e in range(4)} <= set(keys)
    assert "model.layers.1.moe.experts.w_out" not in keys
    torch.testing.assert_close(keys["model.layers.1.moe.experts.w_in.3"].size, torch.Size([48, 16]))


def test_shape_mismatch_names_the_tensor(tmp_path):
    checkpoint.save(make(0), tmp_path / "ck")
    with pytest.raises(
        checkpoint.CheckpointMismatch,
        match=r"checkpoint tensor 'model.layers.0.moe.experts.w_in.0' has shape \[48, 16\], but the "
        r"model expects \[64, 16\]",
    ):
        checkpoint.load(make(0, MOE.replace(ffn_hidden_size=32)), tmp_path / "ck")


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    checkpoint.save(make(0), tmp_path / "ck")
    with_shared_expert = make(0, MOE.replace(num_shared_experts=1))
    with pytest.raises(
        checkpoint.CheckpointMismatch,
        match=r"has no tensor 'model.layers.0.moe.shared_experts.w_in' \(model shape \[48, 16\]\)",
    ):
        checkpoint.load(with_shared_expert, tmp_path / "ck")
    fewer_layers = make(0, cfg=ModelConfig(d_model=16, n_layers=1, n_heads=2, max_seq_len=8))
    with pytest.raises(
        checkpoint.CheckpointMismatch, match=r"no place for: \['model.layers.1.attn.proj.weight'"
    ):
        checkpoint.load(fewer_layers, tmp_path / "ck")
    checkpoint.load(fewer_layers, tmp_path / "ck", strict=False)
    with pytest.raises(checkpoint.CheckpointMismatch, match="holds no optimizer state"):
        model = make(0)
        checkpoint.load(
            model, tmp_path / "ck", optimizer=torch.optim.SGD(model.parameters(), lr=0.1)
        )


class _Exploit:
    def __reduce__(self):
        return (open, ("/tmp/moe_dist_checkpoint_pwned", "w"))


def test_loading_never_unpickles_foreign_objects(tmp_path):
    checkpoint.save(make(0), tmp_path / "ck")
    evil = pickle.dumps(_Exploit())
    (tmp_path / "ck" / ".metadata").write_bytes(evil)
    # An attacker can re-sign the checksums; the allow-listed unpickler is what stops the exploit.
    meta = json.loads((tmp_path / "ck" / checkpoint.META_FILE).read_text())
    meta["checksums"]["metadata"] = f"{zlib.crc32(evil):08x}"
    meta["crc32"] = checkpoint._meta_crc(meta)
    (tmp_path / "ck" / checkpoint.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(pickle.UnpicklingError, match=r"refers to io.open"):
        checkpoint.load(make(0), tmp_path / "ck")
    import os

    assert not os.path.exists("/tmp/moe_dist_checkpoint_pwned")


def test_not_a_checkpoint(tmp_path):
    dcp.save({"model.x": torch.ones(2)}, storage_writer=dcp.FileSystemWriter(tmp_path / "plain"))
    with pytest.raises(FileNotFoundError, match="is not a moe_dist checkpoint"):
        checkpoint.load(make(0), tmp_path / "plain")
