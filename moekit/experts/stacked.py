"""Routed experts as stacked weights: the experts contract (moekit.contract) over a backend.

Parameter layout (as Hugging Face transformers' MoE experts):
  gate_up_proj [E, 2F, D] for gated activations (rows [:F] gate, [F:] up),
  up_proj      [E, F, D]  otherwise,
  down_proj    [E, D, F],
  gate_up_proj_bias [E, 2F] / up_proj_bias [E, F], down_proj_bias [E, D] if config.bias.

Half-size weights for float32 activations: ``moe.experts.to(torch.bfloat16)`` (or float16)
holds the experts in half the bytes while the layer's input and output, its router and its
shared experts stay float32 (``holds_half_weights``). The experts then compute in float32 from
the half weights converted exactly: the fused backend's one native decode call converts them in
registers; its autograd op without gradients converts one expert at a time; every other case
(a gradient to record, another backend) casts the stacks to float32 differentiably, so training
works too, with the weights' gradients in their half dtype.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from moekit.config import MoEConfig
from moekit.contract import DispatchPlan
from moekit.experts.backends import AUTO_ORDER, BACKENDS
from moekit.routing import autocast_dtype, autocast_off

logger = logging.getLogger(__name__)

HALF_DTYPES = (torch.bfloat16, torch.float16)


def holds_half_weights(experts: nn.Module, x_dtype: torch.dtype) -> bool:
    """Whether ``experts`` (stacked, or offloaded: moekit.lm.offload) hold half-size weights
    (bfloat16 or float16) for inputs of x_dtype: float32 inputs with every expert parameter in
    one half dtype. TypeError for parameters of mixed dtypes in that case (looked for when
    either stack of a stacked module is half: its dtype is down_proj's)."""
    if x_dtype != torch.float32:
        return False
    first_proj = getattr(experts, "first_proj", None)
    if getattr(experts, "dtype", None) not in HALF_DTYPES \
            and getattr(first_proj, "dtype", None) not in HALF_DTYPES:
        return False
    dtypes = {name: p.dtype for name, p in experts.named_parameters()}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"half-size expert weights must all have one dtype, got {dtypes}; cast "
                        "them together (moe.experts.to(torch.bfloat16))")
    return True


class Experts(nn.Module):
    """experts(x_TD [T, D], plan) -> y_TD [T, D]: every kept assignment of the plan through its
    expert, weighted and summed per token (moekit.contract).

    Knows nothing about routing. ``config.experts_backend`` names the backend that computes
    (moekit.experts.backends): "fused" (CPU: gather, FFN and combine in one autograd op, one
    native call for decode-size inference), "triton" (CUDA kernels), "grouped_mm" or "loop"
    (row backends), or any registered one. "auto" picks fused on CPU, grouped_mm where it is
    exact for the device, dtype and sizes (CUDA), and the loop otherwise (triton only when
    asked for by name); ``backend_for(dtype)`` tells which one a dtype gets,
    and logs it (debug level) the first time; ``explain_backend(x_TD, plan)`` says the whole
    choice for one call.
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
    def dtype(self) -> torch.dtype:
        return self.down_proj.dtype

    @property
    def device(self) -> torch.device:
        return self.down_proj.device

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
        """The backend used for activations of this dtype on this module's device; ValueError
        when the configured one cannot run them."""
        choice = self.config.experts_backend
        if choice != "auto":
            reason = BACKENDS[choice].unsupported(self, dtype)
            if reason is not None:
                raise ValueError(reason)
            return choice
        backend = next(name for name in AUTO_ORDER if BACKENDS[name].unsupported(self, dtype) is None)
        if (backend, dtype) not in self._logged_backends and not torch.compiler.is_compiling():
            self._logged_backends.add((backend, dtype))
            logger.debug("moekit experts: backend %r for %s on %s", backend, dtype, self.device)
        return backend

    def explain_backend(self, x_TD: torch.Tensor, plan: DispatchPlan) -> str:
        """The whole choice for this call, in words: the backend (and the autocast dtype),
        and, where the backend has more than one path (fused: the one native call for
        decode-size inference), which one it takes and why not the other."""
        dtype = autocast_dtype(x_TD)
        backend = self.backend_for(dtype or x_TD.dtype)
        describe = getattr(BACKENDS[backend], "describe", None)
        if describe is None:
            words = backend
        elif dtype is None:
            words = describe(self._weights_for(x_TD, plan, backend), x_TD, plan)
        else:
            words = describe(_CastExperts(self, dtype), x_TD.to(dtype), plan)
        if dtype is None and holds_half_weights(self, x_TD.dtype):
            converted = ("read as they are (no float32 copy of the stacks)"
                         if self._weights_for(x_TD, plan, backend) is self
                         else "cast to float32 (a gradient to record, or not 'fused')")
            return f"{words}; {self.dtype} expert weights {converted}"
        return words if dtype is None else f"{words}; under autocast in {dtype}"

    def _weights_for(self, x_TD: torch.Tensor, plan: DispatchPlan, backend: str):
        """What the backend reads: these experts, or, for half-size weights where the backend
        cannot read them as they are (a gradient to record, or a backend other than "fused"),
        a view of them cast to x's dtype, differentiably."""
        if not holds_half_weights(self, x_TD.dtype):
            return self
        tensors = (x_TD, plan.weights_TK, *self.parameters())
        records_gradient = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in tensors)
        if backend == "fused" and not records_gradient:
            return self
        return _CastExperts(self, x_TD.dtype)

    def checked_counts(self, counts_E: torch.Tensor, num_rows: int) -> list[int]:
        """counts_E [E] as Python ints; ValueError unless E non-negative counts summing to num_rows."""
        counts = counts_E.tolist()
        if len(counts) != self.num_local_experts or min(counts, default=0) < 0 \
                or sum(counts) != num_rows:
            raise ValueError(f"counts_E must be {self.num_local_experts} non-negative counts "
                             f"summing to the {num_rows} rows; got {counts}")
        return counts

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """y_TD [T, D] in x's dtype; under torch.autocast in the autocast dtype, computed from
        x and the weights cast to it (differentiably), as nn.Linear does. float32 x with
        half-size weights (holds_half_weights): float32 y, see the module docstring."""
        dtype = autocast_dtype(x_TD)
        if dtype is None:
            backend = self.backend_for(x_TD.dtype)
            return BACKENDS[backend](self._weights_for(x_TD, plan, backend), x_TD, plan)
        with autocast_off(x_TD):  # the backend sees one dtype
            return BACKENDS[self.backend_for(dtype)](_CastExperts(self, dtype), x_TD.to(dtype), plan)


class _CastExperts:
    """What a backend reads of stacked experts, with the weights cast to ``dtype`` (autocast)."""

    def __init__(self, experts: Experts, dtype: torch.dtype) -> None:
        self.config, self.num_local_experts = experts.config, experts.num_local_experts
        self.training = experts.training
        self.dtype, self.device, self.checked_counts = dtype, experts.device, experts.checked_counts
        self.first_proj, self.down_proj, self.first_proj_bias, self.down_proj_bias = (
            None if w is None else w.to(dtype) for w in (
                experts.first_proj, experts.down_proj, experts.first_proj_bias,
                experts.down_proj_bias))
