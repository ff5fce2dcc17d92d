"""MoEAux: what one MoE forward reports besides its output (returned, never stored)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from moekit.config import MoEConfig
from moekit.contract import DispatchPlan
from moekit.dispatch.local import GlobalLoad
from moekit.losses import load_balance_loss, router_z_loss, sequence_balance_loss
from moekit.null_experts import null_counts, real_balance_view
from moekit.placement import max_over_mean
from moekit.routing import Routing


def load_imbalance(tokens_per_expert: torch.Tensor) -> tuple[float, float]:
    """(max / mean as moekit.placement.max_over_mean, coefficient of variation) of
    per-expert counts [E]; NaN, NaN when there is no load."""
    load = tokens_per_expert.double()
    peak = max_over_mean(load.tolist())
    if math.isnan(peak):
        return math.nan, math.nan
    return peak, load.std(unbiased=False).item() / load.mean().item()


def router_entropy_sum(router_probs: torch.Tensor) -> float:
    """Sum over tokens of the entropy (nats) of each token's router distribution [T, E]."""
    probs = router_probs.detach().double()
    return float(-(probs * probs.clamp_min(1e-30).log()).sum())


class MoEAux(NamedTuple):
    """Losses and routing statistics of one MoE forward, over the T routed tokens.

    loss:              scalar, balance_loss_weight * balance_loss + z_loss_weight * z_loss
                       (add it to the task loss). Zero when losses are off (see below).
    balance_loss:      scalar, unweighted E * sum_i f_i * P_i (over the batch, or
                       averaged over sequences with balance_scope="sequence").
    z_loss:            scalar, unweighted mean_t logsumexp(logits_t)^2.
    router_logits:     [T, E] router dtype (float32, or float64 for float64 inputs).
    router_probs:      [T, E] the router's per-token distribution over experts.
    expert_indices:    [T, K] int64 (hand it back as moe(x, expert_indices=...) to replay).
    expert_weights:    [T, K] combine weights before capacity drops.
    assignment_mask:   [T, K] bool slots that are assignments (expert choice),
                       or None when all are.
    tokens_per_expert: [E] int64 assignments each expert processed (after capacity).
    dropped_fraction:  0-dim float32, fraction of the T*K assignments dropped.
    null_tokens_per_expert: [N] int64 assignments to each null expert, or None without
                       null experts. With N null experts the router's fields have E + N
                       columns and expert_indices holds ids up to E + N - 1;
                       tokens_per_expert and dropped_fraction cover the E real experts.
    """

    loss: torch.Tensor
    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    router_logits: torch.Tensor
    router_probs: torch.Tensor
    expert_indices: torch.Tensor
    expert_weights: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped_fraction: torch.Tensor
    assignment_mask: torch.Tensor | None = None
    null_tokens_per_expert: torch.Tensor | None = None

    def metrics(self) -> dict[str, float]:
        """Plain floats: load_max_over_mean and load_cv of tokens_per_expert
        (NaN when no tokens), router_entropy (mean per-token entropy of
        router_probs, in nats), dropped_fraction, and the three losses. With null
        experts also null_fraction, the fraction of the assignments that went to
        null experts (the share of routed-expert FLOPs saved against the same top-k
        without them), and real_experts_per_token, the expert rows computed per
        token (after capacity); both NaN when no tokens."""
        max_over_mean, cv = load_imbalance(self.tokens_per_expert)
        num_tokens = self.router_probs.shape[0]
        metrics = {
            "load_max_over_mean": max_over_mean,
            "load_cv": cv,
            "router_entropy": router_entropy_sum(self.router_probs) / num_tokens if num_tokens
            else math.nan,
            "dropped_fraction": float(self.dropped_fraction),
            "loss": float(self.loss.detach()),
            "balance_loss": float(self.balance_loss.detach()),
            "z_loss": float(self.z_loss.detach()),
        }
        if self.null_tokens_per_expert is not None:
            assigned = self.expert_indices.numel() if self.assignment_mask is None \
                else int(self.assignment_mask.sum())
            null = int(self.null_tokens_per_expert.sum())
            rows = int(self.tokens_per_expert.sum())
            metrics["null_fraction"] = null / assigned if assigned else math.nan
            metrics["real_experts_per_token"] = rows / num_tokens if num_tokens else math.nan
        return metrics


def moe_aux(routing: Routing, plan: DispatchPlan, config: MoEConfig, compute_losses: bool,
            sequence_T: torch.Tensor | None = None, num_sequences: int = 1,
            global_load: GlobalLoad | None = None) -> MoEAux:
    """Assemble MoEAux. With compute_losses False (eval or no_grad) the losses are
    detached zeros and nothing is computed for them. sequence_T [T] (sequence
    index of each token) is needed for balance_scope="sequence". global_load
    (totals over all ranks, expert parallel) makes the losses this rank's share
    of the losses over all ranks' tokens."""
    logits_TE, probs_TE = routing.router_logits, routing.router_probs
    ids_TK, mask_TK = routing.expert_indices, routing.assignment_mask
    if compute_losses:
        balance_probs_TE, balance_ids_TK, balance_mask_TK = probs_TE, ids_TK, mask_TK
        if config.num_null_experts and not config.balance_null_experts:
            balance_probs_TE, balance_ids_TK, balance_mask_TK = real_balance_view(
                probs_TE, ids_TK, mask_TK, config.num_experts)
            if global_load is not None:
                global_load = global_load._replace(counts_E=global_load.counts_E[:config.num_experts])
        balance = _balance_loss(balance_probs_TE, balance_ids_TK, balance_mask_TK, config,
                                sequence_T, num_sequences, global_load)
        z = router_z_loss(logits_TE, None if global_load is None else global_load.tokens)
        loss = config.balance_loss_weight * balance + config.z_loss_weight * z
    else:
        balance = z = loss = torch.zeros((), dtype=logits_TE.dtype, device=logits_TE.device)
    nulls = None if not config.num_null_experts else \
        null_counts(ids_TK, config.num_experts, config.num_null_experts, mask_TK)
    return MoEAux(loss, balance, z, logits_TE, probs_TE, ids_TK, routing.expert_weights,
                  plan.counts_E, plan.dropped_fraction, mask_TK, nulls)


def _balance_loss(probs_TE: torch.Tensor, ids_TK: torch.Tensor, mask_TK: torch.Tensor | None,
                  config: MoEConfig, sequence_T: torch.Tensor | None, num_sequences: int,
                  global_load: GlobalLoad | None) -> torch.Tensor:
    """The unweighted balance loss of config.balance_scope."""
    if config.balance_scope == "sequence":
        return sequence_balance_loss(probs_TE, ids_TK, sequence_T, num_sequences, mask_TK,
                                     None if global_load is None else global_load.sequences)
    if global_load is None:
        return load_balance_loss(probs_TE, ids_TK, mask_TK)
    return load_balance_loss(probs_TE, ids_TK, mask_TK, global_load.counts_E, global_load.tokens)
