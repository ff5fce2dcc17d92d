"""MoE layer speed on CPU: ratios to the active-FLOPs limit and to peers, measured in one run.

Run: moekit bench [--shapes S1 S2 S3] [--repeats N] [--no-compile]
     [--shape T,D,F,E,K] [--isolated]
 (or python benchmarks/moe_speed.py with the same flags)

Modules: ``shapes`` (the cases), ``harness`` (``Row``, interleaved timing, /proc
memory probes, read bandwidth), ``limits`` (the active-FLOPs limit and the
weight-streaming bound), ``peers`` (moekit's variants and the peers it is
compared with), ``tables`` (the report).

For each shape (SwiGLU experts, float32 unless the row says otherwise, all
cores) every row is timed forward (under no_grad) and forward+backward
(upstream gradient random, gradients reset to None each time), interleaved
round-robin over --repeats rounds after two warm-up calls; the table gives the
median and the spread ((max - min) / median). With --isolated each row is
timed in its own rounds beside the limit rows only (their times pooled), so no
heavy row (the naive loop, eager's backward) shares its rounds. Ratios divide
by the limit of the same run:
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

from moekit.bench.harness import Row, peak_memory_mib, read_bandwidth_gbs, time_rows
from moekit.bench.limits import limit_rows, streaming_row, swiglu_chain, touched_weights
from moekit.bench.peers import NaiveLoopMoE, candidate_rows, hf_rows, timed_module
from moekit.bench.shapes import SHAPES, Shape, parse_shape
from moekit.bench.tables import main, shape_report

__all__ = ["SHAPES", "NaiveLoopMoE", "Row", "Shape", "candidate_rows", "hf_rows", "limit_rows", "main",
           "parse_shape", "peak_memory_mib", "read_bandwidth_gbs", "shape_report", "streaming_row", "swiglu_chain",
           "time_rows", "timed_module", "touched_weights"]
