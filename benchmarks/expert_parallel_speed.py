"""Expert-parallel MoE layer time at 1, 2 and 4 processes (gloo on CPU), with the communication share.

Run: python benchmarks/expert_parallel_speed.py [--world-sizes 1 2 4] [--repeats 5] [--shape S1]
         [--overlap-chunks 1 2 4] [--shared-experts 1]

The global batch of the shape (S1: 4096 tokens, dim 1024, expert_dim 896, 8
experts, top-2) is split evenly over W processes; each keeps E / W experts and
uses max(1, cores // W) threads. Each row is the slowest rank's median time of
one layer forward (no_grad) and forward+backward, after a barrier and two
warm-up calls. "comm" is the share of forward+backward spent in
torch.distributed calls on the rank's own threads (count and row all-to-alls,
waits, all-reduces), measured with torch.profiler as the union of their time
intervals; waiting for a slower rank counts as communication. Communication
hidden behind computation (apply_expert_parallel's overlap_chunks: rows in
flight while other chunks' experts or the shared experts run) does not count,
so "comm" is the exposed share. The ratio divides by the 1-process time of the
same run. Each expert-parallel world size is measured once per overlap_chunks
value.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moekit
from moekit.bench import SHAPES, Shape, parse_shape
from moekit.parallel import apply_expert_parallel

COMMUNICATION = re.compile(r"c10d|wait_tensor|all_to_all|allreduce|all_reduce|all_gather|barrier")


def _communication_seconds(prof) -> float:
    """Union of the time intervals of communication events outside gloo's own threads."""
    intervals = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if COMMUNICATION.search(e.name) and not e.name.startswith("gloo:"))
    total, end = 0, None
    for start, stop in intervals:
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total / 1e6


def _timed(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _worker(rank: int, world_size: int, init_file: str, shape: Shape, repeats: int, cores: int,
            chunks: int, shared_experts: int, results) -> None:
    torch.set_num_threads(max(1, cores // world_size))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=600))
    torch.manual_seed(0)
    moe = moekit.MoE(moekit.MoEConfig(dim=shape.dim, expert_dim=shape.expert_dim,
                                      num_experts=shape.num_experts, top_k=shape.top_k,
                                      num_shared_experts=shared_experts))
    if world_size > 1:
        apply_expert_parallel(moe, overlap_chunks=chunks)
    tokens = shape.tokens // world_size
    torch.manual_seed(1 + rank)
    x = torch.randn(tokens, shape.dim, requires_grad=True)
    grad = torch.randn(tokens, shape.dim)

    def forward():
        with torch.no_grad():
            moe(x)

    def forward_backward():
        y, aux = moe(x)
        torch.autograd.backward((y, aux.loss), (grad, torch.ones_like(aux.loss)))
        x.grad = None
        moe.zero_grad(set_to_none=True)

    for call in (forward, forward_backward):
        call(), call()
    fwd, fwd_bwd = _timed(forward, repeats), _timed(forward_backward, repeats)
    dist.barrier()
    with torch.profiler.profile() as prof:
        forward_backward()
    comm = _communication_seconds(prof)
    measured = torch.tensor([fwd, fwd_bwd, comm], dtype=torch.float64)
    gathered = [torch.empty_like(measured) for _ in range(world_size)]
    dist.all_gather(gathered, measured)
    if rank == 0:
        slowest = torch.stack(gathered).amax(0).tolist()
        # the communication share of the slowest rank's own profiled step
        results[world_size, chunks] = (tokens, torch.get_num_threads(), *slowest[:2],
                               max(g[2].item() / max(g[1].item(), 1e-9) for g in gathered))
    dist.destroy_process_group()


def measure(world_sizes: list[int], shape: Shape, repeats: int, cores: int,
            overlap_chunks: tuple[int, ...] = (1,), shared_experts: int = 0) -> dict[tuple, tuple]:
    """{(world size, overlap chunks): (tokens per rank, threads per rank, forward s, fwd+bwd s,
    comm share)}; one process runs with chunks 1 only."""
    results = mp.Manager().dict()
    for world_size in world_sizes:
        for chunks in overlap_chunks if world_size > 1 else (1,):
            with tempfile.TemporaryDirectory() as folder:
                mp.start_processes(_worker, args=(world_size, os.path.join(folder, "init"), shape,
                                                  repeats, cores, chunks, shared_experts, results),
                                   nprocs=world_size, start_method="spawn")
    return dict(results)


def table(results: dict[tuple, tuple], shape: Shape, shared_experts: int = 0) -> str:
    base = results.get((1, 1))
    lines = [f"{shape.name} (T={shape.tokens}, dim={shape.dim}, expert_dim={shape.expert_dim}, "
             f"E={shape.num_experts}, k={shape.top_k}, shared experts {shared_experts}): "
             "time per MoE layer call, slowest rank",
             "| processes | overlap chunks | tokens/rank | threads/rank | forward ms | fwd+bwd ms "
             "| fwd+bwd vs 1 process | exposed comm share of fwd+bwd |",
             "|---|---|---|---|---|---|---|---|"]
    for (world_size, chunks), (tokens, threads, fwd, fwd_bwd, comm) in sorted(results.items()):
        ratio = f"{fwd_bwd / base[3]:.2f}x" if base else "-"
        lines.append(f"| {world_size} | {chunks} | {tokens} | {threads} | {fwd * 1e3:.1f} | "
                     f"{fwd_bwd * 1e3:.1f} | {ratio} | {comm:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, shape: Shape | None = None) -> str:
    """Print and return the table; ``shape`` replaces --shape (for a quick run)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--shape", default="S1", choices=list(SHAPES))
    parser.add_argument("--dims", type=parse_shape, metavar="T,D,F,E,K",
                        help="a custom shape instead of --shape")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                        help="cores to share among the processes (default: all)")
    parser.add_argument("--overlap-chunks", type=int, nargs="+", default=[1],
                        help="apply_expert_parallel's overlap_chunks values to measure (default 1)")
    parser.add_argument("--shared-experts", type=int, default=0,
                        help="shared experts in the layer (work the first all-to-all can hide behind)")
    args = parser.parse_args(argv)
    if min(args.overlap_chunks) < 1 or args.shared_experts < 0:
        parser.error(f"--overlap-chunks must be >= 1 (got {args.overlap_chunks}) and "
                     f"--shared-experts >= 0 (got {args.shared_experts})")
    shape = shape or args.dims or SHAPES[args.shape]
    for world_size in args.world_sizes:
        if world_size < 1 or shape.num_experts % world_size or shape.tokens % world_size:
            parser.error(f"--world-sizes {world_size}: must divide the {shape.num_experts} experts "
                         f"and the {shape.tokens} tokens")
    report = table(measure(args.world_sizes, shape, args.repeats, args.cores,
                           tuple(args.overlap_chunks), args.shared_experts), shape, args.shared_experts)
    print(report)
    return report


if __name__ == "__main__":
    main()
