"""Expert activations. Gated ones read h = [gate | up] along the last dim.

swiglu: silu(gate) * up (Shazeer 2020); geglu: gelu(gate) * up (exact erf gelu);
gelu, relu, silu: act(up) on a single up projection.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

_ELEMENTWISE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "swiglu": F.silu, "geglu": F.gelu, "gelu": F.gelu, "relu": F.relu, "silu": F.silu,
}
GATED = frozenset({"swiglu", "geglu"})


def apply_activation(h: torch.Tensor, name: str) -> torch.Tensor:
    """[..., 2F] -> [..., F] for gated activations, [..., F] -> [..., F] otherwise."""
    if name in GATED:
        gate, up = h.chunk(2, dim=-1)
        return gated_activation(gate, up, name)
    return _ELEMENTWISE[name](h)


def gated_activation(gate: torch.Tensor, up: torch.Tensor, name: str) -> torch.Tensor:
    """act(gate) * up for a gated activation name; shapes [..., F]."""
    return _ELEMENTWISE[name](gate) * up
