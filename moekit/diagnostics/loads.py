"""Measured expert loads, by MoE layer: what ``moekit plan-placement`` places experts from.

A load is the number of token assignments an expert received; a layer's loads
are a list [E] of them, keyed by the layer's module name in the model
(``blocks.3.ffn`` in moekit's language model). They come from a training run's
metrics.jsonl or from the inspect.json that ``moekit inspect`` writes.
"""

from __future__ import annotations

import json
from pathlib import Path

from moekit.errors import UsageError
from moekit.validation import require_int


def loads_from_inspect_report(path: str | Path) -> dict[str, list[int]]:
    """tokens_per_expert of every layer of an inspect.json, by module name. A file
    that is missing or is not such a report raises UsageError."""
    try:
        report = json.loads(Path(path).read_text())
        return {name: layer["tokens_per_expert"] for name, layer in report["layers"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        if isinstance(error, OSError):
            reason = error.strerror or str(error)
        elif isinstance(error, json.JSONDecodeError):
            reason = f"not JSON: {error.msg} at line {error.lineno} column {error.colno}"
        elif isinstance(error, ValueError):  # UnicodeDecodeError: not text at all
            reason = f"not text: {error}"
        elif isinstance(error, KeyError):
            reason = f"no {error.args[0]!r} key"
        else:
            reason = f"not shaped like one: {error}"
        raise UsageError(f"{path} is not an inspect.json written by moekit inspect ({reason}); "
                         "give the inspect.json that `moekit inspect RUN` writes") from error


def loads_from_run(run_dir: str | Path, records: int = 10) -> tuple[dict[str, list[int]], int]:
    """Assignments per expert of every MoE layer of a run's model, by module name,
    summed over the last ``records`` training records of its metrics.jsonl (0: all)
    -> (loads, how many records were summed). A dense run, or one without a training
    record yet, raises UsageError."""
    from moekit.lm.checkpoint import METRICS_FILE, read_run_config
    from moekit.lm.plots import read_metrics

    require_int("records", records, 0)
    model_cfg, _, _ = read_run_config(Path(run_dir))
    trained = read_metrics(run_dir)[0] if (Path(run_dir) / METRICS_FILE).is_file() else []
    chosen = trained[-records:] if records else trained
    if model_cfg.moe is None or not chosen:
        raise UsageError(f"{run_dir} has no expert loads: a dense model or no training record yet")
    names = [f"blocks.{i}.ffn" for i in model_cfg.moe_layers]
    loads = {name: [sum(r["tokens_per_expert"][layer][e] for r in chosen)
                    for e in range(model_cfg.moe.num_experts)] for layer, name in enumerate(names)}
    return loads, len(chosen)
