"""The row form of the expert FFN, shared by row backends (loop, grouped_mm).

    rows_RD = dispatch_rows(x_TD, plan)                      gather, expert-major
    h       = matmul(rows_RD, W1, counts) (+ b1[expert])     [R, 2F] gated or [R, F]
    a       = dropout(act(h), expert_dropout) in training    [R, F]
    out_RD  = matmul(a, W2, counts) (+ b2[expert])           [R, D]
              (then dropout(out_RD, expert_output_dropout) in training)
    y_TD    = combine_rows(out_RD, plan)                     weighted sum over K

A row backend supplies only ``matmul(x_RI, w_EOI, counts) -> y_RO`` (rows of expert e times
w_EOI[e]^T, counts as Python ints, or as the [E] int64 tensor for a matmul that takes it:
then nothing leaves the device and torch.compile sees no data-dependent break);
autograd differentiates the rest.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moekit.contract import DispatchPlan
from moekit.dispatch.permute import combine_rows, dispatch_rows
from moekit.experts.activations import apply_activation

GroupedMatmul = Callable[[torch.Tensor, torch.Tensor, "list[int] | torch.Tensor"], torch.Tensor]


def rows_ffn(experts, x_TD: torch.Tensor, plan: DispatchPlan, matmul: GroupedMatmul,
             counts_on_device: bool = False) -> torch.Tensor:
    """y_TD [T, D]: the FFN of stacked ``experts`` (moekit.experts.Experts) on the plan's rows.
    counts_on_device: hand matmul the plan's counts tensor as is (no check, no host copy)."""
    rows_RD = dispatch_rows(x_TD, plan)
    counts_E = plan.counts_E
    counts = counts_E if counts_on_device else experts.checked_counts(counts_E, rows_RD.shape[0])
    h = matmul(rows_RD, experts.first_proj, counts)
    expert_of_row = None
    if experts.config.bias:
        expert_of_row = torch.repeat_interleave(
            torch.arange(experts.num_local_experts, device=rows_RD.device), counts_E,
            output_size=rows_RD.shape[0])
        h = h + experts.first_proj_bias[expert_of_row]
    a = apply_activation(h, experts.config.activation)
    if experts.training and experts.config.expert_dropout > 0:
        # one call over the expert-major rows draws the same numbers as one call per expert
        # in expert order (as Switch Transformers' experts do), measured on CPU
        a = torch.nn.functional.dropout(a, experts.config.expert_dropout, training=True)
    out = matmul(a, experts.down_proj, counts)
    if expert_of_row is not None:
        out = out + experts.down_proj_bias[expert_of_row]
    if experts.training and experts.config.expert_output_dropout > 0:
        # on the unweighted rows: the combine weight is one scalar per row
        out = torch.nn.functional.dropout(out, experts.config.expert_output_dropout, training=True)
    return combine_rows(out, plan)


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
