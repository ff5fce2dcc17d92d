"""``moekit params PATH``: a transformers config.json counts as the model built on the meta
device; a moekit JSON spec as its ArchSpec; bad files are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.cli import main
from moekit.params import KNOWN_ARCHITECTURES, spec_to_dict
from tests.conftest import import_or_skip

transformers = import_or_skip("transformers")

SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(
        **SMALL, intermediate_size=24, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **SMALL, intermediate_size=48, moe_intermediate_size=16, first_k_dense_replace=1,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        q_lora_rank=12, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **SMALL, intermediate_size=48, moe_intermediate_size=16, num_experts=8,
        num_experts_per_tok=2),
    "switch_transformers": lambda: transformers.SwitchTransformersConfig(
        vocab_size=100, d_model=32, d_ff=24, d_kv=8, num_heads=4, num_layers=2,
        num_decoder_layers=2, num_experts=4, num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1),
}


def printed_counts(argv, capsys) -> dict[str, str]:
    assert main(argv) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    return {row[0]: row[1] for row in rows if row[0] in ("total", "active")}


@pytest.mark.parametrize("family", CONFIGS)
def test_config_json_total_is_the_meta_device_model(family, tmp_path, capsys):
    config = CONFIGS[family]()
    config.to_json_file(tmp_path / "config.json")
    auto = transformers.AutoModelForSeq2SeqLM if family == "switch_transformers" \
        else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    counts = printed_counts(["params", str(tmp_path / "config.json")], capsys)
    assert counts["total"] == f"{total:,}"
    assert int(counts["active"].replace(",", "")) < total
    assert printed_counts(["params", str(tmp_path)], capsys) == counts, "a folder: its config.json"


def test_spec_file_counts_as_its_architecture(tmp_path, capsys):
    path = tmp_path / "mixtral.json"
    path.write_text(json.dumps(spec_to_dict(KNOWN_ARCHITECTURES["mixtral-8x7b"])))
    assert main(["params", str(path), "--context", "100"]) == 0
    from_file = capsys.readouterr().out
    assert main(["params", "mixtral-8x7b", "--context", "100"]) == 0
    assert from_file == capsys.readouterr().out


def test_spec_file_without_a_name_is_named_after_the_file(tmp_path, capsys):
    spec = spec_to_dict(KNOWN_ARCHITECTURES["olmoe-1b-7b"])
    del spec["name"]
    (tmp_path / "mine.json").write_text(json.dumps(spec))
    assert main(["params", str(tmp_path / "mine.json")]) == 0
    assert capsys.readouterr().out.startswith("mine ")


@pytest.mark.parametrize("content, message", [
    (None, "cannot read {path}: No such file or directory"),
    ("{not json", "{path} is not valid JSON: Expecting property name"),
    ("[1, 2]", "{path} must hold a JSON object, got a list"),
    ('{"model_type": "gpt-99"}', "{path}: unknown model_type 'gpt-99'"),
    (json.dumps({"model_type": "llama", "hidden_size": 32, "intermediate_size": 24,
                 "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 100}),
     "LlamaForCausalLM (model_type 'llama') has no routed experts: not an MoE model"),
    ('{"vocab_size": 100, "dim": 16}', "{path}: missing ArchSpec field(s): num_layers, "
                                       "attention, moe"),
])
def test_bad_files_exit_2_with_one_line(content, message, tmp_path, capsys):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["params", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message.format(path=path) in err and len(err.strip().splitlines()) == 1


def test_context_is_refused_for_a_transformers_config(tmp_path, capsys):
    CONFIGS["mixtral"]().to_json_file(tmp_path / "config.json")
    with pytest.raises(SystemExit) as exit_info:
        main(["params", str(tmp_path / "config.json"), "--context", "100"])
    assert exit_info.value.code == 2
    assert "--context sets the attention FLOPs" in capsys.readouterr().err


def test_a_config_transformers_cannot_build_is_one_line(tmp_path, monkeypatch):
    """A config its class accepts but its model refuses: transformers' error in one line."""
    import moekit.params.hf_config as hf_config
    from moekit.errors import UsageError

    def refuse(*_args, **_kwargs):
        raise AttributeError("no attribute 'rope_theta'")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", refuse)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(transformers.MixtralConfig(num_hidden_layers=1).to_dict()))
    with pytest.raises(UsageError, match="cannot build a 'mixtral' model.*rope_theta"):
        hf_config.build_on_meta(hf_config.hf_config_from_dict(json.loads(path.read_text())))
