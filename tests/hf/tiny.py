"""Tiny random-weight transformers MoE models, one per supported family (no downloads),
and tiny configs of the other MoE families (``OTHER_CONFIGS``): those moekit does not
convert, and those tested in their own files (their own block layouts, seq2seq models,
random routing: test_switch.py, test_dbrx.py, test_jetmoe.py, test_gpt_oss.py,
test_llama4.py, test_nllb_moe.py, test_phimoe.py).

Weights are redrawn at a scale where routing and every expert matter (the
models' own init, std 0.02, makes the logits nearly constant), and sigmoid
routers get a random score correction bias, so that it changes selections.
"""

from __future__ import annotations

import torch

from tests.conftest import import_or_skip

transformers = import_or_skip("transformers", reason="transformers is not installed "
                                                     "(pip install 'moekit[hf]')")

VOCAB = 64
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, tie_word_embeddings=False, pad_token_id=0,
               bos_token_id=1, eos_token_id=2)
_MIXTRAL = dict(_COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
_OLMOE = dict(_COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2)
_QWEN = dict(_COMMON, intermediate_size=48, moe_intermediate_size=16, num_experts=8,
             num_experts_per_tok=2)
_DEEPSEEK = dict(_COMMON, num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16,
                 n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
                 topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=0,
                 norm_topk_prob=True)

CONFIGS = {
    "mixtral": lambda **kw: transformers.MixtralConfig(**_MIXTRAL | kw),
    "minimax": lambda **kw: transformers.MiniMaxConfig(**_MIXTRAL | kw),
    "qwen3_moe": lambda **kw: transformers.Qwen3MoeConfig(**_QWEN | dict(norm_topk_prob=True) | kw),
    "olmoe": lambda **kw: transformers.OlmoeConfig(**_OLMOE | dict(norm_topk_prob=False) | kw),
    "flex_olmo": lambda **kw: transformers.FlexOlmoConfig(**_OLMOE | kw),
    "qwen2_moe": lambda **kw: transformers.Qwen2MoeConfig(
        **_QWEN | dict(shared_expert_intermediate_size=24, norm_topk_prob=False) | kw),
    "qwen3_next": lambda **kw: transformers.Qwen3NextConfig(
        **_QWEN | dict(shared_expert_intermediate_size=24,
                       layer_types=["linear_attention", "full_attention"]) | kw),
    "deepseek_v3": lambda **kw: transformers.DeepseekV3Config(
        **_DEEPSEEK | dict(head_dim=8, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                           qk_nope_head_dim=8, v_head_dim=8) | kw),
    "glm4_moe": lambda **kw: transformers.Glm4MoeConfig(**_DEEPSEEK | kw),
    "dots1": lambda **kw: transformers.Dots1Config(**_DEEPSEEK | kw),
    "exaone_moe": lambda **kw: transformers.ExaoneMoeConfig(**_DEEPSEEK | kw),
}
FAMILIES = list(CONFIGS)


def _dbrx(**kw):
    config = transformers.DbrxConfig(**dict(
        vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
        attn_config=dict(kv_n_heads=2, clip_qkv=8.0),  # 5.24's attention fails with None
        ffn_config=dict(ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2)) | kw)
    config.attn_config.rope_theta = 10000.0  # transformers 5.24's DBRX attention reads it
    return config


_NO_HEAD_DIM = {k: v for k, v in _COMMON.items() if k != "head_dim"}
# MoE families with no moekit conversion or their own block layout: {model type: config
# factory}, for AutoModel.
OTHER_CONFIGS = {
    "phimoe": lambda **kw: transformers.PhimoeConfig(**_MIXTRAL | kw),
    "switch_transformers": lambda **kw: transformers.SwitchTransformersConfig(**dict(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=16, num_layers=2, num_decoder_layers=2,
        num_heads=4, num_experts=4, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
        expert_capacity=8) | kw),
    "nllb_moe": lambda **kw: transformers.NllbMoeConfig(**dict(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=16,
        decoder_ffn_dim=16, encoder_attention_heads=4, decoder_attention_heads=4, num_experts=4,
        encoder_sparse_step=2, decoder_sparse_step=2, expert_capacity=8) | kw),
    "dbrx": _dbrx,
    "llama4_text": lambda **kw: transformers.Llama4TextConfig(
        **_COMMON | dict(intermediate_size=16, intermediate_size_mlp=24, num_local_experts=4) | kw),
    "jetmoe": lambda **kw: transformers.JetMoeConfig(**dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2,
        kv_channels=8, intermediate_size=16, num_local_experts=4) | kw),
    "longcat_flash": lambda **kw: transformers.LongcatFlashConfig(**dict(
        vocab_size=VOCAB, hidden_size=32, num_layers=1, num_attention_heads=4,
        ffn_hidden_size=24, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, head_dim=8, v_head_dim=8, moe_topk=2, n_routed_experts=4,
        zero_expert_num=2, expert_ffn_hidden_size=16) | kw),
    "gpt_oss": lambda **kw: transformers.GptOssConfig(
        **_COMMON | dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2) | kw),
    "lfm2_moe": lambda **kw: transformers.Lfm2MoeConfig(
        **_NO_HEAD_DIM | dict(intermediate_size=16, moe_intermediate_size=16, num_experts=4,
                              num_experts_per_tok=2, num_dense_layers=0,
                              layer_types=["conv", "full_attention"]) | kw),
    "gemma4_text": lambda **kw: transformers.Gemma4TextConfig(
        **_COMMON | dict(intermediate_size=16, enable_moe_block=True, num_experts=4,
                         top_k_experts=2, moe_intermediate_size=16, hidden_size_per_layer_input=8,
                         vocab_size_per_layer_input=VOCAB, layer_types=["full_attention"] * 2) | kw),
    "nemotron_h": lambda **kw: transformers.NemotronHConfig(
        **{k: v for k, v in _COMMON.items() if k != "num_hidden_layers"}
        | dict(layers_block_type=["moe", "attention"], intermediate_size=16, n_routed_experts=4,
               moe_intermediate_size=16, moe_shared_expert_intermediate_size=16,
               num_experts_per_tok=2, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
               n_groups=1) | kw),
}


