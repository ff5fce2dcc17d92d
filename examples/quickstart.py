"""Build an MoE layer, train it briefly on a toy regression, and print what the router does.

Run: python examples/quickstart.py [--steps N]
"""

from __future__ import annotations

import argparse

import torch

import moekit


def main(steps: int = 60) -> dict[str, float]:
    torch.manual_seed(0)
    config = moekit.MoEConfig(dim=64, expert_dim=128, num_experts=8, top_k=2,
                              capacity_factor=1.25, z_loss_weight=1e-3)
    moe = moekit.MoE(config)
    teacher = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    optimizer = torch.optim.AdamW(moe.parameters(), lr=3e-3)
    print(moe)
    print(f"experts backend: {moe.experts.backend_for(torch.float32)}")
    print(f"{'step':>5} {'task loss':>10} {'aux loss':>9} {'max/mean':>9} {'cv':>6} "
          f"{'entropy':>8} {'dropped':>8}")
    for step in range(1, steps + 1):
        x = torch.randn(8, 32, 64)                      # [batch, seq, dim]
        with torch.no_grad():
            target = teacher(x)
        y, aux = moe(x)
        task_loss = torch.nn.functional.mse_loss(y, target)
        (task_loss + aux.loss).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step % 10 == 0:
            m = aux.metrics()
            print(f"{step:5d} {task_loss.item():10.4f} {m['loss']:9.5f} {m['load_max_over_mean']:9.3f} "
                  f"{m['load_cv']:6.3f} {m['router_entropy']:8.3f} {m['dropped_fraction']:8.3f}")
    return aux.metrics()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    main(parser.parse_args().steps)
