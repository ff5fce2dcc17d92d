"""Fused Triton kernels for the routed experts (optional extra: pip install 'moekit[triton]').

Importing this package needs only torch; the kernels load on first use:
``sort_by_expert`` (routing metadata on the device), ``triton_experts`` (the
expert FFN on rows grouped by expert, forward and backward) and ``fused_moe``
(both, from expert ids and combine weights). Kernels run on CUDA, or on CPU
under the Triton interpreter (TRITON_INTERPRET=1, slow: for tests).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from moekit.experts.activations import KERNEL_ACTIVATIONS
from moekit.experts.rows import expert_dropout_refusal
from moekit.func_transforms import active_func_transforms

_NAMES = ("ExpertSort", "fused_moe", "sort_by_expert", "triton_experts")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_installed() -> bool:
    """True when the triton package can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_runs_on(device: torch.device) -> bool:
    """True when the kernels can run on this device: CUDA with triton installed,
    or CPU under the Triton interpreter (TRITON_INTERPRET=1)."""
    if not triton_installed():
        return False
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


class TritonBackend:
    """The "triton" backend: the fused kernels on the plan's sort (no host round trip)."""

    def unsupported(self, experts, dtype: torch.dtype) -> str | None:
        if not triton_installed():
            return "experts_backend='triton' needs Triton: pip install 'moekit[triton]'"
        if not triton_runs_on(experts.device):
            return (f"experts_backend='triton' runs on CUDA, not {experts.device} (on CPU only "
                    "under the Triton interpreter, TRITON_INTERPRET=1, for tests)")
        if experts.config.bias:
            return "experts_backend='triton' does not support bias=True; use experts_backend='auto'"
        if experts.config.activation not in KERNEL_ACTIVATIONS:
            return (f"experts_backend='triton' does not compute "
                    f"activation={experts.config.activation!r}; use experts_backend='auto'")
        if experts.config.combine_weights_on != "output":
            return (f"experts_backend='triton' applies the combine weights to the expert output "
                    f"only, not combine_weights_on={experts.config.combine_weights_on!r}; use "
                    "experts_backend='auto'")
        if dtype not in _DTYPES:
            return f"experts_backend='triton' runs float32/bfloat16/float16, not {dtype}"
        if active_func_transforms():
            return ("experts_backend='triton' does not run under torch.func transforms; use "
                    "experts_backend='auto' or 'loop'")
        return expert_dropout_refusal(experts, "triton")

    def __call__(self, experts, x_TD: torch.Tensor, plan) -> torch.Tensor:
        from moekit.experts.triton.ops import expert_offsets, triton_experts
        counts_E = plan.counts_E
        if counts_E.shape != (experts.num_local_experts,):  # no value check: that would sync
            raise ValueError(f"counts_E must have shape ({experts.num_local_experts},), "
                             f"got {tuple(counts_E.shape)}")
        return triton_experts(x_TD, plan.order_R, plan.top_k, plan.weights_R,
                              expert_offsets(counts_E), experts.first_proj, experts.down_proj,
                              experts.config.activation)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not triton_installed():
        raise ImportError(f"moekit.experts.triton.{name} needs Triton: "
                          "pip install 'moekit[triton]' (or pip install triton)")
    from moekit.experts.triton import ops
    return getattr(ops, name)


__all__ = [*_NAMES, "TritonBackend", "triton_installed", "triton_runs_on"]
