"""Expert-parallel training of a small MoE language model, launched with torchrun.

Run:  torchrun --nproc-per-node 2 examples/expert_parallel.py [--steps 5]
      torchrun --nproc-per-node 1 examples/expert_parallel.py     # the same global batch, one process

Every rank builds the same model (same seed), keeps E / W of each MoE layer's
experts, and feeds its slice of the global batch. The task loss is summed over
this rank's tokens and divided by the global token count, and aux.loss is this
rank's share of the global aux loss, so after the data-parallel sum of the
replicated gradients every rank applies exactly the one-process update: the
printed losses do not depend on the number of processes.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F

import moekit
from moekit.lm import LMConfig, MoETransformer
from moekit.parallel import all_reduce_replicated_grads, apply_expert_parallel

GLOBAL_BATCH, SEQ_LEN = 8, 32


def main(steps: int = 5, log: bool = True) -> list[float]:
    """Train for ``steps``; returns the global loss of each step (on every rank)."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if GLOBAL_BATCH % world:
        raise ValueError(f"the global batch {GLOBAL_BATCH} must split evenly over {world} ranks")
    torch.manual_seed(0)
    moe = moekit.MoEConfig(dim=32, expert_dim=32, num_experts=4, top_k=2, z_loss_weight=1e-3)
    model = MoETransformer(LMConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=64, moe=moe,
                                    max_seq_len=SEQ_LEN))
    apply_expert_parallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1)  # the same global batches on every rank
    phrase = torch.randint(97, 123, (23,), generator=data)  # text to learn: a repeated phrase
    per_rank = GLOBAL_BATCH // world
    losses = []
    for step in range(steps):
        starts = torch.randint(0, len(phrase), (GLOBAL_BATCH, 1), generator=data)
        batch = phrase[(starts + torch.arange(SEQ_LEN + 1)) % len(phrase)]
        local = batch[rank * per_rank:(rank + 1) * per_rank]
        out = model(local[:, :-1])
        task = F.cross_entropy(out.logits.flatten(0, 1), local[:, 1:].flatten(), reduction="sum")
        loss = task / (GLOBAL_BATCH * SEQ_LEN) + out.aux_loss
        loss.backward()
        all_reduce_replicated_grads(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total))
        if log and rank == 0:
            print(f"step {step + 1}: loss {losses[-1]:.6f} ({world} process(es))")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    main(parser.parse_args().steps)
    dist.destroy_process_group()
