"""The ``moekit`` command: train, generate, compare, params, bench.

    moekit train                     # the tiny MoE LM on the built-in corpus
    moekit train --preset deepseek --steps 2000 --out runs/ds
    moekit train --resume runs/ds    # continue exactly where it stopped
    torchrun --nproc-per-node 2 -m moekit train --expert-parallel   # experts over 2 processes
    moekit generate --run runs/ds --prompt "def "
    moekit compare                   # tiny (MoE) against dense at equal active parameters
    moekit params mixtral-8x7b       # total vs active parameters and FLOPs per token
    moekit bench --shapes S3         # layer speed against the FLOPs limit and peers
    moekit inspect runs/ds           # routing diagnostics on the validation data
    moekit plan-placement --run runs/ds --devices 4 --replicas 4   # experts over devices
"""

from __future__ import annotations

import argparse
import sys

from moekit.cli import bench, compare, generate, inspect, params, plan_placement, train
from moekit.errors import UsageError

# Each command is a module with HELP, add_arguments(parser) and run(args, log=print) -> exit status.
COMMANDS = {"train": train, "generate": generate, "compare": compare, "params": params,
            "bench": bench, "inspect": inspect, "plan-placement": plan_placement}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.add_arguments(commands.add_parser(name, help=command.HELP))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input (a ``UsageError``) prints one line and exits 2;
    a stop on SIGINT or SIGTERM prints one line and exits 128 + the signal's
    number (130, 143); any other exception is a bug and propagates with its traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except UsageError as error:
        parser.exit(2, f"moekit {args.command}: error: {error}\n")
    except KeyboardInterrupt as stopped:  # moekit.lm.signals.TrainingStopped says which signal
        if str(stopped):
            sys.stderr.write(f"moekit {args.command}: stopped: {stopped}\n")
        return getattr(stopped, "exit_status", 130)
