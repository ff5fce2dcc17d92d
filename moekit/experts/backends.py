"""The registry of expert backends: how stacked experts compute ``experts(x_TD, plan)``.

A backend is an object with two methods, and optionally a third:

    unsupported(experts, dtype) -> str | None   why it cannot run these experts (an
                                                moekit.experts.Experts) on inputs of this
                                                dtype, or None when it can
    __call__(experts, x_TD, plan) -> y_TD       the contract of moekit.contract
    describe(experts, x_TD, plan) -> str        which path it takes for this call, and why

A backend reads the experts' config for what the FFN is: ``activation`` with
``activation_params`` (clamped_swiglu's alpha and limit) and ``combine_weights_on`` ("input":
each row is weighted before the first product, FFN(w * x)); one that cannot compute an option
says so in ``unsupported``, never computes something else.

Adding one is one new file plus one line, ``register_backend("name", Backend())``; then
``MoEConfig(experts_backend="name")`` selects it. "auto" takes the first of AUTO_ORDER that
supports the device and dtype.
"""

from __future__ import annotations

from typing import Protocol

import torch

from moekit.contract import DispatchPlan
from moekit.experts.cpu.backend import FusedBackend
from moekit.experts.grouped import GroupedMMBackend
from moekit.experts.loop import LoopBackend
from moekit.experts.triton import TritonBackend


class ExpertsBackend(Protocol):
    def unsupported(self, experts, dtype: torch.dtype) -> str | None: ...

    def __call__(self, experts, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor: ...


BACKENDS: dict[str, ExpertsBackend] = {}
# Triton is not in "auto": its kernels have passed their tests only under the CPU interpreter,
# never on a GPU; it stays an explicit experts_backend="triton" until they have.
AUTO_ORDER = ("fused", "grouped_mm", "loop")


def register_backend(name: str, backend: ExpertsBackend) -> None:
    """Make ``backend`` selectable as experts_backend=name."""
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"a backend name must be a non-empty string other than 'auto', got {name!r}")
    if not callable(backend) or not callable(getattr(backend, "unsupported", None)):
        raise TypeError(f"backend {name!r} must be callable and have an unsupported(experts, dtype) "
                        f"method, got {type(backend).__name__}")
    BACKENDS[name] = backend


def backend_names() -> tuple[str, ...]:
    """The values experts_backend accepts: "auto" and every registered backend."""
    return ("auto", *BACKENDS)


register_backend("fused", FusedBackend())
register_backend("triton", TritonBackend())
register_backend("grouped_mm", GroupedMMBackend())
register_backend("loop", LoopBackend())
