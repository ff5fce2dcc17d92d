"""Checkpoints: exact round trip, weights-only state, verified hashes, atomic replacement."""

from __future__ import annotations

import pytest
import torch

from moekit.lm import checkpoint as ckpt
from moekit.lm.model import MoETransformer

from .helpers import tiny_model_config


def _model(seed: int) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(tiny_model_config(bias_update_rate=1e-2))


def test_round_trip_is_exact_and_state_loads_weights_only(tmp_path):
    model = _model(0)
    with torch.no_grad():
        model.blocks[1].ffn.router.expert_bias.normal_()  # a buffer must travel too
    state = {"step": 7, "rng": torch.get_rng_state(), "values": [1.5, (0.9, 0.95)]}
    folder = ckpt.save_checkpoint(tmp_path, 7, model.state_dict(), state)
    assert folder.name == "step-00000007"
    assert torch.load(folder / ckpt.STATE_FILE, weights_only=True)["values"] == [1.5, (0.9, 0.95)]
    other = _model(1)
    loaded = ckpt.load_checkpoint(folder, other)
    assert loaded["step"] == 7 and torch.equal(loaded["rng"], state["rng"])
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    fresh = _model(2)
    ckpt.load_weights(fresh, tmp_path / ckpt.MODEL_FILE)  # the run's latest weights
    assert torch.equal(fresh.embed.weight, model.embed.weight)


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    model = _model(0)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model.state_dict(), {"step": step}, keep=2)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step-00000002", "step-00000003"]
    ckpt.save_checkpoint(tmp_path, 3, model.state_dict(), {"step": 3}, keep=2)  # the same step again
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000003"


def test_a_failed_write_leaves_the_last_good_checkpoint_untouched(tmp_path, monkeypatch):
    model = _model(0)
    good = ckpt.save_checkpoint(tmp_path, 1, model.state_dict(), {"step": 1})
    before = (tmp_path / ckpt.MODEL_FILE).read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, _model(5).state_dict(), {"step": 2})
    assert ckpt.checkpoint_dirs(tmp_path) == [good]
    assert (tmp_path / ckpt.MODEL_FILE).read_bytes() == before
    assert ckpt.load_checkpoint(good, _model(3))["step"] == 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing_state", "missing_manifest"])
def test_corrupt_or_partial_checkpoints_raise_checkpoint_error(tmp_path, damage):
    folder = ckpt.save_checkpoint(tmp_path, 1, _model(0).state_dict(), {"step": 1})
    model_file = folder / ckpt.MODEL_FILE
    if damage == "flip":
        data = bytearray(model_file.read_bytes())
        data[len(data) // 2] ^= 0x01
        model_file.write_bytes(bytes(data))
    elif damage == "truncate":
        model_file.write_bytes(model_file.read_bytes()[:100])
    elif damage == "missing_state":
        (folder / ckpt.STATE_FILE).unlink()
    else:
        (folder / ckpt.MANIFEST_FILE).unlink()
    with pytest.raises(ckpt.CheckpointError, match="step-00000001 is (corrupt|partial)"):
        ckpt.load_checkpoint(folder, _model(1))


def test_weights_of_another_model_are_refused(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, _model(0).state_dict(), {"step": 1})
    from moekit.lm.config import LMConfig

    other = MoETransformer(LMConfig(dim=32, num_layers=1, num_heads=2, ffn_dim=32, max_seq_len=32))
    with pytest.raises(ckpt.CheckpointError, match="does not match the model"):
        ckpt.load_weights(other, tmp_path / ckpt.MODEL_FILE)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ckpt.CheckpointError, match="not a readable safetensors file"):
        ckpt.load_weights(other, tmp_path / "junk.safetensors")


def test_run_config_round_trip_and_errors(tmp_path):
    from moekit.lm.config import TrainConfig

    model_cfg, train_cfg = tiny_model_config(), TrainConfig(steps=3)
    ckpt.write_run_config(tmp_path, model_cfg, train_cfg, {"data": None})
    assert ckpt.read_run_config(tmp_path) == (model_cfg, train_cfg, {"data": None})
    (tmp_path / ckpt.CONFIG_FILE).write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="not a valid run config"):
        ckpt.read_run_config(tmp_path)


def test_the_run_weights_are_hashed_and_a_flipped_byte_is_refused(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, _model(0).state_dict(), {"step": 1})
    ckpt.save_checkpoint(tmp_path, 2, _model(1).state_dict(), {"step": 2})
    ckpt.verify_run_weights(tmp_path)
    path = tmp_path / ckpt.MODEL_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=rf"{path} is corrupt: it does not match the SHA-256 in "
                                                   rf"{tmp_path / 'manifest.json'}; copy "
                                                   rf"{tmp_path / 'checkpoints/step-00000002/model.safetensors'}"):
        ckpt.verify_run_weights(tmp_path)


def test_a_crash_between_the_run_manifest_and_the_weights_still_verifies(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, _model(0).state_dict(), {"step": 1})
    before = (tmp_path / ckpt.MODEL_FILE).read_bytes()
    original = ckpt.atomic_write

    def crash_on_the_weights(path, write):
        if path.name == ckpt.MODEL_FILE:
            raise OSError("killed")
        return original(path, write)

    monkeypatch.setattr(ckpt, "atomic_write", crash_on_the_weights)
    with pytest.raises(OSError, match="killed"):
        ckpt.save_checkpoint(tmp_path, 2, _model(1).state_dict(), {"step": 2})
    assert (tmp_path / ckpt.MODEL_FILE).read_bytes() == before
    ckpt.verify_run_weights(tmp_path)
