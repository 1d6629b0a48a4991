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
    assert "1 (BatchNorm1d) is in training mode" in out


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
