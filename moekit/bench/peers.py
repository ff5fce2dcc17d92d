"""The rows a limit is compared with: moekit's own variants (capacity, backends, bf16,
torch.compile) and its peers (a naive per-expert loop, transformers' Mixtral block),
all with the same weights and routing. T tokens, D model dim.
"""

from __future__ import annotations

import copy

import torch

import moekit
from moekit.bench.harness import Row, bf16_matmul_note
from moekit.bench.limits import swiglu_chain
from moekit.bench.shapes import SHAPES, Shape
from moekit.experts.cpu.isa import cpu_isa

DECODE_TOKENS = 64  # at most this many tokens: a decode-size shape (S3)


def half_weight_layers(seed: int) -> dict[str, tuple[moekit.MoE, torch.dtype]]:
    """S3 layers in eval mode with one set of weights, name -> (layer, x's dtype): "float32";
    "bfloat16 expert weights" and "float16 expert weights" (only the experts cast: float32 x
    and y; docs/inference.md); "bfloat16 layer" (the whole layer cast, bfloat16 x and y)."""
    shape = SHAPES["S3"]
    torch.manual_seed(seed)
    config = moekit.MoEConfig(dim=shape.dim, expert_dim=shape.expert_dim,
                              num_experts=shape.num_experts, top_k=shape.top_k)
    base = moekit.MoE(config).eval()
    layers = {"float32": (base, torch.float32)}
    for name, dtype in (("bfloat16 expert weights", torch.bfloat16),
                        ("float16 expert weights", torch.float16)):
        layer = copy.deepcopy(base)
        layer.experts.to(dtype)
        layers[name] = (layer, torch.float32)
    layers["bfloat16 layer"] = (copy.deepcopy(base).to(torch.bfloat16), torch.bfloat16)
    return layers


def timed_module(name: str, module: torch.nn.Module, x: torch.Tensor, note: str = "",
                 limit_dtype: torch.dtype = torch.float32) -> Row:
    """A row that runs module on x: forward under no_grad, and forward+backward of a
    fixed random upstream gradient."""
    grad = torch.randn_like(x)
    x_grad = x.detach().clone().requires_grad_()
    params = list(module.parameters())

    def output(out):
        return out[0] if isinstance(out, tuple) else out

    def forward():
        with torch.no_grad():
            return module(x)

    def release():
        for p in params:
            p.grad = None
        x_grad.grad = None

    def forward_backward():
        release()
        output(module(x_grad)).backward(grad)

    return Row(name, forward, forward_backward, release, note, limit_dtype)


class NaiveLoopMoE(torch.nn.Module):
    """Peer: softmax top-k, then a Python loop over experts indexing w[e]."""

    def __init__(self, moe: moekit.MoE) -> None:
        super().__init__()
        self.top_k = moe.config.top_k
        self.router = torch.nn.Parameter(moe.router.weight.detach().clone())
        self.gate_up_proj = torch.nn.Parameter(moe.experts.gate_up_proj.detach().clone())
        self.down_proj = torch.nn.Parameter(moe.experts.down_proj.detach().clone())

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        weights, ids = (x_TD @ self.router.t()).softmax(-1).topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        y = torch.zeros_like(x_TD)
        for e in range(self.gate_up_proj.shape[0]):
            token, slot = torch.where(ids == e)
            if token.numel():
                out = swiglu_chain(x_TD[token], self.gate_up_proj[e], self.down_proj[e])
                y.index_add_(0, token, out * weights[token, slot, None])
        return y


def hf_rows(moe: moekit.MoE, x: torch.Tensor) -> list[Row]:
    """transformers' Mixtral block with moe's weights, eager and grouped_mm experts
    (no rows if transformers is not installed)."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return []
    c = moe.config
    rows = []
    for implementation in ("eager", "grouped_mm"):
        config = MixtralConfig(hidden_size=c.dim, intermediate_size=c.expert_dim,
                               num_local_experts=c.num_experts, num_experts_per_tok=c.top_k,
                               experts_implementation=implementation)
        block = MixtralSparseMoeBlock(config)
        with torch.no_grad():
            block.gate.weight.copy_(moe.router.weight)
            block.experts.gate_up_proj.copy_(moe.experts.gate_up_proj)
            block.experts.down_proj.copy_(moe.experts.down_proj)
        rows.append(timed_module(f"transformers Mixtral block, {implementation}", block,
                                  x.unsqueeze(0)))
    return rows


def candidate_rows(shape: Shape, compile_rows: bool) -> tuple[list[Row], moekit.MoE, torch.Tensor]:
    """moekit's rows and its peers' for shape -> (rows, the dropless layer, its input x_TD)."""
    torch.manual_seed(0)
    base = dict(dim=shape.dim, expert_dim=shape.expert_dim, num_experts=shape.num_experts,
                top_k=shape.top_k)
    moe = moekit.MoE(moekit.MoEConfig(**base))
    x = torch.randn(shape.tokens, shape.dim)
    rows = [timed_module("moekit dropless", moe, x, f"backend {moe.experts.backend_for(x.dtype)}")]

    def variant(dtype=torch.float32, **fields) -> moekit.MoE:
        other = moekit.MoE(moekit.MoEConfig(**(base | fields)))
        other.load_state_dict(moe.state_dict())
        return other.to(dtype)

    rows.append(timed_module("moekit capacity 1.25", variant(capacity_factor=1.25), x))
    rows.append(timed_module("moekit grouped_mm backend", variant(experts_backend="grouped_mm"), x))
    # On a CPU with native bf16 the bf16 row is held to a bf16 limit (tables.py adds its rows);
    # where bf16 is emulated, to the float32 one, the speed it would have to reach.
    native = bool(cpu_isa().native_bf16)
    rows.append(timed_module("moekit bf16", variant(torch.bfloat16), x.bfloat16(),
                              bf16_matmul_note() + ("; vs the bf16 limit" if native else ""),
                              torch.bfloat16 if native else torch.float32))
    if shape.tokens <= DECODE_TOKENS:
        for dtype in (torch.bfloat16, torch.float16):
            half = variant()
            half.experts.to(dtype)
            rows.append(timed_module(f"moekit {str(dtype).removeprefix('torch.')} expert weights",
                                     half, x, "float32 x and y; goal: at most 0.6x moekit "
                                     "dropless forward"))
    if compile_rows:
        rows.append(timed_module("moekit torch.compile", torch.compile(variant()), x))
    rows.append(timed_module("naive per-expert loop", NaiveLoopMoE(moe), x))
    rows.extend(hf_rows(moe, x))
    return rows, moe, x
