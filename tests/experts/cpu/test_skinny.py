"""The skinny CPU kernel against a float64 product, and the fused backend's decode path built on it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from moekit.experts import fused
from moekit.experts.cpu import skinny
from tests.conftest import needs, randomized_moe
from tests.experts.cpu.conftest import count_calls

needs_kernel = needs(skinny.available(), reason=f"no skinny kernel: {skinny.unavailable_reason()}")


def _reference(x_RK: torch.Tensor, w: torch.Tensor, counts: list[int],
               transpose: bool = True) -> torch.Tensor:
    """float64 x_e @ w[e]^T (w [E, N, K]) or x_e @ w[e] (w [E, K, N]), expert by expert."""
    matrices = w.double().transpose(1, 2) if transpose else w.double()
    parts = [x.double() @ matrices[e] for e, x in enumerate(x_RK.split(counts))]
    return torch.cat(parts)


def _stack(num_experts: int, n_out: int, k_in: int, transpose: bool, generator=None) -> torch.Tensor:
    shape = (num_experts, n_out, k_in) if transpose else (num_experts, k_in, n_out)
    return torch.randn(*shape, generator=generator)


@needs_kernel
@pytest.mark.parametrize("k_in", [1, 7, 8, 13, 1000])
@pytest.mark.parametrize("n_out", [1, 2, 3, 17])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("transpose", [True, False])
def test_grouped_product_matches_float64(k_in, n_out, threads, transpose):
    generator = torch.Generator().manual_seed(k_in * 100 + n_out)
    counts = torch.randint(0, 13, (5,), generator=generator).tolist()
    counts[1] = 0  # always one expert without rows
    x = torch.randn(sum(counts), k_in, generator=generator)
    w = _stack(5, n_out, k_in, transpose, generator)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = skinny.skinny_grouped(x, w, counts, transpose=transpose)
    finally:
        torch.set_num_threads(previous)
    expected = _reference(x, w, counts, transpose)
    # float32 dot products of length K: error grows like sqrt(K) * eps * |x| |w|
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * k_in ** 0.5)


@needs_kernel
@pytest.mark.parametrize("transpose", [True, False])
def test_every_row_count_up_to_the_limit(transpose):
    torch.manual_seed(0)
    w = _stack(1, 37, 40, transpose)
    for rows in range(skinny.MAX_ROWS + 1):
        x = torch.randn(rows, 40)
        torch.testing.assert_close(skinny.skinny_grouped(x, w, [rows], transpose=transpose).double(),
                                   _reference(x, w, [rows], transpose), rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("transpose", [True, False])
def test_strided_inputs(transpose):
    torch.manual_seed(0)
    w = _stack(6, 24, 24, transpose)
    x = torch.randn(24, 7).t()  # [7, 24], not contiguous
    cases = [(w[::2], x, [3, 0, 4]),                          # a stride of two experts
             (w[:, :16, :16], x[:, :16], [3, 0, 4, 0, 0, 0])]  # no expert's matrix contiguous
    for stack, rows, counts in cases:
        torch.testing.assert_close(
            skinny.skinny_grouped(rows, stack, counts, transpose=transpose).double(),
            _reference(rows, stack, counts, transpose), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_bad_inputs_are_named():
    x, w = torch.randn(4, 8), torch.randn(2, 3, 8)
    with pytest.raises(TypeError, match="float32, got x torch.float64"):
        skinny.skinny_grouped(x.double(), w, [2, 2])
    with pytest.raises(ValueError, match=r"expected x \[R, K\] and w \[E, N, K\], got \(4, 8\) and \(2, 3, 9\)"):
        skinny.skinny_grouped(x, torch.randn(2, 3, 9), [2, 2])
    with pytest.raises(ValueError, match=r"counts \[3, 2\] must be 2 non-negative numbers summing to the 4"):
        skinny.skinny_grouped(x, w, [3, 2])
    with pytest.raises(ValueError, match=r"counts \[5, -1\]"):
        skinny.skinny_grouped(x, w, [5, -1])
    with pytest.raises(ValueError, match=r"w \[E, K, N\], got \(4, 8\) and \(2, 3, 8\)"):
        skinny.skinny_grouped(x, w, [2, 2], transpose=False)
    with pytest.raises(ValueError, match="runs on CPU, got x on meta, w on cpu"):
        skinny.skinny_grouped(x.to("meta"), w, [2, 2])
    # The registered operator checks as much: counts that overrun x or w never reach the C code.
    with pytest.raises(ValueError, match=r"counts \[3, 4\] must be 2 non-negative numbers"):
        torch.ops.moekit.skinny_grouped(x, w, [3, 4], True)
    with pytest.raises(ValueError, match=r"counts \[1, 1, 2\] must be 2"):
        torch.ops.moekit.skinny_grouped(x, w, [1, 1, 2], True)


def test_unavailable_kernel_says_why(monkeypatch):
    monkeypatch.setattr(skinny, "_tried", True)
    monkeypatch.setattr(skinny, "_library", None)
    monkeypatch.setattr(skinny, "_reason", "disabled by MOEKIT_CPU_KERNELS=0")
    with pytest.raises(RuntimeError, match="disabled by MOEKIT_CPU_KERNELS=0"):
        skinny.skinny_grouped(torch.randn(2, 8), torch.randn(1, 3, 8), [2])


def test_any_load_failure_turns_the_kernel_off_and_says_why(monkeypatch):
    """Not only build errors: whatever stops the library (an error locating the cache, say)
    leaves the kernel reported off with that reason, never reported in use."""
    monkeypatch.setattr(skinny, "_tried", False)
    monkeypatch.setattr(skinny, "_library", None)
    monkeypatch.setattr(skinny, "_reason", None)
    monkeypatch.setenv("MOEKIT_CPU_KERNELS", "1")

    def unexpected(source):
        raise KeyError("getpwuid(): uid not found: 4242")

    monkeypatch.setattr(skinny, "build_library", unexpected)
    with pytest.warns(RuntimeWarning, match="uid not found: 4242.*fall back to torch.mm"):
        assert not skinny.available()
    assert not skinny.available() and "uid not found: 4242" in skinny.unavailable_reason()
    assert not skinny.small_batch(1, torch.ones(2))


@needs_kernel
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("bias", [False, True])
def test_decode_path_equals_the_per_expert_path(activation, bias, monkeypatch):
    """A decode-size MoE (every expert <= MAX_ROWS rows) runs through the kernel; forward and
    every gradient equal the per-expert torch.mm path and the float64 layer."""
    moe = randomized_moe(3, dim=40, expert_dim=24, num_experts=6, top_k=2, activation=activation,
                         bias=bias)
    x = torch.randn(2, 7, 40)
    calls = count_calls(monkeypatch, skinny, "skinny_grouped")

    def run():
        inputs = x.clone().requires_grad_()
        y, _ = moe(inputs)
        grads = torch.autograd.grad(y.square().sum(), [inputs, *moe.parameters()])
        return y, grads

    y_kernel, grads_kernel = run()
    assert calls, "the decode-size batch did not go through the kernel"
    monkeypatch.setattr(skinny, "MAX_ROWS", 0)
    calls.clear()
    y_mm, grads_mm = run()
    assert not calls
    torch.testing.assert_close(y_kernel, y_mm, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_kernel, grads_mm):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_kernel
def test_decode_path_with_weights_and_empty_batch():
    torch.manual_seed(0)
    x, w1, w2 = torch.randn(5, 16), torch.randn(3, 20, 16), torch.randn(3, 16, 10)
    token_R, weights_R, counts = torch.tensor([0, 3, 1, 3, 4, 2]), torch.rand(6), [2, 1, 3]
    saved_kernel, saved_mm = [], []
    y = fused.skinny_experts_forward(x, token_R, weights_R, counts, w1, w2, None, None, "swiglu",
                                     saved_kernel)
    expected = fused.experts_forward(x.double(), token_R, weights_R.double(), counts,
                                     lambda e: (w1[e].double(), w2[e].double(), None, None),
                                     "swiglu", saved_mm)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    assert [h.shape for h in saved_kernel] == [h.shape for h in saved_mm]
    empty = fused.skinny_experts_forward(x[:0], token_R[:0], None, [0, 0, 0], w1, w2, None, None,
                                         "swiglu", [])
    assert empty.shape == (0, 16)


def test_disabled_kernel_falls_back_to_torch():
    """With MOEKIT_CPU_KERNELS=0 the kernel is off, says why, and a layer still runs."""
    code = ("import torch, moekit\n"
            "from moekit.experts.cpu import skinny\n"
            "assert not skinny.available()\n"
            "print(skinny.unavailable_reason())\n"
            "moe = moekit.MoE(moekit.MoEConfig(dim=8, expert_dim=8, num_experts=4, top_k=2))\n"
            "print(moe(torch.randn(3, 8))[0].shape)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "MOEKIT_CPU_KERNELS": "0"}, check=True)
    assert result.stdout.splitlines() == ["disabled by MOEKIT_CPU_KERNELS=0", "torch.Size([3, 8])"]


@needs_kernel
def test_is_a_well_formed_torch_operator():
    """Fake tensors, torch.compile and FlopCounterMode see the kernel as an operator."""
    from torch.utils.flop_counter import FlopCounterMode
    x, w = torch.randn(5, 12), torch.randn(2, 7, 12)
    torch.library.opcheck(torch.ops.moekit.skinny_grouped.default, (x, w, [2, 3], True),
                          test_utils=("test_schema", "test_faketensor"))
    with FlopCounterMode(display=False) as counter:
        skinny.skinny_grouped(x, w, [2, 3])
    assert counter.get_total_flops() == 2 * 5 * 7 * 12


@needs_kernel
def test_profiler_names_the_kernel():
    x, w = torch.randn(3, 12), torch.randn(1, 7, 12)
    with torch.profiler.profile() as profile:
        out = skinny.skinny_grouped(x, w, [3])
    assert "moekit::skinny_grouped" in {event.key for event in profile.key_averages()}
    torch.testing.assert_close(out, skinny.skinny_grouped(x, w, [3]))  # same either way
