"""The integration examples run as their docstrings say (small sizes)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent.parent / "examples"


def _run(*command):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=env, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_hf_trainer_example_audits_then_trains():
    pytest.importorskip("transformers")
    out = _run(sys.executable, str(EXAMPLES / "hf_trainer.py"), "--rows", "40")
    assert "labels counted before the shift" in out
    assert "last step: loss" in out


def test_lightning_example_trains():
    pytest.importorskip("lightning")
    out = _run(
        sys.executable, str(EXAMPLES / "lightning_train.py"), "--rows", "40", "--epochs", "1"
    )
    # 40 rows in batches of 8: 5 batches, windows of 4 and 1
    assert "1 batch(es) per process, 1 process(es)" in out


def test_accelerate_example_on_two_processes():
    pytest.importorskip("accelerate")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = _run(*torchrun, str(EXAMPLES / "accelerate_train.py"), "--steps", "2")
    assert "ranks 2" in out
    assert len([line for line in out.splitlines() if line.startswith("step")]) == 2
