"""The layer's outputs and gradients are bitwise stable across refactors of its internals.

Each case runs a layer with fixed seeds on a CPU backend and hashes every output, aux tensor
and gradient (SHA-256 of the raw bytes). The digests were recorded on a known-good commit and
are stored per machine kind (torch version, CPU capability and model, thread count, whether the
native decode kernel is on), since BLAS and the natively compiled kernel may round differently
on another CPU. On a machine kind with no recorded digests the test is skipped with the command
that records them: run it on a known-good commit, then check a change against it.

    python -m tests.test_layer_bitwise          # record this machine kind's digests
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import pytest
import torch

from moekit.balancing import router_step
from moekit.experts.cpu import skinny
from tests.conftest import randomized_moe

DIGESTS = Path(__file__).with_name("layer_digests.json")

CASES: dict[str, dict] = {
    "fused_swiglu_train": dict(dim=32, expert_dim=24, num_experts=8, top_k=2, mode="train", tokens=96),
    "fused_capacity_bias_gelu": dict(dim=24, expert_dim=16, num_experts=6, top_k=2, bias=True,
                                     activation="gelu", capacity_factor=1.0, mode="train", tokens=80),
    "fused_decode_nograd": dict(dim=64, expert_dim=32, num_experts=8, top_k=2, mode="eval", tokens=5),
    "fused_decode_capacity": dict(dim=64, expert_dim=32, num_experts=8, top_k=2, capacity_factor=0.5,
                                  mode="eval", tokens=12),
    "fused_decode_bias_relu": dict(dim=40, expert_dim=24, num_experts=4, top_k=3, bias=True,
                                   activation="relu", mode="eval", tokens=3),
    "fused_eval_large": dict(dim=32, expert_dim=16, num_experts=4, top_k=2, mode="eval", tokens=200),
    "fused_skinny_train": dict(dim=64, expert_dim=32, num_experts=8, top_k=2, mode="train", tokens=6),
    "fused_expert_choice": dict(dim=32, expert_dim=16, num_experts=4, top_k=2, router="expert_choice",
                                mode="train", tokens=40),
    "fused_expert_choice_eval": dict(dim=32, expert_dim=16, num_experts=4, top_k=2,
                                     router="expert_choice", mode="eval", tokens=8),
    "fused_sigmoid_aux_free": dict(dim=32, expert_dim=16, num_experts=8, top_k=2, score_func="sigmoid",
                                   bias_update_rate=0.01, num_groups=4, topk_groups=2, mode="train",
                                   tokens=64),
    "fused_shared_padding": dict(dim=32, expert_dim=16, num_experts=4, top_k=2, num_shared_experts=1,
                                 shared_expert_gate=True, mode="train", tokens=48, padding=True),
    "fused_float64": dict(dim=16, expert_dim=8, num_experts=4, top_k=2, mode="train", tokens=30,
                          dtype="float64"),
    "fused_bfloat16": dict(dim=16, expert_dim=16, num_experts=4, top_k=2, mode="train", tokens=30,
                           dtype="bfloat16"),
    "loop_capacity_geglu": dict(dim=24, expert_dim=12, num_experts=4, top_k=2, activation="geglu",
                                capacity_factor=1.25, experts_backend="loop", mode="train", tokens=50),
    "loop_bias_silu": dict(dim=20, expert_dim=12, num_experts=5, top_k=1, activation="silu",
                           bias=True, experts_backend="loop", mode="train", tokens=33),
    "grouped_mm_swiglu": dict(dim=32, expert_dim=16, num_experts=4, top_k=2,
                              experts_backend="grouped_mm", mode="train", tokens=64),
    "grouped_mm_eval": dict(dim=32, expert_dim=16, num_experts=4, top_k=2,
                            experts_backend="grouped_mm", mode="eval", tokens=9),
    "hash_router": dict(dim=16, expert_dim=8, num_experts=4, top_k=2, router="hash", mode="train",
                        tokens=20, token_ids=True),
    "balanced_router": dict(dim=16, expert_dim=8, num_experts=4, top_k=1, router="balanced",
                            mode="train", tokens=32),
    "dense_router": dict(dim=16, expert_dim=8, num_experts=3, top_k=3, router="dense", mode="train",
                         tokens=10),
}


def machine_kind() -> str:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    kernel = "kernel on" if skinny.available() else "kernel off"
    return (f"torch {torch.__version__} | {torch.backends.cpu.get_cpu_capability()} | {model} | "
            f"{torch.get_num_threads()} threads | {kernel}")


def case_digest(name: str) -> str:
    """SHA-256 over the bytes of y, the aux tensors and (in training) every gradient."""
    spec = dict(CASES[name])
    mode, tokens = spec.pop("mode"), spec.pop("tokens")
    dtype = getattr(torch, spec.pop("dtype", "float32"))
    padding, with_ids = spec.pop("padding", False), spec.pop("token_ids", False)
    moe = randomized_moe(seed=len(name), dtype=dtype, **spec)
    moe.train(mode == "train")
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, tokens // 2, moe.config.dim, generator=gen).to(dtype)
    mask = torch.rand(x.shape[:-1], generator=gen) > 0.25 if padding else None
    ids = torch.randint(0, 1000, x.shape[:-1], generator=gen) if with_ids else None
    hasher = hashlib.sha256()

    def feed(t: torch.Tensor | None) -> None:
        if t is not None:
            hasher.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes()
                          if t.dtype != torch.bool else t.to(torch.uint8).numpy().tobytes())

    if mode == "train":
        x.requires_grad_()
        torch.manual_seed(11)
        y, aux = moe(x, padding_mask=mask, token_ids=ids)
        upstream = torch.randn(y.shape, generator=gen).to(dtype)
        ((y * upstream).sum().float() + aux.loss).backward()
        router_step(moe)  # the optimizer step's bias update (it moved in forward before)
    else:
        with torch.no_grad():
            y, aux = moe(x, padding_mask=mask, token_ids=ids)
    for t in (y, aux.expert_indices, aux.expert_weights, aux.tokens_per_expert, aux.loss,
              aux.router_probs):
        feed(t)
    if mode == "train":
        feed(x.grad)
        for _, p in sorted(moe.named_parameters()):
            feed(p.grad)
        saved = moe.state_dict()
        for name, b in sorted(moe.named_buffers()):
            if name in saved:  # the buffers that are state (not the bias's per-step scratch)
                feed(b)
    return hasher.hexdigest()


def _recorded() -> dict:
    return json.loads(DIGESTS.read_text()) if DIGESTS.exists() else {}


@pytest.mark.parametrize("name", sorted(CASES))
def test_layer_is_bitwise_as_recorded(name):
    kind = machine_kind()
    recorded = _recorded().get(kind)
    if recorded is None:
        pytest.skip(f"no digests recorded for {kind!r}: run `python -m tests.test_layer_bitwise` "
                    "on a known-good commit to record them")
    assert name in recorded, f"case {name!r} has no recorded digest for this machine kind"
    assert case_digest(name) == recorded[name], f"{name}: output or gradients changed bitwise"


def test_digests_are_sensitive():
    """The digest changes when one weight changes by one ulp (so the check can fail)."""
    first = case_digest("fused_swiglu_train")
    assert case_digest("fused_swiglu_train") == first
    original = randomized_moe
    try:
        def nudged(*args, **kwargs):
            moe = original(*args, **kwargs)
            with torch.no_grad():
                w = moe.experts.down_proj.view(-1)
                w[0] = torch.nextafter(w[0], torch.tensor(float("inf")))
            return moe
        globals()["randomized_moe"] = nudged
        assert case_digest("fused_swiglu_train") != first
    finally:
        globals()["randomized_moe"] = original


if __name__ == "__main__":
    everything = _recorded()
    everything[machine_kind()] = {name: case_digest(name) for name in sorted(CASES)}
    DIGESTS.write_text(json.dumps(everything, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(CASES)} digests for {machine_kind()!r} in {DIGESTS}")
