"""The figures say what their data say: zeros on log axes, titles from the data."""

import math
from types import SimpleNamespace

import batchgrad._plots as plots
from batchgrad._critical_batch import CriticalBatch, TargetRun
from batchgrad._plots import LOG_FLOOR, on_log_axis
from batchgrad._tour import accumulation


def _capture(monkeypatch, module):
    figures = []

    def save(figure, path):
        figures.append(figure)
        return path

    monkeypatch.setattr(module, "save_figure", save)
    return figures


def test_zeros_on_a_log_axis_are_drawn_at_a_marked_floor(monkeypatch, tmp_path):
    assert on_log_axis([0.0, 1e-20, 2e-7]) == ([LOG_FLOOR, LOG_FLOOR, 2e-7], True)
    assert on_log_axis([1e-3]) == ([1e-3], False)
    figures = _capture(monkeypatch, accumulation)
    rows = [
        {
            "order": order,
            "micro_batches": k,
            "naive_rel_err": 0.0 if k == 1 else 0.3,
            "batchgrad_rel_err_float32": 1e-7,
            "batchgrad_rel_err_float64": 0.0 if k == 1 else 2e-16,
        }
        for order in ("random order", "sorted by length")
        for k in (1, 2, 4)
    ]
    accumulation._error_figure(rows, tmp_path / "e.png")
    (axes,) = figures[0].axes
    drawn = [y for line in axes.get_lines() for y in line.get_ydata()]
    assert all(math.isfinite(y) and y >= LOG_FLOOR for y in drawn)
    assert axes.get_ylim()[0] < LOG_FLOOR  # the floor is on the chart
    labels = [line.get_label() for line in axes.get_lines()]
    assert f"exactly 0 (drawn at {LOG_FLOOR:g})" in labels


def test_the_noise_scale_panel_is_titled_by_its_data(monkeypatch, tmp_path):
    figures = _capture(monkeypatch, plots)
    runs = tuple(TargetRun(b, 100 / b + 10, 1.0, 0.5, ((0.5, 1.0),)) for b in (4, 16, 64))
    critical = CriticalBatch("p", 0.1, 100, runs, 10.0, 10.0)
    trajectory = [(1, 2.0, 560.0), (2, 1.0, 10.0), (3, 0.5, 25.0)]
    advice = SimpleNamespace(
        batch_size=16,
        b_range=(8.0, 30.0),
        b_simple=20.0,
        b_simple_std=6.0,
        measured_batch_size=64,
        trajectory=lambda: trajectory,
    )
    critical.figure(tmp_path / "c.png", advice)
    title = figures[0].axes[2].get_title()
    assert "grows" not in title
    assert "560 at first, 10 at its lowest, 25 at the end" in title
