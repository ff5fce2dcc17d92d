"""SoftMoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

Each expert owns p slots (slots_per_expert). Per group of S tokens (one
sequence, or one image's patches):
  logits = X Phi                    [S, E*p], Phi: slot_embeds [D, E*p]
  dispatch = softmax over tokens    (each slot is a convex mix of the tokens)
  combine  = softmax over slots     (each token is a convex mix of the slots)
  Y = combine @ Experts(dispatch^T @ X)
No token is dropped and nothing is discrete, but every slot mixes the whole
group, so it is not causal: use it in encoders and vision models, not in
autoregressive decoders. Logits and both softmaxes run in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.config import MoEConfig
from moekit.contract import rows_plan
from moekit.experts import Experts
from moekit.memory import check_layer_fits
from moekit.routing import router_dtype


class SoftMoE(nn.Module):
    """forward(x [B, S, D] or [S, D], padding_mask [B, S] / [S] or None) -> y, same shape.

    Parameters: ``slot_embeds`` [D, E*p] and ``experts`` (the same stacked
    experts as MoE, each running its B*p slot rows). Padded tokens take no part
    in the dispatch softmax and get zero output. Router options (top_k, score
    function, capacity, losses, shared experts) do not apply.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        if config.output_bias:
            raise ValueError("output_bias=True is a moekit.MoE option; SoftMoE has no output "
                             "bias: set output_bias=False")
        check_layer_fits(config)
        self.config = config
        num_slots = config.num_experts * config.slots_per_expert
        self.slot_embeds = nn.Parameter(torch.randn(config.dim, num_slots) / config.dim ** 0.5)
        self.experts = Experts(config)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() not in (2, 3) or x.shape[-1] != c.dim:
            raise ValueError(f"x must have shape [batch, tokens, dim={c.dim}] or [tokens, dim={c.dim}], "
                             f"got {tuple(x.shape)}")
        if x.is_meta:
            raise ValueError("x is on the meta device, which holds shapes but no values, and the "
                             "expert backends read the rows per expert as numbers; the meta device "
                             "is for building without allocating: moe.to_empty(device='cpu') (or "
                             "cuda) and load the weights to run it")
        if padding_mask is not None and (padding_mask.dtype != torch.bool
                                         or padding_mask.shape != x.shape[:-1]):
            raise ValueError(f"padding_mask must be a bool tensor of shape {tuple(x.shape[:-1])}, got "
                             f"{padding_mask.dtype} {tuple(padding_mask.shape)}")
        x_BSD = x if x.dim() == 3 else x.unsqueeze(0)
        mask_BS = None if padding_mask is None else padding_mask.reshape(x_BSD.shape[:2])
        batch, seq_len, _ = x_BSD.shape
        if seq_len == 0 or batch == 0:  # keep every parameter in the graph (exact zeros)
            return x * 0 + sum(p.reshape(-1)[:0].sum() for p in self.parameters())
        dtype = router_dtype(x.dtype)
        logits_BSN = x_BSD.to(dtype) @ self.slot_embeds.to(dtype)
        dispatch_logits = logits_BSN if mask_BS is None else \
            logits_BSN.masked_fill(~mask_BS[..., None], float("-inf"))
        # A group with no real token has an all -inf column: its slots get 0 input.
        dispatch_BSN = dispatch_logits.softmax(dim=1).nan_to_num(0.0)
        combine_BSN = logits_BSN.softmax(dim=2)
        slots_BND = torch.einsum("bsn,bsd->bnd", dispatch_BSN, x_BSD.to(dtype)).to(x.dtype)
        out_BND = self._run_experts(slots_BND)
        y_BSD = torch.einsum("bsn,bnd->bsd", combine_BSN, out_BND.to(dtype))
        if mask_BS is not None:
            y_BSD = y_BSD * mask_BS[..., None]
        return y_BSD.to(x.dtype).reshape(x.shape)

    def _run_experts(self, slots_BND: torch.Tensor) -> torch.Tensor:
        """Slots [B, E*p, D] -> expert-major rows [E * B*p, D] -> experts -> back."""
        c = self.config
        batch, p = slots_BND.shape[0], c.slots_per_expert
        rows = slots_BND.view(batch, c.num_experts, p, c.dim).transpose(0, 1).reshape(-1, c.dim)
        counts_E = torch.full((c.num_experts,), batch * p, dtype=torch.int64, device=rows.device)
        out = self.experts(rows, rows_plan(counts_E, rows.shape[0]))
        return out.view(c.num_experts, batch, p, c.dim).transpose(0, 1).reshape(batch, -1, c.dim)
