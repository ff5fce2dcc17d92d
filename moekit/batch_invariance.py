"""Batch-invariant forms of the few ops whose result for one row depends on the other rows.

With ``MoEConfig(batch_invariant=True)`` a token's output is bitwise the same whatever other
tokens share its batch and however the batch is split (token-choice routing, no capacity
drops, float32 or float64 on CPU). Everything else the layer does is already row-by-row
(softmax and top-k per row, gathers, scatters, one IEEE add or multiply per element); two
kinds of op are not, measured on torch 2.13's CPU build (MKL, 1-8 threads):

- matrix products: MKL takes other kernels, which round differently, for a few rows
  (1-3 rows, and 5-7 and 9-11 with an even thread count); padding the rows with zeros to a
  multiple of ``ROW_MULTIPLE`` (8, and at least 8) gives every row the product of a large
  batch. ``invariant_mm`` and ``padded_groups`` do that; the cost is the padding rows.
- elementwise sigmoid, SiLU and GELU: the vectorised and the scalar code paths round
  differently, and which elements take the scalar path (a tensor's tail, the ends of the
  threads' chunks) depends on the tensor's size. ``exp`` and ``erf`` agree bitwise in both
  paths, and + - * / are exactly rounded, so ``invariant_activation`` composes the
  activations from them: the same functions up to rounding, not bitwise torch's.

A product's reduction order is the one part that depends on the BLAS library: other CPUs'
MKL paths may need another multiple. tests/test_batch_invariance.py checks the whole layer
on random re-partitions of one batch on the machine it runs on.
"""

from __future__ import annotations

import itertools

import torch

from moekit.experts.activations import ACTIVATIONS, DEFAULT_PARAMS, ActivationParams

ROW_MULTIPLE = 8
_SQRT_HALF = 0.7071067811865476


def padded_row_count(rows: int) -> int:
    """Rows a product runs on for ``rows`` real rows: 0 for 0, else a multiple of ROW_MULTIPLE."""
    if rows == 0:
        return 0
    return max(ROW_MULTIPLE, -(-rows // ROW_MULTIPLE) * ROW_MULTIPLE)


def invariant_mm(x_MI: torch.Tensor, w_OI: torch.Tensor, bias_O: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """x_MI @ w_OI.T (+ bias_O) -> [M, O], each row computed as in a product of many rows.
    Differentiable."""
    rows = x_MI.shape[0]
    padded = padded_row_count(rows)
    if padded != rows:
        x_MI = torch.cat([x_MI, x_MI.new_zeros(padded - rows, x_MI.shape[1])])
    y = (x_MI @ w_OI.t())[:rows]
    return y if bias_O is None else y + bias_O


def padded_groups(matmul):
    """A grouped matmul (``matmul(x_RI, w_EOI, counts_E) -> y_RO``, counts as Python ints,
    rows past the groups 0) that runs ``matmul`` with every expert's rows padded with zeros
    to padded_row_count rows, so each row's product does not depend on its group's size."""

    def padded_matmul(x_RI: torch.Tensor, w_EOI: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
        padded_E = [padded_row_count(n) for n in counts_E]
        if padded_E == list(counts_E):
            return matmul(x_RI, w_EOI, counts_E)
        starts_E = itertools.accumulate(padded_E[:-1], initial=0)
        rows = torch.cat([torch.arange(start, start + n, device=x_RI.device)
                          for start, n in zip(starts_E, counts_E)])  # real rows, padded layout
        total = rows.shape[0]
        x_PI = x_RI.new_zeros(sum(padded_E), x_RI.shape[1]).index_copy(0, rows, x_RI[:total])
        y_RO = matmul(x_PI, w_EOI, padded_E).index_select(0, rows)
        tail = x_RI.shape[0] - total
        return torch.cat([y_RO, y_RO.new_zeros(tail, y_RO.shape[1])]) if tail else y_RO

    return padded_matmul


def invariant_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """1 / (1 + exp(-x)), elementwise, the same bits for an element in any tensor."""
    return torch.reciprocal(torch.exp(-x) + 1)


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x / (torch.exp(-x) + 1)


def _gelu(x: torch.Tensor) -> torch.Tensor:  # the exact (erf) GELU
    return x * 0.5 * (torch.erf(x * _SQRT_HALF) + 1)


_ELEMENTWISE = {"silu": _silu, "gelu": _gelu, "relu": torch.relu}


def invariant_activation(h: torch.Tensor, name: str,
                         params: ActivationParams = DEFAULT_PARAMS) -> torch.Tensor:
    """moekit.experts.activations.apply_activation composed of row-invariant ops:
    [..., 2F] -> [..., F] gated, [..., F] -> [..., F] plain (params: clamped_swiglu's).
    Differentiable."""
    activation = ACTIVATIONS[name]
    if not activation.gated:
        return _ELEMENTWISE[activation.elementwise](h)
    gate, up = h.chunk(2, dim=-1)
    if activation.clamped:  # clamps and products are exact: only the sigmoid needs care
        gate = gate.clamp(max=params.limit)
        return (up.clamp(-params.limit, params.limit) + 1) * (gate * invariant_sigmoid(gate * params.alpha))
    return _ELEMENTWISE[activation.elementwise](gate) * up
