"""The row form of the expert FFN, shared by row backends (loop, grouped_mm).

    rows_RD = dispatch_rows(x_TD, plan)                      gather, expert-major
    h       = matmul(rows_RD, W1, counts) (+ b1[expert])     [R, 2F] gated or [R, F]
    a       = dropout(act(h), expert_dropout) in training    [R, F]
    out_RD  = matmul(a, W2, counts) (+ b2[expert])           [R, D]
              (then dropout(out_RD, expert_output_dropout) in training)
    y_TD    = combine_rows(out_RD, plan)                     weighted sum over K

With combine_weights_on="input" the rows are weighted before the first product instead
(rows_RD * w_R, Llama 4) and summed unweighted.

A row backend supplies only ``matmul(x_RI, w_EOI, counts) -> y_RO`` (rows of expert e times
w_EOI[e]^T, counts as Python ints, or as the [E] int64 tensor for a matmul that takes it:
then nothing leaves the device and torch.compile sees no data-dependent break);
autograd differentiates the rest.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moekit.batch_invariance import invariant_activation, padded_groups
from moekit.contract import DispatchPlan
from moekit.dispatch.permute import combine_rows, dispatch_rows
from moekit.experts.activations import apply_activation

GroupedMatmul = Callable[[torch.Tensor, torch.Tensor, "list[int] | torch.Tensor"], torch.Tensor]


def rows_ffn(experts, x_TD: torch.Tensor, plan: DispatchPlan, matmul: GroupedMatmul,
             counts_on_device: bool = False) -> torch.Tensor:
    """y_TD [T, D]: the FFN of stacked ``experts`` (moekit.experts.Experts) on the plan's rows.
    counts_on_device: hand matmul the plan's counts tensor as is (no check, no host copy);
    with config.batch_invariant the products run on padded groups (moekit.batch_invariance)."""
    rows_RD = dispatch_rows(x_TD, plan)
    weights_on_input = experts.config.combine_weights_on == "input" and plan.weights_TK is not None
    if weights_on_input:
        rows_RD = rows_RD * plan.weights_R.to(rows_RD.dtype).unsqueeze(1)
    counts_E = plan.counts_E
    activate = apply_activation
    if experts.config.batch_invariant:
        matmul, counts_on_device = padded_groups(matmul), False
        activate = invariant_activation
    counts = counts_E if counts_on_device else experts.checked_counts(counts_E, rows_RD.shape[0])
    h = matmul(rows_RD, experts.first_proj, counts)
    expert_of_row = None
    if experts.config.bias:
        expert_of_row = torch.repeat_interleave(
            torch.arange(experts.num_local_experts, device=rows_RD.device), counts_E,
            output_size=rows_RD.shape[0])
        h = h + experts.first_proj_bias[expert_of_row]
    config = experts.config
    a = activate(h, config.activation, config.activation_params)
    if experts.training and config.expert_dropout > 0:
        # one call over the expert-major rows draws the same numbers as one call per expert
        # in expert order (as Switch Transformers' experts do), measured on CPU
        a = torch.nn.functional.dropout(a, config.expert_dropout, training=True)
    out = matmul(a, experts.down_proj, counts)
    if expert_of_row is not None:
        out = out + experts.down_proj_bias[expert_of_row]
    if experts.training and config.expert_output_dropout > 0:
        # on the unweighted rows: the combine weight is one scalar per row
        out = torch.nn.functional.dropout(out, config.expert_output_dropout, training=True)
    return combine_rows(out, plan, weighted=not weights_on_input)


def expert_dropout_refusal(experts, backend: str) -> str | None:
    """Why a backend that is not a row backend cannot run ``experts`` now: expert_dropout or
    expert_output_dropout > 0 in training mode (only rows_ffn applies them); None otherwise."""
    if not getattr(experts, "training", False):
        return None
    for name in ("expert_dropout", "expert_output_dropout"):
        p = getattr(experts.config, name)
        if p > 0:
            return (f"experts_backend={backend!r} does not apply {name} ({p}) in training "
                    "mode; use experts_backend='auto', 'grouped_mm' or 'loop'")
    return None
