"""MoE experts on an NVIDIA GPU: TFLOP/s of moekit's Triton kernels and of torch grouped_mm.

Run: python benchmarks/gpu_moe.py [--shapes S1 S2 mixtral deepseek] [--repeats N] [--no-tests]

First runs the Triton kernel tests on the GPU (pytest tests/experts/triton,
skipped with --no-tests), then, per shape (SwiGLU experts, bfloat16, random
router logits, top-k softmax weights), times every row forward and
forward+backward (upstream gradient random, gradients dropped after each call) with
CUDA events, after warm-up, interleaved round-robin over --repeats rounds;
the table gives the median. TFLOP/s counts the active FLOPs only,
6 * T * k * D * F forward and three times that forward+backward. Ratios, in the
same run: "vs dense" = TFLOP/s / that of the dense row (one bf16 SwiGLU chain
over all T*k rows through one expert's weights: the same FLOPs as one matmul
chain); "vs grouped_mm" = TFLOP/s / that of the torch grouped_mm row.
Rows:
  dense matmul chain:  the active FLOPs as one dense chain (the reference);
  torch grouped_mm:    gather rows, grouped_mm, SwiGLU, grouped_mm, weighted index_add;
  moekit triton_experts: the fused kernels on the same sorted rows;
  moekit fused_moe:    the same plus the on-device counting sort of the expert ids;
  moekit MoE, triton / grouped_mm backend: the whole layer (router, dispatch, combine).
Exits with a message, measuring nothing, when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import moekit
from moekit.bench import SHAPES as CPU_SHAPES
from moekit.bench import Row, Shape, parse_shape
from moekit.experts.triton import triton_installed

SHAPES = {
    "S1": CPU_SHAPES["S1"],
    "S2": CPU_SHAPES["S2"],
    "mixtral": Shape("Mixtral-8x7B layer", 16384, 4096, 14336, 8, 2),
    "deepseek": Shape("DeepSeek-V3-like", 8192, 7168, 2048, 256, 8),
}
NO_GPU = ("benchmarks/gpu_moe.py needs an NVIDIA GPU (torch.cuda.is_available() is False); "
          "nothing was measured")


class Problem:
    """Weights, tokens, routing and upstream gradient of one shape, shared by every row."""

    def __init__(self, shape: Shape, device: torch.device, dtype: torch.dtype) -> None:
        torch.manual_seed(0)
        T, D, F_, E, K = (shape.tokens, shape.dim, shape.expert_dim, shape.num_experts,
                          shape.top_k)
        self.shape = shape

        def leaf(*size: int, scale: float = 1.0) -> torch.Tensor:
            return (torch.randn(*size, device=device) * scale).to(dtype).requires_grad_()

        self.x = leaf(T, D)
        self.grad = torch.randn(T, D, device=device).to(dtype)
        self.w1 = leaf(E, 2 * F_, D, scale=D ** -0.5)
        self.w2 = leaf(E, D, F_, scale=F_ ** -0.5)
        logits = torch.randn(T, E, device=device)
        weights, self.ids = logits.softmax(-1).topk(K, dim=-1)
        self.weights = weights / weights.sum(-1, keepdim=True)
        self.order = torch.argsort(self.ids.reshape(-1), stable=True)
        self.token = self.order // K
        self.weights_R = self.weights.reshape(-1)[self.order]
        counts = torch.zeros(E, dtype=torch.int64, device=device)
        counts.scatter_add_(0, self.ids.reshape(-1), torch.ones_like(self.order))
        self.offsets = torch.zeros(E + 1, dtype=torch.int64, device=device)
        self.offsets[1:] = counts.cumsum(0)

    @property
    def flops(self) -> float:
        s = self.shape
        return 6.0 * s.tokens * s.top_k * s.dim * s.expert_dim


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def grouped_mm_experts(p: Problem, x, w1, w2) -> torch.Tensor:
    """The experts as a user of torch.nn.functional.grouped_mm writes them."""
    offs = p.offsets[1:].to(torch.int32)
    rows = x.index_select(0, p.token)
    h = F.grouped_mm(rows, w1.transpose(-2, -1), offs=offs)
    out = F.grouped_mm(_swiglu(h), w2.transpose(-2, -1), offs=offs)
    out = out * p.weights_R[:, None].to(out.dtype)
    return torch.zeros_like(x).index_add_(0, p.token, out)


def _row(name: str, fn: Callable, inputs: list[torch.Tensor], grad: torch.Tensor,
         note: str = "", params: tuple[torch.Tensor, ...] = ()) -> Row:
    """A Row timing fn(*inputs) forward under no_grad, and forward+backward; the
    gradients of inputs and params are dropped after each call, so the rows'
    weight gradients (22 GiB each for the DeepSeek-like shape) never coexist."""

    def forward():
        with torch.no_grad():
            return fn(*inputs)

    def release():
        for t in (*inputs, *params):
            t.grad = None

    def forward_backward():
        fn(*inputs).backward(grad)
        release()

    return Row(name, forward, forward_backward, release, note)


def _layer(p: Problem, backend: str) -> moekit.MoE:
    """An MoE layer whose expert weights share p's storage (no copy of large weights)."""
    s = p.shape
    with torch.device("meta"):
        moe = moekit.MoE(moekit.MoEConfig(dim=s.dim, expert_dim=s.expert_dim,
                                          num_experts=s.num_experts, top_k=s.top_k,
                                          experts_backend=backend))
    moe.experts.gate_up_proj = torch.nn.Parameter(p.w1.detach())
    moe.experts.down_proj = torch.nn.Parameter(p.w2.detach())
    moe.router.weight = torch.nn.Parameter(
        (torch.randn(s.num_experts, s.dim, device=p.x.device) * s.dim ** -0.5).to(p.x.dtype))
    assert not any(t.is_meta for t in (*moe.parameters(), *moe.buffers()))
    return moe