def other_model(family: str, seed: int = 0, **kwargs):
    """A tiny base model (AutoModel) of an OTHER_CONFIGS family, fp32, eval mode;
    kwargs go to from_config (experts_implementation, ...)."""
    torch.manual_seed(seed)
    return transformers.AutoModel.from_config(OTHER_CONFIGS[family](), **kwargs).eval()


def tiny_model(family: str, seed: int = 0, experts_implementation: str = "eager", **config):
    """A 2-layer causal LM of the family, in fp32 eval mode, with random weights."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        CONFIGS[family](**config), experts_implementation=experts_implementation)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    return model.eval()


def token_ids(seed: int = 1, batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def gradients(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """{parameter name: gradient} of a next-token loss, in training mode."""
    model.train()
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    model.eval()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def moe_blocks(model) -> dict[str, torch.nn.Module]:
    """{name: block} of the model's supported transformers MoE blocks."""
    from moekit.hf import family_of
    return {name: m for name, m in model.named_modules() if family_of(m) is not None}


def gradient_or_zeros(parameter: torch.Tensor) -> torch.Tensor:
    """Its gradient; zeros where none flowed (an eager expert that got no token)."""
    return torch.zeros_like(parameter) if parameter.grad is None else parameter.grad


def moekit_layout_gradients(model, blocks: list[str]) -> dict[str, torch.Tensor]:
    """Every gradient of ``model``, the MoE blocks' (module names ``blocks``) in moekit's
    layout under "<block>.<moekit name>": a patched block's from its moekit layer, a
    transformers block's through its family's parameter_names (stacked or joined)."""
    from moekit.hf import family_of
    from moekit.hf.convert import mapped_tensor

    grads = {n: gradient_or_zeros(p) for n, p in model.named_parameters()
             if not any(n.startswith(b + ".") for b in blocks)}
    for name in blocks:
        block = model.get_submodule(name)
        if hasattr(block, "moe"):
            grads.update({f"{name}.{n}": gradient_or_zeros(p) for n, p in block.moe.named_parameters()})
            continue
        block_grads = {n: gradient_or_zeros(p) for n, p in block.named_parameters()}
        for ours, theirs in family_of(block).parameter_names(block).items():
            grads[f"{name}.{ours}"] = mapped_tensor(block_grads, theirs)
    return grads


def assert_same_states(first, second) -> None:
    """The two modules' state dicts, side by side in order, hold bitwise equal tensors."""
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def assert_same_gradients(eager, patched, blocks: list[str], tol: float = 1e-5) -> dict[str, torch.Tensor]:
    """Every gradient of ``patched`` equals ``eager``'s in moekit's layout (the same names;
    atol and rtol ``tol``); returns the patched model's, by name."""
    want, got = moekit_layout_gradients(eager, blocks), moekit_layout_gradients(patched, blocks)
    assert want.keys() == got.keys()
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, atol=tol, rtol=tol, msg=name)
    return got
