"""The benchmark shapes: tokens, dims, experts and top-k of each ``moekit bench`` case."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """One benchmark case: T tokens of width D through E SwiGLU experts of hidden width F, top-k."""

    name: str
    tokens: int
    dim: int
    expert_dim: int
    num_experts: int
    top_k: int


SHAPES = {
    "S1": Shape("Mixtral-like", 4096, 1024, 896, 8, 2),
    "S2": Shape("fine-grained", 4096, 1024, 256, 64, 8),
    "S3": Shape("decode", 16, 1024, 896, 8, 2),
}


def parse_shape(text: str) -> Shape:
    """A shape from "T,D,F,E,K" (tokens, dim, expert_dim, num_experts, top_k), named
    "custom": the type of a --dims flag, for a quick run at any size."""
    try:
        tokens, dim, expert_dim, num_experts, top_k = (int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"a shape is five integers T,D,F,E,K, got {text!r}") from None
    if min(tokens, dim, expert_dim, num_experts, top_k) < 1 or top_k > num_experts:
        raise ValueError(f"a shape needs T, D, F, E, K >= 1 and K <= E, got {text!r}")
    return Shape("custom", tokens, dim, expert_dim, num_experts, top_k)