def build_rows(p: Problem) -> tuple[list[Row], str]:
    """The rows to time, and a note on how far the Triton output is from grouped_mm's."""
    s = p.shape
    # T*k rows through one expert's weights: the same FLOPs as one dense chain
    dense = [t.detach().clone().requires_grad_() for t in (p.x.index_select(0, p.token),
                                                             p.w1[0], p.w2[0])]
    rows = [_row("dense matmul chain", lambda x, w1, w2: _swiglu(x @ w1.t()) @ w2.t(),
                 dense, torch.randn_like(dense[0])),
            _row("torch grouped_mm", lambda x, w1, w2: grouped_mm_experts(p, x, w1, w2),
                 [p.x, p.w1, p.w2], p.grad)]
    if not triton_installed():
        return rows, "Triton not installed: Triton rows skipped (pip install 'moekit[triton]')"
    from moekit.experts.triton import fused_moe, triton_experts

    def experts(x, w1, w2):
        return triton_experts(x, p.order, s.top_k, p.weights_R, p.offsets, w1, w2, "swiglu")

    def fused(x, w1, w2):
        return fused_moe(x, p.ids, p.weights, w1, w2)

    rows += [_row("moekit triton_experts", experts, [p.x, p.w1, p.w2], p.grad),
             _row("moekit fused_moe (with counting sort)", fused, [p.x, p.w1, p.w2], p.grad)]
    for backend in ("triton", "grouped_mm"):
        layer = _layer(p, backend)
        rows.append(_row(f"moekit MoE layer, backend {backend}", lambda x, m=layer: m(x)[0],
                         [p.x], p.grad, "router and dispatch included",
                         tuple(layer.parameters())))
    with torch.no_grad():
        reference = grouped_mm_experts(p, p.x, p.w1, p.w2).float()
        diff = (experts(p.x, p.w1, p.w2).float() - reference).norm() / reference.norm()
    return rows, f"triton_experts vs torch grouped_mm output: relative difference {diff:.2e}"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rows(rows: list[Row], repeats: int, device: torch.device, warmup: int = 2) -> dict:
    """Median seconds per (row name, "f" or "fb"), round-robin over repeats."""
    for row in rows:
        for _ in range(warmup):
            row.forward()
            row.forward_backward()
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(repeats):
        for row in rows:
            for kind, fn in (("f", row.forward), ("fb", row.forward_backward)):
                _synchronize(device)
                if device.type == "cuda":
                    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    seconds = start.elapsed_time(end) / 1e3
                else:
                    begin = time.perf_counter()
                    fn()
                    seconds = time.perf_counter() - begin
                times.setdefault((row.name, kind), []).append(seconds)
    return {key: statistics.median(values) for key, values in times.items()}


