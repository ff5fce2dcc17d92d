"""Expert offloading for inference: expert weights stay on disk (or in CPU memory) and a
least-recently-used cache keeps at most N experts resident on the compute device.

Every MoE layer's ``experts`` is replaced by an ``OffloadedExperts`` that holds
no weights: for each expert with tokens, in expert order, it asks the shared
``ExpertCache``, which returns the resident copy (a hit) or loads it from its
store, evicting the least recently used expert beyond N (a load). A miss always
loads; no expert is ever skipped. The arithmetic is the fused CPU backend's own
loop (moekit.experts.fused.experts_forward) on the same weights, so on CPU the
outputs are bitwise those of the resident model.

Stores: ``SafetensorsExpertStore`` reads one expert's slice of the stacked
weights straight from a memory-mapped safetensors file (the run's
model.safetensors; nothing is rewritten); ``MemoryExpertStore`` keeps the
stacked weights in CPU memory, for a GPU that cannot hold every expert.
Shape letters: E experts, D model dim, F expert dim, H = 2F (gated) or F.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from torch import nn

from ..config import MoEConfig
from ..contract import DispatchPlan
from ..errors import UsageError
from ..experts.activations import KERNEL_ACTIVATIONS
from ..experts.cpu.decode import applies_to, skinny_ffn_fetched
from ..experts.fused import ExpertWeights, experts_forward
from ..layer import MoE
from .checkpoint import MODEL_FILE, CheckpointError, read_run_config
from .model import MoETransformer


CACHE_POLICIES = ("lru", "lfu")


class ExpertStore(Protocol):
    def load(self, layer: str, expert: int) -> ExpertWeights:
        """One expert's weights of the MoE layer named ``layer``, as CPU tensors."""


def _weight_names(config: MoEConfig) -> tuple[str, str, str | None, str | None]:
    """Names of an Experts module's (w1, w2, b1, b2) parameters; None where it has none."""
    first = "gate_up_proj" if config.is_gated else "up_proj"
    return (first, "down_proj", f"{first}_bias" if config.bias else None,
            "down_proj_bias" if config.bias else None)


class SafetensorsExpertStore:
    """Expert slices read on demand from a memory-mapped safetensors file holding the
    stacked weights under ``<layer>.experts.<name>`` (the layout moekit saves)."""

    def __init__(self, path: str | Path, configs: dict[str, MoEConfig]) -> None:
        self.path = Path(path)
        try:
            self._file = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as error:  # safetensors raises its own error types
            raise CheckpointError(f"{self.path} is not a readable safetensors file ({error})") from error
        self._names = {layer: _weight_names(config) for layer, config in configs.items()}
        missing = sorted(self.expert_keys() - set(self._file.keys()))
        if missing:
            raise CheckpointError(f"{self.path} lacks the expert weights {missing}")

    def expert_keys(self) -> set[str]:
        return {f"{layer}.experts.{n}" for layer, names in self._names.items() for n in names if n}

    def load(self, layer: str, expert: int) -> ExpertWeights:
        return tuple(None if name is None else self._file.get_slice(f"{layer}.experts.{name}")[expert]
                     for name in self._names[layer])

    def stacked(self, layer: str) -> ExpertWeights:
        """Every expert of a layer: (w1 [E, H, D], w2 [E, D, F], b1, b2), read into memory."""
        return tuple(None if name is None else self._file.get_tensor(f"{layer}.experts.{name}")
                     for name in self._names[layer])


class MemoryExpertStore:
    """Stacked expert weights kept in CPU memory (pinned when CUDA is available, so
    copies to the GPU are fast): weights[layer] = (w1 [E, H, D], w2 [E, D, F], b1, b2)."""

    def __init__(self, weights: dict[str, ExpertWeights]) -> None:
        pin = torch.cuda.is_available()
        self._weights = {layer: tuple(None if w is None else (w.pin_memory() if pin else w)
                                      for w in stacked) for layer, stacked in weights.items()}

    def load(self, layer: str, expert: int) -> ExpertWeights:
        return tuple(None if w is None else w[expert] for w in self._weights[layer])


