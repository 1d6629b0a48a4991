"""The figures of `compare` and of the critical-batch measurements.

Figures use matplotlib's object-oriented API (`batchgrad._report.new_figure`), which
needs no display and changes no global backend; `save_figure` writes atomically.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from ._report import new_figure, save_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from ._advise import Advice
    from ._compare import Comparison
    from ._critical_batch import CriticalBatch


def compare_figure(self: Comparison, path: Path) -> Path:
    """Training loss against epochs, steps, samples seen and wall time (4 panels)."""
    figure = new_figure(11, 8)
    axes = figure.subplots(2, 2)
    panels: list[tuple[Axes, str, str, bool]] = [
        (axes[0, 0], "epoch", "epochs", False),
        (axes[0, 1], "step", "optimizer steps (iterations)", True),
        (axes[1, 0], "samples_seen", "samples seen", True),
        (axes[1, 1], "wall_time", "wall time (s)", True),
    ]
    positive = all(p.train_loss > 0 for run in self.runs for p in run.curve)
    for ax, key, label, log in panels:
        for run in self.runs:
            points = [p for p in run.curve if not log or getattr(p, key) > 0]
            ax.plot(
                [getattr(p, key) for p in points],
                [p.train_loss for p in points],
                marker="." if len(points) < 15 else None,
                label=f"{f'{run.regime} (B={run.batch_size})'}, lr {run.lr:g}",
            )
        if log:
            ax.set_xscale("log")
        if positive:
            ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("training loss (whole set)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize="small")
    figure.suptitle(f"{self.problem}: the same training, four clocks")
    return save_figure(figure, path)


def critical_figure(self: CriticalBatch, path: Path, advice: Advice | None = None) -> Path:
    """Steps and samples to the target against B (log-log), the fit, and B_simple."""
    figure = new_figure(15 if advice else 10, 4.5)
    axes = figure.subplots(1, 3 if advice else 2)
    reached = [run for run in self.runs if run.steps is not None]
    sizes = [run.batch_size for run in reached]
    every = [run.batch_size for run in self.runs]
    low, high = min(every) / 1.5, max(every) * 1.5
    dense = [low * (high / low) ** (k / 200) for k in range(201)]
    fitted = math.isfinite(self.s_min) and math.isfinite(self.b_noise)
    for ax, per_step in ((axes[0], True), (axes[1], False)):
        scale = [1.0 if per_step else b for b in sizes]
        ax.plot(
            sizes,
            [(run.steps or math.nan) * s for run, s in zip(reached, scale, strict=True)],
            "o",
            label="measured",
        )
        if fitted:
            ax.plot(
                dense,
                [self.predicted_steps(b) * (1 if per_step else b) for b in dense],
                "-",
                label=f"fit, B_noise = {self.b_noise:.0f}",
            )
            ax.axhline(
                self.s_min if per_step else self.e_min,
                color="grey",
                linestyle=":",
                label="S_min" if per_step else "E_min = S_min B_noise",
            )
            ax.axvline(self.b_noise, color="C1", linestyle="--")
        if advice is not None and advice.batch_size is not None:
            lo, hi = advice.b_range
            ax.axvspan(max(lo, low), min(hi, high), color="C2", alpha=0.15)
            ax.axvline(
                advice.b_simple,
                color="C2",
                label=f"B_simple = {advice.b_simple:.0f} ± {advice.b_simple_std:.0f}",
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel(f"{'steps' if per_step else 'samples'} to loss {self.target:g}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    axes[0].set_title("S = S_min (1 + B_noise / B)")
    axes[1].set_title("E = E_min (1 + B / B_noise)")
    if advice is not None:
        points = advice.trajectory()
        ax = axes[2]
        ax.plot([p[0] for p in points], [p[2] for p in points], color="C2")
        ax.set_yscale("log")
        ax.set_xlabel(f"step (B = {advice.measured_batch_size})")
        ax.set_ylabel("B_simple (moving average)", color="C2")
        twin = ax.twinx()
        twin.plot([p[0] for p in points], [p[1] for p in points], color="grey", alpha=0.5)
        twin.set_yscale("log")
        twin.set_ylabel("batch loss", color="grey")
        ax.set_title("B_simple grows as the loss falls")
    figure.suptitle(f"{self.problem}: the critical batch size")
    return save_figure(figure, path)
