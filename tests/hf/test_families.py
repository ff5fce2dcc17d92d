"""The family table: validation and the name tables it derives (no transformers needed)."""

from __future__ import annotations

import pytest

from moekit.hf import FAMILIES, Family


def test_name_tables_cover_router_experts_and_shared_parts():
    assert Family("plain").parameter_names() == {
        "router.weight": "gate.weight", "experts.gate_up_proj": "experts.gate_up_proj",
        "experts.down_proj": "experts.down_proj"}
    deepseek = FAMILIES["DeepseekV3MoE"].parameter_names()
    assert deepseek["router.expert_bias"] == "gate.e_score_correction_bias"
    assert deepseek["shared_experts.up_proj.weight"] == "shared_experts.up_proj.weight"
    qwen2 = FAMILIES["Qwen2MoeSparseMoeBlock"].parameter_names()
    assert qwen2["shared_experts.gate_proj.weight"] == "shared_expert.gate_proj.weight"
    assert qwen2["shared_experts.shared_expert_gate.weight"] == "shared_expert_gate.weight"
    assert FAMILIES["PhimoeSparseMoeBlock"].parameter_names()["router.weight"] == "router.weight"
    for family in FAMILIES.values():  # one to one (Switch's, NLLB-MoE's and DBRX's, read from
        if family.router in ("switch", "nllb", "dbrx"):  # a block: their own test files)
            continue
        names = family.parameter_names()
        assert len(set(names.values())) == len(names)


def test_bad_families_are_rejected():
    with pytest.raises(ValueError, match=r"router must be one of .*got 'tanh'"):
        Family("x", router="tanh")
    with pytest.raises(ValueError, match=r"x: shared_expert_gate needs shared_experts"):
        Family("x", shared_expert_gate=True)
