"""Routed experts as stacked weights, run as grouped matrix products.

Parameter layout (as Hugging Face transformers' MoE experts):
  gate_up_proj [E, 2F, D] for gated activations (rows [:F] gate, [F:] up),
  up_proj      [E, F, D]  otherwise,
  down_proj    [E, D, F],
  gate_up_proj_bias [E, 2F] / up_proj_bias [E, F], down_proj_bias [E, D] if config.bias.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from moekit.config import MoEConfig
from moekit.experts.activations import apply_activation
from moekit.experts.fused import fused_experts
from moekit.experts.grouped import grouped_matmul, grouped_mm_supports
from moekit.experts.loop import loop_matmul

logger = logging.getLogger(__name__)

MATMULS = {"grouped_mm": grouped_matmul, "loop": loop_matmul}


class Experts(nn.Module):
    """forward(rows_RD, counts_E) -> out_RD: rows already grouped by expert.

    Knows nothing about routing. ``config.experts_backend`` picks how:
    "fused" (CPU: one autograd op per call, see experts/fused.py; it can also
    take tokens directly with ``forward_tokens``), "grouped_mm" or "loop"
    (matmuls on dispatched rows). "auto" picks fused on CPU, grouped_mm where
    it is exact for the device, dtype and sizes, and the loop otherwise;
    ``backend_for(dtype)`` tells which one a dtype gets.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        E, D, F = config.num_experts, config.dim, config.expert_dim
        first = "gate_up_proj" if config.is_gated else "up_proj"
        first_out = 2 * F if config.is_gated else F
        self.first_proj_name = first
        self.register_parameter(first, nn.Parameter(torch.empty(E, first_out, D)))
        self.down_proj = nn.Parameter(torch.empty(E, D, F))
        self.register_parameter(f"{first}_bias",
                                nn.Parameter(torch.empty(E, first_out)) if config.bias else None)
        self.down_proj_bias = nn.Parameter(torch.empty(E, D)) if config.bias else None
        self._logged_backends: set[tuple[str, torch.dtype]] = set()
        self.expert_ids = range(E)  # the global ids held here, in order (a subset under expert parallelism)
        self.reset_parameters()

    @property
    def num_local_experts(self) -> int:
        return self.down_proj.shape[0]

    @property
    def first_proj(self) -> nn.Parameter:
        """gate_up_proj or up_proj, whichever this activation uses."""
        return getattr(self, self.first_proj_name)

    @property
    def first_proj_bias(self) -> nn.Parameter | None:
        return getattr(self, f"{self.first_proj_name}_bias")

    def reset_parameters(self) -> None:
        """Each expert initialised as nn.Linear would initialise it."""
        for weight, bias in ((self.first_proj, self.first_proj_bias),
                             (self.down_proj, self.down_proj_bias)):
            bound = 1.0 / math.sqrt(weight.shape[-1])
            nn.init.uniform_(weight, -bound, bound)
            if bias is not None:
                nn.init.uniform_(bias, -bound, bound)

    def backend_for(self, dtype: torch.dtype) -> str:
        """The matmul backend used for activations of this dtype on this module's device."""
        choice = self.config.experts_backend
        device = self.down_proj.device
        sizes = (self.config.dim, self.first_proj.shape[1], self.config.expert_dim)
        supported = grouped_mm_supports(device, dtype, *sizes)
        if choice == "grouped_mm" and not supported:
            raise ValueError(
                f"experts_backend='grouped_mm' cannot run dtype {dtype} on {device} with sizes "
                f"{sizes}: it needs float32/bfloat16/float16 on CPU or CUDA (capability >= 8.0) "
                "and sizes that are multiples of 16 bytes; use experts_backend='auto' or 'loop'")
        if choice == "fused" and device.type != "cpu":
            raise ValueError(f"experts_backend='fused' runs on CPU only, not {device}; "
                             "use experts_backend='auto'")
        if choice != "auto":
            return choice
        if device.type == "cpu":
            backend = "fused"
        else:
            backend = "grouped_mm" if supported else "loop"
        if (backend, dtype) not in self._logged_backends:
            self._logged_backends.add((backend, dtype))
            logger.debug("moekit experts: backend %r for %s on %s, sizes %s",
                         backend, dtype, device, sizes)
        return backend

    def _checked_counts(self, counts_E: torch.Tensor, num_rows: int) -> list[int]:
        counts = counts_E.tolist()
        if len(counts) != self.num_local_experts or min(counts, default=0) < 0 \
                or sum(counts) != num_rows:
            raise ValueError(f"counts_E must be {self.num_local_experts} non-negative counts "
                             f"summing to the {num_rows} rows; got {counts}")
        return counts

    def forward_tokens(self, x_TD: torch.Tensor, token_R: torch.Tensor,
                       weights_R: torch.Tensor | None, counts_E: torch.Tensor) -> torch.Tensor:
        """Fused backend only: y_TD [T, D] = sum over rows r of
        weights_R[r] * FFN_{e(r)}(x_TD[token_R[r]]), rows grouped by expert."""
        counts = self._checked_counts(counts_E, token_R.shape[0])
        return fused_experts(x_TD, token_R, weights_R, counts, self.first_proj, self.down_proj,
                             self.config.activation, self.first_proj_bias, self.down_proj_bias)

    def forward(self, rows_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """rows_RD: [R, D] grouped by expert; counts_E: [E] ints summing to R -> [R, D]."""
        backend = self.backend_for(rows_RD.dtype)
        if backend == "fused":
            token_R = torch.arange(rows_RD.shape[0], device=rows_RD.device)
            return self.forward_tokens(rows_RD, token_R, None, counts_E)
        counts = self._checked_counts(counts_E, rows_RD.shape[0])
        matmul = MATMULS[backend]
        h = matmul(rows_RD, self.first_proj, counts)
        expert_of_row = None
        if self.config.bias:
            expert_of_row = torch.repeat_interleave(
                torch.arange(len(counts), device=rows_RD.device), counts_E,
                output_size=rows_RD.shape[0])
            h = h + self.first_proj_bias[expert_of_row]
        out = matmul(apply_activation(h, self.config.activation), self.down_proj, counts)
        if expert_of_row is not None:
            out = out + self.down_proj_bias[expert_of_row]
        return out
