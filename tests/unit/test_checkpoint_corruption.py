"""Issue 15 case 3: every corruption of a moe_dist checkpoint (flipped bytes in a tensor, a corrupt
.metadata or moe_dist.json, a missing key) raises CheckpointCorrupt naming the path and the tensor
or file, instead of loading garbage or a bare JSONDecodeError/KeyError/UnpicklingError."""

from __future__ import annotations

import json

import pytest
import torch

from moe_dist import MoEConfig
from moe_dist.lm import ModelConfig, MoETransformer
from moe_dist.training import checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

CFG = ModelConfig(d_model=16, n_layers=1, n_heads=2, max_seq_len=8)
MOE = MoEConfig(hidden_size=16, ffn_hidden_size=24, num_experts=4, top_k=2)


def make(seed: int) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(CFG, MOE)


@pytest.fixture
def ck(tmp_path):
    checkpoint.save(make(0), tmp_path / "ck", extra={"step": 3})
    return tmp_path / "ck"


def _flip_inside(ck, key: str) -> None:
    """Flips 4 bytes in the middle of the stored bytes of tensor `key`."""
    reader = checkpoint.SafeFileSystemReader(ck)
    for index, info in reader.read_metadata().storage_data.items():
        if index.fqn == key:
            f = ck / info.relative_path
            data = bytearray(f.read_bytes())
            # the tail of the range holds the tensor's data (a torch.save zip: header first)
            at = info.offset + info.length - 200 + int(torch.randint(0, 100, ()))
            data[at : at + 4] = bytes(b ^ 0xFF for b in data[at : at + 4])
            f.write_bytes(bytes(data))
            return
    raise AssertionError(f"no stored tensor {key}")


def test_flipped_bytes_in_an_expert_tensor(ck):
    key = f"model.layers.0.moe.experts.w_in.{int(torch.randint(0, 4, ()))}"
    _flip_inside(ck, key)
    with pytest.raises(checkpoint.CheckpointCorrupt, match=rf"{ck}: tensor '{key}' .* is corrupt"):
        checkpoint.load(make(1), ck)


def test_corrupt_metadata_file(ck):
    data = bytearray((ck / ".metadata").read_bytes())
    data[len(data) // 2] ^= 0x55
    (ck / ".metadata").write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointCorrupt, match=rf"{ck}.*\.metadata is corrupt"):
        checkpoint.load(make(1), ck)


def test_moe_dist_json_not_json(ck):
    (ck / checkpoint.META_FILE).write_text('{"format": "moe_dist.tr')
    with pytest.raises(checkpoint.CheckpointCorrupt, match=rf"{ck}.*moe_dist.json is not valid"):
        checkpoint.load(make(1), ck)


def test_moe_dist_json_value_changed(ck):
    meta = json.loads((ck / checkpoint.META_FILE).read_text())
    meta["extra"]["step"] = 4  # still valid JSON
    (ck / checkpoint.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointCorrupt, match=rf"{ck}.*moe_dist.json is corrupt"):
        checkpoint.load(make(1), ck)


def test_moe_dist_json_missing_key(ck):
    meta = json.loads((ck / checkpoint.META_FILE).read_text())
    del meta["experts"]
    (ck / checkpoint.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointCorrupt, match=r"lacks the keys \['experts'\]"):
        checkpoint.load(make(1), ck)


def test_missing_tensor_checksum(ck):
    meta = json.loads((ck / checkpoint.META_FILE).read_text())
    key = "model.layers.0.moe.router.weight"
    (stored,) = [k for k in meta["checksums"]["tensors"] if k.startswith(f"'{key}'")]
    del meta["checksums"]["tensors"][stored]
    meta["crc32"] = checkpoint._meta_crc(meta)
    (ck / checkpoint.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(
        checkpoint.CheckpointCorrupt, match=rf"tensor '{key}'.* has no saved checksum"
    ):
        checkpoint.load(make(1), ck)


def test_intact_checkpoint_still_loads(ck):
    model = make(1)
    assert checkpoint.load(model, ck) == {"step": 3}
    for (name, a), b in zip(model.state_dict().items(), make(0).state_dict().values()):
        assert torch.equal(a, b), name