def shape_report(key: str, shape: Shape, repeats: int, device: torch.device,
                 dtype: torch.dtype, warmup: int) -> str:
    problem = Problem(shape, device, dtype)
    rows, note = build_rows(problem)
    median = time_rows(rows, repeats, device, warmup)
    tflops = {k: problem.flops * (3 if k[1] == "fb" else 1) / t / 1e12 for k, t in median.items()}
    dense, peer = rows[0].name, rows[1].name
    lines = [f"### {key} {shape.name}: T={shape.tokens}, dim={shape.dim}, "
             f"expert_dim={shape.expert_dim}, E={shape.num_experts}, k={shape.top_k}, {dtype}",
             "", note, "",
             "| row | forward ms | TFLOP/s | vs dense | vs grouped_mm | forward+backward ms "
             "| TFLOP/s | vs dense | vs grouped_mm |", "|" + "---|" * 9]
    for row in rows:
        cells = [row.name + (f" ({row.note})" if row.note else "")]
        for kind in ("f", "fb"):
            rate = tflops[(row.name, kind)]
            cells += [f"{median[(row.name, kind)] * 1e3:.2f}", f"{rate:.1f}",
                      f"{rate / tflops[(dense, kind)]:.2f}", f"{rate / tflops[(peer, kind)]:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_kernel_tests() -> int:
    """pytest tests/experts/triton on this machine's GPU; its exit code."""
    root = Path(__file__).resolve().parent.parent
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "tests/experts/triton"],
                           cwd=root)


def main(shape_keys: list[str], repeats: int = 10, custom: Shape | None = None,
         device: str = "cuda", dtype: torch.dtype = torch.bfloat16, warmup: int = 2) -> str:
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = f"{name}, torch {torch.__version__}, moekit {moekit.__version__}"
    if triton_installed():
        import triton
        header += f", triton {triton.__version__}"
    targets = {"custom": custom} if custom else {k: SHAPES[k] for k in shape_keys}
    report = "\n\n".join([header] + [shape_report(k, s, repeats, device, dtype, warmup)
                                     for k, s in targets.items()])
    print(report, flush=True)
    return report


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-tests", action="store_true",
                        help="skip running tests/experts/triton on the GPU first")
    parser.add_argument("--dims", type=parse_shape, metavar="T,D,F,E,K",
                        help="one custom shape instead of --shapes")
    parser.add_argument("--cpu", action="store_true",
                        help="build the rows and the table on CPU in float32 without warm-up, "
                             "to check the script runs (Triton under its interpreter; no GPU numbers)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    if args.cpu:
        main(args.shapes, args.repeats, custom=args.dims, device="cpu", dtype=torch.float32, warmup=0)
        return
    if not torch.cuda.is_available():
        raise SystemExit(NO_GPU)
    if not args.no_tests and run_kernel_tests() != 0:
        raise SystemExit("tests/experts/triton failed on this GPU; not benchmarking")
    main(args.shapes, args.repeats, custom=args.dims)


if __name__ == "__main__":
    cli()
