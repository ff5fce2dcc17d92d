"""A decode step's whole expert FFN in one C call, for inference (no autograd).

    y_TD[t] = sum_j weights_TK[t, j] * FFN_{ids_TK[t, j]}(x_TD[t])
    FFN_e(v) = act(v @ w1[e]^T + b1[e]) @ w2[e]^T + b2[e]

At decode sizes the products stream the weights at about memory speed (skinny.c), and what is
left is the dozen small torch ops around them: sorting, gathering, the activation, the combine.
Each of those runs on caches the weight stream has just emptied, so together they cost a large
part of a step (measured in docs/benchmarks.md). moekit_skinny_ffn does all of it in one call
and one team of threads. It declines (returns None) when some expert would get more than
max_rows rows, where torch.mm is the faster product.

The expert weights may be held in bfloat16 or float16 (half the bytes to stream) while x and y
stay float32: the kernel widens each weight to float32 in registers as it loads it and computes
in float32, so the result is the float32 computation with the half weights converted exactly
(the biases are converted to float32 before the call; they are small).

A layer held in bfloat16 or float16 (x and the expert weights of that dtype) takes the same
call: the activation and the combine run in float32 and y is rounded once to x's dtype. Where
the CPU has a bf16 dot product (AVX512-BF16; skinny.native_bf16_dot()) and the layer is
bfloat16, both products run on it: bfloat16 x, and the activation rounded to bfloat16 (as the
autograd path rounds it), meet the bfloat16 weights, exact products summed in float32 in
another order (and denormals flushed). Elsewhere, and for float16, x is widened exactly to
float32 as in the float32 path and the activation stays float32.

float32 x with bfloat16 weights takes the dot product too where torch's float32 matmul
precision allows bfloat16 inside float32 products (float32_may_use_bf16():
torch.set_float32_matmul_precision("medium"), or torch.backends.mkldnn.matmul.fp32_precision =
"bf16"): x and the activation are rounded to bfloat16 (to nearest even) for the two products.
At the default precision nothing is rounded.

Numerically, for float32 x at the default precision, it is the fused backend's forward: the
same products, the activation in float32 with libm's expf/erff, the combine weight applied to
the activation, and each token's outputs summed in the order of its choices j. For half x it is
at least as precise as the fused autograd op, which rounds h and the activation to x's dtype:
the two agree to that dtype's rounding, not bit for bit.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.overrides import has_torch_function

from moekit.contract import DispatchPlan
from moekit.experts.activations import ACTIVATIONS, GATED, kernel_codes
from moekit.experts.cpu import skinny
from moekit.experts.fused import ExpertWeights

# How the kernel reads w1 and w2: skinny.c's WEIGHTS_F32, WEIGHTS_BF16, WEIGHTS_F16.
WEIGHT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# How it reads x: skinny.c's X_F32, X_BF16 (with bfloat16 weights only), and X_F32_AS_BF16:
# float32 x that may be rounded to bfloat16 (bfloat16 weights, float32_may_use_bf16()).
X_F32, X_BF16, X_F32_AS_BF16 = 0, 1, 2


def float32_may_use_bf16() -> bool:
    """Whether torch's float32 matmul precision on CPU lets float32 products compute in bfloat16
    inside: torch.backends.mkldnn.matmul.fp32_precision "bf16", which
    torch.set_float32_matmul_precision("medium") also sets (torch before 2.9: that call's
    "medium"), set there or inherited from torch.backends.mkldnn or torch.backends. torch's
    default ("none" everywhere: float32 inside) does not.

    Read on every decode call with bfloat16 weights, so through the getter behind that
    property: with cold caches 27 us against 68 us for the property (AMD EPYC Zen 4) (the public
    torch.get_float32_matmul_precision is cheaper still but answers "medium" after a later
    per-backend setting of "ieee"). The getter is private: should it change, the property."""
    if _PRECISION_GETTER is not None:
        try:
            return _PRECISION_GETTER("mkldnn", "matmul") == "bf16"
        except (TypeError, RuntimeError):
            return torch.backends.mkldnn.matmul.fp32_precision == "bf16"
    return torch.get_float32_matmul_precision() == "medium"


# torch >= 2.9: the function behind torch.backends.mkldnn.matmul.fp32_precision
_PRECISION_GETTER = getattr(torch._C, "_get_fp32_precision_getter", None)


class DecodedExperts(NamedTuple):
    """y_TD [T, D] in x's dtype; order_R [R] int64, the assignment t * K + j of each kept row with
    rows grouped by expert (stable: by token, then j); counts_E [E] int64 rows per expert."""

    y_TD: torch.Tensor
    order_R: torch.Tensor
    counts_E: torch.Tensor


def applies_to(x_TD: torch.Tensor, plan: DispatchPlan, *weights: torch.Tensor,
               cpu_kernels: str = "auto", count_rows: bool = True,
               weight_dtype: torch.dtype | None = None, compiles_as_operator: bool = False
               ) -> bool:
    """Whether the one-call path may run the plan on x_TD [T, D] with these expert weights: the
    plan has the routing's choices (not a rows plan), no gradient to record for any tensor, no
    torch tool watching (compile, FlopCounterMode, the profiler; they would not see the C call;
    compiles_as_operator: the caller runs the call as the operator moekit::fused_decode under
    torch.compile, for plans without a kept mask, see cpu/backend.py),
    and a decode-size batch (skinny.small_batch: x and the combine weights float32 on CPU,
    cpu_kernels not "off", the kernel available, at most skinny.MAX_ROWS rows for every expert),
    with expert weights on CPU of one dtype among WEIGHT_KINDS. x may also be bfloat16 or
    float16 when the expert weights have its dtype (a layer held in that dtype); a caller
    without the weight tensors (offloaded experts) names their dtype in weight_dtype.

    count_rows=False, for the call that follows at once: without a kept mask the rows are not
    counted (two torch ops); only batches whose assignments average more than MAX_ROWS per
    expert are declined here, and the call itself returns None when some expert has more than
    max_rows."""
    return declined_because(x_TD, plan, *weights, cpu_kernels=cpu_kernels, count_rows=count_rows,
                            weight_dtype=weight_dtype,
                            compiles_as_operator=compiles_as_operator) is None


def declined_because(x_TD: torch.Tensor, plan: DispatchPlan, *weights: torch.Tensor,
                     cpu_kernels: str = "auto", count_rows: bool = True,
                     weight_dtype: torch.dtype | None = None,
                     compiles_as_operator: bool = False) -> str | None:
    """Why the one-call path does not run this plan (see applies_to), or None when it does."""
    if plan.ids_TK is None:
        return "rows already grouped by expert (a rows plan)"
    tensors = (x_TD, plan.weights_TK, *weights)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "a gradient to record"
    # torch.compile (only) may see the call as the operator; a tensor subclass never does
    as_operator = compiles_as_operator and plan.kept_TK is None \
        and torch.compiler.is_compiling() and not has_torch_function(tensors)
    if skinny.observed(*tensors) and not as_operator:
        return "a torch tool watches (compile, a dispatch mode or the profiler)"
    reason = _weights_declined(weights)
    if reason is not None:
        return reason
    weight_dtype = weights[0].dtype if weights else weight_dtype
    float32_tensors = (x_TD, plan.weights_TK)
    if x_TD.dtype in (torch.bfloat16, torch.float16) and x_TD.is_cpu:
        if not _half_layer(x_TD.dtype, weight_dtype):
            return (f"the kernel takes x in float32, or in the expert weights' half dtype, not "
                    f"{x_TD.dtype} with {weight_dtype} weights")
        float32_tensors = (plan.weights_TK,)  # the call reads half x as it is
    if count_rows or plan.kept_TK is not None:
        most_rows = lambda: int(plan.counts_E.max())
    else:  # every assignment a row: their mean per expert is at most the largest count
        most_rows = -(-plan.ids_TK.numel() // plan.num_experts)
    return skinny.not_small_batch(most_rows, *float32_tensors, cpu_kernels=cpu_kernels)


def rounds_float32_x(x_dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """Whether the call rounds float32 x (and the activation) to bfloat16 for the CPU's bf16 dot
    product: bfloat16 weights, float32 matmul precision "bf16", and a kernel built with the dot
    product (skinny.native_bf16_dot())."""
    return (x_dtype == torch.float32 and weight_dtype == torch.bfloat16
            and skinny.native_bf16_dot() and float32_may_use_bf16())


def _half_layer(x_dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """Whether x and the expert weights share one half dtype: a layer held in bf16 or f16."""
    return x_dtype in (torch.bfloat16, torch.float16) and weight_dtype == x_dtype


def _weights_declined(weights: tuple[torch.Tensor, ...]) -> str | None:
    """Why the kernel cannot read these expert weights (and biases), or None when it can."""
    dtypes = sorted({str(t.dtype) for t in weights})
    if not all(t.is_cpu for t in weights):
        return "the kernel runs on CPU, and some expert weights are not there"
    if len(dtypes) > 1 or not all(t.dtype in WEIGHT_KINDS for t in weights):
        return (f"the kernel reads expert weights of one dtype among float32, bfloat16 and "
                f"float16, not {', '.join(dtypes)}")
    return None


def _ids_out_of_range(ids_TK: torch.Tensor, num_experts: int) -> ValueError:
    return ValueError(f"ids_TK must lie in [0, {num_experts}), got values from "
                      f"{int(ids_TK.min())} to {int(ids_TK.max())}")


def _check_tokens(x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                  kept_TK: torch.Tensor | None, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, "
                         f"got {activation!r}")
    for name, tensor in (("x_TD", x_TD), ("weights_TK", weights_TK)):
        allowed = (torch.float32, torch.bfloat16, torch.float16) if name == "x_TD" \
            else (torch.float32,)
        if tensor.dtype not in allowed or not tensor.is_cpu:
            kinds = "float32, bfloat16 or float16" if name == "x_TD" else "float32"
            raise TypeError(f"{name} must be a {kinds} CPU tensor, got {tensor.dtype} on "
                            f"{tensor.device}")
    if ids_TK.dtype != torch.int64 or not ids_TK.is_cpu:
        raise TypeError(f"ids_TK must be an int64 CPU tensor, got {ids_TK.dtype} on "
                        f"{ids_TK.device}")
    if x_TD.dim() != 2 or ids_TK.dim() != 2 or weights_TK.shape != ids_TK.shape \
            or ids_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"expected x_TD [T, D], ids_TK and weights_TK [T, K]; got "
                         f"{tuple(x_TD.shape)}, {tuple(ids_TK.shape)}, {tuple(weights_TK.shape)}")
    if kept_TK is not None:
        if kept_TK.dtype != torch.bool or not kept_TK.is_cpu:
            raise TypeError(f"kept_TK must be a bool CPU tensor, got {kept_TK.dtype} on "
                            f"{kept_TK.device}")
        if kept_TK.shape != ids_TK.shape:
            raise ValueError(f"kept_TK must have ids_TK's shape {tuple(ids_TK.shape)}, got "
                             f"{tuple(kept_TK.shape)}")


def _check_weights(names: tuple[str, ...], weights: ExpertWeights,
                   expected: tuple[tuple[int, ...], ...], activation: str) -> None:
    """weights (w1, w2, b1, b2; b1 and b2 both or neither None) CPU tensors with the expected
    shapes, in full (the C code reads every element these shapes promise); w1 and w2 of one
    dtype among WEIGHT_KINDS, the biases of any of them."""
    for name, tensor, shape in zip(names, weights, expected):
        if tensor is None:
            continue
        if tensor.dtype not in WEIGHT_KINDS or not tensor.is_cpu:
            raise TypeError(f"{name} must be a float32, bfloat16 or float16 CPU tensor, got "
                            f"{tensor.dtype} on {tensor.device}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for {activation!r}, got "
                             f"{tuple(tensor.shape)}")
    if weights[0].dtype != weights[1].dtype:
        raise TypeError(f"{names[0]} and {names[1]} must have one dtype, got {weights[0].dtype} "
                        f"and {weights[1].dtype}")
    if (weights[2] is None) != (weights[3] is None):
        raise ValueError(f"give both {names[2]} and {names[3]} or neither")


def _check_x_dtype(x_TD: torch.Tensor, weight_dtype: torch.dtype) -> None:
    """x float32 with weights of any kind, or x of the weights' half dtype."""
    if x_TD.dtype != torch.float32 and not _half_layer(x_TD.dtype, weight_dtype):
        raise TypeError(f"x_TD must be float32, or have the expert weights' dtype (a layer held "
                        f"in bfloat16 or float16); got x_TD {x_TD.dtype} and weights "
                        f"{weight_dtype}")


