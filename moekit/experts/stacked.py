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
from moekit.experts.cpu import decode, skinny
from moekit.experts.fused import fused_experts
from moekit.experts.grouped import grouped_matmul, grouped_mm_supports
from moekit.experts.loop import loop_matmul
from moekit.experts.triton import triton_installed, triton_runs_on

logger = logging.getLogger(__name__)

MATMULS = {"grouped_mm": grouped_matmul, "loop": loop_matmul}
TOKEN_BACKENDS = ("fused", "triton")  # backends that read tokens directly (forward_tokens)
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Experts(nn.Module):
    """forward(rows_RD, counts_E) -> out_RD: rows already grouped by expert.

    Knows nothing about routing. ``config.experts_backend`` picks how:
    "fused" (CPU: one autograd op per call, see experts/fused.py) and "triton"
    (CUDA: fused Triton kernels, see experts/triton/) can also take tokens
    directly with ``forward_tokens``; "grouped_mm" or "loop" run matmuls on
    dispatched rows. "auto" picks fused on CPU, triton on CUDA when Triton is
    installed (and bias is off), grouped_mm where it is exact for the device,
    dtype and sizes, and the loop otherwise; ``backend_for(dtype)`` tells
    which one a dtype gets, and logs it (debug level) the first time.
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
        if choice == "triton":
            self._check_triton(device, dtype)
        if choice != "auto":
            return choice
        if device.type == "cpu":
            backend = "fused"
        elif device.type == "cuda" and triton_installed() and not self.config.bias \
                and dtype in _TRITON_DTYPES:
            backend = "triton"
        else:
            backend = "grouped_mm" if supported else "loop"
        if (backend, dtype) not in self._logged_backends:
            self._logged_backends.add((backend, dtype))
            logger.debug("moekit experts: backend %r for %s on %s, sizes %s",
                         backend, dtype, device, sizes)
        return backend

    def _check_triton(self, device: torch.device, dtype: torch.dtype) -> None:
        if not triton_installed():
            raise ValueError("experts_backend='triton' needs Triton: pip install 'moekit[triton]'")
        if not triton_runs_on(device):
            raise ValueError(f"experts_backend='triton' runs on CUDA, not {device} (on CPU only "
                             "under the Triton interpreter, TRITON_INTERPRET=1, for tests)")
        if self.config.bias:
            raise ValueError("experts_backend='triton' does not support bias=True; "
                             "use experts_backend='auto'")
        if dtype not in _TRITON_DTYPES:
            raise ValueError(f"experts_backend='triton' runs float32/bfloat16/float16, not {dtype}")

    def _checked_counts(self, counts_E: torch.Tensor, num_rows: int) -> list[int]:
        counts = counts_E.tolist()
        if len(counts) != self.num_local_experts or min(counts, default=0) < 0 \
                or sum(counts) != num_rows:
            raise ValueError(f"counts_E must be {self.num_local_experts} non-negative counts "
                             f"summing to the {num_rows} rows; got {counts}")
        return counts

    def forward_tokens(self, x_TD: torch.Tensor, order_R: torch.Tensor, top_k: int,
                       weights_R: torch.Tensor | None, counts_E: torch.Tensor) -> torch.Tensor:
        """Fused and triton backends: y_TD [T, D] = sum over rows r of
        weights_R[r] * FFN_{e(r)}(x_TD[order_R[r] // top_k]), rows grouped by
        expert (counts_E [E]); order_R [R] holds assignment indices t * K + j."""
        if self.backend_for(x_TD.dtype) == "triton":
            from moekit.experts.triton.ops import expert_offsets, triton_experts
            if counts_E.shape != (self.num_local_experts,):  # no value check: that would sync
                raise ValueError(f"counts_E must have shape ({self.num_local_experts},), "
                                 f"got {tuple(counts_E.shape)}")
            return triton_experts(x_TD, order_R, top_k, weights_R, expert_offsets(counts_E),
                                  self.first_proj, self.down_proj, self.config.activation)
        counts = self._checked_counts(counts_E, order_R.shape[0])
        token_R = torch.div(order_R, top_k, rounding_mode="floor")
        return fused_experts(x_TD, token_R, weights_R, counts, self.first_proj, self.down_proj,
                             self.config.activation, self.first_proj_bias, self.down_proj_bias)

    def forward_decode(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                       kept_TK: torch.Tensor | None = None) -> decode.DecodedExperts | None:
        """The fused backend's inference path for decode-size batches: every choice of every
        token (ids_TK, weights_TK [T, K]) that kept_TK [T, K] bool keeps (None: all) through its
        expert and combined, in one C call (experts/cpu/decode.py). None where it does not apply:
        another backend, not float32, a gradient to record, a torch tool watching (compile,
        FlopCounterMode, the profiler), the kernel unavailable, or an expert with more than
        skinny.MAX_ROWS rows."""
        params = [p for p in (self.first_proj, self.down_proj, self.first_proj_bias,
                              self.down_proj_bias) if p is not None]
        if self.backend_for(x_TD.dtype) != "fused" \
                or not decode.applies_to(x_TD, weights_TK, *params):
            return None  # before counting the kept rows: training and GPU batches skip the sum
        rows = ids_TK.numel() if kept_TK is None else int(kept_TK.sum())
        if rows > self.num_local_experts * skinny.MAX_ROWS:
            return None
        return decode.skinny_ffn(x_TD, ids_TK, weights_TK, self.first_proj, self.down_proj,
                                 self.config.activation, self.first_proj_bias, self.down_proj_bias,
                                 kept_TK=kept_TK)

    def forward(self, rows_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """rows_RD: [R, D] grouped by expert; counts_E: [E] ints summing to R -> [R, D]."""
        backend = self.backend_for(rows_RD.dtype)
        if backend in TOKEN_BACKENDS:
            order_R = torch.arange(rows_RD.shape[0], device=rows_RD.device)
            return self.forward_tokens(rows_RD, order_R, 1, None, counts_E)
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
