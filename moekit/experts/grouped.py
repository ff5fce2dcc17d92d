"""The "grouped_mm" backend: a safe wrapper around ``torch.nn.functional.grouped_mm``.

It hides the operator's traps (torch 2.13, CPU): offsets must be int32; sizes
must be 16-byte aligned; rows past the last offset are left uninitialised in
the output and the input gradient; an expanded (stride-0) upstream gradient
crashes its backward; float64 is unsupported; under torch.compile only
bfloat16 traces (its meta function rejects other dtypes). ``grouped_mm_supports`` says when
the operator can be used at all; ``grouped_matmul`` makes the rest safe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moekit.contract import DispatchPlan
from moekit.experts.rows import rows_ffn
from moekit.func_transforms import active_func_transforms

_INT32_MAX = 2**31 - 1
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_supports(device: torch.device, dtype: torch.dtype, *sizes: int) -> bool:
    """True when grouped_mm runs this device and dtype and every size is 16-byte aligned.

    CPU: float32/bfloat16/float16. CUDA: the same from compute capability 8.0
    (a fast kernel for bfloat16 from 9.0, a fallback otherwise). Elsewhere: no.
    """
    if not hasattr(F, "grouped_mm") or dtype not in _SUPPORTED_DTYPES:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 0):
            return False
    elif device.type != "cpu":
        return False
    if torch.compiler.is_compiling() and dtype != torch.bfloat16:
        return False
    multiple = 16 // torch.empty((), dtype=dtype).element_size()
    return all(size % multiple == 0 for size in sizes)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (in the setup_context
    form, which torch.func.grad needs)."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def grouped_matmul(x_RI: torch.Tensor, w_EOI: torch.Tensor,
                   counts_E: list[int] | torch.Tensor) -> torch.Tensor:
    """y_RO where rows of expert e are x_RI[rows of e] @ w_EOI[e].T, via grouped_mm.

    counts_E: rows per expert as Python ints summing to at most R. Rows past
    the last group never reach the operator: they are 0 in the output and get 0
    gradient. Same contract as ``loop_matmul``; check ``grouped_mm_supports``
    first. Or the [E] int64 tensor of counts summing to exactly R (unchecked: nothing
    is read on the host, so torch.compile traces it whole).
    """
    if isinstance(counts_E, torch.Tensor):
        offsets_E = counts_E.cumsum(0).to(torch.int32)
        return _ContiguousGrad.apply(F.grouped_mm(x_RI, w_EOI.transpose(-2, -1), offs=offsets_E))
    total = sum(counts_E)
    if total > _INT32_MAX:
        raise ValueError(f"grouped_mm offsets are int32; {total} rows exceed {_INT32_MAX}")
    if total > x_RI.shape[0]:
        raise ValueError(f"counts_E sum to {total} rows but x_RI has {x_RI.shape[0]}")
    out_features = w_EOI.shape[1]
    if total == 0:
        # An exact 0 (a sum over nothing) keeps the output in the graph of both
        # inputs, so their gradients exist (as zeros) even with no rows.
        nothing = w_EOI.reshape(-1)[:0].sum() + x_RI.reshape(-1)[:0].sum()
        return x_RI.new_zeros(x_RI.shape[0], out_features) + nothing
    offsets_E = torch.tensor(counts_E, dtype=torch.int64).cumsum(0).to(torch.int32)
    y = F.grouped_mm(x_RI[:total], w_EOI.transpose(-2, -1), offs=offsets_E.to(x_RI.device))
    y = _ContiguousGrad.apply(y)
    tail = x_RI.shape[0] - total
    if tail:
        y = torch.cat([y, y.new_zeros(tail, out_features)], dim=0)
    return y


class GroupedMMBackend:
    """Row backend over grouped_matmul (the GPU path; on CPU a loop of matmuls)."""

    def unsupported(self, experts, dtype: torch.dtype) -> str | None:
        device = experts.device
        sizes = (experts.config.dim, experts.first_proj.shape[1], experts.config.expert_dim)
        if "jvp" in active_func_transforms():
            return ("experts_backend='grouped_mm' does not run under torch.func.jvp (torch's "
                    "grouped_mm has no forward-mode derivative); use experts_backend='auto' or 'loop'")
        if grouped_mm_supports(device, dtype, *sizes):
            return None
        return (f"experts_backend='grouped_mm' cannot run dtype {dtype} on {device} with sizes "
                f"{sizes}: it needs float32/bfloat16/float16 on CPU or CUDA (capability >= 8.0) "
                "and sizes that are multiples of 16 bytes; use experts_backend='auto' or 'loop'")

    def __call__(self, experts, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        # traced by torch.compile: counts stay a tensor, no graph break
        return rows_ffn(experts, x_TD, plan, grouped_matmul,
                        counts_on_device=torch.compiler.is_compiling())
