"""Triton kernels of the grouped expert FFN (imported only when Triton is installed).

Letters: T tokens, D model dim, F expert hidden dim, H = 2F (gated) or F, E
experts, K experts per token, R dispatched rows. Rows are grouped by expert:
expert e owns rows offsets_E1[e]:offsets_E1[e + 1]; row r serves assignment
slot_R[r] = t * K + j (token t, its j-th choice). A row kernel's program
handles BLOCK_M rows of one expert; tile_end_E[e] is the cumulative count of
row tiles, ceil(count_e / BLOCK_M), so the grid is an upper bound,
ceil(R / BLOCK_M) + E, read from shapes alone, and programs past the last tile
return at once: nothing here waits on the host.

Every product accumulates in float32. UPCAST converts loaded half tiles to
float32 before the product: the Triton interpreter (CPU) computes bfloat16
arithmetic wrongly otherwise. Index arithmetic is int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moekit.experts.activations import ELEMENTWISE_CODES

# The elementwise activation codes, from the one table of activations.
SILU = tl.constexpr(ELEMENTWISE_CODES["silu"])
GELU = tl.constexpr(ELEMENTWISE_CODES["gelu"])
RELU = tl.constexpr(ELEMENTWISE_CODES["relu"])


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == SILU:
        return x * tl.sigmoid(x)
    elif ACT == GELU:
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))  # exact (erf) gelu
    else:
        return tl.maximum(x, 0.0)


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    if ACT == SILU:
        s = tl.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    elif ACT == GELU:
        return 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) \
            + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    else:
        return (x > 0.0).to(tl.float32)


@triton.jit
def _tile_rows(tile_end_ptr, offsets_ptr, num_experts, pid_m,
               BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """(expert, rows [BLOCK_M] int64, row mask) of row tile pid_m; expert is
    num_experts for a program past the last tile."""
    experts = tl.arange(0, E_POW2)
    ends = tl.load(tile_end_ptr + experts, mask=experts < num_experts, other=2147483647)
    expert = tl.sum((ends <= pid_m).to(tl.int32))
    safe = tl.minimum(expert, num_experts - 1)
    row_begin = tl.load(offsets_ptr + safe)
    row_end = tl.load(offsets_ptr + safe + 1)
    tile_begin = tl.load(tile_end_ptr + safe) - tl.cdiv(row_end - row_begin, BLOCK_M)
    rows = row_begin + (pid_m - tile_begin).to(tl.int64) * BLOCK_M \
        + tl.arange(0, BLOCK_M).to(tl.int64)
    return expert, rows, rows < row_end


@triton.jit
def _load(ptrs, mask, UPCAST: tl.constexpr):
    tile = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _rows_matmul(in_ptr, in_rows, row_mask, stride_in, w_base, stride_wk, stride_wn, cols, col_mask,
                 K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_N] float32: in[in_rows, :K] @ B[:K, cols], B[k, n] at
    w_base + k * stride_wk + n * stride_wn."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = _load(in_ptr + in_rows[:, None] * stride_in + ks[None, :],
                  row_mask[:, None] & (ks[None, :] < K), UPCAST)
        w = _load(w_base + ks[:, None] * stride_wk + cols[None, :].to(tl.int64) * stride_wn,
                  (ks[:, None] < K) & col_mask[None, :], UPCAST)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    return acc


@triton.jit
def up_kernel(x_ptr, slot_ptr, w1_ptr, h_ptr, a_ptr, tile_end_ptr, offsets_ptr,
              num_experts, top_k, D, F,
              stride_xt, stride_we, stride_wh, stride_wd,
              GATED: tl.constexpr, ACT: tl.constexpr, STORE_H: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              E_POW2: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """h_RH = x_TD[token of row] @ W1[e]^T; a_RF = act(gate) * up (gated) or act(h).

    Tokens are read through slot_R // K, never copied. h (pre-activation, for
    backward) is stored only with STORE_H; h and a are contiguous [R, H], [R, F].
    """
    expert, rows, row_mask = _tile_rows(tile_end_ptr, offsets_ptr, num_experts,
                                        tl.program_id(0), BLOCK_M, E_POW2)
    if expert >= num_experts:
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < F
    tokens = tl.load(slot_ptr + rows, mask=row_mask, other=0) // top_k
    w_base = w1_ptr + expert.to(tl.int64) * stride_we
    gate = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = _load(x_ptr + tokens[:, None] * stride_xt + ks[None, :],
                  row_mask[:, None] & (ks[None, :] < D), UPCAST)
        w_mask = (ks[:, None] < D) & col_mask[None, :]
        w_ptrs = w_base + ks[:, None] * stride_wd + cols[None, :].to(tl.int64) * stride_wh
        gate = tl.dot(x, _load(w_ptrs, w_mask, UPCAST), gate, input_precision=PRECISION)
        if GATED:
            up = tl.dot(x, _load(w_ptrs + F * stride_wh, w_mask, UPCAST), up,
                        input_precision=PRECISION)
    mask = row_mask[:, None] & col_mask[None, :]
    H = 2 * F if GATED else F
    h_ptrs = h_ptr + rows[:, None] * H + cols[None, :]
    if GATED:
        act = _act(gate, ACT) * up
        if STORE_H:
            tl.store(h_ptrs, gate.to(h_ptr.dtype.element_ty), mask=mask)
            tl.store(h_ptrs + F, up.to(h_ptr.dtype.element_ty), mask=mask)
    else:
        act = _act(gate, ACT)
        if STORE_H:
            tl.store(h_ptrs, gate.to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(a_ptr + rows[:, None] * F + cols[None, :], act.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rows_to_slots_kernel(in_ptr, slot_ptr, weight_ptr, w_ptr, out_ptr, tile_end_ptr, offsets_ptr,
                         num_experts, top_k, N, K,
                         stride_in, stride_we, stride_wk, stride_wn, stride_out,
                         HAS_WEIGHT: tl.constexpr, ATOMIC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         E_POW2: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """out[slot_R[r]] = weight_R[r] * (in_RK[r] @ B_e), B_e[k, n] = w[e] at (k, n) by strides.

    Forward down projection (in = a_RF, B_e = W2[e]^T, weighted) and the input
    gradient (in = grad_h_RH, B_e = W1[e]). Each row lands in its own
    assignment slot of out [T*K, N], so the sum over K is done afterwards in a
    fixed order; with ATOMIC it is instead added to out [T, N] (float32) at
    its token, in no fixed order.
    """
    expert, rows, row_mask = _tile_rows(tile_end_ptr, offsets_ptr, num_experts,
                                        tl.program_id(0), BLOCK_M, E_POW2)
    if expert >= num_experts:
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = _rows_matmul(in_ptr, rows, row_mask, stride_in, w_ptr + expert.to(tl.int64) * stride_we,
                       stride_wk, stride_wn, cols, col_mask, K, BLOCK_M, BLOCK_N, BLOCK_K,
                       UPCAST, PRECISION)
    if HAS_WEIGHT:
        acc = acc * tl.load(weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    slots = tl.load(slot_ptr + rows, mask=row_mask, other=0)
    mask = row_mask[:, None] & col_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptr + (slots // top_k)[:, None] * stride_out + cols[None, :], acc,
                      mask=mask)
    else:
        tl.store(out_ptr + slots[:, None] * stride_out + cols[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def down_grad_kernel(grad_y_ptr, slot_ptr, weight_ptr, w2_ptr, h_ptr, grad_h_ptr, partial_ptr,
                     tile_end_ptr, offsets_ptr, num_experts, top_k, D, F,
                     stride_gt, stride_we, stride_wd, stride_wf,
                     GATED: tl.constexpr, ACT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     E_POW2: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Backward through the down projection and the activation, per row.

    ga = grad_y[token] @ W2[e] [.., F]; grad_h_RH = act'(h) * weight * ga (by
    gate and up for gated activations); partial_RN[r, n-tile] = sum over the
    tile of ga * a, the pieces of the combine weight's gradient (summed on the
    host in a fixed order, not by atomics).
    """
    expert, rows, row_mask = _tile_rows(tile_end_ptr, offsets_ptr, num_experts,
                                        tl.program_id(0), BLOCK_M, E_POW2)
    if expert >= num_experts:
        return
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < F
    tokens = tl.load(slot_ptr + rows, mask=row_mask, other=0) // top_k
    ga = _rows_matmul(grad_y_ptr, tokens, row_mask, stride_gt,
                      w2_ptr + expert.to(tl.int64) * stride_we, stride_wd, stride_wf, cols,
                      col_mask, D, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
    mask = row_mask[:, None] & col_mask[None, :]
    H = 2 * F if GATED else F
    h_ptrs = h_ptr + rows[:, None] * H + cols[None, :]
    gate = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
    grad_a = ga
    if HAS_WEIGHT:
        grad_a = ga * tl.load(weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    grad_ptrs = grad_h_ptr + rows[:, None] * H + cols[None, :]
    if GATED:
        up = tl.load(h_ptrs + F, mask=mask, other=0.0).to(tl.float32)
        act_gate = _act(gate, ACT)
        a = act_gate * up
        tl.store(grad_ptrs, (grad_a * up * _act_grad(gate, ACT)).to(grad_h_ptr.dtype.element_ty),
                 mask=mask)
        tl.store(grad_ptrs + F, (grad_a * act_gate).to(grad_h_ptr.dtype.element_ty), mask=mask)
    else:
        a = _act(gate, ACT)
        tl.store(grad_ptrs, (grad_a * _act_grad(gate, ACT)).to(grad_h_ptr.dtype.element_ty),
                 mask=mask)
    if HAS_WEIGHT:
        num_n = tl.cdiv(F, BLOCK_N)
        tl.store(partial_ptr + rows * num_n + pid_n, tl.sum(tl.where(mask, ga * a, 0.0), axis=1),
                 mask=row_mask)


@triton.jit
def weight_grad_kernel(a_ptr, b_ptr, slot_ptr, scale_ptr, out_ptr, offsets_ptr, top_k, M, N,
                       stride_ar, stride_br, stride_oe, stride_om, stride_on,
                       GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, SCALE_A: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """out[e] [M, N] = sum over rows r of expert e of A[r]^T (scale_R[r] * ...) B[r].

    A [.., M] and B [.., N] are read at row r, or at its token slot_R[r] // K
    with GATHER_*; an expert with no rows gets an exact zero. Rows are summed
    in order: deterministic. Program (e, tile of M x N).
    """
    expert = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    m = (tl.program_id(1) // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = (tl.program_id(1) % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_begin = tl.load(offsets_ptr + expert)
    row_end = tl.load(offsets_ptr + expert + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for r0 in range(row_begin, row_end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K).to(tl.int64)
        row_mask = rows < row_end
        a_rows = rows
        b_rows = rows
        if GATHER_A or GATHER_B:
            tokens = tl.load(slot_ptr + rows, mask=row_mask, other=0) // top_k
            if GATHER_A:
                a_rows = tokens
            if GATHER_B:
                b_rows = tokens
        a_t = _load(a_ptr + a_rows[None, :] * stride_ar + m[:, None],
                    row_mask[None, :] & (m[:, None] < M), UPCAST)
        if SCALE_A:
            scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
            a_t = (a_t.to(tl.float32) * scale.to(tl.float32)[None, :]).to(a_t.dtype)
        b = _load(b_ptr + b_rows[:, None] * stride_br + n[None, :],
                  row_mask[:, None] & (n[None, :] < N), UPCAST)
        acc = tl.dot(a_t, b, acc, input_precision=PRECISION)
    tl.store(out_ptr + expert.to(tl.int64) * stride_oe + m[:, None].to(tl.int64) * stride_om
             + n[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=(m[:, None] < M) & (n[None, :] < N))


@triton.jit
def block_rank_kernel(ids_ptr, rank_ptr, hist_ptr, num_assignments, num_experts,
                      BLOCK: tl.constexpr):
    """Stable counting sort, pass 1: for each assignment its rank among the
    earlier assignments of the same expert in its block, and the block's
    histogram hist[block, e] (written once per expert by its last assignment)."""
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = idx < num_assignments
    ids = tl.load(ids_ptr + idx, mask=valid, other=-1)
    same = ids[:, None] == ids[None, :]
    local = tl.arange(0, BLOCK)
    rank = tl.sum((same & (local[None, :] < local[:, None])).to(tl.int32), axis=1)
    count = tl.sum(same.to(tl.int32), axis=1)
    tl.store(rank_ptr + idx, rank, mask=valid)
    tl.store(hist_ptr + pid.to(tl.int64) * num_experts + ids, count,
             mask=valid & (rank + 1 == count))
