"""experts_backend="triton" in the layer: against the float64 reference, and its selection rules."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import import_or_skip, needs, randomized_moe

import_or_skip("triton", reason="Triton is not installed (pip install 'moekit[triton]')")

from moekit import MoEConfig  # noqa: E402
from moekit.contract import rows_plan  # noqa: E402
from moekit.experts import Experts  # noqa: E402
from moekit.experts.triton import triton_runs_on  # noqa: E402
from tests.test_layer import check_against_reference  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
runs_here = needs(triton_runs_on(DEVICE), reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


@runs_here
@pytest.mark.parametrize("dtype, tol, grad_tol", [(torch.float32, 1e-5, 1e-5),
                                                  (torch.bfloat16, 2e-2, 5e-2)])
@pytest.mark.parametrize("case", [dict(num_experts=4, top_k=2),
                                  dict(num_experts=4, top_k=2, capacity_factor=0.75),
                                  dict(num_experts=3, top_k=1, activation="gelu")])
def test_layer_matches_reference(case, dtype, tol, grad_tol):
    moe = randomized_moe(dtype=dtype, dim=16, expert_dim=8, experts_backend="triton", **case)
    moe = moe.to(DEVICE)
    assert moe.experts.backend_for(dtype) == "triton"
    check_against_reference(moe, 19, dtype=dtype, tol=tol, grad_tol=grad_tol)


@runs_here
def test_rows_interface_matches_loop_backend():
    torch.manual_seed(0)
    triton = Experts(MoEConfig(dim=16, expert_dim=8, num_experts=3, top_k=1,
                               experts_backend="triton")).to(DEVICE)
    loop = Experts(MoEConfig(dim=16, expert_dim=8, num_experts=3, top_k=1,
                             experts_backend="loop")).to(DEVICE)
    loop.load_state_dict(triton.state_dict())
    rows = torch.randn(21, 16, device=DEVICE, requires_grad=True)
    counts = torch.tensor([9, 0, 12], device=DEVICE)
    outs, grads = [], []
    for module in (triton, loop):
        outs.append(module(rows, rows_plan(counts, rows.shape[0])))
        grads.append(torch.autograd.grad(outs[-1].square().sum(), [rows, *module.parameters()]))
    torch.testing.assert_close(*outs)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_selection_rules(monkeypatch):
    config = MoEConfig(dim=16, expert_dim=8, num_experts=2, top_k=1, experts_backend="triton")
    with pytest.raises(ValueError, match="experts_backend='triton' runs on CUDA, not meta"):
        Experts(config).to("meta").backend_for(torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"runs on CUDA, not cpu .*TRITON_INTERPRET=1"):
        Experts(config).backend_for(torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="does not support bias=True"):
        Experts(MoEConfig(dim=16, expert_dim=8, num_experts=2, top_k=1, bias=True,
                          experts_backend="triton")).backend_for(torch.float32)
    with pytest.raises(ValueError, match="float32/bfloat16/float16, not torch.float64"):
        Experts(config).backend_for(torch.float64)
    auto = Experts(MoEConfig(dim=16, expert_dim=8, num_experts=2, top_k=1))
    assert auto.backend_for(torch.float32) == "fused"  # CPU keeps its own backend
    if torch.cuda.is_available():
        assert auto.to("cuda").backend_for(torch.bfloat16) == "grouped_mm"  # triton only by name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_without_triton_runs_grouped_mm_in_bf16(monkeypatch):
    """A GPU user without Triton gets grouped_mm, matching the loop backend."""
    monkeypatch.setattr("moekit.experts.triton.triton_installed", lambda: False)
    moe = randomized_moe(dtype=torch.bfloat16, dim=64, expert_dim=32, num_experts=4,
                         top_k=2).cuda()
    assert moe.experts.backend_for(torch.bfloat16) == "grouped_mm"
    loop = randomized_moe(dtype=torch.bfloat16, dim=64, expert_dim=32, num_experts=4, top_k=2,
                          experts_backend="loop").cuda()
    loop.load_state_dict(moe.state_dict())
    x = torch.randn(37, 64, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(moe(x)[0], loop(x)[0], rtol=2e-2, atol=2e-2)


def test_missing_triton_says_what_to_install(monkeypatch):
    import moekit.experts.triton as package
    monkeypatch.setattr(package, "triton_installed", lambda: False)  # TritonBackend asks here too
    with pytest.raises(ImportError, match=r"pip install 'moekit\[triton\]'"):
        package.fused_moe  # noqa: B018
    forced = Experts(MoEConfig(dim=16, expert_dim=8, num_experts=2, top_k=1,
                               experts_backend="triton"))
    with pytest.raises(ValueError, match=r"needs Triton: pip install 'moekit\[triton\]'"):
        forced.backend_for(torch.float32)
