"""The benchmarks run end to end (at tiny sizes); their timings are never asserted."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


sys.path.insert(0, str(BENCHMARKS))  # as when a benchmark runs as a script: finds common.py


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
    results = json.loads(out.read_text())
    rows = {row["method"]: row for row in results["rows"]}
    assert rows["sync every micro-batch"]["grad_all_reduces"] == 4  # 4 micro-batches
    assert rows["no_sync loop"]["grad_all_reduces"] == 1
    assert rows["batchgrad"]["grad_all_reduces"] == 1
    assert rows["batchgrad"]["grad_bytes"] == rows["no_sync loop"]["grad_bytes"]
    assert rows["batchgrad"]["control_all_reduces"] == 0  # the agreement rides in the sum
    assert 0 < rows["batchgrad"]["control_bytes"] < 1000
    for other in results["counted_only"]["4"].values():  # first call, and with a hook
        assert (other["grad_all_reduces"], other["control_all_reduces"]) == (1, 1)
        assert other["grad_bytes"] == rows["no_sync loop"]["grad_bytes"]


@pytest.fixture(scope="module")
def bptt_memory():
    module = load("bptt_memory")
    yield module
    sys.modules.pop(module.__name__, None)


def test_bptt_memory_quick_run_writes_every_row(bptt_memory, tmp_path):
    out = tmp_path / "results" / "bptt.json"

    assert bptt_memory.main(["--quick", "--out", str(out)]) == 0

    results = json.loads(out.read_text())
    assert results["benchmark"] == "bptt_memory"
    settings = results["settings"]
    assert settings["quick"] is True
    full, *chunked = results["rows"]
    assert (full["method"], full["chunk"]) == ("full BPTT", settings["steps"])
    assert full["boundary_state_bytes"] == 0
    assert full["memory_ratio"] == full["time_ratio"] == 1.0
    assert [(row["method"], row["chunk"]) for row in chunked] == [
        ("bg.bptt", chunk) for chunk in settings["chunks"]
    ]
    for row in chunked:
        assert row["max_grad_rel_err"] <= settings["grad_tolerance"]
        assert 0 < row["saved_peak_bytes"] < row["total_bytes"] < full["saved_peak_bytes"]
        assert row["time"]["n"] == len(row["time"]["times_s"]) == settings["repeats"]


def test_bptt_memory_counts_each_saved_storage_once_until_freed(bptt_memory):
    weight = torch.ones(1000, requires_grad=True)
    saved = bptt_memory.SavedTensors(exclude=[weight])
    x = torch.ones(1000, requires_grad=True)
    with saved.watching():
        y = (x.exp() * weight)[:10].sum()  # exp saves its output; mul saves exp's output
    assert saved.peak == saved.live == 4000  # exp's output counted once; the weight left out
    y.backward()
    assert saved.live == 0
    assert saved.peak == 4000


def test_bptt_memory_aborts_when_the_gradients_disagree(bptt_memory, tmp_path, monkeypatch):
    def forgets_the_count(model, sequence, chunk):
        model.zero_grad(set_to_none=True)
        bptt_memory.bg.bptt(model, bptt_memory.step_fn, sequence, chunk=chunk, reduction="sum")

    monkeypatch.setattr(bptt_memory, "chunked_bptt", forgets_the_count)
    out = tmp_path / "x.json"

    assert bptt_memory.main(["--quick", "--out", str(out)]) == 1
    assert not out.exists()


@pytest.fixture(scope="module")
def per_sample():
    module = load("per_sample")
    yield module
    sys.modules.pop(module.__name__, None)


def test_per_sample_quick_run_checks_and_times_every_method(per_sample, tmp_path):
    out = tmp_path / "results" / "per_sample.json"

    assert per_sample.main(["--quick", "--out", str(out)]) == 0

    results = json.loads(out.read_text())
    assert results["benchmark"] == "per_sample"
    assert {"torch", "torch_threads", "platform", "opacus"} <= results["environment"].keys()
    settings = results["settings"]
    assert settings["quick"] is True
    assert settings["repeats"] == 2
    with_opacus = per_sample.opacus_missing() is None
    with_backpack = per_sample.backpack_missing() is None
    assert (settings["opacus_skipped"] is None) == with_opacus
    models = ("mlp", "cnn", "transformer")
    if per_sample.transformers_missing() is None:
        models += ("gpt2",)
    expected = {
        (model, task, method)
        for model in models
        for task in ("grads", "norms", "clipped")
        for method in per_sample.METHODS
        if not (method == "opacus ghost" and task == "grads")
    }
    rows = results["rows"]
    assert len(rows) == len(expected)
    assert {(row["model"], row["task"], row["method"]) for row in rows} == expected
    for row in rows:
        missing = (row["method"] in ("opacus", "opacus ghost") and not with_opacus) or (
            row["method"] == "backpack" and not with_backpack
        )
        if missing:
            assert row["status"] == "skipped"
            continue
        if row["status"] == "failed":  # a peer that cannot run this model, or is wrong on it
            assert row["method"] in ("opacus", "opacus ghost", "backpack")
            assert row["note"].startswith(("fails", "wrong"))
            continue
        assert row["status"] == "ok"
        assert row["timings"]["n"] == len(row["timings"]["times_ms"]) == settings["repeats"]
        assert {"ratio", "ratio_min", "ratio_paired_median", "median_ms"} <= row.keys()
        if row["method"] == "plain":
            assert row["max_rel_err"] is None
        else:  # every method is checked against torch.func before it is timed
            assert 0 <= row["max_rel_err"] <= settings["tolerance"]
    assert len(results["targets"]) == len(models) * 3 + 2
    assert all(target["met"] in (True, False) for target in results["targets"])


def test_per_sample_reports_a_failing_peer_and_goes_on(per_sample, tmp_path, monkeypatch):
    def broken(self, batch):
        raise RuntimeError("no rule for this layer (test)")

    monkeypatch.setattr(per_sample.Naive, "norms", broken)
    monkeypatch.setattr(per_sample, "build_workloads", _first_workload(per_sample))
    out = tmp_path / "per_sample.json"

    assert per_sample.main(["--quick", "--no-opacus", "--no-backpack", "--out", str(out)]) == 0

    rows = json.loads(out.read_text())["rows"]
    (row,) = [r for r in rows if (r["task"], r["method"]) == ("norms", "naive")]
    assert row["status"] == "failed"
    assert "no rule for this layer (test)" in row["note"]


def test_per_sample_skips_opacus_rows_when_it_is_missing(per_sample, tmp_path, monkeypatch):
    monkeypatch.setattr(per_sample, "opacus_missing", lambda: "opacus is not installed (test)")
    monkeypatch.setattr(per_sample, "build_workloads", _first_workload(per_sample))
    out = tmp_path / "per_sample.json"

    assert per_sample.main(["--quick", "--out", str(out)]) == 0

    results = json.loads(out.read_text())
    assert results["settings"]["opacus_skipped"] == "opacus is not installed (test)"
    status = {(row["task"], row["method"]): row["status"] for row in results["rows"]}
    assert status[("grads", "opacus")] == status[("clipped", "opacus ghost")] == "skipped"
    assert ("grads", "opacus ghost") not in status
    assert status[("clipped", "batchgrad")] == status[("grads", "torch.func")] == "ok"


def test_per_sample_aborts_when_a_method_disagrees(per_sample, tmp_path, monkeypatch):
    def wrong_norms(self, batch):
        """The norms of the batch's summed gradient, not of each sample's."""
        return self.grads(batch)["0.weight"].sum(0).norm().expand(batch[0].shape[0])

    monkeypatch.setattr(per_sample.Batchgrad, "norms", wrong_norms)
    monkeypatch.setattr(per_sample, "build_workloads", _first_workload(per_sample))
    out = tmp_path / "per_sample.json"

    assert per_sample.main(["--quick", "--no-opacus", "--out", str(out)]) == 1
    assert not out.exists()


def _first_workload(per_sample):
    build = per_sample.build_workloads
    return lambda sizes, seed: build(sizes, seed)[:1]


@pytest.fixture(scope="module")
def noise_overhead():
    module = load("noise_overhead")
    yield module
    sys.modules.pop(module.__name__, None)


def test_noise_overhead_quick_run(noise_overhead, tmp_path):
    out = tmp_path / "noise.json"

    assert noise_overhead.main(["--quick", "--out", str(out)]) == 0

    results = json.loads(out.read_text())
    assert [row["model"] for row in results["rows"]] == ["mlp", "tiny_lm"]
    for row in results["rows"]:
        assert row["max_grad_rel_err"] <= 1e-5
        assert row["micro_batches"] == 4
        assert row["accumulate"]["n"] == row["accumulate_noise"]["n"] == 3


@pytest.fixture(scope="module")
def precision():
    module = load("precision")
    yield module
    sys.modules.pop(module.__name__, None)


def test_precision_quick_run_writes_errors_timings_and_the_plot(precision, tmp_path):
    out = tmp_path / "results" / "precision.json"

    assert precision.main(["--quick", "--out", str(out)]) == 0

    results = json.loads(out.read_text())
    assert results["benchmark"] == "precision"
    settings = results["settings"]
    assert [(row["problem"], row["micro_batches"]) for row in results["errors"]] == [
        (problem, k) for problem in ("linear", "mlp") for k in settings["counts"]
    ]
    for row in results["errors"]:
        assert 0 < row["one rounding"] <= row["batchgrad"]
        if row["problem"] == "linear":  # only the summation differs: one rounding's worth
            assert row["batchgrad"] <= 1.5 * row["one rounding"]
    assert [row["micro_batches"] for row in results["timings"]] == settings["time_counts"]
    for row in results["timings"]:
        assert row["plain"]["n"] == row["batchgrad"]["n"] == settings["repeats"]
    assert (tmp_path / "results" / "precision.png").stat().st_size > 0
