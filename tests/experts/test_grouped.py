"""grouped_matmul (the safe grouped_mm wrapper) and loop_matmul against a float64 loop."""

from __future__ import annotations

import pytest
import torch

from moekit.experts.grouped import grouped_matmul, grouped_mm_supports
from moekit.experts.loop import loop_matmul

MATMULS = {"grouped_mm": grouped_matmul, "loop": loop_matmul}


def reference(x, w, counts):
    out, start = [], 0
    for e, n in enumerate(counts):
        out.extend(x[r].double() @ w[e].double().t() for r in range(start, start + n))
        start += n
    out.extend(torch.zeros(w.shape[1], dtype=torch.float64) for _ in range(start, x.shape[0]))
    return torch.stack(out) if out else torch.zeros(0, w.shape[1], dtype=torch.float64)


@pytest.mark.parametrize("name", MATMULS)
@pytest.mark.parametrize("counts,tail", [([3, 0, 5, 1], 0), ([0, 0, 0, 0], 0), ([2, 0, 0, 7], 3),
                                         ([0, 4, 0, 0], 2), ([0, 0, 0, 0], 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_forward_backward_and_tail_is_safe(name, counts, tail, dtype):
    E, I, O = 4, 16, 8
    x = torch.randn(sum(counts) + tail, I).to(dtype)
    x[sum(counts):] = float("nan")  # tail rows must never be read
    x.requires_grad_()
    w = torch.randn(E, O, I).to(dtype).requires_grad_()
    y = MATMULS[name](x, w, counts)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), reference(x.detach(), w.detach(), counts),
                               rtol=tol, atol=tol * 10)
    g = torch.randn_like(y)
    y.backward(g)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y64 = torch.cat([x64[: sum(counts)].split(counts)[e] @ w64[e].t() for e in range(E)]) \
        if sum(counts) else (x64[:0] @ w64[0].t())
    y64.backward(g[: sum(counts)].double())
    assert torch.count_nonzero(x.grad[sum(counts):]) == 0
    torch.testing.assert_close(x.grad[: sum(counts)].double(), x64.grad[: sum(counts)],
                               rtol=tol, atol=tol * 10)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=tol, atol=tol * 10)
    for e, n in enumerate(counts):
        if n == 0:
            assert torch.count_nonzero(w.grad[e]) == 0  # exact zeros, not garbage


@pytest.mark.parametrize("name", MATMULS)
def test_expanded_upstream_gradient(name):
    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(2, 4, 8, requires_grad=True)
    MATMULS[name](x, w, [2, 4]).sum().backward()  # stride-0 gradient
    expected = torch.cat([torch.ones(2, 4) @ w[0], torch.ones(4, 4) @ w[1]])
    torch.testing.assert_close(x.grad, expected.detach())


def test_float64_gradcheck_of_loop():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: loop_matmul(a, b, [2, 0, 2]), (x, w))


def test_supports():
    cpu = torch.device("cpu")
    assert grouped_mm_supports(cpu, torch.float32, 16, 8, 4)
    assert not grouped_mm_supports(cpu, torch.float32, 16, 6)   # 24 bytes: unaligned
    assert grouped_mm_supports(cpu, torch.bfloat16, 16, 8)
    assert not grouped_mm_supports(cpu, torch.bfloat16, 16, 4)  # 8 bytes: unaligned
    assert not grouped_mm_supports(cpu, torch.float64, 16)
    assert not grouped_mm_supports(torch.device("meta"), torch.float32, 16)


def test_counts_beyond_int32_or_rows_are_rejected():
    x, w = torch.randn(4, 8), torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="offsets are int32; 2147483648 rows exceed"):
        grouped_matmul(x, w, [2**31, 0])
    with pytest.raises(ValueError, match="counts_E sum to 5 rows but x_RI has 4"):
        grouped_matmul(x, w, [2, 3])
