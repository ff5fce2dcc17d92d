"""Custom ops over the Triton kernels: routing metadata, and the expert FFN with its backward.

Letters as in kernels.py. ``sort_by_expert`` builds the routing metadata on
the device (block histogram -> exclusive cumsum -> stable counting sort), and
``triton_experts`` runs the whole expert FFN on rows grouped by expert:
gate/up product with the activation in its epilogue, down product with the
combine weight in its epilogue, and the sum over K. Nothing on either path
copies a value to the host.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from moekit.experts.activations import ACTIVATIONS, kernel_codes
from moekit.experts.triton import interpreting, kernels

_SORT_BLOCK = 128


class _Blocks(NamedTuple):
    m: int
    n: int
    k: int
    warps: int
    stages: int


def _blocks(x: torch.Tensor) -> _Blocks:
    """One tile configuration for x's dtype and device (no autotuning: it crashes
    in the interpreter, and BLOCK_M fixes the tile schedule). Untuned on GPUs;
    3 pipeline stages where a block may use 160 KiB of shared memory (A100,
    H100), else 2."""
    if interpreting():
        return _Blocks(16, 16, 16, 1, 1)
    half = x.dtype != torch.float32
    properties = torch.cuda.get_device_properties(x.device)
    stages = 3 if getattr(properties, "shared_memory_per_block_optin", 0) >= 160 * 1024 else 2
    return _Blocks(128, 128 if half else 64, 64 if half else 32, 8, stages)


def _launch_options(x: torch.Tensor, blocks: _Blocks) -> dict:
    """Tile sizes and compiler options of a matmul kernel launch on x's dtype."""
    options = dict(BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k, UPCAST=interpreting(),
                   PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    if not interpreting():
        options.update(num_warps=blocks.warps, num_stages=blocks.stages)
    return options


class ExpertSort(NamedTuple):
    """Rows grouped by expert.

    order_R: [R] int64 assignment index t * K + j of each row, stably sorted by expert.
    counts_E: [E] int64 rows per expert.
    offsets_E1: [E + 1] int64 exclusive cumulative counts (offsets_E1[-1] = R).
    """

    order_R: torch.Tensor
    counts_E: torch.Tensor
    offsets_E1: torch.Tensor


def expert_offsets(counts_E: torch.Tensor) -> torch.Tensor:
    """[E + 1] int64 exclusive cumsum of counts_E, starting at 0."""
    offsets = counts_E.new_zeros(counts_E.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(counts_E, 0, out=offsets[1:])
    return offsets


def tile_ends(offsets_E1: torch.Tensor, block_m: int) -> torch.Tensor:
    """[E] int32 cumulative count of BLOCK_M row tiles: expert e's rows padded to whole tiles."""
    counts = offsets_E1[1:] - offsets_E1[:-1]
    return torch.cumsum(torch.div(counts + block_m - 1, block_m, rounding_mode="floor"), 0,
                        dtype=torch.int32)


@torch.library.custom_op("moekit::triton_sort_by_expert", mutates_args=())
def _sort_op(ids_A: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    num = ids_A.shape[0]
    blocks = triton.cdiv(num, _SORT_BLOCK)
    ids = ids_A.to(torch.int64).contiguous()
    rank = torch.empty(num, dtype=torch.int32, device=ids.device)
    hist = torch.zeros(blocks, num_experts, dtype=torch.int32, device=ids.device)
    if num:
        kernels.block_rank_kernel[(blocks,)](ids, rank, hist, num, num_experts, BLOCK=_SORT_BLOCK)
    hist = hist.to(torch.int64)
    counts = hist.sum(0)
    block_base = torch.cumsum(hist, 0) - hist
    block = torch.arange(num, device=ids.device) // _SORT_BLOCK
    position = expert_offsets(counts)[ids] + block_base[block, ids] + rank
    order = torch.empty_like(ids).scatter_(0, position, torch.arange(num, device=ids.device))
    return order, counts


@_sort_op.register_fake
def _(ids_A, num_experts):
    return ids_A.new_empty(ids_A.shape, dtype=torch.int64), \
        ids_A.new_empty(num_experts, dtype=torch.int64)


def sort_by_expert(ids_A: torch.Tensor, num_experts: int) -> ExpertSort:
    """Stable counting sort of the flat expert ids ids_A [A] (values in [0, E)).

    Same order as ``torch.argsort(ids_A, stable=True)``. A block histogram, an
    exclusive cumsum over blocks and experts, and a scatter: no host sync.
    """
    order, counts = _sort_op(ids_A.reshape(-1), num_experts)
    return ExpertSort(order, counts, expert_offsets(counts))


def _slot_buffer(x_TD: torch.Tensor, num_rows: int, top_k: int) -> torch.Tensor:
    """[T*K, D] buffer, one row per assignment slot; zeroed only when some slots
    get no row (capacity drops), since dropless rows fill every slot."""
    num_slots = x_TD.shape[0] * top_k
    make = torch.empty if num_rows == num_slots else torch.zeros
    return make(num_slots, x_TD.shape[1], dtype=x_TD.dtype, device=x_TD.device)


def _common(offsets_E1: torch.Tensor, x: torch.Tensor):
    blocks = _blocks(x)
    num_experts = offsets_E1.shape[0] - 1
    return blocks, num_experts, tile_ends(offsets_E1, blocks.m), triton.next_power_of_2(num_experts)


def _row_grid(num_rows: int, num_experts: int, cols: int, blocks: _Blocks) -> tuple[int, int]:
    return triton.cdiv(num_rows, blocks.m) + num_experts, triton.cdiv(cols, blocks.n)


def _rows_to_slots(rows_RK, slot_R, weight_R, w_EXX, stride_wk, stride_wn, offsets_E1, tiles,
                   out, top_k, atomic=False):
    """out[slot] (or out[token], atomic) = weight * rows @ B_e: see the kernel."""
    blocks, num_experts, _, e_pow2 = _common(offsets_E1, rows_RK)
    cols, inner = out.shape[1], rows_RK.shape[1]
    kernels.rows_to_slots_kernel[_row_grid(rows_RK.shape[0], num_experts, cols, blocks)](
        rows_RK, slot_R, weight_R, w_EXX, out, tiles, offsets_E1, num_experts, top_k, cols, inner,
        rows_RK.stride(0), w_EXX.stride(0), stride_wk, stride_wn, out.stride(0),
        HAS_WEIGHT=weight_R is not None, ATOMIC=atomic, E_POW2=e_pow2,
        **_launch_options(rows_RK, blocks))


@torch.library.custom_op("moekit::triton_experts_forward", mutates_args=())
def _forward_op(x_TD: torch.Tensor, slot_R: torch.Tensor, weights_R: torch.Tensor | None,
                offsets_E1: torch.Tensor, w1_EHD: torch.Tensor, w2_EDF: torch.Tensor,
                top_k: int, activation: str, save_h: bool, deterministic: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_tokens, dim = x_TD.shape
    num_rows, (gated, act) = slot_R.shape[0], kernel_codes(activation)
    expert_dim = w2_EDF.shape[2]
    h = x_TD.new_empty(num_rows if save_h else 0, w1_EHD.shape[1])
    a = x_TD.new_empty(num_rows, expert_dim)
    if not deterministic:
        y = x_TD.new_zeros(num_tokens, dim, dtype=torch.float32)
    else:
        y = _slot_buffer(x_TD, num_rows, top_k)
    if num_rows:
        x_TD = x_TD.contiguous()
        blocks, num_experts, tiles, e_pow2 = _common(offsets_E1, x_TD)
        kernels.up_kernel[_row_grid(num_rows, num_experts, expert_dim, blocks)](
            x_TD, slot_R, w1_EHD, h, a, tiles, offsets_E1, num_experts, top_k, dim, expert_dim,
            x_TD.stride(0), w1_EHD.stride(0), w1_EHD.stride(1), w1_EHD.stride(2),
            GATED=gated, ACT=act, STORE_H=save_h, E_POW2=e_pow2,
            **_launch_options(x_TD, blocks))
        _rows_to_slots(a, slot_R, weights_R, w2_EDF, w2_EDF.stride(2), w2_EDF.stride(1),
                       offsets_E1, tiles, y, top_k, atomic=not deterministic)
    if deterministic:  # the sum over K in a fixed order, in float32
        y = y.view(num_tokens, top_k, dim).sum(1, dtype=torch.float32)
    return y.to(x_TD.dtype), h, a


@_forward_op.register_fake
def _(x_TD, slot_R, weights_R, offsets_E1, w1_EHD, w2_EDF, top_k, activation, save_h,
      deterministic):
    num_rows = slot_R.shape[0]
    return (x_TD.new_empty(x_TD.shape), x_TD.new_empty(num_rows if save_h else 0, w1_EHD.shape[1]),
            x_TD.new_empty(num_rows, w2_EDF.shape[2]))


@torch.library.custom_op("moekit::triton_experts_backward", mutates_args=())
def _backward_op(grad_y_TD: torch.Tensor, x_TD: torch.Tensor, slot_R: torch.Tensor,
                 weights_R: torch.Tensor | None, offsets_E1: torch.Tensor,
                 w1_EHD: torch.Tensor, w2_EDF: torch.Tensor, h_RH: torch.Tensor,
                 a_RF: torch.Tensor, top_k: int, activation: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    num_tokens, dim = x_TD.shape
    num_rows, (gated, act) = slot_R.shape[0], kernel_codes(activation)
    expert_dim, hidden = w2_EDF.shape[2], w1_EHD.shape[1]
    grad_y_TD, x_TD = grad_y_TD.contiguous(), x_TD.contiguous()
    grad_w1 = torch.empty_like(w1_EHD)
    grad_w2 = torch.empty_like(w2_EDF)
    grad_x = _slot_buffer(x_TD, num_rows, top_k)
    grad_weights = x_TD.new_zeros(0 if weights_R is None else num_rows,
                                  dtype=torch.float32 if weights_R is None else weights_R.dtype)
    if num_rows == 0:
        grad_w1.zero_()
        grad_w2.zero_()
        return grad_x.view(num_tokens, top_k, dim).sum(1), grad_weights, grad_w1, grad_w2
    blocks, num_experts, tiles, e_pow2 = _common(offsets_E1, x_TD)
    options = _launch_options(x_TD, blocks)
    grad_h = torch.empty_like(h_RH)
    partial = x_TD.new_empty(num_rows, triton.cdiv(expert_dim, blocks.n), dtype=torch.float32)
    kernels.down_grad_kernel[_row_grid(num_rows, num_experts, expert_dim, blocks)](
        grad_y_TD, slot_R, weights_R, w2_EDF, h_RH, grad_h, partial, tiles, offsets_E1,
        num_experts, top_k, dim, expert_dim,
        grad_y_TD.stride(0), w2_EDF.stride(0), w2_EDF.stride(1), w2_EDF.stride(2),
        GATED=gated, ACT=act, HAS_WEIGHT=weights_R is not None, E_POW2=e_pow2, **options)
    if weights_R is not None:
        grad_weights = partial.sum(1).to(weights_R.dtype)
    _rows_to_slots(grad_h, slot_R, None, w1_EHD, w1_EHD.stride(1), w1_EHD.stride(2),
                   offsets_E1, tiles, grad_x, top_k)
    grad_x = grad_x.view(num_tokens, top_k, dim).sum(1, dtype=torch.float32).to(x_TD.dtype)
    for out, a, b, gather_a, gather_b, m, n in (
            (grad_w1, grad_h, x_TD, False, True, hidden, dim),
            (grad_w2, grad_y_TD, a_RF, True, False, dim, expert_dim)):
        grid = (num_experts, triton.cdiv(m, blocks.m) * triton.cdiv(n, blocks.n))
        scale = weights_R if gather_a else None
        kernels.weight_grad_kernel[grid](
            a, b, slot_R, scale, out, offsets_E1, top_k, m, n, a.stride(0), b.stride(0),
            out.stride(0), out.stride(1), out.stride(2), GATHER_A=gather_a, GATHER_B=gather_b,
            SCALE_A=scale is not None, **options)
    return grad_x, grad_weights, grad_w1, grad_w2


@_backward_op.register_fake
def _(grad_y_TD, x_TD, slot_R, weights_R, offsets_E1, w1_EHD, w2_EDF, h_RH, a_RF, top_k,
      activation):
    grad_weights = x_TD.new_empty(0, dtype=torch.float32) if weights_R is None \
        else weights_R.new_empty(weights_R.shape)
    return (x_TD.new_empty(x_TD.shape), grad_weights, w1_EHD.new_empty(w1_EHD.shape),
            w2_EDF.new_empty(w2_EDF.shape))


def _setup_context(ctx, inputs, output):
    x_TD, slot_R, weights_R, offsets_E1, w1_EHD, w2_EDF, top_k, activation, _, _ = inputs
    _, h_RH, a_RF = output
    ctx.save_for_backward(x_TD, slot_R, weights_R, offsets_E1, w1_EHD, w2_EDF, h_RH, a_RF)
    ctx.top_k, ctx.activation = top_k, activation


def _backward(ctx, grad_y_TD, grad_h, grad_a):
    x_TD, slot_R, weights_R, offsets_E1, w1_EHD, w2_EDF, h_RH, a_RF = ctx.saved_tensors
    if h_RH.shape[0] != slot_R.shape[0]:
        raise RuntimeError("triton_experts ran with save_h=False; it cannot be differentiated")
    grad_x, grad_weights, grad_w1, grad_w2 = _backward_op(
        grad_y_TD, x_TD, slot_R, weights_R, offsets_E1, w1_EHD, w2_EDF, h_RH, a_RF,
        ctx.top_k, ctx.activation)
    return (grad_x, None, None if weights_R is None else grad_weights, None, grad_w1, grad_w2,
            None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(x_TD, order_R, top_k, weights_R, offsets_E1, w1_EHD, w2_EDF, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
    if x_TD.dim() != 2 or w1_EHD.dim() != 3 or w2_EDF.dim() != 3:
        raise ValueError(f"x_TD must be 2-D and the weights 3-D; got shapes {tuple(x_TD.shape)}, "
                         f"{tuple(w1_EHD.shape)}, {tuple(w2_EDF.shape)}")
    E, D, F = w2_EDF.shape
    H = 2 * F if ACTIVATIONS[activation].gated else F
    if w1_EHD.shape != (E, H, D) or x_TD.shape[1] != D:
        raise ValueError(f"for {activation!r} with down_proj {tuple(w2_EDF.shape)} expected "
                         f"x_TD [T, {D}] and w1_EHD {(E, H, D)}; got {tuple(x_TD.shape)} and "
                         f"{tuple(w1_EHD.shape)}")
    if not (x_TD.dtype == w1_EHD.dtype == w2_EDF.dtype) or x_TD.dtype not in (
            torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x_TD, w1_EHD, w2_EDF must share one dtype of float32/bfloat16/float16; "
                        f"got {x_TD.dtype}, {w1_EHD.dtype}, {w2_EDF.dtype}")
    if order_R.dtype != torch.int64 or order_R.dim() != 1 or offsets_E1.shape != (E + 1,):
        raise ValueError(f"order_R must be 1-D int64 and offsets_E1 [{E + 1}]; got "
                         f"{order_R.dtype} {tuple(order_R.shape)} and {tuple(offsets_E1.shape)}")
    if weights_R is not None and weights_R.shape != order_R.shape:
        raise ValueError(f"weights_R must have order_R's shape {tuple(order_R.shape)}, "
                         f"got {tuple(weights_R.shape)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")


def triton_experts(x_TD: torch.Tensor, order_R: torch.Tensor, top_k: int,
                   weights_R: torch.Tensor | None, offsets_E1: torch.Tensor,
                   w1_EHD: torch.Tensor, w2_EDF: torch.Tensor, activation: str,
                   deterministic: bool = True) -> torch.Tensor:
    """y_TD [T, D] = sum over rows r of weights_R[r] * FFN_{e(r)}(x_TD[order_R[r] // K]).

    order_R: [R] int64 assignment index t * K + j of each row, rows grouped by
    expert as offsets_E1 [E + 1] says (see ``sort_by_expert``); weights_R: [R]
    combine weights or None for 1. w1_EHD: gate_up_proj [E, 2F, D] (gated
    activations) or up_proj [E, F, D]; w2_EDF: down_proj [E, D, F]. Half or
    float32 inputs, float32 accumulation. Differentiable in x_TD, weights_R,
    w1_EHD and w2_EDF. deterministic=False adds each row into its token with
    float32 atomics instead of summing over K in a fixed order afterwards.
    """
    _check_inputs(x_TD, order_R, top_k, weights_R, offsets_E1, w1_EHD, w2_EDF, activation)
    save_h = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x_TD, weights_R, w1_EHD, w2_EDF))
    weights_R = None if weights_R is None else weights_R.contiguous()
    y_TD, _, _ = _forward_op(x_TD, order_R.contiguous(), weights_R, offsets_E1.contiguous(),
                             w1_EHD, w2_EDF, top_k, activation, save_h, deterministic)
    return y_TD


def fused_moe(x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
              w1_EHD: torch.Tensor, w2_EDF: torch.Tensor, activation: str = "swiglu",
              deterministic: bool = True) -> torch.Tensor:
    """y_TD [T, D] = sum_j weights_TK[t, j] * FFN_{ids_TK[t, j]}(x_TD[t]), all on the device.

    The routing metadata comes from ``sort_by_expert``; then ``triton_experts``.
    ids_TK: [T, K] expert ids in [0, E); weights_TK: [T, K] combine weights.
    """
    if ids_TK.dim() != 2 or weights_TK.shape != ids_TK.shape or ids_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"ids_TK and weights_TK must both be [T={x_TD.shape[0]}, K]; got "
                         f"{tuple(ids_TK.shape)} and {tuple(weights_TK.shape)}")
    top_k = ids_TK.shape[1]
    expert_sort = sort_by_expert(ids_TK.reshape(-1), w1_EHD.shape[0])
    weights_R = weights_TK.reshape(-1).index_select(0, expert_sort.order_R)
    return triton_experts(x_TD, expert_sort.order_R, top_k, weights_R, expert_sort.offsets_E1,
                          w1_EHD, w2_EDF, activation, deterministic)
