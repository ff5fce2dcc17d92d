"""Skinny expert products on CPU (decode): a few rows per expert against its weight matrix.

    out_RN[rows of e] = x_RK[rows of e] @ w_ENK[e]^T      (forward: transpose=True)
    out_RN[rows of e] = x_RK[rows of e] @ w_EKN[e]        (backward: transpose=False)

At a few rows the product costs one read of the weights, and BLAS GEMMs read them more than
once (they pack the matrix first). skinny.c streams each weight element once; it is compiled
on first use with the host's C compiler (moekit/experts/cpu/build.py) and called through
ctypes, which releases the GIL. Without a compiler, or with MOEKIT_CPU_KERNELS=0 (which overrides
the config), ``available()`` is False, the reason is in ``unavailable_reason()``, and callers fall
back to torch.mm. ``small_batch`` is the one place that decides whether a batch takes the kernel;
callers pass it the layer's ``MoEConfig.cpu_kernels`` ("auto", or "off": never).
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.overrides import has_torch_function
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.flop_counter import register_flop_formula

from moekit.experts.cpu.build import build_library

# Up to this many rows per expert the kernel beats MKL's GEMM (1.4-4x at 1-12 rows on a 2-core
# AVX2 machine, forward and backward forms, about level at 16; benchmarks/skinny_kernel.py).
MAX_ROWS = 12

_SOURCE = Path(__file__).with_name("skinny.c")
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_reason: str | None = None
_tried = False


def library() -> ctypes.CDLL:
    """The loaded kernel library (building it on the first call); RuntimeError with the reason
    when it is unavailable."""
    loaded = _load()
    if loaded is None:
        raise RuntimeError(_reason)
    return loaded


def _load() -> ctypes.CDLL | None:
    global _library, _reason, _tried
    if _tried:  # set only once _library and _reason hold the outcome: no lock on the hot path
        return _library
    with _lock:
        if not _tried:
            _library, _reason = _build()
            _tried = True
        return _library


def _build() -> tuple[ctypes.CDLL | None, str | None]:
    """(the loaded library, None), or (None, why not)."""
    if os.environ.get("MOEKIT_CPU_KERNELS", "1") == "0":
        return None, "disabled by MOEKIT_CPU_KERNELS=0"
    try:
        library = ctypes.CDLL(str(build_library(_SOURCE)))
        _declare(library)
    except Exception as error:  # whatever stops the kernel, the callers fall back to torch.mm
        reason = f"the skinny CPU kernel could not be built: {error}"
        warnings.warn(f"{reason}; decode-size expert products fall back to torch.mm",
                      RuntimeWarning, stacklevel=4)
        return None, reason
    return library, None


def _declare(library: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for function in (library.moekit_skinny_grouped, library.moekit_skinny_grouped_nn):
        function.argtypes = [p, p, i64, p, p, i64, i64, i64, ctypes.c_int]
        function.restype = None
    library.moekit_skinny_ffn.argtypes = [p, p, p, p, i64, i64, p, p, p, p, i64, i64, i64,
                                          ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                          i64, p, p, p, ctypes.c_int]
    library.moekit_skinny_ffn.restype = ctypes.c_int
    library.moekit_skinny_native_bf16_dot.argtypes = []
    library.moekit_skinny_native_bf16_dot.restype = ctypes.c_int


def native_bf16_dot() -> bool:
    """Whether the kernel multiplies bfloat16 x by bfloat16 weights on the CPU's bf16 dot product
    (AVX512-BF16, decided when it was compiled for this CPU); False without the kernel."""
    return _native_bf16_dot(_load())


@functools.lru_cache(maxsize=None)
def _native_bf16_dot(loaded: ctypes.CDLL | None) -> bool:
    return loaded is not None and bool(loaded.moekit_skinny_native_bf16_dot())


def available() -> bool:
    """Whether the kernel is built and loaded (building it on the first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why the kernel is not in use, or None when it is."""
    _load()
    return _reason


def small_batch(rows_per_expert: int | Callable[[], int], *tensors: torch.Tensor,
                cpu_kernels: str = "auto") -> bool:
    """The one decision whether a batch is decode-size, i.e. its products go through the kernel:
    every tensor float32 on CPU, cpu_kernels not "off", the kernel available, and at most
    MAX_ROWS rows for every expert. rows_per_expert: the most rows any expert has, or a function
    that gives it, called only when the other conditions hold (counting rows costs more than
    they do)."""
    return not_small_batch(rows_per_expert, *tensors, cpu_kernels=cpu_kernels) is None


def not_small_batch(rows_per_expert: int | Callable[[], int], *tensors: torch.Tensor,
                    cpu_kernels: str = "auto") -> str | None:
    """Why a batch is not decode-size (see small_batch), or None when it is."""
    for t in tensors:
        if t.dtype != torch.float32 or not t.is_cpu:
            return f"the kernel takes float32 on CPU, not {t.dtype} on {t.device.type}"
    if cpu_kernels == "off":
        return "turned off by cpu_kernels='off'"
    if not available():
        return unavailable_reason()
    rows = rows_per_expert() if callable(rows_per_expert) else rows_per_expert
    if rows > MAX_ROWS:
        return f"an expert has {rows} rows, more than the kernel's {MAX_ROWS}"
    return None


def skinny_grouped(x_RK: torch.Tensor, w: torch.Tensor, counts_E: list[int], *,
                   transpose: bool = True) -> torch.Tensor:
    """out_RN [R, N]: the rows of expert e (counts_E[e] of them, in expert order) times its matrix,
    w[e]^T for w [E, N, K] (transpose=True) or w[e] for w [E, K, N] (transpose=False).

    x_RK [R, K] and w float32 on CPU. The stack may be a slice (any stride between experts); an
    expert's matrix that is not contiguous is copied. Not differentiable: for the insides of
    forward and backward passes.
    """
    library()
    _check_grouped(x_RK, w, counts_E, transpose)
    if observed(x_RK, w):
        return torch.ops.moekit.skinny_grouped(x_RK, w, list(counts_E), transpose)
    return _run(x_RK, w, counts_E, transpose)


def _check_grouped(x_RK: torch.Tensor, w: torch.Tensor, counts_E: list[int],
                   transpose: bool) -> None:
    """Every shape the C code relies on, for skinny_grouped and the operator alike."""
    if x_RK.dtype != torch.float32 or w.dtype != torch.float32:
        raise TypeError(f"skinny_grouped takes float32, got x {x_RK.dtype} and w {w.dtype}")
    if not (x_RK.is_cpu and w.is_cpu):
        raise ValueError(f"skinny_grouped runs on CPU, got x on {x_RK.device}, w on {w.device}")
    k_axis = 2 if transpose else 1
    if x_RK.dim() != 2 or w.dim() != 3 or x_RK.shape[1] != w.shape[k_axis]:
        layout = "[E, N, K]" if transpose else "[E, K, N]"
        raise ValueError(f"expected x [R, K] and w {layout}, got {tuple(x_RK.shape)} and "
                         f"{tuple(w.shape)}")
    if len(counts_E) != w.shape[0] or sum(counts_E) != x_RK.shape[0] or min(counts_E, default=0) < 0:
        raise ValueError(f"counts {list(counts_E)} must be {w.shape[0]} non-negative numbers "
                         f"summing to the {x_RK.shape[0]} rows of x")


def observed(*tensors: torch.Tensor) -> bool:
    """Whether a torch tool watches the call (compile, a dispatch mode such as FlopCounterMode or
    fake tensors, the profiler, a tensor subclass): then it goes through the registered operator,
    which they see. Otherwise the ctypes call is made directly: the operator's dispatch costs
    about 40 us, several percent of a decode-size layer."""
    return (torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
            or torch.autograd._profiler_enabled() or has_torch_function(tensors))


def _run(x_RK: torch.Tensor, w: torch.Tensor, counts_E: list[int], transpose: bool) -> torch.Tensor:
    num_experts, rows, columns = w.shape
    if w.stride(2) != 1 or w.stride(1) != columns:
        w = w.contiguous()
    k_in, n_out = (columns, rows) if transpose else (rows, columns)
    x_RK = x_RK.contiguous()
    out_RN = torch.empty(x_RK.shape[0], n_out, dtype=torch.float32)
    counts = (ctypes.c_int64 * num_experts)(*counts_E)
    expert_stride = w.stride(0) if num_experts > 1 else 0
    kernels = library()
    function = kernels.moekit_skinny_grouped if transpose else kernels.moekit_skinny_grouped_nn
    function(x_RK.data_ptr(), w.data_ptr(), expert_stride, out_RN.data_ptr(), counts, num_experts,
             k_in, n_out, torch.get_num_threads())
    return out_RN


# Also a torch operator, so that torch's tools see the kernel: FlopCounterMode counts its FLOPs,
# the profiler names it, and torch.compile treats it as one opaque op.
@torch.library.custom_op("moekit::skinny_grouped", mutates_args=(), device_types="cpu")
def _skinny_grouped_op(x_RK: torch.Tensor, w: torch.Tensor, counts_E: list[int],
                       transpose: bool) -> torch.Tensor:
    _check_grouped(x_RK, w, counts_E, transpose)  # the operator may be called directly
    return _run(x_RK, w, counts_E, transpose)


@_skinny_grouped_op.register_fake
def _(x_RK: torch.Tensor, w: torch.Tensor, counts_E: list[int], transpose: bool) -> torch.Tensor:
    return x_RK.new_empty(x_RK.shape[0], w.shape[1] if transpose else w.shape[2])


@register_flop_formula(torch.ops.moekit.skinny_grouped)
def _flops(x_shape, w_shape, counts_E, transpose, *args, out_shape=None, **kwargs) -> int:
    return 2 * x_shape[0] * w_shape[1] * w_shape[2]