class ExpertCache:
    """At most max_resident experts (over all layers) on ``device``. When full, policy
    "lru" evicts the least recently used expert; "lfu" the least often requested
    so far (ties: the least recent), which keeps the hot experts when the experts a
    token needs over all layers outnumber the cache and LRU would evict each one just
    before its next use. hits and loads count the requests served from memory and
    from the store."""

    def __init__(self, store: ExpertStore, max_resident: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, policy: str = "lru") -> None:
        if not isinstance(max_resident, int) or max_resident < 1:
            raise UsageError(f"max_resident must be an int >= 1, got {max_resident!r}")
        if policy not in CACHE_POLICIES:
            raise UsageError(f"policy must be one of {CACHE_POLICIES}, got {policy!r}")
        self.store, self.max_resident, self.policy = store, max_resident, policy
        self.device, self.dtype = torch.device(device), dtype
        self._resident: OrderedDict[tuple[str, int], ExpertWeights] = OrderedDict()  # oldest first
        self._requests: dict[tuple[str, int], int] = {}
        self.hits = self.loads = 0

    def get(self, layer: str, expert: int) -> ExpertWeights:
        key = (layer, expert)
        self._requests[key] = self._requests.get(key, 0) + 1
        weights = self._resident.get(key)
        if weights is not None:
            self._resident.move_to_end(key)
            self.hits += 1
            return weights
        weights = tuple(None if w is None else w.to(self.device, self.dtype, non_blocking=True)
                        for w in self.store.load(layer, expert))
        self.loads += 1
        if len(self._resident) == self.max_resident:
            del self._resident[self._victim()]
        self._resident[key] = weights
        return weights

    def _victim(self) -> tuple[str, int]:
        if self.policy == "lru":
            return next(iter(self._resident))
        return min(self._resident, key=self._requests.__getitem__)  # min keeps the first (oldest) tie

    @property
    def resident_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for ws in self._resident.values() for w in ws
                   if w is not None)

    def stats(self) -> dict[str, float]:
        """hits, loads, hit_rate (NaN before any request), resident_experts, resident_bytes."""
        requests = self.hits + self.loads
        return {"hits": self.hits, "loads": self.loads,
                "hit_rate": self.hits / requests if requests else float("nan"),
                "resident_experts": len(self._resident), "resident_bytes": self.resident_bytes}


class OffloadedExperts(nn.Module):
    """The experts contract (moekit.contract) with no weights of its own: each expert with rows
    is fetched from the cache, in expert order, and run as the fused CPU backend runs it (one
    native call for a decode-size batch). Inputs must have the cache's dtype and device, or be
    float32 with a bfloat16/float16 cache (half-size weights: the native call reads them as
    they are, the general path converts one expert at a time, as for stacked experts).
    Inference only (no gradient reaches the stored weights)."""

    def __init__(self, config: MoEConfig, layer: str, cache: ExpertCache) -> None:
        super().__init__()
        if config.combine_weights_on != "output":
            raise ValueError(f"offloaded experts apply the combine weights to the expert output "
                             f"only, not combine_weights_on={config.combine_weights_on!r} "
                             f"(layer {layer!r})")
        self.config, self.layer, self.cache = config, layer, cache

    @property
    def num_local_experts(self) -> int:
        return self.config.num_experts

    @property
    def dtype(self) -> torch.dtype:
        return self.cache.dtype

    @property
    def device(self) -> torch.device:
        return self.cache.device

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        if torch.is_grad_enabled() and x_TD.requires_grad:
            raise RuntimeError("offloaded experts are for inference: run under torch.no_grad()")
        fetch = functools.partial(self.cache.get, self.layer)
        invariant = self.config.batch_invariant
        if not invariant and self.config.activation in KERNEL_ACTIVATIONS \
                and applies_to(x_TD, plan, cpu_kernels=self.config.cpu_kernels,
                               count_rows=False,  # skinny_ffn_fetched counts them
                               weight_dtype=self.dtype or x_TD.dtype):
            decoded = skinny_ffn_fetched(x_TD, plan.ids_TK, plan.weights_TK, fetch,
                                         self.config.num_experts, self.config.expert_dim,
                                         self.config.activation, kept_TK=plan.kept_TK)
            if decoded is not None:  # None only if it declined after all: the general path
                plan.adopt_sort(decoded.order_R, decoded.counts_E)
                return decoded.y_TD
        if self.dtype is not None and self.dtype != x_TD.dtype:  # half-size weights
            fetch = functools.partial(_fetched_as, fetch, x_TD.dtype)
        return experts_forward(x_TD, plan.token_R, plan.weights_R, plan.counts_E.tolist(), fetch,
                               self.config.activation, cpu_kernels=self.config.cpu_kernels,
                               params=self.config.activation_params, batch_invariant=invariant)

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, num_experts={self.config.num_experts}, offloaded"


