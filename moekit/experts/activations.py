"""Expert activations: the one table every implementation is derived from.

An activation is plain, act(h) on a single up projection h [..., F], or gated, act(gate) * up
on h = [gate | up] [..., 2F]; act is one of three elementwise functions:
swiglu = silu(gate) * up (Shazeer 2020), geglu = gelu(gate) * up (exact erf gelu),
gelu, relu, silu = act(h).

The torch functions below, the native kernel's codes (passed to the C compiler as
-DMOEKIT_ACT_<NAME>=<code>, moekit/experts/cpu/build.py) and the Triton kernels' codes
(moekit/experts/triton/kernels.py) all come from ACTIVATIONS and ELEMENTWISE_CODES;
tests/experts/test_activations.py checks that every implementation computes the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Activation(NamedTuple):
    gated: bool
    elementwise: str  # a key of ELEMENTWISE_FUNCTIONS


ACTIVATIONS: dict[str, Activation] = {
    "swiglu": Activation(True, "silu"), "geglu": Activation(True, "gelu"),
    "gelu": Activation(False, "gelu"), "relu": Activation(False, "relu"),
    "silu": Activation(False, "silu"),
}
ELEMENTWISE_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "gelu": F.gelu, "relu": F.relu,
}
# What the native and Triton kernels switch on.
ELEMENTWISE_CODES: dict[str, int] = {"silu": 0, "gelu": 1, "relu": 2}
GATED = frozenset(name for name, activation in ACTIVATIONS.items() if activation.gated)


def kernel_codes(name: str) -> tuple[bool, int]:
    """(gated, elementwise code) of an activation, as the kernels take it."""
    activation = ACTIVATIONS[name]
    return activation.gated, ELEMENTWISE_CODES[activation.elementwise]


def apply_activation(h: torch.Tensor, name: str) -> torch.Tensor:
    """[..., 2F] -> [..., F] for gated activations, [..., F] -> [..., F] otherwise.
    Differentiable."""
    if name in GATED:
        gate, up = h.chunk(2, dim=-1)
        return gated_activation(gate, up, name)
    return ELEMENTWISE_FUNCTIONS[ACTIVATIONS[name].elementwise](h)


def gated_activation(gate: torch.Tensor, up: torch.Tensor, name: str) -> torch.Tensor:
    """act(gate) * up for a gated activation name; shapes [..., F]."""
    return ELEMENTWISE_FUNCTIONS[ACTIVATIONS[name].elementwise](gate) * up


def activate_no_grad(h: torch.Tensor, name: str) -> torch.Tensor:
    """apply_activation for the inside of a hand-written forward (not differentiable): SwiGLU
    multiplies in place instead of allocating a second [..., F] buffer."""
    if name == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)
    return apply_activation(h, name)


def activation_backward(h: torch.Tensor, grad_a: torch.Tensor, name: str
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(h), dL/dh) for a pre-activation h and the gradient grad_a of act(h). SwiGLU by hand
    (no concatenation); the others through a local autograd call."""
    if name == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_h = torch.empty_like(h)
        grad_gate, grad_up = grad_h.chunk(2, dim=-1)
        torch.mul(grad_a, silu, out=grad_up)
        # d silu / d gate = sig * (1 + gate * (1 - sig))
        torch.mul(grad_a * up, sig * (1 + gate * (1 - sig)), out=grad_gate)
        return silu.mul_(up), grad_h
    h = h.detach().requires_grad_()
    with torch.enable_grad():
        a = apply_activation(h, name)
    (grad_h,) = torch.autograd.grad(a, h, grad_a)
    return a.detach(), grad_h
