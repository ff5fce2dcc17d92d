"""MoE layer speed on CPU against the active-FLOPs limit and peers: see moekit/bench.py.

Run: python benchmarks/moe_speed.py [--shapes S1 S2 S3] [--repeats N] [--no-compile]
(the same as `moekit bench`).
"""

from moekit.bench import cli

if __name__ == "__main__":
    cli()
