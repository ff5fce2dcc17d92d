"""Expert placement: the Placement record, and plan_placement against exhaustive search."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from moekit.placement import (Placement, contiguous_placement, max_over_mean, plan_placement,
                              read_placement_file, validate_placement)


def best_by_exhaustive_search(loads, num_devices, num_replicas):
    """The lowest possible maximum device load: every choice of S experts per device
    that covers all experts (devices are interchangeable, so sorted tuples only)."""
    E = len(loads)
    S = (E + num_replicas) // num_devices
    best = math.inf
    for devices in itertools.combinations_with_replacement(
            itertools.combinations(range(E), S), num_devices):
        replicas = [0] * E
        for experts in devices:
            for e in experts:
                replicas[e] += 1
        if 0 in replicas:
            continue
        best = min(best, max(sum(loads[e] / replicas[e] for e in experts) for experts in devices))
    return best


def random_loads(rng, count):
    """Half heavy-tailed (Pareto), half uniform: skew as routers produce it."""
    return [rng.paretovariate(1.2) if rng.random() < 0.5 else rng.random() for _ in range(count)]


@pytest.mark.parametrize("experts,devices", [(6, 2), (8, 2), (6, 3), (8, 4), (9, 3)])
def test_without_replicas_the_plan_is_near_the_optimum(experts, devices):
    rng = random.Random(experts * 10 + devices)
    ratios = []
    for _ in range(15):
        loads = random_loads(rng, experts)
        placement = plan_placement(loads, devices)
        assert placement.replicas() == [1] * experts
        ratios.append(max(placement.device_loads(loads)) / best_by_exhaustive_search(loads, devices, 0))
    assert min(ratios) >= 1 - 1e-9  # the search is exhaustive
    assert max(ratios) <= 1.06
    assert sum(r <= 1 + 1e-9 for r in ratios) >= 12


@pytest.mark.parametrize("experts,devices,replicas", [(4, 2, 2), (5, 2, 1), (3, 3, 3), (4, 4, 4),
                                                      (6, 2, 2)])
def test_with_replicas_the_plan_is_within_a_quarter_of_the_optimum(experts, devices, replicas):
    rng = random.Random(experts * 100 + devices * 10 + replicas)
    ratios = []
    for _ in range(15):
        loads = random_loads(rng, experts)
        placement = plan_placement(loads, devices, replicas)
        assert sum(placement.replicas()) == experts + replicas
        ratios.append(max(placement.device_loads(loads)) / best_by_exhaustive_search(loads, devices,
                                                                                      replicas))
    assert min(ratios) >= 1 - 1e-9
    assert max(ratios) <= 1.25
    assert sum(r <= 1 + 1e-9 for r in ratios) >= 5


def test_replicating_the_hot_expert_removes_its_imbalance():
    loads = [8.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # one expert takes half of the tokens
    plain = plan_placement(loads, 4)
    assert max(plain.device_loads(loads)) == 9.0  # its device cannot go below 8 + 1
    replicated = plan_placement(loads, 4, num_replicas=4)  # 3 slots per device
    assert replicated.replicas()[0] == 4
    # Each device: a quarter of expert 0 (2.0) and two cold slots: 4.0 at most, mean 15 / 4.
    assert max(replicated.device_loads(loads)) == 4.0
    assert max_over_mean(replicated.device_loads(loads)) == pytest.approx(4.0 / 3.75)


def test_placement_record_loads_and_round_trip():
    placement = Placement(((0, 2), (1, 2)), 3)
    assert placement.replicas() == [1, 1, 2]
    assert placement.device_loads([3.0, 1.0, 4.0]) == [5.0, 3.0]
    assert (placement.num_devices, placement.slots_per_device) == (2, 2)
    assert Placement.from_dict(placement.to_dict()) == placement
    assert contiguous_placement(6, 3) == Placement(((0, 1), (2, 3), (4, 5)), 6)
    assert max_over_mean([2.0, 1.0, 0.0]) == 2.0 and math.isnan(max_over_mean([0.0, 0.0]))


def test_max_over_mean_of_no_loads_is_nan():
    assert math.isnan(max_over_mean([])) and max_over_mean((4, 4)) == 1.0


def test_plan_edges_one_device_one_expert_zero_loads():
    assert plan_placement([5.0], 1) == Placement(((0,),), 1)
    assert plan_placement([1.0, 2.0, 3.0], 1).experts_per_device == ((0, 1, 2),)
    zero = plan_placement([0.0] * 4, 2, num_replicas=2)
    assert zero.device_loads([0.0] * 4) == [0.0, 0.0]
    spread = plan_placement([1.0] * 4, 4, num_replicas=12)  # every expert on every device
    assert spread.replicas() == [4] * 4


@pytest.mark.parametrize("devices,message", [
    (((0, 1), (2,)), "same number"), (((0, 0), (1, 2)), "twice"), (((0, 3), (1, 2)), "outside"),
    (((0, 1), (0, 1)), "on no device"), ((), "at least one device")])
def test_a_bad_placement_is_refused(devices, message):
    with pytest.raises(ValueError, match=message):
        Placement(devices, 3)


def test_validate_placement_with_and_without_copies():
    copies = [[0, 1, 2], [3, 0, 1]]
    assert validate_placement(copies, 4, 2, allow_copies=True) == copies
    with pytest.raises(ValueError, match=r"every expert 0..3 exactly once \(allow_copies=False: no replicated experts"):
        validate_placement(copies, 4, 2, allow_copies=False)
    once = validate_placement(((3, 1), (2, 0)), 4, 2, allow_copies=False)
    assert once == [[3, 1], [2, 0]] and all(type(e) is int for d in once for e in d)
    assert validate_placement(Placement(((0, 1), (1, 0)), 2).experts_per_device, 2, 2,
                              allow_copies=True) == [[0, 1], [1, 0]]


@pytest.mark.parametrize("devices,num_experts,num_devices,allow_copies,message", [
    ([], 2, 0, True, "a placement needs at least one device"),
    ([], 2, 1, False, "a placement needs at least one device"),
    ([[0, 1]], 2, 2, True, r"placement lists 1 devices, expected num_devices=2"),
    ([[0, 1], [2]], 3, 2, True, r"every device must hold the same number \(>= 1\) of experts, got \[2, 1\]"),
    ([[], []], 0, 2, True, r"same number \(>= 1\) of experts, got \[0, 0\]"),
    ([[1, 1], [0, 2]], 3, 2, True, r"device 0 holds an expert twice: \[1, 1\]"),
    ([[0, 5], [1, 2]], 3, 2, True, r"device 0 holds expert ids \[5\] outside \[0, 3\)"),
    ([[0, 1], [1, 0]], 3, 2, True, r"experts \[2\] are on no device"),
    ([[0, 1, 2]], 3, 2, False, r"placement lists 1 devices, expected num_devices=2"),
    ([[0], [1], [2]], 4, 3, False, r"num_experts \(4\) must be divisible by the number of devices \(3\)"),
    ([[0, 1], [2, 2]], 4, 2, False, r"every expert 0..3 exactly once .* got \[\[0, 1\], \[2, 2\]\]"),
    ([[0, 1], [2, 4]], 4, 2, False, r"every expert 0..3 exactly once"),
    ([[0, 1, 2], [3]], 4, 2, False, r"placement must list 2 experts for each of the 2 devices, "
                                    r"got sizes \[3, 1\]"),
])
def test_validate_placement_names_the_broken_rule(devices, num_experts, num_devices, allow_copies,
                                                  message):
    with pytest.raises(ValueError, match=message):
        validate_placement(devices, num_experts, num_devices, allow_copies=allow_copies)


def test_validate_placement_wants_int_expert_ids():
    with pytest.raises(TypeError, match=r"expert ids must be ints, got 1.5 \(float\)"):
        validate_placement([[0, 1.5]], 2, 1, allow_copies=True)
    with pytest.raises(TypeError, match="expert ids must be ints, got '0'"):
        Placement((("0", 1),), 2)
    assert Placement([[1, 0]], 2).experts_per_device == ((1, 0),)  # lists become tuples


def test_expert_parallel_placement_is_the_validator_with_copies():
    from moekit.dispatch.alltoall import expert_placement
    assert expert_placement(4, 2) == [[0, 1], [2, 3]]
    assert expert_placement(4, 2, Placement(((3, 1), (2, 0)), 4)) == [[3, 1], [2, 0]]
    with pytest.raises(ValueError, match=r"num_experts \(3\) must be divisible"):
        expert_placement(3, 2)
    with pytest.raises(ValueError, match="the same number"):
        expert_placement(3, 2, [[0, 1], [2]])
    assert expert_placement(4, 2, Placement(((0, 1, 2), (3, 0, 1)), 4)) == [[0, 1, 2], [3, 0, 1]]


@pytest.mark.parametrize("loads,devices,replicas,message", [
    ([1.0, 2.0, 3.0], 2, 0, "divisible"), ([1.0, -1.0], 2, 0, ">= 0"),
    ([1.0, math.nan], 2, 0, "finite"), ([1.0, 1.0], 0, 0, "num_devices"),
    ([1.0, 1.0], 2, -2, "num_replicas"), ([1.0, 1.0], 2, 4, "at most once"), ([], 1, 0, "empty")])
def test_bad_plan_inputs_are_named(loads, devices, replicas, message):
    with pytest.raises(ValueError, match=message):
        plan_placement(loads, devices, replicas)
    with pytest.raises(ValueError, match="divisible"):
        contiguous_placement(5, 2)
    with pytest.raises(ValueError, match="entries"):
        Placement(((0,), (1,)), 2).device_loads([1.0])


def test_plan_placement_command_from_metrics_and_from_inspect(tmp_path, capsys):
    import json

    from moekit.cli import main
    from moekit.lm.checkpoint import write_run_config

    from .lm.helpers import tiny_model_config, tiny_train_config

    run = tmp_path / "run"
    run.mkdir()
    write_run_config(run, tiny_model_config(), tiny_train_config())  # 2 MoE layers of 4 experts
    records = [{"kind": "train", "step": s, "tokens_per_expert": [[8, 1, 1, 2], [3, 3, 3, 3]]}
               for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["plan-placement", "--run", str(run), "--devices", "2", "--records", "2"]) == 0
    assert "last 2 records" in capsys.readouterr().out
    written = json.loads((run / "placement.json").read_text())
    first = written["layers"]["blocks.0.ffn"]
    assert first["expert_loads"] == [16, 2, 2, 4]
    assert first["max_over_mean_contiguous"] == pytest.approx(18 / 12)
    assert first["max_over_mean_planned"] == pytest.approx(18 / 12)  # 16 + the coldest is the best
    assert Placement.from_dict(first).device_loads([16, 2, 2, 4]) == first["device_loads"]
    planned = read_placement_file(run / "placement.json")
    assert list(planned) == ["blocks.0.ffn", "blocks.1.ffn"] and planned["blocks.0.ffn"] == Placement.from_dict(first)
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ValueError, match="junk.json is not a placement file"):
        read_placement_file(tmp_path / "junk.json")

    inspect = tmp_path / "inspect.json"
    inspect.write_text(json.dumps({"layers": {"m": {"tokens_per_expert": [6, 0, 0, 0, 0, 2]}}}))
    out = tmp_path / "p.json"
    assert main(["plan-placement", "--loads", str(inspect), "--devices", "2", "--replicas", "2",
                 "--out", str(out)]) == 0
    layer = json.loads(out.read_text())["layers"]["m"]
    assert layer["replicas"][0] == 2 and layer["max_over_mean_planned"] == pytest.approx(1.0)
    with pytest.raises(SystemExit):
        main(["plan-placement", "--run", str(run), "--devices", "3"])
    assert "divisible by num_devices (3)" in capsys.readouterr().err


def test_the_python_example_of_the_docs_runs(capsys):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs/placement.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    exec(compile(block, "docs/placement.md", "exec"), {})
    assert capsys.readouterr().out.splitlines()[0] == "9.0 4.0"
