"""``moekit plan-placement``: place experts over devices for expert parallelism from
measured loads, print the predicted balance and write a placement file
(docs/placement.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moekit.cli.output_folder import writable_folder
from moekit.errors import UsageError, usage_errors

HELP = "place experts over devices for expert parallelism from measured loads (docs/placement.md)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", help="a run folder: loads from its metrics.jsonl")
    parser.add_argument("--loads", metavar="JSON", help="loads from an inspect.json instead")
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--replicas", type=int, default=0,
                        help="extra expert copies in all (experts + replicas divisible by devices)")
    parser.add_argument("--records", type=int, default=10,
                        help="sum the loads of the last N training records of metrics.jsonl (0: all)")
    parser.add_argument("--out", help="placement file (default RUN/placement.json, else ./placement.json)")


def measured_loads(args: argparse.Namespace) -> tuple[dict[str, list[int]], str]:
    """The loads the flags point at, by layer, and where they came from."""
    from moekit.diagnostics.loads import loads_from_inspect_report, loads_from_run
    from moekit.lm.checkpoint import METRICS_FILE

    if args.loads:
        return loads_from_inspect_report(args.loads), args.loads
    if not args.run:
        raise UsageError("give --run RUN_DIR (loads from its metrics.jsonl) or --loads inspect.json")
    if args.records < 0:
        raise UsageError(f"--records must be >= 0, got {args.records}")
    loads, records = loads_from_run(args.run, args.records)
    return loads, f"{Path(args.run) / METRICS_FILE} (last {records} records)"


def placement_file(args: argparse.Namespace) -> Path:
    """--out, else RUN/placement.json, else ./placement.json: a file path in a folder
    that takes new files (UsageError otherwise)."""
    out = Path(args.out) if args.out else (Path(args.run) if args.run and not args.loads
                                           else Path(".")) / "placement.json"
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file path such as {out / 'placement.json'}")
    writable_folder(out.parent, f"--out {out}: folder")
    return out


def run(args: argparse.Namespace, log=print) -> int:
    from rich.console import Console
    from rich.table import Table

    from moekit.placement import check_plan_inputs, contiguous_placement, max_over_mean, plan_placement

    loads, source = measured_loads(args)
    out = placement_file(args)
    layers = {}
    table = Table(title=f"Expert placement over {args.devices} devices, {args.replicas} extra copies "
                        "(predicted device load max/mean)")
    for column in ("layer", "experts", "contiguous", "planned", "replicated experts (copies)"):
        table.add_column(column, justify="left" if column in ("layer", "replicated experts (copies)")
                         else "right")
    for name, expert_loads in loads.items():
        with usage_errors():  # --devices and --replicas against the loads
            check_plan_inputs(expert_loads, args.devices, args.replicas)
        placement = plan_placement(expert_loads, args.devices, args.replicas)
        after = max_over_mean(placement.device_loads(expert_loads))
        before = max_over_mean(contiguous_placement(len(expert_loads), args.devices)
                               .device_loads(expert_loads)) \
            if len(expert_loads) % args.devices == 0 else None
        replicas = placement.replicas()
        layers[name] = {**placement.to_dict(), "expert_loads": expert_loads, "replicas": replicas,
                        "device_loads": placement.device_loads(expert_loads),
                        "max_over_mean_contiguous": before, "max_over_mean_planned": after}
        copies = ", ".join(f"{e} ({r})" for e, r in enumerate(replicas) if r > 1) or "-"
        table.add_row(name, str(len(expert_loads)), "-" if before is None else f"{before:.3f}",
                      f"{after:.3f}", copies)
    Console().print(table)
    try:
        out.write_text(json.dumps({"num_devices": args.devices, "num_replicas": args.replicas,
                                   "loads_from": source, "layers": layers}, indent=1) + "\n")
    except OSError as error:  # a file there that cannot be replaced, say
        raise UsageError(f"--out {out}: cannot write it ({error.strerror}); give another file path") from error
    log(f"loads from {source}; placement written to {out}")
    return 0
