"""Expert placement for expert parallelism: which devices hold which experts.

From measured expert loads (assignments per expert), plan_placement spreads
the experts of one MoE layer over D devices, each holding the same number S of
expert slots, so that the most loaded device carries as little as possible.
With num_replicas > 0 the hottest experts get extra copies on other devices and
their tokens are split evenly between the copies, as DeepSeek's EPLB does
(github.com/deepseek-ai/EPLB): S = (E + num_replicas) / D.

Shape letters: E experts, D devices, S expert slots per device.

The plan, for each of up to 9 splits of the extra copies into "hot" and "cold"
ones, keeping the best: replication (each hot copy to the expert with the
largest load per copy, as EPLB; each cold copy, which only fills a slot, to the
one with the smallest); packing (copies in decreasing load, each onto the least
loaded device with a free slot that does not hold that expert yet: longest
processing time first); then a local search on the most loaded device (swap
one of its experts with another device's, or hand a slot holding a replicated
expert to another expert) while a move lowers it. Finding the best placement
is NP-hard (multiway number partitioning); tests/test_placement.py checks the
plan against exhaustive search on small cases.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path


def validate_placement(placement: Iterable[Iterable[int]], num_experts: int, num_devices: int, *,
                       allow_copies: bool) -> list[list[int]]:
    """The placement as a list per device of the expert ids it holds, checked.

    Always: num_devices >= 1 devices, each holding the same number (>= 1) of
    expert ids in [0, num_experts), none twice on one device, every expert on
    at least one device. allow_copies=False (a placement without copies) also requires
    every expert exactly once, so num_experts / num_devices per device; with
    copies (plan_placement's replicas) an expert may sit on several devices.
    Raises TypeError for an id that is not an int, ValueError for any other
    broken rule, naming it and the offending values."""
    devices = [[_expert_id(e) for e in experts] for experts in placement]
    if num_devices < 1 or not devices:
        raise ValueError("a placement needs at least one device")
    if len(devices) != num_devices:
        raise ValueError(f"placement lists {len(devices)} devices, expected num_devices={num_devices}")
    if not allow_copies:
        _require_each_expert_once(devices, num_experts)
    sizes = [len(experts) for experts in devices]
    if len(set(sizes)) != 1 or 0 in sizes:
        raise ValueError(f"every device must hold the same number (>= 1) of experts, got {sizes}")
    for d, experts in enumerate(devices):
        if len(set(experts)) != len(experts):
            raise ValueError(f"device {d} holds an expert twice: {experts}")
        bad = [e for e in experts if not 0 <= e < num_experts]
        if bad:
            raise ValueError(f"device {d} holds expert ids {bad} outside [0, {num_experts})")
    missing = sorted(set(range(num_experts)) - {e for experts in devices for e in experts})
    if missing:
        raise ValueError(f"experts {missing} are on no device")
    return devices


def _expert_id(value) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"expert ids must be ints, got {value!r} ({type(value).__name__})") from None


def _require_each_expert_once(devices: list[list[int]], num_experts: int) -> None:
    """The "no copies" rule: every expert on exactly one
    device, num_experts / num_devices on each."""
    num_devices = len(devices)
    if num_experts % num_devices:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by the number of devices "
                         f"({num_devices}) to hold every expert exactly once")
    if sorted(e for experts in devices for e in experts) != list(range(num_experts)):
        raise ValueError(f"placement must hold every expert 0..{num_experts - 1} exactly once "
                         f"(allow_copies=False: no replicated experts), "
                         f"got {devices}")
    per_device = num_experts // num_devices
    if any(len(experts) != per_device for experts in devices):
        raise ValueError(f"placement must list {per_device} experts for each of the {num_devices} "
                         f"devices, got sizes {[len(experts) for experts in devices]}")


@dataclass(frozen=True)
class Placement:
    """experts_per_device[d]: the expert ids device d holds, S of them on every
    device, each id at most once per device; every expert is on at least one
    device, and an expert held by r devices sends 1/r of its tokens to each.
    The order within a device is the order of its local expert slots. Checked
    by validate_placement with copies allowed."""

    experts_per_device: tuple[tuple[int, ...], ...]
    num_experts: int

    def __post_init__(self) -> None:
        devices = validate_placement(self.experts_per_device, self.num_experts,
                                     len(self.experts_per_device), allow_copies=True)
        object.__setattr__(self, "experts_per_device", tuple(map(tuple, devices)))

    @property
    def num_devices(self) -> int:
        return len(self.experts_per_device)

    @property
    def slots_per_device(self) -> int:
        return len(self.experts_per_device[0])

    def replicas(self) -> list[int]:
        """[E] how many devices hold each expert."""
        counts = [0] * self.num_experts
        for experts in self.experts_per_device:
            for e in experts:
                counts[e] += 1
        return counts

    def device_loads(self, expert_loads: Sequence[float]) -> list[float]:
        """[D] predicted load of each device: the sum of load_e / replicas_e over its experts."""
        if len(expert_loads) != self.num_experts:
            raise ValueError(f"expert_loads has {len(expert_loads)} entries, the placement "
                             f"{self.num_experts} experts")
        replicas = self.replicas()
        return [sum(expert_loads[e] / replicas[e] for e in experts)
                for experts in self.experts_per_device]

    def to_dict(self) -> dict:
        return {"num_experts": self.num_experts,
                "experts_per_device": [list(experts) for experts in self.experts_per_device]}

    @classmethod
    def from_dict(cls, values: dict) -> Placement:
        return cls(tuple(tuple(int(e) for e in experts) for experts in values["experts_per_device"]),
                   int(values["num_experts"]))


def max_over_mean(loads: Sequence[float]) -> float:
    """The largest load over the mean load (1.0 is perfectly even; NaN with no load):
    of devices under a placement here, of experts in moekit.aux.load_imbalance."""
    mean = sum(loads) / len(loads) if len(loads) else 0.0
    return max(loads) / mean if mean > 0 else math.nan


def contiguous_placement(num_experts: int, num_devices: int) -> Placement:
    """Experts in order, E / D per device (expert e on device e // (E / D)): the
    placement of plain expert parallelism."""
    if num_devices < 1 or num_experts % num_devices:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by num_devices "
                         f"({num_devices}) for a contiguous placement")
    per = num_experts // num_devices
    return Placement(tuple(tuple(range(d * per, (d + 1) * per)) for d in range(num_devices)),
                     num_experts)


def check_plan_inputs(expert_loads: Sequence[float], num_devices: int, num_replicas: int) -> None:
    """ValueError/TypeError naming the bad value unless plan_placement can plan these inputs."""
    if len(expert_loads) == 0:
        raise ValueError("expert_loads must not be empty")
    bad = [x for x in expert_loads if not (math.isfinite(x) and x >= 0)]
    if bad:
        raise ValueError(f"expert_loads must be finite and >= 0, got {bad[:5]}")
    if not isinstance(num_devices, int) or num_devices < 1:
        raise ValueError(f"num_devices must be an int >= 1, got {num_devices!r}")
    if not isinstance(num_replicas, int) or num_replicas < 0:
        raise ValueError(f"num_replicas must be an int >= 0, got {num_replicas!r}")
    experts = len(expert_loads)
    if (experts + num_replicas) % num_devices:
        raise ValueError(f"num_experts + num_replicas ({experts} + {num_replicas}) must be divisible "
                         f"by num_devices ({num_devices}), so every device holds as many experts")
    if num_replicas > experts * (num_devices - 1):
        raise ValueError(f"num_replicas {num_replicas} exceeds {experts * (num_devices - 1)}: an "
                         f"expert can be on each of the {num_devices} devices at most once")


def _replica_counts(expert_loads: list[float], num_devices: int, hot: int, cold: int) -> list[int]:
    """[E] copies of each expert: one each, then ``hot`` extra copies one at a time
    to the expert with the largest load per copy, then ``cold`` to the one with the
    smallest (cold copies only fill slots). Ties go to the lowest id; an expert
    is never on more than num_devices devices."""
    replicas = [1] * len(expert_loads)
    for count, sign in ((hot, -1), (cold, 1)):
        for _ in range(count):
            open_experts = [e for e in range(len(expert_loads)) if replicas[e] < num_devices]
            chosen = min(open_experts, key=lambda e: (sign * expert_loads[e] / replicas[e], e))
            replicas[chosen] += 1
    return replicas


def plan_placement(expert_loads: Sequence[float], num_devices: int, num_replicas: int = 0) -> Placement:
    """A placement of E = len(expert_loads) experts plus num_replicas extra copies
    over num_devices devices that keeps the most loaded device light (see the
    module docstring). Loads are any non-negative numbers (tokens per expert)."""
    expert_loads = [float(x) for x in expert_loads]
    check_plan_inputs(expert_loads, num_devices, num_replicas)
    best = None
    # Candidate splits of the extra copies into hot and cold ones (at most 9 tried).
    for hot in sorted({round(num_replicas * i / 8) for i in range(9)}, reverse=True):
        replicas = _replica_counts(expert_loads, num_devices, hot, num_replicas - hot)
        devices = _pack(expert_loads, replicas, num_devices)
        _local_search(devices, expert_loads, replicas)
        placement = Placement(tuple(tuple(sorted(experts)) for experts in devices), len(expert_loads))
        peak = max(placement.device_loads(expert_loads))
        if best is None or peak < best[0]:
            best = (peak, placement)
    return best[1]


def _pack(expert_loads: list[float], replicas: list[int], num_devices: int) -> list[list[int]]:
    """The copies, heaviest first, each onto the least loaded device with a free slot
    that does not hold that expert yet."""
    slots = sum(replicas) // num_devices
    copies = sorted(((expert_loads[e] / replicas[e], e) for e in range(len(expert_loads))
                     for _ in range(replicas[e])), key=lambda c: (-c[0], c[1]))
    devices: list[list[int]] = [[] for _ in range(num_devices)]
    loads = [0.0] * num_devices
    for load, e in copies:
        open_devices = [d for d in range(num_devices) if len(devices[d]) < slots and e not in devices[d]]
        if not open_devices:
            _make_room(devices, e, slots)
            open_devices = [d for d in range(num_devices) if len(devices[d]) < slots and e not in devices[d]]
            loads = [sum(expert_loads[x] / replicas[x] for x in experts) for experts in devices]
        target = min(open_devices, key=lambda d: (loads[d], d))
        devices[target].append(e)
        loads[target] += load
    return devices


def _make_room(devices: list[list[int]], expert: int, slots: int) -> None:
    """Every device with a free slot already holds ``expert``: move one expert from a
    full device without it onto such a device. One always exists, since a device
    with a free slot holds fewer than S experts and so cannot hold all S of a full one."""
    with_room = next(d for d in devices if len(d) < slots)
    full = next(d for d in devices if len(d) == slots and expert not in d)
    movable = next(x for x in full if x not in with_room)
    full.remove(movable)
    with_room.append(movable)


def _local_search(devices: list[list[int]], expert_loads: list[float], replicas: list[int]) -> None:
    """Lower the most loaded device, one move at a time, while a move does so without
    raising any other device to its old load. Two moves: swap an expert of the top
    device with one of another device; or give a slot of the top device that holds a
    copy of a replicated expert x to another expert y (x loses a copy, y gains one).
    Each move makes the loads sorted in decreasing order lexicographically smaller,
    so the search ends; the best move (lowest new maximum) is taken each time."""
    num_experts = len(expert_loads)
    for _ in range(100 * sum(len(d) for d in devices)):
        share = [expert_loads[e] / replicas[e] for e in range(num_experts)]
        loads = [sum(share[e] for e in experts) for experts in devices]
        top = max(range(len(devices)), key=lambda d: (loads[d], -d))
        limit = loads[top] - 1e-12 * max(loads[top], 1e-300)
        best = None  # (new maximum of the changed devices, move)
        for x in devices[top]:
            for other, experts in enumerate(devices):
                if other == top or x in experts:
                    continue
                for y in experts:
                    if y in devices[top]:
                        continue
                    score = max(loads[top] - share[x] + share[y], loads[other] - share[y] + share[x])
                    if score < limit and (best is None or score < best[0]):
                        best = (score, ("swap", x, y, other))
            if replicas[x] < 2:
                continue
            gain_x = expert_loads[x] / (replicas[x] - 1) - share[x]  # on x's other devices
            raised = max(loads[d] + gain_x for d, experts in enumerate(devices)
                         if d != top and x in experts)
            candidates = [y for y in range(num_experts) if y not in devices[top]]
            if not candidates:
                continue
            y = min(candidates, key=lambda y: (expert_loads[y] / (replicas[y] + 1), y))
            score = max(loads[top] - share[x] + expert_loads[y] / (replicas[y] + 1), raised)
            if score < limit and (best is None or score < best[0]):
                best = (score, ("replace", x, y, None))
        if best is None:
            return
        kind, x, y, other = best[1]
        devices[top][devices[top].index(x)] = y
        if kind == "swap":
            devices[other][devices[other].index(y)] = x
        else:
            replicas[x] -= 1
            replicas[y] += 1


def read_placement_file(path: str | Path) -> dict[str, Placement]:
    """The placement of every MoE layer in a file written by `moekit plan-placement`
    ({layer name: Placement}), for moekit.parallel.apply_expert_parallel or
    `moekit train --expert-parallel --placement FILE`."""
    path = Path(path)
    try:
        layers = json.loads(path.read_text())["layers"]
        return {name: Placement.from_dict(layer) for name, layer in layers.items()}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} is not a placement file written by moekit plan-placement "
                         f"({type(error).__name__}: {error})") from error
