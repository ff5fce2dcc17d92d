"""The "fused" backend (CPU): gather, FFN and weighted combine without dispatched rows.

Every batch can run through the fused autograd op (moekit/experts/fused.py). A decode-size
batch with no gradient to record (decode.applies_to) instead runs as one native call that
sorts, gathers, computes and combines (moekit/experts/cpu/decode.py); its sort is handed to
the plan, so nothing is sorted twice. In float32 both give the same bits; a layer held in
bfloat16 or float16 gets the one call too, computed in float32 and rounded once (the autograd op
rounds h and the activation as well), so there the two agree to that dtype's rounding.

Under torch.compile the one call is the operator moekit::fused_decode (for plans without a kept
mask), so a compiled decode step keeps it, in one graph: without it torch.compile would see
the ctypes call, which it cannot trace, and the layer would take the autograd op's path, whose
per-expert counts break the graph (with half-size expert weights that path casts the stacks to
float32 on every step).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from moekit.contract import DispatchPlan
from moekit.experts.activations import DEFAULT_PARAMS, KERNEL_ACTIVATIONS
from moekit.experts.cpu import decode, skinny
from moekit.experts.fused import fused_experts
from moekit.experts.rows import expert_dropout_refusal
from moekit.func_transforms import active_func_transforms


class FusedBackend:
    """The CPU backend "auto" picks."""

    def unsupported(self, experts, dtype: torch.dtype) -> str | None:
        device = experts.device
        if device.type != "cpu":
            return f"experts_backend='fused' runs on CPU only, not {device}; use experts_backend='auto'"
        if experts.config.combine_weights_on != "output":
            return (f"experts_backend='fused' applies the combine weights to the expert output "
                    f"only, not combine_weights_on={experts.config.combine_weights_on!r}; use "
                    "experts_backend='auto', 'grouped_mm' or 'loop'")
        transforms = active_func_transforms()
        if transforms:
            return (f"experts_backend='fused' does not run under torch.func transforms "
                    f"({', '.join(sorted(transforms))}): its backward is hand-written; use "
                    "experts_backend='auto' or 'loop'")
        return expert_dropout_refusal(experts, "fused")

    def describe(self, experts, x_TD: torch.Tensor, plan: DispatchPlan) -> str:
        """Which of the two paths this plan takes, and why not the native one."""
        if experts.config.batch_invariant:
            return "fused: the autograd op with batch-invariant products (batch_invariant=True)"
        weights = (experts.first_proj, experts.down_proj, experts.first_proj_bias,
                   experts.down_proj_bias)
        reason = native_activation_declined(experts.config.activation) or decode.declined_because(
            x_TD, plan, *(t for t in weights if t is not None),
            cpu_kernels=experts.config.cpu_kernels, compiles_as_operator=True)
        if reason is not None:
            return f"fused: the autograd op (not the one native call: {reason})"
        detail = ""
        if decode.rounds_float32_x(x_TD.dtype, experts.down_proj.dtype):
            detail = ("; float32 matmul precision 'bf16': x and the activation rounded to bfloat16 "
                      "for the CPU's bf16 dot product")
        elif x_TD.dtype == torch.bfloat16 and skinny.native_bf16_dot():
            detail = ("; both products on the CPU's bf16 dot product, the activation rounded to "
                      "bfloat16")
        return f"fused: one native call for the whole FFN (decode-size, no gradient{detail})"

    def __call__(self, experts, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        w1, w2, b1, b2 = experts.first_proj, experts.down_proj, experts.first_proj_bias, \
            experts.down_proj_bias
        config = experts.config
        activation, cpu_kernels = config.activation, config.cpu_kernels
        if not config.batch_invariant and activation in KERNEL_ACTIVATIONS and decode.applies_to(
                x_TD, plan, *(t for t in (w1, w2, b1, b2) if t is not None),
                cpu_kernels=cpu_kernels, count_rows=False, compiles_as_operator=True):
            if torch.compiler.is_compiling():  # applies_to: only without a kept mask
                y_TD, order_R, counts_E = torch.ops.moekit.fused_decode(
                    x_TD, plan.ids_TK, plan.weights_TK, w1, w2, b1, b2, activation, cpu_kernels)
                plan.adopt_sort(order_R, counts_E)
                return y_TD
            decoded = decode.skinny_ffn(x_TD, plan.ids_TK, plan.weights_TK, w1, w2, activation,
                                        b1, b2, kept_TK=plan.kept_TK)
            if decoded is not None:  # None only if it declined after all: the general path
                plan.adopt_sort(decoded.order_R, decoded.counts_E)
                return decoded.y_TD
        counts = experts.checked_counts(plan.counts_E, plan.order_R.shape[0])
        return fused_experts(x_TD, plan.token_R, plan.weights_R, counts, w1, w2, activation, b1, b2,
                             cpu_kernels, config.activation_params, config.batch_invariant)


def native_activation_declined(activation: str) -> str | None:
    """Why the one native call cannot compute this activation, or None when it can."""
    if activation in KERNEL_ACTIVATIONS:
        return None
    return f"the native kernel does not compute activation={activation!r}"


@torch.library.custom_op("moekit::fused_decode", mutates_args=(), device_types="cpu")
def _fused_decode_op(x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                     w1_EHD: torch.Tensor, w2_EDF: torch.Tensor, b1_EH: torch.Tensor | None,
                     b2_ED: torch.Tensor | None, activation: str, cpu_kernels: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused backend's forward of a plan of all T*K choices without a gradient, as one
    operator for torch.compile: (y_TD [T, D] in x's dtype, order_R [T*K] int64, counts_E [E]
    int64) as decode.skinny_ffn gives them; where that call declines (an expert with more than
    MAX_ROWS rows), the fused autograd op's result and the plan's own sort. Not differentiable
    (FusedBackend calls it only where there is no gradient to record)."""
    decoded = decode.skinny_ffn(x_TD, ids_TK, weights_TK, w1_EHD, w2_EDF, activation, b1_EH,
                                b2_ED)
    if decoded is not None:
        return decoded.y_TD, decoded.order_R, decoded.counts_E
    plan = DispatchPlan(ids_TK, weights_TK, w2_EDF.shape[0])
    y_TD = fused_experts(x_TD, plan.token_R, plan.weights_R, plan.counts_E.tolist(), w1_EHD,
                         w2_EDF, activation, b1_EH, b2_ED, cpu_kernels, DEFAULT_PARAMS)
    return y_TD, plan.order_R, plan.counts_E


@_fused_decode_op.register_fake
def _(x_TD, ids_TK, weights_TK, w1_EHD, w2_EDF, b1_EH, b2_ED, activation, cpu_kernels):
    return (x_TD.new_empty(x_TD.shape), ids_TK.new_empty(ids_TK.numel()),
            ids_TK.new_empty(w2_EDF.shape[0]))


@register_flop_formula(torch.ops.moekit.fused_decode)
def _flops(x_shape, ids_shape, weights_shape, w1_shape, w2_shape, *args, out_shape=None,
           **kwargs) -> int:
    """Both products for every one of the T*K choices: 2 * T*K * (H*D + D*F)."""
    choices = ids_shape[0] * ids_shape[1]
    return 2 * choices * (w1_shape[1] * w1_shape[2] + w2_shape[1] * w2_shape[2])
