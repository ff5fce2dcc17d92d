"""Offloaded experts give exactly the resident model's logits and tokens, and every miss loads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from moekit import MoEConfig
from moekit.lm.checkpoint import MODEL_FILE, weights_of, write_run_config
from moekit.lm.generate import generate_tokens
from moekit.lm.model import MoETransformer
from moekit.lm.offload import (ExpertCache, MemoryExpertStore, OffloadedExperts, load_offloaded_model,
                               moe_layers, offload_experts, resident_bytes)

from .helpers import tiny_model_config, tiny_train_config

NUM_MOE_EXPERTS = 2 * 4  # tiny_model_config: 2 MoE blocks of 4 experts


def saved_run(tmp_path, **moe_fields):
    """A run folder with random (not initial) weights, and the resident model."""
    torch.manual_seed(0)
    cfg = tiny_model_config(**moe_fields)
    model = MoETransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    run = tmp_path / "run"
    run.mkdir()
    write_run_config(run, cfg, tiny_train_config())
    save_file(weights_of(model.state_dict()), str(run / MODEL_FILE))
    return run, model


def expected_loads(model, batches, max_resident):
    """Requests and loads of an LRU cache of max_resident experts, simulated from the
    experts each layer of the resident model uses, in the order the layers run them."""
    requests = []
    handles = [moe.register_forward_hook(
        lambda m, args, out, name=name: requests.extend(
            (name, e) for e, n in enumerate(out[1].tokens_per_expert.tolist()) if n))
        for name, moe in moe_layers(model).items()]
    with torch.no_grad():
        for tokens in batches:
            model(tokens)
    for handle in handles:
        handle.remove()
    resident, loads = [], 0
    for key in requests:
        if key in resident:
            resident.remove(key)
        else:
            loads += 1
            if len(resident) == max_resident:
                resident.pop(0)
        resident.append(key)
    return len(requests), loads


@pytest.mark.parametrize("max_resident", [1, 3, NUM_MOE_EXPERTS])
@pytest.mark.parametrize("store", ["disk", "memory"])
def test_offloaded_logits_and_tokens_are_identical(tmp_path, max_resident, store):
    run, model = saved_run(tmp_path)
    offloaded, cache = load_offloaded_model(run, max_resident, store=store)
    batches = [torch.randint(0, 256, (2, 9)), torch.randint(0, 256, (1, 1))]
    with torch.no_grad():
        for tokens in batches:
            assert torch.equal(offloaded(tokens).logits, model(tokens).logits)
    requests, loads = expected_loads(model, batches, max_resident)
    assert (cache.hits + cache.loads, cache.loads) == (requests, loads)
    assert cache.stats()["resident_experts"] == min(max_resident, NUM_MOE_EXPERTS)
    prompt = torch.tensor(list(b"def f(x):"))
    expected = list(generate_tokens(model, prompt, 20, temperature=0))
    assert list(generate_tokens(offloaded, prompt, 20, temperature=0)) == expected
    sampled = [list(generate_tokens(m, prompt, 12, temperature=1.0, top_k=None,
                                    generator=torch.Generator().manual_seed(3)))
               for m in (model, offloaded)]
    assert sampled[0] == sampled[1]


def test_a_miss_loads_from_the_store_and_the_least_recent_is_evicted():
    calls = []

    class CountingStore:
        def load(self, layer, expert):
            calls.append((layer, expert))
            return (torch.full((2, 2), float(expert)), torch.zeros(2, 2), None, None)

    cache = ExpertCache(CountingStore(), max_resident=2)
    for expert in (0, 1, 0, 2, 1, 1):
        assert cache.get("m", expert)[0][0, 0] == expert
    assert calls == [("m", 0), ("m", 1), ("m", 2), ("m", 1)]  # 1 was evicted by 2 after 0's hit
    assert cache.stats() == {"hits": 2, "loads": 4, "hit_rate": 2 / 6, "resident_experts": 2,
                             "resident_bytes": 2 * 2 * 4 * 4}


@pytest.mark.parametrize("fields", [dict(activation="gelu", capacity_factor=1.0),
                                    dict(activation="clamped_swiglu", swiglu_limit=0.5)])
def test_biased_and_ungated_or_clamped_experts_offload_exactly(tmp_path, fields):
    """clamped_swiglu has no native kernel code: its decode steps take the torch path."""
    run, model = saved_run(tmp_path, bias=True, **fields)
    offloaded, cache = load_offloaded_model(run, 2)
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(offloaded(tokens).logits, model(tokens).logits)
    assert cache.loads > 0


def test_offloading_an_in_memory_model_frees_its_expert_weights():
    torch.manual_seed(0)
    model = MoETransformer(tiny_model_config()).eval()
    tokens = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        expected = model(tokens).logits
    full = resident_bytes(model)
    stacked = {name: (moe.experts.first_proj.detach().clone(), moe.experts.down_proj.detach().clone(),
                      None, None) for name, moe in moe_layers(model).items()}
    cache = offload_experts(model, MemoryExpertStore(stacked), max_resident=1)
    assert all(isinstance(moe.experts, OffloadedExperts) for moe in moe_layers(model).values())
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, expected)
    expert_bytes = sum(w.numel() * 4 for ws in stacked.values() for w in ws if w is not None)
    assert resident_bytes(model, cache) == full - expert_bytes + cache.resident_bytes
    with pytest.raises(RuntimeError, match="no_grad"):
        model(tokens).logits.sum().backward()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="offloaded experts apply the combine weights to the "
                                         "expert output only, not combine_weights_on='input'"):
        OffloadedExperts(MoEConfig(dim=8, expert_dim=8, num_experts=2, combine_weights_on="input"),
                         "layers.0.moe", None)
    run, _ = saved_run(tmp_path)
    with pytest.raises(ValueError, match="max_resident"):
        load_offloaded_model(run, 0)
    with pytest.raises(ValueError, match="store"):
        load_offloaded_model(run, 2, store="tape")
    with pytest.raises(ValueError, match="no moekit MoE layer"):
        offload_experts(torch.nn.Linear(2, 2), MemoryExpertStore({}), 1)


def test_lfu_keeps_the_most_requested_experts():
    calls = []

    class CountingStore:
        def load(self, layer, expert):
            calls.append(expert)
            return (torch.zeros(1, 1), torch.zeros(1, 1), None, None)

    cache = ExpertCache(CountingStore(), max_resident=2, policy="lfu")
    for expert in (0, 0, 1, 2, 0, 3, 2):
        cache.get("m", expert)
    # 2 evicts 1 (1 request against 0's 2); 3 evicts 2 (1 request against 0's 3);
    # 2, loaded again, evicts 3 (1 request): expert 0 stays throughout.
    assert calls == [0, 1, 2, 3, 2]
    assert (cache.hits, cache.loads) == (2, 5)
    with pytest.raises(ValueError, match="policy"):
        ExpertCache(CountingStore(), 2, policy="fifo")


def test_lfu_outputs_are_identical_too(tmp_path):
    run, model = saved_run(tmp_path)
    offloaded, cache = load_offloaded_model(run, 3, policy="lfu")
    prompt = torch.tensor(list(b"import os\n"))
    assert list(generate_tokens(offloaded, prompt, 16, temperature=0)) == \
        list(generate_tokens(model, prompt, 16, temperature=0))
    assert cache.loads > 0 and cache.stats()["resident_experts"] == 3


def test_generate_command_with_offloaded_experts(tmp_path, capsys):
    from moekit.cli import main

    run, _ = saved_run(tmp_path)
    flags = ["generate", "--run", str(run), "--prompt", "ab", "--max-new-tokens", "12", "--seed", "1"]
    assert main(flags) == 0
    resident = capsys.readouterr().out
    assert main([*flags, "--offload-experts", "--max-resident-experts", "2"]) == 0
    printed = capsys.readouterr()
    assert printed.out == resident
    assert "hit rate" in printed.err and "of at most 2 resident" in printed.err
    with pytest.raises(SystemExit):
        main([*flags, "--max-resident-experts", "2"])
    assert "needs --offload-experts" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cpu_kernels", ["auto", "off"])
def test_half_size_expert_weights_offload_exactly(dtype, cpu_kernels):
    """A float32 model whose experts were cast to dtype (half-size weights) gives the same
    logits offloaded, from a cache in that dtype: the native call at decode size (one token),
    one expert converted at a time above it (or with cpu_kernels="off")."""
    torch.manual_seed(1)
    model = MoETransformer(tiny_model_config(cpu_kernels=cpu_kernels)).eval()
    for moe in moe_layers(model).values():
        moe.experts.to(dtype)
    batches = [torch.randint(0, 256, (2, 12)), torch.randint(0, 256, (1, 1))]
    with torch.no_grad():
        expected = [model(tokens).logits for tokens in batches]
    stacked = {name: (moe.experts.first_proj.detach().clone(), moe.experts.down_proj.detach().clone(),
                      None, None) for name, moe in moe_layers(model).items()}
    cache = offload_experts(model, MemoryExpertStore(stacked), max_resident=3)
    assert cache.dtype == dtype
    with torch.no_grad():
        for tokens, logits in zip(batches, expected):
            result = model(tokens).logits
            assert result.dtype == torch.float32 and torch.equal(result, logits)


def test_a_bfloat16_model_offloaded_takes_the_native_call_too(monkeypatch):
    """A model cast wholly to bfloat16, offloaded with a bfloat16 cache: decode-size batches go
    through skinny_ffn_fetched, and the logits equal the resident bfloat16 model's."""
    from moekit.experts.cpu import decode, skinny
    from moekit.lm import offload
    if not skinny.available():
        pytest.skip(f"no skinny kernel: {skinny.unavailable_reason()}")
    torch.manual_seed(2)
    model = MoETransformer(tiny_model_config()).eval().to(torch.bfloat16)
    tokens = torch.randint(0, 256, (1, 1))
    with torch.no_grad():
        expected = model(tokens).logits
    stacked = {name: (moe.experts.first_proj.detach().clone(), moe.experts.down_proj.detach().clone(),
                      None, None) for name, moe in moe_layers(model).items()}
    cache = offload_experts(model, MemoryExpertStore(stacked), max_resident=3)
    assert cache.dtype == torch.bfloat16
    calls = []
    real = decode.skinny_ffn_fetched
    monkeypatch.setattr(offload, "skinny_ffn_fetched", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        result = model(tokens).logits
    assert len(calls) == len(stacked)
    assert result.dtype == torch.bfloat16 and torch.equal(result, expected)
