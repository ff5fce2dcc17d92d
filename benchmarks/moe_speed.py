"""MoE layer speed on CPU against the active-FLOPs limit and peers: see moekit/bench/.

Run: python benchmarks/moe_speed.py [--shapes S1 S2 S3] [--repeats N] [--no-compile]
     [--shape T,D,F,E,K] [--isolated]
(the same as `moekit bench`).
"""

import argparse

import moekit.bench
from moekit.cli import bench as command

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=moekit.bench.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    command.add_arguments(parser)
    command.run(parser.parse_args())
