"""MoE layer speed on CPU: ratios to the active-FLOPs limit and to peers, measured in one run.

Run: moekit bench [--shapes S1 S2 S3] [--repeats N] [--no-compile]
 (or python benchmarks/moe_speed.py with the same flags)

For each shape (SwiGLU experts, float32 unless the row says otherwise, all
cores) every row is timed forward (under no_grad) and forward+backward
(upstream gradient random, gradients reset to None each time), interleaved
round-robin over --repeats rounds after two warm-up calls; the table gives the
median and the spread ((max - min) / median). Ratios divide by the limit of the
same run:
  limit: exactly the active FLOPs, the T*k rows through one expert's SwiGLU
         weights, as one chain and as E equal chunks, whichever is faster;
  decode-size batches (at most 64 tokens, S3) also get the weight-streaming
         bound: a row that reads the weights of the experts the tokens touch,
         plus the router's, once (a sum over them), timed in the same rounds
         as the rest; the best of five sums of a separate 256 MiB buffer is
         printed beside it as the machine's best-case read bandwidth.
Peers: a naive per-expert loop, and Hugging Face transformers' Mixtral block
with experts_implementation "eager" and "grouped_mm" (skipped if transformers
is not installed), all with the same weights and routing as moekit.
Peak memory: the rise of the process's peak resident set (VmHWM, reset
through /proc/self/clear_refs after malloc_trim) over one forward+backward,
from a baseline without the previous call's gradients, so it counts the
gradients plus every temporary; it sees every allocation torch makes on CPU,
which tracemalloc does not.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import moekit
from moekit.experts.cpu import skinny


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


@dataclass
class Row:
    """A candidate: forward() and forward_backward() each run one call (a row
    without a backward, such as the weight stream, has forward_backward None);
    release() drops the gradients a forward_backward left behind."""

    name: str
    forward: Callable[[], object]
    forward_backward: Callable[[], object] | None
    release: Callable[[], None]
    note: str = ""


# ---------------------------------------------------------------- the limit

def _swiglu_chain(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, w1).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def limit_rows(shape: Shape) -> list[Row]:
    """The active FLOPs alone: one chain, and E equal chunks, through one expert."""
    torch.manual_seed(0)
    rows_count = shape.tokens * shape.top_k
    x = torch.randn(rows_count, shape.dim)
    w1 = (torch.randn(2 * shape.expert_dim, shape.dim) * 0.02).requires_grad_()
    w2 = (torch.randn(shape.dim, shape.expert_dim) * 0.02).requires_grad_()
    x_grad = x.clone().requires_grad_()
    grad = torch.randn(rows_count, shape.dim)

    def release():
        for w in (w1, w2, x_grad):
            w.grad = None

    def run(chunks: int, backward: bool):
        release()
        source = x_grad if backward else x
        for part, g in zip(source.chunk(chunks), grad.chunk(chunks)):
            if backward:
                _swiglu_chain(part, w1, w2).backward(g)
            else:
                with torch.no_grad():
                    _swiglu_chain(part, w1, w2)

    return [Row("limit: one chain", lambda: run(1, False), lambda: run(1, True), release),
            Row(f"limit: {shape.num_experts} chunks", lambda: run(shape.num_experts, False),
                lambda: run(shape.num_experts, True), release)]


# ---------------------------------------------------------------- candidates

def _timed_module(name: str, module: torch.nn.Module, x: torch.Tensor, note: str = "") -> Row:
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

    return Row(name, forward, forward_backward, release, note)


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
                out = _swiglu_chain(x_TD[token], self.gate_up_proj[e], self.down_proj[e])
                y.index_add_(0, token, out * weights[token, slot, None])
        return y


def hf_rows(moe: moekit.MoE, x: torch.Tensor) -> list[Row]:
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
        rows.append(_timed_module(f"transformers Mixtral block, {implementation}", block,
                                  x.unsqueeze(0)))
    return rows


def candidate_rows(shape: Shape, compile_rows: bool) -> tuple[list[Row], moekit.MoE, torch.Tensor]:
    torch.manual_seed(0)
    base = dict(dim=shape.dim, expert_dim=shape.expert_dim, num_experts=shape.num_experts,
                top_k=shape.top_k)
    moe = moekit.MoE(moekit.MoEConfig(**base))
    x = torch.randn(shape.tokens, shape.dim)
    rows = [_timed_module("moekit dropless", moe, x, f"backend {moe.experts.backend_for(x.dtype)}")]

    def variant(dtype=torch.float32, **fields) -> moekit.MoE:
        other = moekit.MoE(moekit.MoEConfig(**(base | fields)))
        other.load_state_dict(moe.state_dict())
        return other.to(dtype)

    rows.append(_timed_module("moekit capacity 1.25", variant(capacity_factor=1.25), x))
    rows.append(_timed_module("moekit grouped_mm backend", variant(experts_backend="grouped_mm"), x))
    rows.append(_timed_module("moekit bf16", variant(torch.bfloat16), x.bfloat16(),
                              "no AVX512-BF16/AMX here: bf16 matmul is emulated"))
    if compile_rows:
        rows.append(_timed_module("moekit torch.compile", torch.compile(variant()), x))
    rows.append(_timed_module("naive per-expert loop", NaiveLoopMoE(moe), x))
    rows.extend(hf_rows(moe, x))
    return rows, moe, x


# ---------------------------------------------------------------- measuring

def time_rows(rows: list[Row], repeats: int) -> dict[tuple[str, str], list[float]]:
    times: dict[tuple[str, str], list[float]] = {}
    def calls(row: Row) -> list[tuple[str, Callable[[], object]]]:
        pairs = [("f", row.forward), ("fb", row.forward_backward)]
        return [(kind, fn) for kind, fn in pairs if fn is not None]

    for row in rows:  # warm-up (and compilation) first
        for _ in range(2):
            for _, fn in calls(row):
                fn()
    for _ in range(repeats):
        for row in rows:
            for kind, fn in calls(row):
                start = time.perf_counter()
                fn()
                times.setdefault((row.name, kind), []).append(time.perf_counter() - start)
    return times


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mib(fn: Callable[[], object], release: Callable[[], None] = lambda: None) -> float:
    """Rise of the peak resident set over one call of fn, from a baseline taken after
    release() (Linux only; NaN elsewhere). Releasing the previous call's gradients
    first makes the figure count the gradients fn creates plus its temporaries;
    without it, it would depend on whether the freed gradients' pages went back to
    the OS, which changes from call to call."""
    try:
        release()
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        baseline = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset VmHWM to the current resident set
        fn()
        return (_status_kib("VmHWM") - baseline) / 1024
    except (OSError, RuntimeError):
        return float("nan")


def read_bandwidth_gbs() -> float:
    """Best-case read bandwidth: the fastest of five sums of a 256 MiB buffer."""
    big = torch.ones(64 * 2**20)
    big.sum()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        big.sum()
        times.append(time.perf_counter() - start)
    return big.numel() * 4 / min(times) / 1e9


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


def shape_report(key: str, shape: Shape, repeats: int, compile_rows: bool) -> str:
    limits = limit_rows(shape)
    rows, moe, x = candidate_rows(shape, compile_rows)
    decode = shape.tokens <= 64
    if decode:
        stream, stream_bytes = streaming_row(moe, x)
        rows.insert(0, stream)
    times = time_rows(limits + rows, repeats)
    median = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: (max(v) - min(v)) / statistics.median(v) for k, v in times.items()}
    limit = {kind: min(median[(row.name, kind)] for row in limits) for kind in ("f", "fb")}
    lines = [f"### {key} {shape.name}: T={shape.tokens}, dim={shape.dim}, "
             f"expert_dim={shape.expert_dim}, E={shape.num_experts}, k={shape.top_k}", "",
             f"limit: forward {limit['f'] * 1e3:.1f} ms, forward+backward {limit['fb'] * 1e3:.1f} ms"]
    bound = None
    if decode:
        bound = median[(stream.name, "f")]
        fastest = min(times[(stream.name, "f")])
        lines[-1] += (f"; weight-streaming bound {bound * 1e3:.2f} ms (the median of the bound row: "
                      f"{stream_bytes / bound / 1e9:.1f} GB/s, its fastest round "
                      f"{stream_bytes / fastest / 1e9:.1f} GB/s; the best of five 256 MiB sums "
                      f"reads {read_bandwidth_gbs():.1f} GB/s)")
    header = "| row | forward ms | vs limit | forward+backward ms | vs limit | peak MiB (f+b) |"
    if decode:
        header = header.replace("| forward+backward", "| vs streaming | forward+backward")
    lines += ["", header, "|" + "---|" * (header.count("|") - 1)]
    for row in limits + rows:
        f = median[(row.name, "f")]
        cells = [row.name + (f" ({row.note})" if row.note else ""),
                 f"{f * 1e3:.1f} ±{spread[(row.name, 'f')] * 50:.0f}%", f"{f / limit['f']:.2f}"]
        if decode:
            cells.append(f"{f / bound:.2f}")
        if row.forward_backward is None:
            cells += ["—", "—", "—"]
        else:
            fb = median[(row.name, "fb")]
            cells += [f"{fb * 1e3:.1f} ±{spread[(row.name, 'fb')] * 50:.0f}%",
                      f"{fb / limit['fb']:.2f}",
                      f"{peak_memory_mib(row.forward_backward, row.release):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(shapes: list[str], repeats: int = 5, compile_rows: bool = True,
         custom: Shape | None = None) -> str:
    torch.manual_seed(0)
    kernel = skinny.unavailable_reason()
    header = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"moekit {moekit.__version__}, skinny decode kernel "
              + ("on" if kernel is None else f"off ({kernel})"))
    targets = {"custom": custom} if custom else {k: SHAPES[k] for k in shapes}
    report = "\n\n".join([header] + [shape_report(k, s, repeats, compile_rows)
                                     for k, s in targets.items()])
    print(report)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")


def run(args: argparse.Namespace) -> str:
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    return main(args.shapes, args.repeats, not args.no_compile)


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args(argv))
