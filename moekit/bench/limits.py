"""What a layer cannot beat: the active-FLOPs limit rows, and for decode sizes the
weight-streaming bound (read each weight the tokens touch once). T tokens, D model
dim, k experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import moekit
from moekit.bench.harness import Row
from moekit.bench.shapes import Shape


def swiglu_chain(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, w1).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def limit_rows(shape: Shape, dtype: torch.dtype = torch.float32) -> list[Row]:
    """The active FLOPs alone: one chain, and E equal chunks, through one expert, in dtype
    (rows of another dtype than float32 are named for it)."""
    torch.manual_seed(0)
    rows_count = shape.tokens * shape.top_k
    x = torch.randn(rows_count, shape.dim).to(dtype)
    w1 = (torch.randn(2 * shape.expert_dim, shape.dim) * 0.02).to(dtype).requires_grad_()
    w2 = (torch.randn(shape.dim, shape.expert_dim) * 0.02).to(dtype).requires_grad_()
    x_grad = x.clone().requires_grad_()
    grad = torch.randn(rows_count, shape.dim).to(dtype)
    suffix = "" if dtype == torch.float32 else f", {str(dtype).removeprefix('torch.')}"

    def release():
        for w in (w1, w2, x_grad):
            w.grad = None

    def run(chunks: int, backward: bool):
        release()
        source = x_grad if backward else x
        for part, g in zip(source.chunk(chunks), grad.chunk(chunks)):
            if backward:
                swiglu_chain(part, w1, w2).backward(g)
            else:
                with torch.no_grad():
                    swiglu_chain(part, w1, w2)

    return [Row(f"limit: one chain{suffix}", lambda: run(1, False), lambda: run(1, True), release,
                limit_dtype=dtype),
            Row(f"limit: {shape.num_experts} chunks{suffix}", lambda: run(shape.num_experts, False),
                lambda: run(shape.num_experts, True), release, limit_dtype=dtype)]


def touched_weights(moe: moekit.MoE, x: torch.Tensor) -> list[torch.Tensor]:
    """The weights a forward of x must read: the router's, and the first (gate/up) and
    down matrices of every expert a token is routed to, as few slices [n, ...] of the
    expert stacks as the runs of consecutive touched experts allow."""
    with torch.no_grad():
        _, aux = moe(x)
    touched = (aux.tokens_per_expert > 0).tolist()
    slices = [moe.router.weight.detach()]
    start = None
    for expert, used in enumerate(touched + [False]):
        if used and start is None:
            start = expert
        elif not used and start is not None:
            slices += [moe.experts.first_proj.detach()[start:expert],
                       moe.experts.down_proj.detach()[start:expert]]
            start = None
    return slices


def streaming_row(moe: moekit.MoE, x: torch.Tensor) -> tuple[Row, int]:
    """The weight-streaming bound as a row: read each touched weight once (a sum).
    Returns the row and the bytes it reads."""
    weights = touched_weights(moe, x)

    def forward():
        with torch.no_grad():
            return [w.sum() for w in weights]

    nbytes = sum(w.numel() * w.element_size() for w in weights)
    return Row("bound: read the touched weights once (sum)", forward, None, lambda: None,
               f"{nbytes / 2**20:.0f} MiB"), nbytes
