"""Tiny random-weight transformers MoE models, one per supported family (no downloads).

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
