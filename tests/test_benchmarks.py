"""The benchmarks run end to end (at tiny sizes); their timings are never asserted."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` from its file: benchmarks/ is not a package."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def accumulate_overhead():
    module = load("accumulate_overhead")
    yield module
    sys.modules.pop(module.__name__, None)


def test_accumulate_overhead_quick_run_writes_every_row(accumulate_overhead, tmp_path):
    out = tmp_path / "results" / "x.json"

    assert accumulate_overhead.main(["--quick", "--out", str(out)]) == 0

    results = json.loads(out.read_text())
    assert results["benchmark"] == "accumulate_overhead"
    assert {"torch", "torch_threads", "platform"} <= results["environment"].keys()
    settings = results["settings"]
    assert settings["quick"] is True
    assert settings["repeats"] == 2
    counts = settings["micro_batch_counts"]
    rows = results["rows"]
    assert [(row["model"], row["micro_batches"]) for row in rows] == [
        (model, count) for model in ("mlp", "tiny_lm") for count in counts
    ]
    for row in rows:
        assert row["micro_batch_size"] * row["micro_batches"] == settings["logical_batch"]
        assert row["max_grad_rel_err"] <= settings["grad_tolerance"]
        assert {"ratio", "ratio_min", "ratio_paired_median"} <= row.keys()
        for side in ("plain", "batchgrad"):
            summary = row[side]
            assert summary["n"] == len(summary["times_ms"]) == settings["repeats"]
            assert {"median_ms", "min_ms", "q1_ms", "q3_ms", "median_page_faults"} <= summary.keys()


def test_accumulate_overhead_aborts_when_the_loops_disagree(
    accumulate_overhead, tmp_path, monkeypatch
):
    def wrong_plain_step(model, batch, micro_batch_size):
        """Forgets to divide by the count: right only when the batch is run whole."""
        inputs, labels = batch
        model.zero_grad(set_to_none=True)
        chunks = zip(inputs.split(micro_batch_size), labels.split(micro_batch_size), strict=True)
        for x, y in chunks:
            accumulate_overhead.F.cross_entropy(model(x), y).backward()

    monkeypatch.setattr(accumulate_overhead, "plain_classifier_step", wrong_plain_step)
    out = tmp_path / "x.json"

    assert accumulate_overhead.main(["--quick", "--out", str(out)]) == 1
    assert not out.exists()


def test_ddp_communication_quick_run_counts_one_sync(tmp_path):
    out = tmp_path / "ddp.json"
    script = BENCHMARKS / "ddp_communication.py"
    subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=240,
        env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"},
    )
    rows = {row["method"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["sync every micro-batch"]["grad_all_reduces"] == 4  # 4 micro-batches
    assert rows["no_sync loop"]["grad_all_reduces"] == 1
    assert rows["batchgrad"]["grad_all_reduces"] == 1
    assert rows["batchgrad"]["grad_bytes"] == rows["no_sync loop"]["grad_bytes"]
    assert rows["batchgrad"]["control_all_reduces"] == 2
