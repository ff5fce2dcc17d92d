"""Triton expert kernels against a float64 loop, forward and backward.

On CPU they run under the Triton interpreter (see tests/conftest.py), which is slow:
shapes stay tiny, but cover tails of a 16-row tile, empty experts, one
expert, zero tokens, and every activation.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import assert_rel_close, import_or_skip, needs

import_or_skip("triton", reason="Triton is not installed (pip install 'moekit[triton]')")

from moekit.experts.triton import fused_moe, sort_by_expert, triton_experts, triton_runs_on  # noqa: E402
from moekit.experts.triton import ops  # noqa: E402
from tests.reference import reference_experts  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = needs(triton_runs_on(DEVICE), reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def random_ids(num_tokens: int, num_experts: int, top_k: int, experts_used=None) -> torch.Tensor:
    """[T, K] distinct expert ids per token, drawn from experts_used (default all)."""
    pool = torch.tensor(experts_used if experts_used is not None else range(num_experts))
    picks = [pool[torch.randperm(len(pool))[:top_k]] for _ in range(num_tokens)]
    return torch.stack(picks) if picks else torch.zeros(0, top_k, dtype=torch.int64)


def random_problem(T, D, F, E, K, activation="swiglu", experts_used=None):
    hidden = 2 * F if activation in ("swiglu", "geglu") else F
    return dict(x=torch.randn(T, D, dtype=torch.float64),
                w1=torch.randn(E, hidden, D, dtype=torch.float64) / D ** 0.5,
                w2=torch.randn(E, D, F, dtype=torch.float64) / F ** 0.5,
                weights=torch.rand(T, K, dtype=torch.float64),
                ids=random_ids(T, E, K, experts_used))


def check_against_reference(problem, activation, dtype, deterministic=True):
    """fused_moe in dtype (combine weights float32) equals the float64 loop,
    output and every gradient."""
    names = ("x", "weights", "w1", "w2")
    inputs = {n: problem[n].to(DEVICE, torch.float32 if n == "weights" else dtype)
              .requires_grad_() for n in names}
    y = fused_moe(inputs["x"], problem["ids"].to(DEVICE), inputs["weights"], inputs["w1"],
                  inputs["w2"], activation, deterministic)
    assert y.dtype == dtype and y.shape == problem["x"].shape
    ref_inputs = {n: problem[n].clone().requires_grad_() for n in names}
    expected = reference_experts(ref_inputs["x"], problem["ids"], ref_inputs["weights"],
                                 ref_inputs["w1"], ref_inputs["w2"], activation)
    tol = TOLERANCE[dtype]
    assert_rel_close(y.cpu(), expected, tol, "output")
    grad = torch.randn_like(expected)
    y.backward(grad.to(DEVICE, dtype))
    expected.backward(grad)
    for n in names:
        assert_rel_close(inputs[n].grad.cpu(), ref_inputs[n].grad, 2 * tol, f"grad {n}")


@pytest.mark.parametrize("num, num_experts", [(0, 3), (1, 1), (128, 7), (300, 5), (129, 64)])
def test_sort_by_expert_is_a_stable_sort(num, num_experts):
    ids = torch.randint(0, max(num_experts - 2, 1), (num,), device=DEVICE)  # last experts empty
    result = sort_by_expert(ids, num_experts)
    assert torch.equal(result.order_R, torch.argsort(ids, stable=True))
    counts = torch.zeros(num_experts, dtype=torch.int64, device=DEVICE)
    counts.scatter_add_(0, ids, torch.ones_like(ids))
    assert torch.equal(result.counts_E, counts)
    assert result.offsets_E1.tolist() == [0] + counts.cumsum(0).tolist()


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu", "silu"])
def test_every_activation_matches_reference(activation):
    check_against_reference(random_problem(T=21, D=19, F=13, E=4, K=2, activation=activation),
                            activation, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_float32(dtype):
    check_against_reference(random_problem(T=25, D=16, F=16, E=3, K=2), "swiglu", dtype)


@pytest.mark.parametrize("T, E, K, experts_used", [
    (0, 3, 2, None),            # no tokens
    (7, 1, 1, None),            # one expert
    (40, 6, 1, [1, 4]),         # empty experts, 16-row tiles with tails
    (9, 5, 5, None),            # k = E
])
def test_edge_cases_match_reference(T, E, K, experts_used):
    check_against_reference(random_problem(T, D=16, F=8, E=E, K=K, experts_used=experts_used),
                            "swiglu", torch.float32)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="GPU tiles are 128 rows: too slow to interpret")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_several_gpu_tiles_per_expert_with_tails(dtype):
    check_against_reference(random_problem(T=300, D=200, F=136, E=5, K=2, experts_used=[0, 2, 3]),
                            "swiglu", dtype)


def test_atomic_combine_matches_reference():
    check_against_reference(random_problem(T=11, D=16, F=8, E=3, K=2), "swiglu", torch.float32,
                            deterministic=False)


def test_deterministic_path_is_bitwise_reproducible():
    p = random_problem(T=23, D=16, F=16, E=3, K=2)
    results = []
    for _ in range(2):
        x, w1, w2 = (p[n].float().to(DEVICE).requires_grad_() for n in ("x", "w1", "w2"))
        y = fused_moe(x, p["ids"].to(DEVICE), p["weights"].float().to(DEVICE), w1, w2)
        y.square().sum().backward()
        results.append([y, x.grad, w1.grad, w2.grad])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_unused_experts_get_exact_zero_weight_gradient():
    p = random_problem(T=10, D=16, F=8, E=4, K=1, experts_used=[2])
    w1, w2 = (p[n].float().to(DEVICE).requires_grad_() for n in ("w1", "w2"))
    fused_moe(p["x"].float().to(DEVICE), p["ids"].to(DEVICE), p["weights"].float().to(DEVICE),
              w1, w2).sum().backward()
    for grad in (w1.grad, w2.grad):
        assert torch.count_nonzero(grad[[0, 1, 3]]) == 0 and torch.count_nonzero(grad[2]) > 0


def test_inference_saves_no_preactivation_and_refuses_backward():
    p = random_problem(T=5, D=16, F=8, E=2, K=1)
    x, w1, w2 = (p[n].float().to(DEVICE) for n in ("x", "w1", "w2"))
    order = torch.argsort(p["ids"].reshape(-1), stable=True).to(DEVICE)
    offsets = ops.expert_offsets(torch.bincount(p["ids"].reshape(-1), minlength=2).to(DEVICE))
    with torch.no_grad():
        y = triton_experts(x, order, 1, None, offsets, w1, w2, "swiglu")
    y_op, h, _ = ops._forward_op(x.requires_grad_(), order, None, offsets, w1, w2, 1, "swiglu",
                                 False, True)
    assert h.shape == (0, 16)
    with pytest.raises(RuntimeError, match="save_h=False; it cannot be differentiated"):
        y_op.sum().backward()
    expected = reference_experts(p["x"], p["ids"], torch.ones(5, 1, dtype=torch.float64),
                                 p["w1"], p["w2"], "swiglu")
    assert_rel_close(y.cpu(), expected, 1e-5)


def test_custom_ops_pass_opcheck():
    p = random_problem(T=6, D=16, F=8, E=3, K=2)
    x, w1, w2 = (p[n].float().to(DEVICE).requires_grad_() for n in ("x", "w1", "w2"))
    ids = p["ids"].reshape(-1).to(DEVICE)
    torch.library.opcheck(ops._sort_op, (ids, 3))
    expert_sort = sort_by_expert(ids, 3)
    weights = p["weights"].float().reshape(-1)[expert_sort.order_R.cpu()].to(DEVICE) \
        .requires_grad_()
    args = (x, expert_sort.order_R, weights, expert_sort.offsets_E1, w1, w2, 2, "swiglu")
    torch.library.opcheck(ops._forward_op, (*args, True, True))
    _, h, a = ops._forward_op(*args, True, True)
    plain = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]  # no double backward
    torch.library.opcheck(ops._backward_op, (torch.randn_like(x), *plain[:6], h.detach(),
                                             a.detach(), *plain[6:]))


def test_fused_moe_traces_as_one_graph():
    p = random_problem(T=9, D=16, F=8, E=3, K=2)
    x, w1, w2 = (p[n].float().to(DEVICE).requires_grad_() for n in ("x", "w1", "w2"))
    ids, weights = p["ids"].to(DEVICE), p["weights"].float().to(DEVICE)
    compiled = torch.compile(fused_moe, backend="aot_eager", fullgraph=True)
    y = compiled(x, ids, weights, w1, w2)
    (grad_x,) = torch.autograd.grad(y.square().sum(), x)
    y_eager = fused_moe(x, ids, weights, w1, w2)
    assert torch.equal(y, y_eager)
    assert torch.equal(grad_x, torch.autograd.grad(y_eager.square().sum(), x)[0])


def test_bad_inputs_are_rejected_with_their_values():
    p = random_problem(T=4, D=16, F=8, E=2, K=1)
    x, w1, w2 = (p[n].float() for n in ("x", "w1", "w2"))
    order, offsets = torch.arange(4), torch.tensor([0, 2, 4])
    with pytest.raises(ValueError, match="activation must be one of .* got 'tanh'"):
        triton_experts(x, order, 1, None, offsets, w1, w2, "tanh")
    with pytest.raises(ValueError, match=r"expected x_TD \[T, 16\] and w1_EHD \(2, 8, 16\)"):
        triton_experts(x, order, 1, None, offsets, w1, w2, "gelu")
    with pytest.raises(TypeError, match="share one dtype .* got torch.float64, torch.float32"):
        triton_experts(x.double(), order, 1, None, offsets, w1, w2, "swiglu")
    with pytest.raises(ValueError, match=r"offsets_E1 \[3\]; got torch.int64 \(4,\) and \(2,\)"):
        triton_experts(x, order, 1, None, offsets[:2], w1, w2, "swiglu")
    with pytest.raises(ValueError, match=r"must both be \[T=4, K\]; got \(4, 1\) and \(4, 2\)"):
        fused_moe(x, p["ids"], torch.ones(4, 2), w1, w2)
