"""Expert activations: the one table every implementation is derived from.

An activation is plain, act(h) on a single up projection h [..., F], or gated, act(gate) * up
on h = [gate | up] [..., 2F]; act is one of three elementwise functions:
swiglu = silu(gate) * up (Shazeer 2020), geglu = gelu(gate) * up (exact erf gelu),
gelu, relu, silu = act(h).
clamped_swiglu (GPT-OSS) is gated with clamps and two parameters (ActivationParams: alpha,
limit; MoEConfig.swiglu_alpha, swiglu_limit): g = min(gate, limit), u = clamp(up, -limit, limit),
out = (u + 1) * g * sigmoid(alpha * g); where a clamp is active its input gets zero gradient.
It has no kernel code: the native decode kernel and the Triton kernels do not run it.

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
    clamped: bool = False  # the clamped form above (gated, silu-like, with ActivationParams)


class ActivationParams(NamedTuple):
    """The parameters of clamped_swiglu (ignored by the others): alpha scales the gate inside
    the sigmoid, limit bounds gate (above) and up (both sides). Defaults: GPT-OSS's."""

    alpha: float = 1.702
    limit: float = 7.0


DEFAULT_PARAMS = ActivationParams()

ACTIVATIONS: dict[str, Activation] = {
    "swiglu": Activation(True, "silu"), "geglu": Activation(True, "gelu"),
    "gelu": Activation(False, "gelu"), "relu": Activation(False, "relu"),
    "silu": Activation(False, "silu"), "clamped_swiglu": Activation(True, "silu", clamped=True),
}
ELEMENTWISE_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "gelu": F.gelu, "relu": F.relu,
}
# What the native and Triton kernels switch on.
ELEMENTWISE_CODES: dict[str, int] = {"silu": 0, "gelu": 1, "relu": 2}
GATED = frozenset(name for name, activation in ACTIVATIONS.items() if activation.gated)
# Activations the native and Triton kernels compute (the others run in torch only).
KERNEL_ACTIVATIONS = frozenset(name for name, activation in ACTIVATIONS.items()
                               if not activation.clamped)


def kernel_codes(name: str) -> tuple[bool, int]:
    """(gated, elementwise code) of an activation, as the kernels take it; ValueError for one
    the kernels do not compute (not in KERNEL_ACTIVATIONS)."""
    if name not in KERNEL_ACTIVATIONS:
        raise ValueError(f"activation {name!r} has no kernel code; the kernels compute "
                         f"{', '.join(sorted(KERNEL_ACTIVATIONS))}")
    activation = ACTIVATIONS[name]
    return activation.gated, ELEMENTWISE_CODES[activation.elementwise]


def apply_activation(h: torch.Tensor, name: str,
                     params: ActivationParams = DEFAULT_PARAMS) -> torch.Tensor:
    """[..., 2F] -> [..., F] for gated activations, [..., F] -> [..., F] otherwise.
    params: clamped_swiglu's alpha and limit. Differentiable."""
    if name in GATED:
        gate, up = h.chunk(2, dim=-1)
        return gated_activation(gate, up, name, params)
    return ELEMENTWISE_FUNCTIONS[ACTIVATIONS[name].elementwise](h)


def gated_activation(gate: torch.Tensor, up: torch.Tensor, name: str,
                     params: ActivationParams = DEFAULT_PARAMS) -> torch.Tensor:
    """act(gate) * up for a gated activation name (clamped_swiglu: see the module docstring);
    shapes [..., F]."""
    if ACTIVATIONS[name].clamped:
        return clamped_swiglu(gate, up, params)
    return ELEMENTWISE_FUNCTIONS[ACTIVATIONS[name].elementwise](gate) * up


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, params: ActivationParams) -> torch.Tensor:
    """(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit); [..., F].
    The clamps pass no gradient where they are active (GPT-OSS's SwiGLU)."""
    gate = gate.clamp(max=params.limit)
    up = up.clamp(-params.limit, params.limit)
    return (up + 1) * (gate * torch.sigmoid(gate * params.alpha))


def activate_no_grad(h: torch.Tensor, name: str,
                     params: ActivationParams = DEFAULT_PARAMS) -> torch.Tensor:
    """apply_activation for the inside of a hand-written forward (not differentiable): SwiGLU
    multiplies in place instead of allocating a second [..., F] buffer."""
    if name == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)
    return apply_activation(h, name, params)


def activation_backward(h: torch.Tensor, grad_a: torch.Tensor, name: str,
                        params: ActivationParams = DEFAULT_PARAMS
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(h), dL/dh) for a pre-activation h and the gradient grad_a of act(h). SwiGLU and
    clamped_swiglu by hand (no concatenation); the others through a local autograd call."""
    if name == "clamped_swiglu":
        return _clamped_swiglu_backward(h, grad_a, params)
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
        a = apply_activation(h, name, params)
    (grad_h,) = torch.autograd.grad(a, h, grad_a)
    return a.detach(), grad_h


def _clamped_swiglu_backward(h: torch.Tensor, grad_a: torch.Tensor, params: ActivationParams
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """activation_backward of clamped_swiglu: with g, u the clamped gate and up and
    s = sigmoid(alpha * g), d/du = g * s and d/dg = (u + 1) * s * (1 + alpha * g * (1 - s)),
    each zero where its clamp is active (beyond the limit; at it the gradient passes, as
    torch.clamp's does). The activation equals clamped_swiglu's bit for bit."""
    gate, up = h.chunk(2, dim=-1)
    limit, alpha = params.limit, params.alpha
    g, u_plus_1 = gate.clamp(max=limit), up.clamp(-limit, limit) + 1
    sig = torch.sigmoid(g * alpha)
    glu = g * sig
    grad_h = torch.empty_like(h)
    grad_gate, grad_up = grad_h.chunk(2, dim=-1)
    torch.mul(grad_a, glu, out=grad_up)
    grad_up.masked_fill_(up.abs() > limit, 0)
    torch.mul(grad_a * u_plus_1, sig * (1 + alpha * g * (1 - sig)), out=grad_gate)
    grad_gate.masked_fill_(gate > limit, 0)
    return glu.mul_(u_plus_1), grad_h
