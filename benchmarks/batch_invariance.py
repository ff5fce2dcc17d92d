"""What MoEConfig(batch_invariant=True) costs: the layer's time with it against without it, per
experts backend and shape, forward and forward+backward, rows interleaved in one run.

Run: python benchmarks/batch_invariance.py [--shapes S1 S2 S3] [--repeats N]
Prints a markdown table of median seconds and the ratio invariant / default (the one in
docs/routing.md). grouped_mm rows run in bfloat16 (torch's CPU grouped_mm is fastest there),
the others in float32; decode-size S3 shows the native kernel the option turns off.
"""

from __future__ import annotations

import argparse
import platform
import statistics
from pathlib import Path

import torch

from moekit import MoE, MoEConfig
from moekit.bench.harness import Row, time_rows
from moekit.bench.shapes import SHAPES

BACKENDS = {"fused": torch.float32, "loop": torch.float32, "grouped_mm": torch.bfloat16}


def cpu_model() -> str:
    """The CPU's model name (Linux), else the processor name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def layer_rows(shape, backend: str, dtype: torch.dtype) -> list[Row]:
    """Two rows on one input and one set of weights: batch_invariant off and on."""
    torch.manual_seed(0)
    x = torch.randn(shape.tokens, shape.dim, dtype=dtype)
    grad = torch.randn_like(x)
    rows, weights = [], None
    for invariant in (False, True):
        moe = MoE(MoEConfig(dim=shape.dim, expert_dim=shape.expert_dim,
                            num_experts=shape.num_experts, top_k=shape.top_k,
                            experts_backend=backend, batch_invariant=invariant)).to(dtype)
        if weights is None:
            weights = moe.state_dict()
        moe.load_state_dict(weights)
        x_grad = x.clone().requires_grad_()

        def forward(moe=moe):
            with torch.no_grad():
                return moe(x)

        def forward_backward(moe=moe, x_grad=x_grad):
            y, aux = moe(x_grad)
            ((y * grad).sum() + aux.loss).backward()

        def release(moe=moe, x_grad=x_grad):
            moe.zero_grad(set_to_none=True)
            x_grad.grad = None

        rows.append(Row("invariant" if invariant else "default", forward, forward_backward,
                        release))
    return rows


def main(shapes: list[str], repeats: int) -> str:
    lines = [("| shape | backend | dtype | default fwd s | invariant fwd s | ratio | "
              "default fwd+bwd s | invariant fwd+bwd s | ratio |"), "|---|---|---|---|---|---|---|---|---|"]
    for name in shapes:
        shape = SHAPES[name]
        for backend, dtype in BACKENDS.items():
            rows = layer_rows(shape, backend, dtype)
            times = time_rows(rows, repeats)
            for row in rows:
                row.release()
            med = {key: statistics.median(values) for key, values in times.items()}
            f0, f1 = med[("default", "f")], med[("invariant", "f")]
            b0, b1 = med[("default", "fb")], med[("invariant", "fb")]
            lines.append(f"| {name} T{shape.tokens} D{shape.dim} F{shape.expert_dim} "
                         f"E{shape.num_experts} k{shape.top_k} | {backend} | "
                         f"{str(dtype).removeprefix('torch.')} | {f0:.4f} | {f1:.4f} | "
                         f"{f1 / f0:.2f} | {b0:.4f} | {b1:.4f} | {b1 / b0:.2f} |")
    header = (f"batch_invariant cost, median of {repeats} interleaved rounds, {cpu_model()} "
              f"(torch CPU capability {torch.backends.cpu.get_cpu_capability()}), "
              f"{torch.get_num_threads()} threads")
    return header + "\n\n" + "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=7)
    arguments = parser.parse_args()
    print(main(arguments.shapes, arguments.repeats))
