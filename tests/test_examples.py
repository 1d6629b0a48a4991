"""The examples run exactly as their docstrings say."""

import os
import socket
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parent.parent / "examples" / "ddp_train.py"


def _run(*command, env=None):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=240, env=env, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _losses(out):
    return [float(line.split()[3]) for line in out.splitlines() if line.startswith("step")]


def test_ddp_train_with_torchrun_gives_the_losses_of_one_process():
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    two = _run(*torchrun, "--nproc_per_node=2", str(EXAMPLE), "--steps", "2")
    one = _run(sys.executable, str(EXAMPLE), "--steps", "2")
    assert "ranks 2" in two
    assert len(_losses(two)) == 2
    # The same logical batches, so the same training trajectory up to float32 rounding.
    for a, b in zip(_losses(one), _losses(two), strict=True):
        assert abs(a - b) <= 1e-4 * abs(a)


FSDP_EXAMPLE = EXAMPLE.parent / "fsdp_train.py"


def test_fsdp_train_with_torchrun_gives_the_losses_of_one_process():
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    steps = ("--steps", "2", "--batch-size", "16", "--micro-batch-size", "4")
    two = _run(*torchrun, "--nproc_per_node=2", str(FSDP_EXAMPLE), *steps)
    # one process, without torchrun's agent: the environment it would set
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    alone = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": "0", "WORLD_SIZE": "1"}
    one = _run(sys.executable, str(FSDP_EXAMPLE), *steps, "--short", "0", env=alone)
    assert "ranks 2" in two
    assert len(_losses(two)) == 2
    # Uneven shares, the same logical batches: the same trajectory up to float32 rounding.
    for a, b in zip(_losses(one), _losses(two), strict=True):
        assert abs(a - b) <= 1e-4 * abs(a)
