"""Published MoE models as data: ``KNOWN_ARCHITECTURES``, name -> ``ArchSpec``.

Each entry cites its source model and the published total/active counts it
reproduces (checked in tests/params/test_params.py).
"""

from __future__ import annotations

from moekit.config import MoEConfig
from moekit.params.specs import ArchSpec, AttentionSpec, MLASpec

KNOWN_ARCHITECTURES: dict[str, ArchSpec] = {spec.name: spec for spec in (
    # google/switch-base-8 (Fedus et al. 2021), a T5 v1.0 encoder-decoder: 12 + 12 blocks,
    # every other FFN an 8-expert top-1 ReLU MoE, shared tied embedding. 619.3M total.
    ArchSpec(name="switch-base-8", vocab_size=32128, dim=768, num_layers=12,
             attention=AttentionSpec(num_heads=12, num_kv_heads=12, head_dim=64,
                                     position_buckets=32),
             moe=MoEConfig(dim=768, expert_dim=3072, num_experts=8, top_k=1, activation="relu",
                           normalize_topk=False, router_noise="jitter", capacity_factor=1.25),
             num_dense_layers=6, ffn_dim=3072, ffn_gated=False, tie_embeddings=True,
             encoder_decoder=True),
    # google/switch-c-2048 (Fedus et al. 2021, table 9): 15 + 15 blocks, every FFN a
    # 2048-expert top-1 ReLU MoE. 1,571,308,972,448 parameters, exactly transformers'
    # SwitchTransformersForConditionalGeneration of its config.
    ArchSpec(name="switch-c-2048", vocab_size=32128, dim=2080, num_layers=15,
             attention=AttentionSpec(num_heads=32, num_kv_heads=32, head_dim=64,
                                     position_buckets=32),
             moe=MoEConfig(dim=2080, expert_dim=6144, num_experts=2048, top_k=1,
                           activation="relu", normalize_topk=False, router_noise="jitter",
                           capacity_factor=1.25),
             ffn_gated=False, tie_embeddings=True, encoder_decoder=True),
    # GLaM 64B/64E (Du et al. 2022, table 4): 64 blocks, every other FFN an MoE of 64
    # plain-GELU experts, top-2, the dense FFNs gated GELU; one 256K x 8192 vocabulary
    # matrix. 1.16T total, 96.6B active (its relative position bias is not counted).
    ArchSpec(name="glam-64b-64e", vocab_size=256000, dim=8192, num_layers=64,
             attention=AttentionSpec(num_heads=128, num_kv_heads=128, head_dim=128),
             moe=MoEConfig(dim=8192, expert_dim=32768, num_experts=64, top_k=2,
                           activation="gelu"),
             num_dense_layers=32, ffn_dim=32768, tie_embeddings=True),
    # mistralai/Mixtral-8x7B-v0.1: 46.7B total, 12.9B active.
    ArchSpec(name="mixtral-8x7b", vocab_size=32000, dim=4096, num_layers=32,
             attention=AttentionSpec(num_heads=32, num_kv_heads=8, head_dim=128),
             moe=MoEConfig(dim=4096, expert_dim=14336, num_experts=8, top_k=2,
                           balance_loss_weight=0.02)),
    # deepseek-ai/DeepSeek-V3: 671B total, 37B active. The released checkpoint's extra
    # 14B multi-token-prediction module is not part of the 671B and is not counted.
    ArchSpec(name="deepseek-v3", vocab_size=129280, dim=7168, num_layers=61,
             attention=MLASpec(num_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                               qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
             moe=MoEConfig(dim=7168, expert_dim=2048, num_experts=256, top_k=8,
                           score_func="sigmoid", route_scale=2.5, bias_update_rate=0.001,
                           num_groups=8, topk_groups=4, num_shared_experts=1,
                           balance_scope="sequence", balance_loss_weight=0.0001),
             num_dense_layers=3, ffn_dim=18432),
    # Qwen/Qwen3-30B-A3B: 30.5B total, 3.3B active.
    ArchSpec(name="qwen3-30b-a3b", vocab_size=151936, dim=2048, num_layers=48,
             attention=AttentionSpec(num_heads=32, num_kv_heads=4, head_dim=128, qk_norm="head"),
             moe=MoEConfig(dim=2048, expert_dim=768, num_experts=128, top_k=8,
                           balance_loss_weight=0.001)),
    # allenai/OLMoE-1B-7B-0924: 6.9B total, 1.3B active.
    ArchSpec(name="olmoe-1b-7b", vocab_size=50304, dim=2048, num_layers=16,
             attention=AttentionSpec(num_heads=16, num_kv_heads=16, head_dim=128, qk_norm="full"),
             moe=MoEConfig(dim=2048, expert_dim=1024, num_experts=64, top_k=8,
                           normalize_topk=False, z_loss_weight=0.001)),
)}
