"""Shared experts: a dense FFN every token passes through (DeepSeekMoE, Qwen2-MoE).

The num_shared_experts experts are merged into one FFN of hidden width
num_shared_experts * shared_expert_dim, which computes the same sum. With
shared_expert_gate, the output is scaled by sigmoid(x . w_gate) per token
(Qwen2-MoE). Module names follow transformers: gate_proj, up_proj, down_proj
(nn.Linear), and shared_expert_gate (nn.Linear(D, 1)).
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.batch_invariance import invariant_activation, invariant_mm, invariant_sigmoid
from moekit.config import MoEConfig
from moekit.experts.activations import apply_activation, gated_activation


class SharedExperts(nn.Module):
    """x_TD [T, D] -> [T, D]."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        D, H = config.dim, config.shared_hidden_dim
        self.activation, self.activation_params = config.activation, config.activation_params
        self.batch_invariant = config.batch_invariant
        self.gate_proj = nn.Linear(D, H, bias=config.bias) if config.is_gated else None
        self.up_proj = nn.Linear(D, H, bias=config.bias)
        self.down_proj = nn.Linear(H, D, bias=config.bias)
        self.shared_expert_gate = nn.Linear(D, 1, bias=False) if config.shared_expert_gate else None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant:
            return self._batch_invariant_forward(x_TD)
        up = self.up_proj(x_TD)
        if self.gate_proj is None:
            h = apply_activation(up, self.activation)
        else:
            h = gated_activation(self.gate_proj(x_TD), up, self.activation, self.activation_params)
        out = self.down_proj(h)
        if self.shared_expert_gate is not None:
            out = torch.sigmoid(self.shared_expert_gate(x_TD)) * out
        return out

    def _batch_invariant_forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        """forward with each token's result independent of the others' (moekit.batch_invariance)."""
        def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
            return invariant_mm(x, layer.weight, layer.bias)

        h = linear(self.up_proj, x_TD)
        if self.gate_proj is not None:
            h = torch.cat([linear(self.gate_proj, x_TD), h], dim=-1)
        out = linear(self.down_proj, invariant_activation(h, self.activation, self.activation_params))
        if self.shared_expert_gate is not None:
            out = invariant_sigmoid(linear(self.shared_expert_gate, x_TD)) * out
        return out
