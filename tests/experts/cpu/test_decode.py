"""A decode step's whole expert FFN in one C call, against a float64 reference and the layer."""

from __future__ import annotations

import copy
import ctypes

import pytest
import torch

from moekit.contract import DispatchPlan
from moekit.experts.activations import GATED, KERNEL_ACTIVATIONS, apply_activation
from moekit.experts.cpu import decode, skinny
from tests.conftest import needs, randomized_moe
from tests.experts.cpu.conftest import count_calls

needs_kernel = needs(skinny.available(), reason=f"no skinny kernel: {skinny.unavailable_reason()}")


def _reference(x, ids, weights, w1, w2, activation, b1=None, b2=None, kept=None) -> torch.Tensor:
    """float64 sum_j weights[t, j] * FFN_{ids[t, j]}(x[t]) over the kept j, token by token."""
    y = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            if kept is not None and not kept[t, j]:
                continue
            e = int(ids[t, j])
            h = w1[e].double() @ x[t].double() + (0 if b1 is None else b1[e].double())
            out = w2[e].double() @ apply_activation(h, activation)
            y[t] += weights[t, j].double() * (out + (0 if b2 is None else b2[e].double()))
    return y


def _problem(tokens, top_k, experts, dim, expert_dim, activation, bias, generator):
    hidden = 2 * expert_dim if activation in GATED else expert_dim
    x = torch.randn(tokens, dim, generator=generator)
    ids = torch.rand(tokens, experts, generator=generator).argsort(-1)[:, :top_k]
    weights = torch.rand(tokens, top_k, generator=generator)
    w1 = torch.randn(experts, hidden, dim, generator=generator) / dim ** 0.5
    w2 = torch.randn(experts, dim, expert_dim, generator=generator) / expert_dim ** 0.5
    b1 = torch.randn(experts, hidden, generator=generator) if bias else None
    b2 = torch.randn(experts, dim, generator=generator) if bias else None
    return x, ids, weights, w1, w2, b1, b2


@needs_kernel
@pytest.mark.parametrize("activation", sorted(KERNEL_ACTIVATIONS))
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_matches_float64(activation, bias, threads):
    generator = torch.Generator().manual_seed(len(activation) * 10 + threads)
    x, ids, weights, w1, w2, b1, b2 = _problem(9, 2, 5, 37, 19, activation, bias, generator)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = decode.skinny_ffn(x, ids, weights, w1, w2, activation, b1, b2)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(result.y_TD.double(), _reference(x, ids, weights, w1, w2, activation,
                                                                b1, b2), rtol=1e-5, atol=1e-5)
    flat = ids.reshape(-1)
    torch.testing.assert_close(result.counts_E, torch.bincount(flat, minlength=5))
    torch.testing.assert_close(result.order_R, torch.argsort(flat, stable=True))


@needs_kernel
@pytest.mark.parametrize("tokens,top_k,experts", [(0, 2, 4), (1, 1, 1), (1, 4, 4), (16, 2, 8),
                                                   (6, 3, 3)])
