"""Start the ranks of a CPU tensor-parallel group as torchrun does (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
each running tests/runtime/tp_worker.py, and read back what each saved."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(args: list[str], out_dir: Path, world_size: int, timeout_s: float = 120) -> list[dict]:
    """Run `python -m tests.runtime.tp_worker *args` as world_size ranks; a hang fails the test after timeout_s."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the kernels' torch references
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world_size))
    cmd = [sys.executable, "-m", "tests.runtime.tp_worker", *args]
    ranks = [
        subprocess.Popen(
            cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(world_size)
    ]  # fmt: skip
    deadline = time.monotonic() + timeout_s
    try:
        logs = [p.communicate(timeout=max(deadline - time.monotonic(), 1))[0].decode() for p in ranks]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the {world_size} ranks did not finish in {timeout_s} s")
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
    for r, (p, log) in enumerate(zip(ranks, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-3000:]}"
    return [torch.load(out_dir / f"out.rank{r}.pt", weights_only=True) for r in range(world_size)]