def _fetched_as(fetch: Callable[[int], ExpertWeights], dtype: torch.dtype,
                expert: int) -> ExpertWeights:
    """fetch(expert) with every tensor cast to dtype."""
    return tuple(None if w is None else w.to(dtype) for w in fetch(expert))


def moe_layers(model: nn.Module) -> dict[str, MoE]:
    """The moekit MoE layers of a model, by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, MoE)}


def offload_experts(model: nn.Module, store: ExpertStore, max_resident: int,
                    policy: str = "lru") -> ExpertCache:
    """Replace the experts of every MoE layer of model by OffloadedExperts served from
    one cache of max_resident experts over ``store`` (eviction ``policy`` "lru" or
    "lfu", see ExpertCache), on the model's current device and dtype. The replaced expert weights are released. Returns the cache."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no moekit MoE layer to offload")
    reference = next(iter(layers.values())).experts
    cache = ExpertCache(store, max_resident, reference.device, reference.dtype, policy)
    for name, moe in layers.items():
        moe.experts = OffloadedExperts(moe.config, name, cache)
    return cache


def load_offloaded_model(run_dir: str | Path, max_resident: int, device: str | torch.device = "cpu",
                         store: str = "auto", policy: str = "lru") -> tuple[MoETransformer, ExpertCache]:
    """The trained model of a run folder, in eval mode, with its experts offloaded:
    store "disk" reads them from model.safetensors (memory-mapped) on demand,
    "memory" keeps them in CPU memory; "auto" is disk on CPU, memory on a GPU.
    Only the other weights are loaded onto ``device``; at most max_resident experts
    join them there, evicted by ``policy`` ("lru" or "lfu", see ExpertCache)."""
    if store not in ("auto", "disk", "memory"):
        raise UsageError(f"store must be 'auto', 'disk' or 'memory', got {store!r}")
    device = torch.device(device)
    path = Path(run_dir) / MODEL_FILE
    model_cfg, _, _ = read_run_config(Path(run_dir))
    if model_cfg.moe is None:
        raise UsageError(f"{run_dir} is a dense model: it has no experts to offload")
    model = MoETransformer(model_cfg)
    layers = moe_layers(model)
    disk = SafetensorsExpertStore(path, {name: moe.config for name, moe in layers.items()})
    in_memory = store == "memory" or (store == "auto" and device.type != "cpu")
    chosen = MemoryExpertStore({name: disk.stacked(name) for name in layers}) if in_memory else disk
    cache = offload_experts(model, chosen, max_resident, policy)
    with safe_open(str(path), framework="pt", device="cpu") as weights:
        state = {key: weights.get_tensor(key) for key in weights.keys() if key not in disk.expert_keys()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not match the model of this run: {error}") from error
    model.to(device).eval()
    cache.device = device  # experts are loaded onto the device the model now lives on
    return model, cache


def resident_bytes(model: nn.Module, cache: ExpertCache | None = None) -> int:
    """Bytes of the model's parameters and buffers, plus the experts resident in cache."""
    own = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return own + (cache.resident_bytes if cache is not None else 0)
