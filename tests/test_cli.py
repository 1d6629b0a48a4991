import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import batchgrad as bg
from batchgrad.cli import main

FACTORIES = "tests/factories.py"


def _output(capsys):
    captured = capsys.readouterr()
    return " ".join((captured.out + captured.err).split())  # undo rich's line wrapping


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
        (["compare", "--lrs", "fast"], "--lrs takes comma-separated positive numbers"),
        (["advise", "--batch-size", "3"], "batch_size must be between micro_batches"),
    ],
)
def test_compare_and_advise_bad_input_exits_2(args, message, capsys):
    assert main(args) == 2
    assert re.search(message, _output(capsys))


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["check", f"{FACTORIES}:exact", "--micro-batch-size", "0"], "--micro-batch-size"),
        (["check", f"{FACTORIES}:exact", "--nproc", "0"], "--nproc"),
        (["check", f"{FACTORIES}:exact", "--tolerance", "-1"], "--tolerance"),
        (["check", f"{FACTORIES}:exact", "--tolerance", "nan"], "--tolerance"),
        (["check", f"{FACTORIES}:exact", "--threads", "0"], "--threads"),
        (["compare", "--epochs", "0"], "--epochs"),
        (["compare", "--momentum", "-0.5"], "--momentum"),
        (["advise", "--steps", "0"], "--steps"),
        (["advise", "--lr", "-1"], "--lr"),
        (["advise", "--batch-size", "1"], "--batch-size"),
        (["advise", "--micro-batches", "1"], "--micro-batches"),
        (["tour", "--threads", "x"], "--threads"),
    ],
)
def test_every_bad_flag_is_refused_naming_it(args, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err


def test_bad_lrs_are_refused_naming_the_flag(capsys):
    assert main(["advise", "--lrs", "0.1,-1"]) == 2
    assert "--lrs takes comma-separated positive numbers" in _output(capsys)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("wrong_model", r"returned str as its 1st item; .* starts with the model"),
        ("loss_not_callable", r"returned CrossEntropyLoss as its 2nd item; .*from_criterion"),
        ("string_batch", r"returned str as its 3rd item \(batch\); give a tensor"),
        ("disagreeing_batch", r"BatchShapeError: .* batch\[0\] has 10, batch\[1\] has 7"),
        ("bad_micro_batch_size", r"returned 0 as its 4th item, the micro-batch size"),
    ],
)
def test_factory_results_are_checked_with_one_clean_line(factory, message, capsys):
    assert main(["check", f"{FACTORIES}:{factory}"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1  # one line, whatever its length
    assert "Traceback" not in captured.err
    assert re.search(message, captured.err)


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_a_batch_error_is_one_clean_line_in_one_process_and_across_processes(nproc, capsys):
    assert main(["check", f"{FACTORIES}:nan_loss", "--nproc", nproc]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("NonFiniteError: ")
    assert "is nan" in captured.err
    assert ("On rank" in captured.err) == (nproc == "2")


def test_traceback_flag_lets_the_error_through():
    with pytest.raises(bg.NonFiniteError):
        main(["check", f"{FACTORIES}:nan_loss", "--traceback"])


def test_the_naive_recipe_is_named_for_its_reduction(capsys):
    assert main(["check", "tests.factories:exact", "--reduction", "sum"]) == 0
    out = _output(capsys)
    assert "naive recipe (micro-batch sum / micro-batches)" in out
    assert "micro-batch mean" not in out


def test_python_m_batchgrad_prints_help_and_help_loads_no_torch():
    result = subprocess.run(
        [sys.executable, "-m", "batchgrad"], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("usage: batchgrad")
    assert "check" in result.stdout
    probe = "import sys, batchgrad.cli as c; c._parser(); print('torch' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert loaded.stdout.strip() == "False"


def test_progress_is_printed_as_lines_when_output_is_not_a_terminal(capsys):
    assert main(["advise", "--steps", "20", "--lr", "0.5", "--micro-batches", "2"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("progress:")]
    assert lines
    assert "measuring the noise scale" in " ".join(lines)


def test_a_factory_file_named_json_does_not_replace_json(tmp_path, monkeypatch, capsys):
    import json as real_json

    (tmp_path / "json.py").write_text(
        "from tests.factories import exact as make\nVALUE = 'factory'\n"
    )
    path_before = list(sys.path)
    assert main(["check", f"{tmp_path / 'json.py'}:make"]) == 0
    assert sys.modules["json"] is real_json
    assert sys.path == path_before


def test_a_module_factory_leaves_sys_path_alone_and_shadows_nothing(tmp_path):
    """Run from a folder holding planted json.py and matplotlib.py next to the factory."""
    (tmp_path / "matplotlib.py").write_text("raise SystemExit('planted matplotlib ran')\n")
    (tmp_path / "json.py").write_text("raise SystemExit('planted json ran')\n")
    (tmp_path / "my_setup.py").write_text(
        "import json\nfrom tests.factories import exact as make\n"
    )
    probe = tmp_path / "elsewhere" / "probe.py"  # not in the folder: python puts its own first
    probe.parent.mkdir()
    probe.write_text(
        "import sys\n"
        "from batchgrad.cli import load_factory, main\n"
        "before = list(sys.path)\n"
        "load_factory('my_setup:make')\n"
        "assert sys.path == before, sys.path\n"
        "import json, matplotlib.figure\n"
        "raise SystemExit(main(['check', 'my_setup:make']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    result = subprocess.run(
        [sys.executable, str(probe)], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert "planted" not in result.stderr + result.stdout
    assert "OK" in result.stdout


def test_out_folder_that_is_a_symlink_is_refused(tmp_path, capsys):
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "out"
    link.symlink_to(target)
    assert main(["advise", "--steps", "5", "--lr", "0.5", "--out", str(link)]) == 2
    assert "ConfigError: --out" in (out := _output(capsys))
    assert "symbolic link" in out
    assert list(target.iterdir()) == []


def test_critical_measures_by_branching_and_writes_its_files(tmp_path, capsys):
    out = tmp_path / "crit"
    args = ["critical", "--batch-sizes", "8,64,512", "--samples", "1024"]
    assert main([*args, "--checkpoints", "0,200", "--lrs", "0.3,1", "--out", str(out)]) == 0
    text = _output(capsys)
    assert "B_crit" in text
    assert "B_simple" in text
    data = json.loads((out / "critical.json").read_text())
    assert [c["step"] for c in data["checkpoints"]] == [0, 200]
    for checkpoint in data["checkpoints"]:
        assert [b["steps"] for b in checkpoint["branches"]] == [128, 16, 2]
        assert checkpoint["critical"] in (8, 64, 512)
    assert (out / "critical.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![critical](critical.png)" in (out / "critical.md").read_text()
    assert main(["critical", "--checkpoints", "0,-1"]) == 2
    assert "--checkpoints takes comma-separated ints ≥ 0" in _output(capsys)
