"""The core never imports the heavy peer libraries; only the integrations do."""

import subprocess
import sys

PEERS = ("transformers", "lightning", "pytorch_lightning", "accelerate")


def test_importing_batchgrad_and_its_cli_imports_no_trainer_library():
    code = (
        "import sys, batchgrad, batchgrad.cli, batchgrad._tour, batchgrad.integrations\n"
        f"print(sorted(m for m in {PEERS!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"
