"""A small decoder-only MoE transformer: RMSNorm, rotary positions, causal attention, MoE FFNs.

Shapes: B batch, S sequence (new tokens), P past tokens in the KV cache,
D model width, H heads, Dh = D / H, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..aux import MoEAux
from ..experts.activations import apply_activation
from ..layer import MoE
from ..memory import check_parameters_fit
from .config import LMConfig

KVCache = list[tuple[torch.Tensor, torch.Tensor] | None]
"""Per layer, the keys and values seen so far, each [B, H, P, Dh] (None before the first call)."""


@dataclass
class LMOutput:
    """logits [B, S, V]; aux_loss the sum of the MoE layers' ``aux.loss`` (a scalar);
    moe_aux one ``MoEAux`` per MoE block, in block order."""

    logits: torch.Tensor
    aux_loss: torch.Tensor
    moe_aux: list[MoEAux]


def rotary_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_len, head_dim / 2] in float32 (rotate-half convention)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, S, Dh] by the position tables cos, sin [S, Dh / 2]."""
    first, second = x.float().chunk(2, dim=-1)
    rotated = torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)
    return rotated.to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary positions and an optional KV cache."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x [B, S, D], cos/sin [S, Dh/2] for the new positions, past keys/values
        [B, H, P, Dh] -> (y [B, S, D], keys/values [B, H, P + S, Dh])."""
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        P = k.shape[2] - S
        if P == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # new query i sits at position P + i and sees keys 0..P + i
            visible = torch.arange(P + S, device=x.device) <= torch.arange(P, P + S, device=x.device)[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        return self.out(y.transpose(1, 2).reshape(B, S, D)), (k, v)


class DenseFFN(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up fused in one product."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(apply_activation(self.gate_up(x), "swiglu"))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x)), the FFN dense or MoE."""

    def __init__(self, cfg: LMConfig, use_moe: bool) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = MoE(cfg.moe) if use_moe else DenseFFN(cfg.dim, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, tokens: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None,
                expert_indices: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, MoEAux | None, tuple[torch.Tensor, torch.Tensor]]:
        """expert_indices [B*S, K]: the MoE layer's routing to replay (None: route)."""
        attn_out, present = self.attn(self.attn_norm(x), cos, sin, past)
        x = x + attn_out
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoE):
            ffn_out, aux = self.ffn(h, token_ids=tokens, expert_indices=expert_indices)
        else:
            ffn_out, aux = self.ffn(h), None
        return x + ffn_out, aux, present


def _check_fits(cfg: LMConfig) -> None:
    """The model's parameters against the memory free where they will be made (moekit/memory.py)."""
    from ..params import count_parameters, spec_from_lm_config

    moe = "" if cfg.moe is None else \
        f", num_experts={cfg.moe.num_experts}, expert_dim={cfg.moe.expert_dim}"
    check_parameters_fit(f"LMConfig(dim={cfg.dim}, num_layers={cfg.num_layers}, "
                         f"ffn_dim={cfg.ffn_dim}{moe})",
                         count_parameters(spec_from_lm_config(cfg), context_length=0).total,
                         "use smaller sizes (--num-experts, --expert-dim, or a smaller preset)")


class MoETransformer(nn.Module):
    """Decoder-only language model. ``forward(tokens [B, S] int64)`` -> ``LMOutput``.

    Weights are initialised N(0, init_std), the residual output projections
    (attention output, FFN and expert down projections) scaled by
    1/sqrt(2 * num_layers); norms start at one, biases and noise weights at zero.
    With ``tie_embeddings`` the output head is the token embedding.
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        if not isinstance(cfg, LMConfig):
            raise TypeError(f"cfg must be an LMConfig, got {type(cfg).__name__}")
        _check_fits(cfg)
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        moe_layers = set(cfg.moe_layers)
        self.blocks = nn.ModuleList(Block(cfg, i in moe_layers) for i in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.num_layers)
        for name, param in self.named_parameters():
            if param.dim() < 2:
                if name.endswith("norm.weight"):
                    nn.init.ones_(param)
                else:
                    nn.init.zeros_(param)
            elif "noise_weight" in name:
                nn.init.zeros_(param)
            elif name.endswith(("attn.out.weight", "down.weight", "down_proj", "down_proj.weight")):
                nn.init.normal_(param, std=residual_std)
            else:
                nn.init.normal_(param, std=std)

    @property
    def moe_layers(self) -> list[MoE]:
        return [block.ffn for block in self.blocks if isinstance(block.ffn, MoE)]

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None,
                routing_replay: list[torch.Tensor] | None = None) -> LMOutput:
        """tokens [B, S] integer ids; with ``cache`` (a list of num_layers entries,
        updated in place) the tokens continue the cached sequence. ``routing_replay``:
        one expert_indices [B*S, K] per MoE block in block order (as
        ``[a.expert_indices for a in out.moe_aux]``), each block routing exactly so
        (MoE's expert_indices)."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be a [batch, seq] integer tensor, got shape "
                             f"{tuple(tokens.shape)} dtype {tokens.dtype}")
        past_len = 0 if cache is None or cache[0] is None else cache[0][0].shape[2]
        end = past_len + tokens.shape[1]
        if end > self.config.max_seq_len:
            raise ValueError(f"sequence length {end} exceeds max_seq_len {self.config.max_seq_len}")
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(f"cache has {len(cache)} entries, the model {len(self.blocks)} layers")
        replay = self._replay_per_block(routing_replay)
        cos, sin = self.rope_cos[past_len:end], self.rope_sin[past_len:end]
        x = self.embed(tokens)
        moe_aux: list[MoEAux] = []
        for i, block in enumerate(self.blocks):
            x, aux, present = block(x, cos, sin, tokens, None if cache is None else cache[i],
                                    replay[i])
            if cache is not None:
                cache[i] = present
            if aux is not None:
                moe_aux.append(aux)
        x = self.norm(x)
        logits = F.linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)
        aux_loss = sum((a.loss for a in moe_aux), x.new_zeros((), dtype=torch.float32))
        return LMOutput(logits, aux_loss, moe_aux)

    def _replay_per_block(self, routing_replay: list[torch.Tensor] | None
                          ) -> list[torch.Tensor | None]:
        """routing_replay (one entry per MoE block) spread over all blocks (None for dense)."""
        if routing_replay is None:
            return [None] * len(self.blocks)
        if not isinstance(routing_replay, (list, tuple)):
            raise TypeError(f"routing_replay must be a list of expert_indices tensors, one per MoE "
                            f"block, got {type(routing_replay).__name__}")
        moe_blocks = self.config.moe_layers
        if len(routing_replay) != len(moe_blocks):
            raise ValueError(f"routing_replay has {len(routing_replay)} entries, the model "
                             f"{len(moe_blocks)} MoE blocks")
        replay: list[torch.Tensor | None] = [None] * len(self.blocks)
        for block, ids in zip(moe_blocks, routing_replay):
            replay[block] = ids
        return replay

    def new_cache(self) -> KVCache:
        return [None] * len(self.blocks)
