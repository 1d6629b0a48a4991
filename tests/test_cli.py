import json
import math
import re
import subprocess
import sys

import pytest

from batchgrad.cli import main

FACTORIES = "tests/factories.py"


def _output(capsys):
    return " ".join(capsys.readouterr().out.split())  # undo rich's line wrapping


def test_check_passes_on_an_exact_model(capsys):
    assert main(["check", f"{FACTORIES}:exact"]) == 0
    out = _output(capsys)
    assert "OK" in out
    assert "0.weight" in out
    assert "naive recipe (micro-batch mean / micro-batches) is off by 3.3e-01" in out


def test_check_fails_and_names_the_batchnorm(capsys):
    assert main(["check", f"{FACTORIES}:with_batchnorm", "--micro-batch-size", "5"]) == 1
    out = _output(capsys)
    assert "NOT EQUIVALENT" in out
    assert "finding: 1 (BatchNorm1d) is in training mode" in out


def test_check_across_processes(capsys):
    assert main(["check", f"{FACTORIES}:exact", "--nproc", "2"]) == 0
    out = _output(capsys)
    assert "on 2 ranks" in out
    assert "OK" in out
    assert "averaged over ranks" in out


def test_check_across_processes_names_the_batchnorm(capsys):
    args = ["check", f"{FACTORIES}:with_batchnorm", "--nproc", "2", "--micro-batch-size", "3"]
    assert main(args) == 1
    assert "1 (BatchNorm1d) is in training mode" in _output(capsys)


def test_check_with_an_importable_module(capsys):
    assert main(["check", "tests.factories:exact", "--reduction", "sum"]) == 0
    assert "reduction='sum'" in _output(capsys)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "Expected MODULE:FACTORY"),
        ("missing.py:f", "No such file"),
        ("no_such_module_xyz:f", "Cannot import 'no_such_module_xyz'"),
        (f"{FACTORIES}:nothing", "no callable named 'nothing'"),
        (f"{FACTORIES}:not_a_tuple", "must return \\(model, loss_fn, batch\\)"),
    ],
)
def test_check_bad_factories_exit_2_with_a_message(spec, message, capsys):
    assert main(["check", spec]) == 2
    assert re.search(message, _output(capsys))


def test_unknown_tour_chapter(capsys, tmp_path):
    assert main(["tour", "--out", str(tmp_path), "--chapter", "nope"]) == 2
    assert "Unknown chapter" in _output(capsys)


def test_the_installed_program_runs():
    result = subprocess.run(
        [sys.executable, "-m", "batchgrad", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("batchgrad ")


def test_compare_on_the_embedded_digits_writes_its_files(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--epochs", "1", "--batch-sizes", "8,full", "--out", str(out)]
    assert main([*args, "--lrs", "0.1,1"]) == 0
    text = _output(capsys)
    assert "mini-batch" in text
    assert "full-batch" in text
    assert "Per step" in text
    report = json.loads((out / "compare.json").read_text())
    assert [r["label"] for r in report["runs"]] == ["8", "full"]
    assert [r["steps"] for r in report["runs"]] == [179, 1]  # 1438 digits, 1 epoch, 6 left
    assert report["drop_last"] is True
    assert main([*args, "--lrs", "0.1,1", "--keep-last-batch"]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert [r["steps"] for r in report["runs"]] == [180, 1]
    assert report["drop_last"] is False
    assert all(r["lr"] in (0.1, 1.0) for r in report["runs"])
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![compare](compare.png)" in (out / "compare.md").read_text()


def test_compare_with_a_factory_and_held_out_data(tmp_path, capsys):
    factory = tmp_path / "regression.py"
    factory.write_text(
        "import torch\n"
        "import batchgrad as bg\n\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    x = torch.randn(48, 3)\n"
        "    y = x @ torch.ones(3, 1)\n"
        "    loss = lambda m, b: bg.Loss.from_criterion(torch.nn.MSELoss(), m(b[0]), b[1])\n"
        "    return torch.nn.Linear(3, 1), loss, (x[:32], y[:32]), (x[32:], y[32:])\n"
    )
    args = ["compare", f"{factory}:make", "--epochs", "2", "--batch-sizes", "1,4,full"]
    assert main([*args, "--lrs", "0.01,0.1", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert [r["regime"] for r in report["runs"]] == ["stochastic", "mini-batch", "full-batch"]
    assert all(r["eval_loss"] < r["curve"][0]["eval_loss"] for r in report["runs"])


def test_advise_prints_the_noise_scale_and_writes_json(tmp_path, capsys):
    assert main(["advise", "--steps", "20", "--lr", "0.5", "--out", str(tmp_path)]) == 0
    text = _output(capsys)
    assert re.search(r"B_simple = [\d.]+ ± [\d.]+", text)
    assert "Recommended batch size" in text
    assert "Learning rate (SGD)" in text
    advice = json.loads((tmp_path / "advise.json").read_text())
    assert advice["measured_batch_size"] == 64
    assert advice["micro_batches"] == 4
    assert advice["steps"] == 20
    assert advice["b_simple"] > 0
    assert advice["batch_size"] == 2 ** round(math.log2(advice["b_simple"]))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compare", f"{FACTORIES}:not_a_tuple"], r"must return \(model, loss_fn, data\)"),
        (["advise", f"{FACTORIES}:exact"], "returned an int as its 4th item"),
        (["advise", "no_colon"], "Expected MODULE:FACTORY"),
        (["compare", "--batch-sizes", "1,x"], "--batch-sizes takes positive ints and 'full'"),
        (["compare", "--lrs", "fast"], "--lrs takes comma-separated numbers"),
        (["advise", "--micro-batches", "1"], "micro_batches must be at least 2"),
    ],
)
def test_compare_and_advise_bad_input_exits_2(args, message, capsys):
    assert main(args) == 2
    assert re.search(message, _output(capsys))
