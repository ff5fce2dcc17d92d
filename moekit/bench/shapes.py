"""The benchmark shapes: tokens, dims, experts and top-k of each ``moekit bench`` case."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
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
