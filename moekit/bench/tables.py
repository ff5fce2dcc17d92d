"""The ``moekit bench`` report: one markdown table per shape, ratios to the limits."""

from __future__ import annotations

import statistics

import torch

import moekit
from moekit.bench.harness import peak_memory_mib, read_bandwidth_gbs, time_rows, time_rows_isolated
from moekit.bench.limits import limit_rows, streaming_row
from moekit.bench.peers import DECODE_TOKENS, candidate_rows
from moekit.bench.shapes import SHAPES, Shape
from moekit.experts.cpu import skinny
from moekit.experts.cpu.isa import cpu_isa


def shape_report(key: str, shape: Shape, repeats: int, compile_rows: bool,
                 isolated: bool = False) -> str:
    """One shape's section: its title, the limits, and a row of ratios for every candidate.
    isolated: each candidate timed in its own rounds beside the limit rows only
    (harness.time_rows_isolated), instead of all rows interleaved in one set of rounds."""
    rows, moe, x = candidate_rows(shape, compile_rows)
    limits = [row for dtype in dict.fromkeys(row.limit_dtype for row in rows)
              for row in limit_rows(shape, dtype)]
    decode = shape.tokens <= DECODE_TOKENS
    if decode:
        stream, stream_bytes = streaming_row(moe, x)
        rows.insert(0, stream)
    times = time_rows_isolated(limits, rows, repeats) if isolated else time_rows(limits + rows, repeats)
    median = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: (max(v) - min(v)) / statistics.median(v) for k, v in times.items()}
    limit_of = {dtype: {kind: min(median[(row.name, kind)] for row in limits
                                  if row.limit_dtype == dtype) for kind in ("f", "fb")}
                for dtype in {row.limit_dtype for row in limits}}
    limit = limit_of[torch.float32]
    lines = [f"### {key} {shape.name}: T={shape.tokens}, dim={shape.dim}, "
             f"expert_dim={shape.expert_dim}, E={shape.num_experts}, k={shape.top_k}", "",
             f"limit: forward {limit['f'] * 1e3:.1f} ms, forward+backward {limit['fb'] * 1e3:.1f} ms"
             + "".join(f" ({str(dtype).removeprefix('torch.')}: {own['f'] * 1e3:.1f} ms, "
                       f"{own['fb'] * 1e3:.1f} ms; rows that say so divide by it)"
                       for dtype, own in limit_of.items() if dtype != torch.float32)]
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
        f, own_limit = median[(row.name, "f")], limit_of[row.limit_dtype]
        cells = [row.name + (f" ({row.note})" if row.note else ""),
                 f"{f * 1e3:.1f} ±{spread[(row.name, 'f')] * 50:.0f}%",
                 f"{f / own_limit['f']:.2f}"]
        if decode:
            cells.append(f"{f / bound:.2f}")
        if row.forward_backward is None:
            cells += ["—", "—", "—"]
        else:
            fb = median[(row.name, "fb")]
            cells += [f"{fb * 1e3:.1f} ±{spread[(row.name, 'fb')] * 50:.0f}%",
                      f"{fb / own_limit['fb']:.2f}",
                      f"{peak_memory_mib(row.forward_backward, row.release):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(shapes: list[str], repeats: int = 5, compile_rows: bool = True,
         custom: Shape | None = None, isolated: bool = False) -> str:
    """The report of the named shapes (or of ``custom`` alone), printed and returned;
    isolated: see shape_report."""
    torch.manual_seed(0)
    kernel = skinny.unavailable_reason()
    header = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"moekit {moekit.__version__}, CPU {cpu_isa().describe()}, skinny decode kernel "
              + ("on" if kernel is None else f"off ({kernel})")
              + ("; every row timed alone beside the limit rows" if isolated else
                 "; all rows interleaved in the same rounds"))
    targets = {"custom": custom} if custom else {k: SHAPES[k] for k in shapes}
    report = "\n\n".join([header] + [shape_report(k, s, repeats, compile_rows, isolated)
                                     for k, s in targets.items()])
    print(report)
    return report