def _float32_biases(weights: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """(w1, w2, b1, b2) with the biases float32, as the kernel reads them."""
    return [t if i < 2 or t is None else t.float() for i, t in enumerate(weights)]


def _expert_shapes(dim: int, expert_dim: int, activation: str) -> tuple[tuple[int, ...], ...]:
    """One expert's (w1, w2, b1, b2) shapes."""
    hidden = 2 * expert_dim if activation in GATED else expert_dim
    return (hidden, dim), (dim, expert_dim), (hidden,), (dim,)


def _check_expert(e: int, weights: ExpertWeights, dim: int, expert_dim: int,
                  activation: str) -> None:
    names = tuple(f"expert {e}'s {name}" for name in ("w1", "w2", "b1", "b2"))
    _check_weights(names, weights, _expert_shapes(dim, expert_dim, activation), activation)


def _check_stacks(stacks: ExpertWeights, num_experts: int, dim: int, expert_dim: int,
                  activation: str) -> None:
    shapes = tuple((num_experts, *shape) for shape in _expert_shapes(dim, expert_dim, activation))
    _check_weights(("w1_EHD", "w2_EDF", "b1_EH", "b2_ED"), stacks, shapes, activation)


def _run(x_TD, ids_TK, weights_TK, kept_TK, pointers, weight_dtype, num_experts, dim, expert_dim,
         activation, max_rows) -> DecodedExperts | None:
    """The C call; pointers = (w1, w2, b1, b2) ctypes arrays of E addresses (b1, b2 may be None;
    float32), w1 and w2 of weight_dtype."""
    num_tokens, top_k = ids_TK.shape
    out_dtype = x_TD.dtype
    # bfloat16 x (a bfloat16 layer) goes in as it is; float16 x is widened exactly here
    if out_dtype == torch.bfloat16:
        x_kind = X_BF16
    elif rounds_float32_x(out_dtype, weight_dtype):
        x_kind = X_F32_AS_BF16
    else:
        x_kind = X_F32
    x_TD = (x_TD if x_kind == X_BF16 else x_TD.to(torch.float32)).contiguous()
    ids_TK, weights_TK = ids_TK.contiguous(), weights_TK.contiguous()
    kept_TK = None if kept_TK is None else kept_TK.contiguous()
    y_TD = torch.empty(num_tokens, dim)
    order_R = torch.empty(num_tokens * top_k, dtype=torch.int64)
    counts_E = torch.empty(num_experts, dtype=torch.int64)
    status = skinny.library().moekit_skinny_ffn(
        x_TD.data_ptr(), ids_TK.data_ptr(), weights_TK.data_ptr(),
        None if kept_TK is None else kept_TK.data_ptr(), num_tokens, top_k, *pointers,
        num_experts, dim, expert_dim, *kernel_codes(activation), WEIGHT_KINDS[weight_dtype],
        x_kind, max_rows, y_TD.data_ptr(),
        order_R.data_ptr(), counts_E.data_ptr(), torch.get_num_threads())
    if status == 1:
        return None
    if status == -1:
        raise _ids_out_of_range(ids_TK, num_experts)
    if status == -3:  # the callers check first (see the test that reaches it)
        raise TypeError(f"the kernel takes bfloat16 x only with bfloat16 weights, got "
                        f"{weight_dtype}")
    if status != 0:
        raise MemoryError(f"moekit_skinny_ffn could not allocate its rows (status {status})")
    if kept_TK is not None:
        order_R = order_R[:int(counts_E.sum())]
    return DecodedExperts(y_TD.to(out_dtype), order_R, counts_E)


def _addresses(tensors: list[torch.Tensor | None]) -> ctypes.Array:
    """A C array of the tensors' addresses (NULL for None)."""
    return (ctypes.c_void_p * len(tensors))(*(None if t is None else t.data_ptr() for t in tensors))


def _stack_addresses(stack: torch.Tensor) -> ctypes.Array:
    """A C array of the address of each expert's slice of a stack [E, ...], without building
    the slices (this runs on every decode step: the arrays are kept, as they depend only on
    the three numbers)."""
    return _addresses_from(stack.data_ptr(), stack.stride(0) * stack.element_size(),
                           stack.shape[0])


@functools.lru_cache(maxsize=256)
def _addresses_from(base: int, step: int, count: int) -> ctypes.Array:
    """The C array base, base + step, ..., base + (count - 1) * step (read only)."""
    return (ctypes.c_void_p * count)(*(base + e * step for e in range(count)))


def skinny_ffn(x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
               w1_EHD: torch.Tensor, w2_EDF: torch.Tensor, activation: str,
               b1_EH: torch.Tensor | None = None, b2_ED: torch.Tensor | None = None,
               max_rows: int = skinny.MAX_ROWS,
               kept_TK: torch.Tensor | None = None) -> DecodedExperts | None:
    """The experts' combined output for every token, or None when an expert would get more than
    max_rows rows. On CPU: x_TD [T, D] float32, ids_TK [T, K] int64 expert of each choice,
    weights_TK [T, K] float32 its combine weight, w1_EHD [E, H, D] (H = 2F for gated
    activations: gate rows then up rows) and w2_EDF [E, D, F] both float32, both bfloat16 or
    both float16 (y float32 all the same; x may also have the weights' half dtype, and y then
    has it too), biases [E, H] and [E, D] or None;
    kept_TK [T, K] bool leaves out the choices it marks False (dropped by capacity, or not
    assignments), None keeps all. Not differentiable. ValueError for an id outside [0, E)."""
    skinny.library()
    _check_tokens(x_TD, ids_TK, weights_TK, kept_TK, activation)
    if w1_EHD.dim() != 3 or w2_EDF.dim() != 3 or w1_EHD.shape[0] != w2_EDF.shape[0] \
            or w2_EDF.shape[0] == 0:
        raise ValueError(f"expected w1_EHD [E, H, D] and w2_EDF [E, D, F], got "
                         f"{tuple(w1_EHD.shape)} and {tuple(w2_EDF.shape)}")
    num_experts, dim, expert_dim = w2_EDF.shape
    stacks = [w1_EHD, w2_EDF, b1_EH, b2_ED]
    _check_x_dtype(x_TD, w1_EHD.dtype)
    # Every stack in full, every expert: the C code reads E experts from each.
    _check_stacks(stacks, num_experts, x_TD.shape[1], expert_dim, activation)
    # Each expert's matrix must be row-major and contiguous; the stack may be strided.
    stacks = [t if t is None or t[0].is_contiguous() else t.contiguous()
              for t in _float32_biases(stacks)]
    pointers = [None if t is None else _stack_addresses(t) for t in stacks]
    return _run(x_TD, ids_TK, weights_TK, kept_TK, pointers, w1_EHD.dtype, num_experts, dim,
                expert_dim, activation, max_rows)


def skinny_ffn_fetched(x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                       expert_weights: Callable[[int], ExpertWeights], num_experts: int,
                       expert_dim: int, activation: str, max_rows: int = skinny.MAX_ROWS,
                       kept_TK: torch.Tensor | None = None) -> DecodedExperts | None:
    """skinny_ffn with each expert's weights fetched by expert_weights(e): called once for each
    expert with (kept) rows, in expert order, and only once it is known that no expert has more
    than max_rows rows (else None, and nothing is fetched). For weights held outside a stack (an
    offloading cache); same arithmetic as skinny_ffn, bit for bit."""
    skinny.library()
    _check_tokens(x_TD, ids_TK, weights_TK, kept_TK, activation)
    if ids_TK.numel() and (int(ids_TK.min()) < 0 or int(ids_TK.max()) >= num_experts):
        raise _ids_out_of_range(ids_TK, num_experts)
    ids = ids_TK.reshape(-1) if kept_TK is None else ids_TK[kept_TK]
    counts = torch.bincount(ids, minlength=num_experts).tolist()
    if max(counts, default=0) > max_rows:
        return None
    fetched: list[ExpertWeights] = [(None, None, None, None)] * num_experts
    for e, count in enumerate(counts):
        if count:
            weights = tuple(None if t is None else t.contiguous() for t in expert_weights(e))
            _check_expert(e, weights, x_TD.shape[1], expert_dim, activation)
            fetched[e] = tuple(_float32_biases(list(weights)))
    biased = {w[2] is not None for w, count in zip(fetched, counts) if count}
    if len(biased) > 1:
        raise ValueError("either every expert with rows has biases or none has")
    has_bias = biased == {True}
    dtypes = {w[0].dtype for w, count in zip(fetched, counts) if count}
    if len(dtypes) > 1:
        raise TypeError(f"every expert's weights must have one dtype, got {sorted(map(str, dtypes))}")
    pointers = [_addresses([w[i] for w in fetched]) if i < 2 or has_bias else None
                for i in range(4)]
    if dtypes:
        weight_dtype = dtypes.pop()
        _check_x_dtype(x_TD, weight_dtype)
    else:  # no expert with rows: nothing is read, and x's own dtype needs no widening
        weight_dtype = x_TD.dtype if x_TD.dtype in WEIGHT_KINDS else torch.float32
    return _run(x_TD, ids_TK, weights_TK, kept_TK, pointers, weight_dtype, num_experts,
                x_TD.shape[1], expert_dim, activation, max_rows)