def test_batch_shapes(tokens, top_k, experts):
    generator = torch.Generator().manual_seed(tokens * 7 + top_k)
    x, ids, weights, w1, w2, _, _ = _problem(tokens, top_k, experts, 24, 16, "swiglu", False,
                                             generator)
    result = decode.skinny_ffn(x, ids, weights, w1, w2, "swiglu", max_rows=16)
    assert result.y_TD.shape == (tokens, 24) and result.order_R.shape == (tokens * top_k,)
    torch.testing.assert_close(result.y_TD.double(),
                               _reference(x, ids, weights, w1, w2, "swiglu"), rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_kept_mask_leaves_choices_out(bias, threads):
    """Choices kept_TK marks False take no row, no work and no part in the combine; a token
    with none kept gets zeros."""
    generator = torch.Generator().manual_seed(3 + threads)
    x, ids, weights, w1, w2, b1, b2 = _problem(7, 3, 5, 24, 12, "swiglu", bias, generator)
    kept = torch.rand(7, 3, generator=generator) < 0.6
    kept[2] = False
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = decode.skinny_ffn(x, ids, weights, w1, w2, "swiglu", b1, b2, kept_TK=kept)
    finally:
        torch.set_num_threads(previous)
    expected = _reference(x, ids, weights, w1, w2, "swiglu", b1, b2, kept)
    torch.testing.assert_close(result.y_TD.double(), expected, rtol=1e-5, atol=1e-5)
    assert not result.y_TD[2].any()
    flat_ids, flat_kept = ids.reshape(-1), kept.reshape(-1)
    torch.testing.assert_close(result.counts_E, torch.bincount(flat_ids[flat_kept], minlength=5))
    sort_key = torch.where(flat_kept, flat_ids, 5)
    expected_order = torch.argsort(sort_key, stable=True)[:int(flat_kept.sum())]
    torch.testing.assert_close(result.order_R, expected_order)
    none_kept = decode.skinny_ffn(x, ids, weights, w1, w2, "swiglu", kept_TK=torch.zeros_like(kept))
    assert not none_kept.y_TD.any() and none_kept.order_R.numel() == 0


@needs_kernel
def test_strided_stacks_and_inputs():
    generator = torch.Generator().manual_seed(5)
    x, ids, weights, w1, w2, _, _ = _problem(4, 2, 6, 16, 8, "relu", False, generator)
    ids = ids % 3
    w1_every_other, w2_every_other = torch.cat([w1, w1])[::2], torch.cat([w2, w2])[::2]
    x_strided = torch.cat([x, x], dim=1)[:, ::2]
    result = decode.skinny_ffn(x_strided, ids, weights.t().contiguous().t(), w1_every_other,
                               w2_every_other, "relu")
    expected = _reference(x_strided, ids, weights, w1_every_other, w2_every_other, "relu")
    torch.testing.assert_close(result.y_TD.double(), expected, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_declines_above_max_rows():
    generator = torch.Generator().manual_seed(0)
    x, _, weights, w1, w2, _, _ = _problem(5, 1, 3, 8, 8, "silu", False, generator)
    ids = torch.tensor([[0], [2], [0], [0], [1]])
    assert decode.skinny_ffn(x, ids, weights, w1, w2, "silu", max_rows=2) is None
    assert decode.skinny_ffn(x, ids, weights, w1, w2, "silu", max_rows=3) is not None


@needs_kernel
def test_bad_inputs_are_named():
    generator = torch.Generator().manual_seed(0)
    x, ids, weights, w1, w2, _, _ = _problem(3, 2, 4, 8, 6, "swiglu", False, generator)
    with pytest.raises(ValueError, match=r"ids_TK must lie in \[0, 4\), got values from 0 to 4"):
        decode.skinny_ffn(x, torch.tensor([[0, 4], [1, 2], [3, 0]]), weights, w1, w2, "swiglu")
    with pytest.raises(ValueError, match=r"ids_TK must lie in \[0, 4\), got values from -1"):
        decode.skinny_ffn(x, torch.tensor([[0, -1], [1, 2], [3, 0]]), weights, w1, w2, "swiglu")
    with pytest.raises(ValueError, match="activation must be one of"):
        decode.skinny_ffn(x, ids, weights, w1, w2, "tanh")
    with pytest.raises(TypeError, match="x_TD must be a float32, bfloat16 or float16 CPU tensor, got "
                                        "torch.float64"):
        decode.skinny_ffn(x.double(), ids, weights, w1, w2, "swiglu")
    with pytest.raises(TypeError, match="ids_TK must be an int64 CPU tensor, got torch.int32"):
        decode.skinny_ffn(x, ids.int(), weights, w1, w2, "swiglu")
    with pytest.raises(ValueError, match=r"expected x_TD \[T, D\], ids_TK and weights_TK \[T, K\]; "
                                         r"got \(3, 8\), \(3, 2\), \(2, 3\)"):
        decode.skinny_ffn(x, ids, weights.t(), w1, w2, "swiglu")
    with pytest.raises(ValueError, match=r"w1_EHD must have shape \(4, 14, 8\) for 'swiglu', "
                                         r"got \(4, 12, 8\)"):  # F = 7 from w2
        decode.skinny_ffn(x, ids, weights, w1, torch.randn(4, 8, 7), "swiglu")
    with pytest.raises(TypeError, match="w2_EDF must be a float32, bfloat16 or float16 CPU tensor, got torch.float64"):
        decode.skinny_ffn(x, ids, weights, w1, w2.double(), "swiglu")
    with pytest.raises(ValueError, match="give both b1_EH and b2_ED or neither"):
        decode.skinny_ffn(x, ids, weights, w1, w2, "swiglu", b1_EH=torch.zeros(4, 12))
    # Every expert's slice is checked, not only expert 0's: the C code would read past the end.
    with pytest.raises(ValueError, match=r"b1_EH must have shape \(4, 12\) for 'swiglu', got \(2, 12\)"):
        decode.skinny_ffn(x, ids, weights, w1, w2, "swiglu", torch.zeros(2, 12), torch.zeros(4, 8))
    with pytest.raises(ValueError, match=r"b2_ED must have shape \(4, 8\) for 'swiglu', got \(1, 8\)"):
        decode.skinny_ffn(x, ids, weights, w1, w2, "swiglu", torch.zeros(4, 12), torch.zeros(1, 8))
    with pytest.raises(ValueError, match=r"b2_ED must have shape \(4, 8\) for 'swiglu', got \(4, 7\)"):
        decode.skinny_ffn(x, ids, weights, w1, w2, "swiglu", torch.zeros(4, 12), torch.zeros(4, 7))
    with pytest.raises(TypeError, match="kept_TK must be a bool CPU tensor, got torch.int64"):
        decode.skinny_ffn(x, ids, weights, w1, w2, "swiglu", kept_TK=torch.ones_like(ids))
    with pytest.raises(ValueError, match=r"kept_TK must have ids_TK's shape \(3, 2\), got \(3,\)"):
        decode.skinny_ffn(x, ids, weights, w1, w2, "swiglu", kept_TK=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expected w1_EHD \[E, H, D\] and w2_EDF \[E, D, F\], got "
                                         r"\(4, 12, 8\) and \(3, 8, 6\)"):
        decode.skinny_ffn(x, ids, weights, w1, w2[:3], "swiglu")


def run_one_call_and_autograd(moe, x, monkeypatch):
    """moe(x) under no_grad (which must take the one-call path) and with gradients (which must
    not); asserts equal outputs and counts and returns both aux."""
    calls = count_calls(monkeypatch, decode, "skinny_ffn")
    with torch.no_grad():
        y_fast, aux_fast = moe(x)
    assert calls, "the inference batch did not take the one-call path"
    calls.clear()
    y_grad, aux_grad = moe(x)
    assert not calls and y_grad.requires_grad
    torch.testing.assert_close(y_fast, y_grad.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux_fast.tokens_per_expert, aux_grad.tokens_per_expert)
    return aux_fast, aux_grad


@needs_kernel
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("bias", [False, True])
def test_layer_inference_takes_one_call_and_equals_the_autograd_path(activation, bias, monkeypatch):
    """Under no_grad a decode-size dropless layer goes through skinny_ffn; its output and
    aux equal those of the same layer run with gradients (the fused autograd op)."""
    moe = randomized_moe(2, dim=40, expert_dim=24, num_experts=6, top_k=2, activation=activation,
                         bias=bias)
    aux_fast, _ = run_one_call_and_autograd(moe, torch.randn(2, 5, 40), monkeypatch)
    assert float(aux_fast.dropped_fraction) == 0.0


@needs_kernel
@pytest.mark.parametrize("fields", [dict(capacity_factor=0.5), dict(router="expert_choice")],
                         ids=["capacity", "expert_choice"])
def test_layer_drops_and_masks_take_one_call_too(fields, monkeypatch):
    """Capacity drops and expert choice's non-assignments go through the one-call path as a
    kept mask; output, counts and dropped fraction equal the autograd path's."""
    moe = randomized_moe(3, dim=16, expert_dim=8, num_experts=4, top_k=2, **fields)
    aux_fast, aux_grad = run_one_call_and_autograd(moe, torch.randn(6, 16), monkeypatch)
    torch.testing.assert_close(aux_fast.dropped_fraction, aux_grad.dropped_fraction)
    if "capacity_factor" in fields:
        assert float(aux_fast.dropped_fraction) > 0  # the case under test: some choices dropped


@needs_kernel
def test_layer_keeps_the_general_path_where_it_must(monkeypatch):
    """float64, too many rows per expert, and a watching FlopCounterMode all leave the one-call
    path alone (and still give the right answer)."""
    from torch.utils.flop_counter import FlopCounterMode
    calls = count_calls(monkeypatch, decode, "skinny_ffn")
    x = torch.randn(6, 16)
    dropless = randomized_moe(1, dim=16, expert_dim=8, num_experts=4, top_k=2)
    with torch.no_grad():
        dropless.double()(x.double())
        randomized_moe(1, dim=16, expert_dim=8, num_experts=2, top_k=2)(torch.randn(13, 16))
        with FlopCounterMode(display=False) as counter:
            randomized_moe(1, dim=16, expert_dim=8, num_experts=4, top_k=2)(x)
    assert not calls
    assert counter.get_total_flops() > 0


@needs_kernel
@pytest.mark.parametrize("bias", [False, True])
def test_fetched_weights_give_the_same_bits(bias):
    """skinny_ffn_fetched fetches only experts with rows, in expert order, and equals skinny_ffn
    exactly; above max_rows it fetches nothing."""
    generator = torch.Generator().manual_seed(9)
    x, _, weights, w1, w2, b1, b2 = _problem(4, 2, 6, 16, 8, "geglu", bias, generator)
    ids = torch.tensor([[4, 1], [1, 4], [0, 4], [1, 0]])
    fetched = []

    def expert_weights(e):
        fetched.append(e)
        return w1[e], w2[e], None if b1 is None else b1[e], None if b2 is None else b2[e]

    result = decode.skinny_ffn_fetched(x, ids, weights, expert_weights, 6, 8, "geglu")
    assert fetched == [0, 1, 4]
    stacked = decode.skinny_ffn(x, ids, weights, w1, w2, "geglu", b1, b2)
    assert torch.equal(result.y_TD, stacked.y_TD) and torch.equal(result.order_R, stacked.order_R)
    fetched.clear()
    kept = torch.tensor([[True, False], [False, True], [True, True], [False, False]])
    result = decode.skinny_ffn_fetched(x, ids, weights, expert_weights, 6, 8, "geglu",
                                       kept_TK=kept)
    assert fetched == [0, 4]  # expert 1's choices are all dropped: not fetched
    stacked = decode.skinny_ffn(x, ids, weights, w1, w2, "geglu", b1, b2, kept_TK=kept)
    assert torch.equal(result.y_TD, stacked.y_TD) and torch.equal(result.order_R, stacked.order_R)
    fetched.clear()
    declined = decode.skinny_ffn_fetched(x, ids, weights, expert_weights, 6, 8, "geglu", max_rows=2)
    assert declined is None
    assert fetched == []
    with pytest.raises(ValueError, match=r"ids_TK must lie in \[0, 6\), got values from 2 to 6"):
        decode.skinny_ffn_fetched(x, ids + 2, weights, expert_weights, 6, 8, "geglu")
    with pytest.raises(ValueError, match="either every expert with rows has biases or none has"):
        decode.skinny_ffn_fetched(x, ids, weights, lambda e: (w1[e], w2[e]) + (
            (torch.zeros(16), torch.zeros(16)) if e == 4 else (None, None)), 6, 8, "geglu")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [1, 9])
def test_half_weights_match_float64(dtype, activation, bias, tokens):
    """bfloat16/float16 w1, w2 (and biases) with float32 x: against the float64 loop on the half
    weights cast to float64, and the float32 kernel on the weights widened to float32 to a few
    float32 ulps (the conversion in registers is exact; the compiler may fuse the tail's
    multiply-adds differently). D = 37 leaves a tail after the vectors of eight; some float16
    weights are subnormal."""
    generator = torch.Generator().manual_seed(tokens * 7 + bias)
    x, ids, weights, w1, w2, b1, b2 = _problem(tokens, 2, 5, 37, 19, activation, bias, generator)
    w1[0, :3, :5] = 3e-6  # a float16 subnormal
    half = [None if t is None else t.to(dtype) for t in (w1, w2, b1, b2)]
    result = decode.skinny_ffn(x, ids, weights, half[0], half[1], activation, half[2], half[3])
    assert result.y_TD.dtype == torch.float32
    torch.testing.assert_close(result.y_TD.double(),
                               _reference(x, ids, weights, *half[:2], activation, *half[2:]),
                               rtol=1e-5, atol=1e-5)
    widened = [None if t is None else t.float() for t in half]
    same = decode.skinny_ffn(x, ids, weights, widened[0], widened[1], activation, *widened[2:])
    torch.testing.assert_close(result.y_TD, same.y_TD, rtol=1e-6, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weights_without_f16c_or_avx(dtype, tmp_path, monkeypatch):
    """The same source built without -march=native (x86-64's baseline: no AVX, no F16C) takes
    the portable conversions; its result equals the native build's bit for bit only up to the
    vector width's summation order, so both are held to the float64 loop. Most of w1 is
    subnormal in float16, where the fallback's conversion takes its own branch."""
    from moekit.experts.cpu import build
    target = tmp_path / "skinny-portable.so"
    flags = build.PORTABLE_FLAGS + build.ACTIVATION_DEFINES
    build._compile(build.find_compiler(), flags, skinny._SOURCE, target)
    portable = ctypes.CDLL(str(target))
    skinny._declare(portable)
    generator = torch.Generator().manual_seed(3)
    x, ids, weights, w1, w2, b1, b2 = _problem(6, 2, 4, 29, 13, "swiglu", True, generator)
    w1, x = w1 * 1e-5, x * 1e5  # most float16 w1 subnormal, each h as before
    half = [t.to(dtype) for t in (w1, w2, b1, b2)]
    monkeypatch.setattr(skinny, "library", lambda: portable)
    result = decode.skinny_ffn(x, ids, weights, half[0], half[1], "swiglu", half[2], half[3])
    torch.testing.assert_close(result.y_TD.double(),
                               _reference(x, ids, weights, *half[:2], "swiglu", *half[2:]),
                               rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def avx2_build(tmp_path_factory) -> ctypes.CDLL:
    """skinny.c built for AVX2 + FMA + F16C only, once per module: 16 vector registers, so two
    weight rows at a time (the native build on an AVX-512VL CPU streams four), and no bf16 dot
    product."""
    from moekit.experts.cpu import build, isa
    flags = isa.cpu_isa().flags
    if not {"avx2", "fma", "f16c"} <= flags:
        pytest.skip("this CPU cannot run an AVX2 + FMA + F16C build")
    target = tmp_path_factory.mktemp("avx2") / "skinny-avx2.so"
    avx2_flags = [f for f in build.NATIVE_FLAGS if f != "-march=native"] + ["-mavx2", "-mfma",
                                                                             "-mf16c"]
    build._compile(build.find_compiler(), avx2_flags + build.ACTIVATION_DEFINES, skinny._SOURCE,
                   target)
    library = ctypes.CDLL(str(target))
    skinny._declare(library)
    return library


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens,dim,expert_dim", [(1, 37, 19), (7, 64, 30), (13, 45, 33)])
def test_same_bits_as_an_avx2_build(dtype, tokens, dim, expert_dim, avx2_build, monkeypatch):
    """The native build equals an AVX2-only build bit for bit: however many weight rows stream
    together, each output sums over the same i in the same order, so machine kinds agree. Odd
    hidden sizes leave rows outside the groups of four and two; up to 13 rows per expert
    (MAX_ROWS raised) span groups of six x rows."""
    generator = torch.Generator().manual_seed(tokens * 31 + dim)
    x, ids, weights, w1, w2, b1, b2 = _problem(tokens, 2, 2, dim, expert_dim, "swiglu", True,
                                               generator)
    stacks = [t.to(dtype) for t in (w1, w2, b1, b2)]
    native = decode.skinny_ffn(x, ids, weights, *stacks[:2], "swiglu", *stacks[2:], max_rows=16)
    monkeypatch.setattr(skinny, "library", lambda: avx2_build)
    other = decode.skinny_ffn(x, ids, weights, *stacks[:2], "swiglu", *stacks[2:], max_rows=16)
    assert torch.equal(native.y_TD, other.y_TD)


@needs_kernel
def test_the_hot_path_does_not_count_rows(monkeypatch):
    """applies_to(count_rows=False) decides without counting rows per expert (the call counts
    them), declining only batches whose assignments average more than MAX_ROWS per expert;
    count_rows=True (describe) counts."""
    from moekit import contract
    generator = torch.Generator().manual_seed(6)
    x, ids, weights, w1, w2, _, _ = _problem(5, 2, 4, 8, 6, "swiglu", False, generator)
    counted = count_calls(monkeypatch, contract, "expert_counts")
    assert decode.applies_to(x, DispatchPlan(ids, weights, 4), w1, w2, count_rows=False)
    assert not counted
    assert decode.applies_to(x, DispatchPlan(ids, weights, 4), w1, w2)
    assert counted
    crowded = torch.zeros(skinny.MAX_ROWS * 4 + 4, 1, dtype=torch.int64)
    assert "more than the kernel's" in decode.declined_because(
        torch.randn(crowded.shape[0], 8), DispatchPlan(crowded, torch.rand(crowded.shape), 4),
        w1, w2, count_rows=False)


@needs_kernel
def test_fetched_half_x_without_rows_gives_zeros():
    """bfloat16 x through skinny_ffn_fetched when no expert has rows (no tokens, or every choice
    dropped): zeros in x's dtype, nothing fetched."""
    generator = torch.Generator().manual_seed(8)
    x, ids, weights, w1, w2, _, _ = _problem(2, 2, 4, 8, 6, "swiglu", False, generator)
    fetched = []

    def expert_weights(e):
        fetched.append(e)
        return w1[e].bfloat16(), w2[e].bfloat16(), None, None
    for tokens, kept in ((0, None), (2, torch.zeros(2, 2, dtype=torch.bool))):
        result = decode.skinny_ffn_fetched(x[:tokens].bfloat16(), ids[:tokens], weights[:tokens],
                                           expert_weights, 4, 6, "swiglu", kept_TK=kept)
        assert result.y_TD.dtype == torch.bfloat16 and not result.y_TD.any()
    assert not fetched


@needs_kernel
def test_bf16_dot_product_follows_the_cpu():
    """The native build takes the bf16 dot product exactly where the compiler, targeting this
    CPU, offers AVX512-BF16 and AVX512-VL, and only where the CPU lists them, so the
    bfloat16-layer tests above exercise it on such machines."""
    import subprocess

    from moekit.experts.cpu import build, isa
    macros = subprocess.run([build.find_compiler(), "-march=native", "-dM", "-E", "-x", "c",
                             "/dev/null"], capture_output=True, text=True, check=True).stdout
    targeted = "__AVX512BF16__" in macros and "__AVX512VL__" in macros
    assert skinny.native_bf16_dot() == targeted
    if targeted:
        assert {"avx512_bf16", "avx512vl"} <= isa.cpu_isa().flags


@needs_kernel
@pytest.mark.parametrize("tokens,dim,expert_dim", [(1, 37, 19), (13, 64, 30)])
def test_bf16_layer_near_an_avx2_build(tokens, dim, expert_dim, avx2_build, monkeypatch):
    """bfloat16 x and weights: the native build (the bf16 dot product where the CPU has it) and an
    AVX2-only build (x widened) agree to the output's bfloat16 rounding; up to 13 rows per
    expert, tails after the vectors of sixteen."""
    generator = torch.Generator().manual_seed(tokens + dim)
    x, ids, weights, w1, w2, b1, b2 = _problem(tokens, 2, 2, dim, expert_dim, "swiglu", True,
                                               generator)
    half = [t.bfloat16() for t in (x, w1, w2, b1, b2)]
    native = decode.skinny_ffn(half[0], ids, weights, *half[1:3], "swiglu", *half[3:], max_rows=16)
    monkeypatch.setattr(skinny, "library", lambda: avx2_build)
    other = decode.skinny_ffn(half[0], ids, weights, *half[1:3], "swiglu", *half[3:], max_rows=16)
    torch.testing.assert_close(native.y_TD, other.y_TD, rtol=2 ** -7, atol=2 ** -7)
    reference = _reference(*half[:1], ids, weights, *half[1:3], "swiglu", *half[3:])
    torch.testing.assert_close(native.y_TD.double(), reference, rtol=2 ** -7, atol=2 ** -7)


@needs_kernel
@pytest.mark.parametrize("transpose", [True, False])
def test_grouped_products_same_bits_as_an_avx2_build(transpose, avx2_build, monkeypatch):
    """The forward (x @ W^T) and backward (x @ W) grouped products, with tails after the vectors
    of eight in both dimensions, equal an AVX2-only build bit for bit."""
    generator = torch.Generator().manual_seed(11)
    counts = [5, 0, 12, 1]
    x = torch.randn(sum(counts), 29, generator=generator)
    w = torch.randn((4, 35, 29) if transpose else (4, 29, 35), generator=generator)
    native = skinny.skinny_grouped(x, w, counts, transpose=transpose)
    monkeypatch.setattr(skinny, "library", lambda: avx2_build)
    assert torch.equal(native, skinny.skinny_grouped(x, w, counts, transpose=transpose))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_half_layer_is_computed_in_float32_and_rounded_once(dtype, bias):
    """x and the weights both bfloat16 (or float16), a layer held in that dtype: y is the float32
    computation on x widened exactly, rounded once to the dtype (bit for bit; for bfloat16 on a
    CPU with a bf16 dot product, within one rounding: its sums are taken in another order and
    the activation is rounded to bfloat16 for the second product), and so within one rounding
    of the float64 loop."""
    generator = torch.Generator().manual_seed(21 + bias)
    x, ids, weights, w1, w2, b1, b2 = _problem(7, 2, 5, 37, 19, "swiglu", bias, generator)
    half = [None if t is None else t.to(dtype) for t in (x, w1, w2, b1, b2)]
    result = decode.skinny_ffn(half[0], ids, weights, half[1], half[2], "swiglu", *half[3:])
    assert result.y_TD.dtype == dtype
    widened = decode.skinny_ffn(half[0].float(), ids, weights, half[1], half[2], "swiglu",
                                *half[3:])
    if dtype == torch.float16 or not skinny.native_bf16_dot():
        assert torch.equal(result.y_TD, widened.y_TD.to(dtype))
    else:  # both products on the bf16 dot product: the activation rounded, sums reordered
        torch.testing.assert_close(result.y_TD, widened.y_TD.to(dtype), rtol=2 ** -7, atol=2 ** -7)
    reference = _reference(half[0], ids, weights, half[1], half[2], "swiglu", *half[3:])
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(result.y_TD.double(), reference, rtol=eps, atol=eps)
    fetched = decode.skinny_ffn_fetched(half[0], ids, weights, lambda e: tuple(
        None if t is None else t[e] for t in half[1:]), 5, 19, "swiglu")
    assert torch.equal(fetched.y_TD, result.y_TD)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_layer_inference_takes_one_call(dtype, monkeypatch):
    """A layer cast to bfloat16 (or float16) decodes through the one call under no_grad; its
    output agrees with the autograd path (which rounds h and the activation to the dtype) to
    the dtype's rounding, and is at least as close to the float64 layer."""
    moe = randomized_moe(4, dim=48, expert_dim=24, num_experts=6, top_k=2)
    x = torch.randn(7, 48)
    with torch.no_grad():
        exact, _ = moe.double()(x.double())
    moe.to(dtype)
    calls = count_calls(monkeypatch, decode, "skinny_ffn")
    with torch.no_grad():
        y_fast, _ = moe(x.to(dtype))
    assert calls and y_fast.dtype == dtype
    calls.clear()
    y_grad, _ = moe(x.to(dtype))
    assert not calls and y_grad.requires_grad
    scale = float(exact.abs().max())
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y_fast.double(), y_grad.detach().double(), rtol=4 * eps,
                               atol=4 * eps * scale)
    fast_error = float((y_fast.double() - exact).abs().max())
    grad_error = float((y_grad.detach().double() - exact).abs().max())
    assert fast_error <= grad_error + eps * scale


@needs_kernel
def test_half_weights_bad_combinations_are_named():
    generator = torch.Generator().manual_seed(4)
    x, ids, weights, w1, w2, _, _ = _problem(3, 2, 4, 8, 6, "swiglu", False, generator)
    with pytest.raises(TypeError, match="w1_EHD and w2_EDF must have one dtype, got "
                                        "torch.bfloat16 and torch.float16"):
        decode.skinny_ffn(x, ids, weights, w1.bfloat16(), w2.half(), "swiglu")
    with pytest.raises(TypeError, match="w1_EHD must be a float32, bfloat16 or float16 CPU "
                                        "tensor, got torch.float64"):
        decode.skinny_ffn(x, ids, weights, w1.double(), w2.double(), "swiglu")
    with pytest.raises(TypeError, match="x_TD must be float32, or have the expert weights' dtype "
                                        r"\(a layer held in bfloat16 or float16\); got x_TD "
                                        "torch.bfloat16 and weights torch.float16"):
        decode.skinny_ffn(x.bfloat16(), ids, weights, w1.half(), w2.half(), "swiglu")
    with pytest.raises(TypeError, match="got x_TD torch.float16 and weights torch.float32"):
        decode.skinny_ffn(x.half(), ids, weights, w1, w2, "swiglu")
    plan = DispatchPlan(ids, weights, 4)
    assert decode.declined_because(x, plan, w1.bfloat16(), w2.bfloat16()) is None
    assert ("the kernel takes x in float32, or in the expert weights' half dtype, not "
            "torch.bfloat16 with torch.float16 weights") == decode.declined_because(
        x.bfloat16(), plan, w1.half(), w2.half())
    assert "not torch.bfloat16, torch.float16" in decode.declined_because(
        x, plan, w1.bfloat16(), w2.half())


@needs_kernel
def test_fetched_half_weights_give_the_same_bits():
    """skinny_ffn_fetched with bfloat16 experts (an offloading cache in bfloat16) equals
    skinny_ffn on the stacks."""
    generator = torch.Generator().manual_seed(5)
    x, ids, weights, w1, w2, b1, b2 = _problem(4, 2, 6, 16, 8, "swiglu", True, generator)
    half = [t.bfloat16() for t in (w1, w2, b1, b2)]
    result = decode.skinny_ffn_fetched(x, ids, weights, lambda e: tuple(t[e] for t in half), 6, 8,
                                       "swiglu")
    stacked = decode.skinny_ffn(x, ids, weights, half[0], half[1], "swiglu", half[2], half[3])
    assert torch.equal(result.y_TD, stacked.y_TD)


@pytest.fixture
def float32_precision_bf16():
    """torch's float32 matmul precision on CPU at "bf16" for the test (what
    torch.set_float32_matmul_precision("medium") sets), restored after."""
    matmul = torch.backends.mkldnn.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    yield
    matmul.fp32_precision = previous


def _rounded_reference(x, ids, weights, w1, w2, b1, b2) -> torch.Tensor:
    """float64 swiglu experts on x rounded to bfloat16, each activation row (times its combine
    weight) rounded to bfloat16 before the second product: the rounded mode's arithmetic."""
    y = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = w1[e].double() @ x[t].bfloat16().double() + b1[e].double()
            a = (weights[t, j].double() * apply_activation(h, "swiglu")).bfloat16().double()
            y[t] += w2[e].double() @ a + weights[t, j].double() * b2[e].double()
    return y


def test_float32_precision_setting_is_read(float32_precision_bf16, monkeypatch):
    assert decode.float32_may_use_bf16()
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    assert not decode.float32_may_use_bf16()
    torch.backends.mkldnn.matmul.fp32_precision = "none"  # the default: inherits
    previous = torch.backends.fp32_precision
    torch.backends.fp32_precision = "bf16"  # every backend's, mkldnn's matmul included
    try:
        assert decode.float32_may_use_bf16()
    finally:
        torch.backends.fp32_precision = previous
    assert not decode.float32_may_use_bf16()
    # torch before 2.9 has no per-backend setting: its float32_matmul_precision decides
    monkeypatch.setattr(decode, "_PRECISION_GETTER", None)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "medium")
    assert decode.float32_may_use_bf16()
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert not decode.float32_may_use_bf16()
    # a private getter that changed its signature: the public property decides
    monkeypatch.setattr(decode, "_PRECISION_GETTER", lambda: "bf16")
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    assert decode.float32_may_use_bf16()
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    assert not decode.float32_may_use_bf16()


@needs_kernel
@pytest.mark.parametrize("tokens,dim,expert_dim", [(1, 37, 19), (9, 64, 30), (13, 45, 33)])
def test_float32_precision_bf16_rounds_x_and_the_activation(tokens, dim, expert_dim,
                                                            float32_precision_bf16):
    """float32 x, bfloat16 weights, float32 matmul precision "bf16": where the CPU has the bf16
    dot product, x and the activation are rounded to bfloat16 and both products run on it, so
    y is the float64 computation on those rounded values (to float32 sums in another order, and
    a rounding of the activation that the float32 h may tip) and far from the unrounded one;
    elsewhere nothing is rounded (the same bits as the default precision). Tails after the
    vectors of eight and sixteen, odd weight-row counts, up to 13 rows per expert."""
    generator = torch.Generator().manual_seed(tokens * 5 + dim)
    x, ids, weights, w1, w2, b1, b2 = _problem(tokens, 2, 2, dim, expert_dim, "swiglu", True,
                                               generator)
    half = [t.bfloat16() for t in (w1, w2)]
    result = decode.skinny_ffn(x, ids, weights, *half, "swiglu", b1, b2, max_rows=16).y_TD
    fetched = decode.skinny_ffn_fetched(x, ids, weights, lambda e: (half[0][e], half[1][e], b1[e],
                                        b2[e]), 2, expert_dim, "swiglu", max_rows=16).y_TD
    assert torch.equal(fetched, result)  # offloaded experts: the same call
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    exact = decode.skinny_ffn(x, ids, weights, *half, "swiglu", b1, b2, max_rows=16).y_TD
    if not skinny.native_bf16_dot():
        assert torch.equal(result, exact)
        return
    rounded = _rounded_reference(x, ids, weights, *half, b1, b2)
    unrounded = _reference(x, ids, weights, *half, "swiglu", b1, b2)
    to_rounded = float((result.double() - rounded).abs().max())
    assert to_rounded < 1e-5 * float(rounded.abs().max()) + 2 ** -9 * float(
        (rounded - unrounded).abs().max())
    assert to_rounded * 10 < float((result.double() - unrounded).abs().max())
    torch.testing.assert_close(result, exact, rtol=2 ** -6, atol=2 ** -6)


@needs_kernel
def test_float32_precision_bf16_on_an_avx2_build_rounds_nothing(float32_precision_bf16,
                                                               avx2_build, monkeypatch):
    """Without the bf16 dot product the setting changes nothing: float32 as always."""
    generator = torch.Generator().manual_seed(17)
    x, ids, weights, w1, w2, b1, b2 = _problem(7, 2, 3, 40, 24, "swiglu", True, generator)
    half = [t.bfloat16() for t in (w1, w2)]
    monkeypatch.setattr(skinny, "library", lambda: avx2_build)
    result = decode.skinny_ffn(x, ids, weights, *half, "swiglu", b1, b2).y_TD
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    assert torch.equal(result, decode.skinny_ffn(x, ids, weights, *half, "swiglu", b1, b2).y_TD)


@needs_kernel
def test_layer_with_bf16_experts_at_float32_precision_bf16(float32_precision_bf16, monkeypatch):
    """A float32 layer whose experts are bfloat16, at float32 matmul precision "bf16", decodes
    through the one call and stays within bfloat16 rounding of the float64 layer. The float64
    layer's choices are replayed: where torch's own float32 products take bfloat16 too (the
    router's, on AMX), a near-tie could otherwise choose another expert."""
    moe = randomized_moe(9, dim=48, expert_dim=24, num_experts=6, top_k=2)
    x = torch.randn(7, 48)
    with torch.no_grad():
        reference = copy.deepcopy(moe).double()
        ids = reference.router(x.double()).expert_indices
        exact, _ = reference(x.double(), expert_indices=ids)
        moe.experts.to(torch.bfloat16)
        calls = count_calls(monkeypatch, decode, "skinny_ffn")
        y, _ = moe(x, expert_indices=ids)
    assert calls and y.dtype == torch.float32
    scale = float(exact.abs().max())
    torch.testing.assert_close(y.double(), exact, rtol=2 ** -6, atol=2 ** -6 * scale)


@needs_kernel
def test_the_kernel_itself_refuses_half_x_with_float32_weights():
    """Behind the Python checks the C call checks x's kind against the weights' too (status
    -3): reached only through the private _run, it gives a TypeError, and y is not written."""
    generator = torch.Generator().manual_seed(12)
    x, ids, weights, w1, w2, _, _ = _problem(3, 2, 4, 8, 6, "swiglu", False, generator)
    pointers = [decode._stack_addresses(w1), decode._stack_addresses(w2), None, None]
    with pytest.raises(TypeError, match="bfloat16 x only with bfloat16 weights, got "
                                        "torch.float32"):
        decode._run(x.bfloat16(), ids, weights, None, pointers, torch.float32, 4, 8, 6,
                    "swiglu", skinny.MAX_ROWS)


def _ties_and_denormals(rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """float32 [rows, dim]: a third exactly halfway between two bfloat16 numbers (ties, which
    round to the even one), a third one float32 ulp above halfway, a third bfloat16
    denormals and random values, in every position (the vectors of eight and the tail)."""
    mantissa = torch.randint(0, 2 ** 7, (rows, dim), generator=generator) << 16
    exponent = torch.randint(125, 130, (rows, dim), generator=generator) << 23  # 0.25 to 8
    bits = exponent | mantissa | 0x8000  # halfway below the 16 bits bfloat16 keeps
    kind = torch.arange(rows * dim).reshape(rows, dim) % 3
    bits = torch.where(kind == 1, bits + 1, bits)
    x = bits.to(torch.int32).view(torch.float32) * torch.where(
        torch.rand(rows, dim, generator=generator) < 0.5, -1.0, 1.0)
    other = torch.randn(rows, dim, generator=generator)
    other[:, ::5] = 1e-39  # a bfloat16 (and float32) denormal: the dot product reads it as zero
    return torch.where(kind == 2, other, x)


@needs_kernel
@pytest.mark.parametrize("dim", [37, 64])
def test_rounded_float32_x_equals_the_bfloat16_layer(dim, float32_precision_bf16):
    """At float32 matmul precision "bf16", where the CPU has the dot product, float32 x through
    bfloat16 weights gives the bits of x.bfloat16() widened back to float32 (so the kernel's
    rounding of x, vector and scalar tail, is torch's round to nearest even, on ties and
    denormals too), and, rounded to bfloat16, the bits of the bfloat16 layer on x.bfloat16()
    (both round the activation the same way before the second product)."""
    if not skinny.native_bf16_dot():
        pytest.skip("no bf16 dot product here: nothing is rounded (tested above)")
    generator = torch.Generator().manual_seed(dim)
    _, ids, weights, w1, w2, _, _ = _problem(9, 2, 3, dim, 21, "swiglu", False, generator)
    x = _ties_and_denormals(9, dim, generator)
    assert not torch.equal(x.bfloat16().float(), x)  # the ties do round
    half = [t.bfloat16() for t in (w1, w2)]
    from_float32 = decode.skinny_ffn(x, ids, weights, *half, "swiglu").y_TD
    rounded_by_torch = decode.skinny_ffn(x.bfloat16().float(), ids, weights, *half, "swiglu").y_TD
    assert torch.equal(from_float32, rounded_by_torch)
    from_bfloat16 = decode.skinny_ffn(x.bfloat16(), ids, weights, *half, "swiglu").y_TD
    assert torch.equal(from_float32.bfloat16(), from_bfloat16)
