"""Two machines simulated on one: two torchrun agents ("nodes") meet through a c10d rendezvous
on 127.0.0.1 and train examples/expert_parallel.py expert-parallel; the losses equal one process."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "expert_parallel.py"
STEPS = 3
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*launch_args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", *launch_args, str(EXAMPLE),
               "--steps", str(STEPS)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _outputs(*processes: subprocess.Popen) -> list[str]:
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, out in zip(processes, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def _losses(output: str, processes: int) -> torch.Tensor:
    """The losses a run printed ("step i: loss x (W process(es))")."""
    found = re.findall(rf"step \d+: loss ([0-9.]+) \({processes} process", output)
    return torch.tensor([float(v) for v in found], dtype=torch.float64)


def test_two_torchrun_nodes_with_c10d_rendezvous_equal_one_process():
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [_torchrun("--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                       "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes",
                       "--rdzv-conf", f"is_host={node == 0}", "--local-addr", "127.0.0.1",
                       "--max-restarts", "0")
             for node in range(2)]
    two_nodes = _outputs(*nodes)
    one = _outputs(_torchrun("--standalone", "--nproc-per-node", "1"))[0]
    expected = _losses(one, 1)
    got = _losses("".join(two_nodes), 2)  # global rank 0 prints, on whichever node it landed
    assert len(expected) == STEPS, one[-3000:]
    # printed with 6 decimals
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6)
    assert expected[-1] < expected[0]
