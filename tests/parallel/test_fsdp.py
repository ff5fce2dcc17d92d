"""FSDP2 + expert parallelism on a 2-D (dp, ep) mesh over gloo: outputs, aux losses and every
gradient equal one process on all tokens."""

from __future__ import annotations

import os

import pytest
import torch
from torch.distributed.tensor import DTensor

from moekit.parallel.fsdp import apply_fsdp_expert_parallel

from ..conftest import randomized_moe
from ..distributed import run_distributed
from .test_expert_parallel import CASES, _global_tokens


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _fsdp_worker(rank, world_size, result_dir, case, sizes, mesh_shape):
    from torch.distributed.device_mesh import init_device_mesh

    fields = {**CASES[case], "balance_loss_weight": 0.1, "z_loss_weight": 0.01}
    reference = randomized_moe(seed=0, **fields)
    sharded = randomized_moe(seed=0, **fields)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("dp", "ep"))
    apply_fsdp_expert_parallel(sharded, mesh)
    x_all, grad_all = _global_tokens(sizes, fields["dim"], False, case)
    start, stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
    x_ref = x_all.clone().requires_grad_()
    y_ref, aux_ref = reference(x_ref)
    ((y_ref * grad_all).sum() + aux_ref.loss).backward()
    x = x_all[start:stop].clone().requires_grad_()
    y, aux = sharded(x)
    ((y * grad_all[start:stop]).sum() + aux.loss).backward()
    torch.testing.assert_close(y, y_ref[start:stop], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad[start:stop], rtol=1e-5, atol=1e-6)
    ref_params = dict(reference.named_parameters())
    shard = sharded.experts.expert_ids
    checked = 0
    for name, param in sharded.named_parameters():
        expected = ref_params[name].grad
        if name.startswith("experts."):
            expected = expected[shard]
        torch.testing.assert_close(_full(param.grad), expected, rtol=1e-5, atol=1e-5, msg=name)
        checked += 1
    assert checked == len(ref_params)
    torch.save({"aux_loss": aux.loss.detach(), "reference_aux_loss": aux_ref.loss.detach(),
                "tokens_per_expert": aux.tokens_per_expert, "reference": aux_ref.tokens_per_expert},
               os.path.join(result_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("case,sizes,mesh_shape", [
    pytest.param("sigmoid-bias-shared", [5, 11], (2, 1), id="world2-dp2-ep1-shared"),
    pytest.param("topk", [5, 11], (1, 2), id="world2-dp1-ep2-topk"),
    pytest.param("sigmoid-bias-shared", [0, 3, 17, 9], (2, 2), id="world4-dp2-ep2-shared"),
    pytest.param("capacity-score-shared", [6, 3, 17, 9], (2, 2), id="world4-dp2-ep2-capacity"),
    pytest.param("expert-choice", [6, 3, 17, 9], (2, 2), id="world4-dp2-ep2-expert-choice")])
def test_fsdp_with_expert_parallel_equals_one_process(tmp_path, case, sizes, mesh_shape):
    results = run_distributed(_fsdp_worker, len(sizes), tmp_path, case, sizes, mesh_shape, timeout_s=240)
    torch.testing.assert_close(sum(r["aux_loss"] for r in results), results[0]["reference_aux_loss"])
    # every rank counts its own tokens: they sum to one process's counts
    assert sum(r["tokens_per_expert"] for r in results).tolist() == results[0]["reference"].tolist()
