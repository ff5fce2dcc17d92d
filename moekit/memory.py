"""Whether parameters fit before they are allocated: estimated bytes against the memory free.

``check_parameters_fit(what, num_parameters, fix)`` is called by ``moekit.MoE``,
``moekit.SoftMoE`` (through ``check_layer_fits``) and
``moekit.lm.model.MoETransformer`` before they allocate: a config with, say,
``num_experts=10**9`` is a ``moekit.errors.UsageError`` (a ``ValueError``) naming
the config, the estimated bytes and the free memory, not an allocator error (or
a machine swapping for minutes).
The estimate is parameters x the size of the dtype they are made in; the free
memory is, on the CPU, the kernel's MemAvailable plus free swap (Linux), and on a
CUDA device what ``torch.cuda.mem_get_info`` reports. Where the free memory is not
known (the meta device, which allocates nothing; other devices; other systems),
nothing is checked.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moekit.errors import UsageError

_MEMINFO = Path("/proc/meminfo")


def free_bytes(device: torch.device) -> int | None:
    """Bytes that new tensors on device can take now, or None where that is not known."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        fields = dict(line.split(":", 1) for line in _MEMINFO.read_text().splitlines() if ":" in line)
        return sum(int(fields[name].split()[0]) * 1024 for name in ("MemAvailable", "SwapFree"))
    except (OSError, KeyError, ValueError, IndexError):  # not Linux, or a kernel without them
        return None


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB': one decimal in the largest binary unit not above n."""
    size, unit = float(n), "bytes"
    for bigger in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{n} bytes" if unit == "bytes" else f"{size:.1f} {unit}"


def check_parameters_fit(what: str, num_parameters: int, fix: str,
                         device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
    """UsageError when num_parameters in dtype need more bytes than are free on device
    (defaults: torch's default device and dtype, where a module's parameters are made)."""
    device = torch.get_default_device() if device is None else torch.device(device)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    needed = num_parameters * dtype.itemsize
    free = free_bytes(device)
    if free is not None and needed > free:
        raise UsageError(f"{what} has {num_parameters:,} parameters, about {human_bytes(needed)} in "
                         f"{str(dtype).removeprefix('torch.')}, more than the {human_bytes(free)} free "
                         f"on {device}; {fix}")


def check_layer_fits(config) -> None:
    """check_parameters_fit for one moekit.MoE(config) or SoftMoE(config) (a MoEConfig)."""
    from moekit.params.counting import moe_layer_parameters  # counting imports the config

    check_parameters_fit(f"MoEConfig(num_experts={config.num_experts}, dim={config.dim}, "
                         f"expert_dim={config.expert_dim})",
                         sum(count.total for count in moe_layer_parameters(config).values()),
                         "use smaller sizes, or build the layer under `with torch.device('meta'):` "
                         "to allocate nothing")
