"""A run's stored configs and dtype bind its resume; only steps may change."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moekit.lm import checkpoint as ckpt
from moekit.lm.model import MoETransformer
from moekit.lm.run_config import check_resume_config, config_differences, run_dtype

from .helpers import tiny_model_config, tiny_train_config


def test_differences_name_every_nested_field():
    assert config_differences({"a": 1, "m": {"k": 2, "j": 3}}, {"a": 1, "m": {"k": 4, "j": 3}, "b": 5}) == [
        "b: run None, given 5", "m.k: run 2, given 4"]


def test_only_steps_may_change_on_resume(tmp_path):
    model, train = tiny_model_config(), tiny_train_config()
    check_resume_config(tmp_path, (model, train, "float32"),
                        (model, dataclasses.replace(train, steps=99), torch.float32))
    other = dataclasses.replace(model, moe=dataclasses.replace(model.moe, top_k=1))
    with pytest.raises(ckpt.CheckpointError, match=r"\(dtype: run 'float32', given 'bfloat16'; model.moe.top_k: "
                                                   r"run 2, given 1\); resume with the run's own configs"):
        check_resume_config(tmp_path, (model, train, "float32"), (other, train, torch.bfloat16))


def test_the_dtype_of_a_run_written_before_it_was_stored_comes_from_its_weights(tmp_path):
    assert run_dtype(tmp_path, {"dtype": "bfloat16"}) == "bfloat16"
    assert run_dtype(tmp_path, {}) == "float32"  # nothing saved yet
    model = MoETransformer(tiny_model_config()).to(torch.bfloat16)
    ckpt.save_checkpoint(tmp_path, 1, model.state_dict(), {"step": 1})
    assert run_dtype(tmp_path, {}) == "bfloat16"
