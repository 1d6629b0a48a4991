"""The figures of `compare` and of the critical-batch measurements.

Figures use matplotlib's object-oriented API (`batchgrad._report.new_figure`), which
needs no display and changes no global backend; `save_figure` writes atomically.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from ._report import new_figure, save_figure

LOG_FLOOR = 1e-17
"""Where a relative error of exactly 0 is drawn on a log axis (below float64's 1.1e-16)."""


def on_log_axis(values: list[float], floor: float = LOG_FLOOR) -> tuple[list[float], bool]:
    """``values`` with zeros (and anything below ``floor``) raised to ``floor``, and
    whether any was: a log axis has no 0, and a point dropped or plunging off the
    chart misleads; drawn at a floor the figure says so.

    Example:
        >>> on_log_axis([0.0, 3e-8, float("nan")])
        ([1e-17, 3e-08, nan], True)
    """
    clamped = [floor if v < floor else v for v in values]
    return clamped, any(v < floor for v in values)


def mark_floor(ax: Axes, floor: float = LOG_FLOOR) -> None:
    """A dotted line at ``floor``, labelled as where exact zeros are drawn."""
    ax.axhline(floor, color="grey", linestyle=":", label=f"exactly 0 (drawn at {floor:g})")


if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from ._advise import Advice
    from ._branch import BranchedCritical
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
        values = [p[2] for p in points]
        if values:
            low = min(values)
            ax.set_title(
                f"B_simple along the run: {values[0]:.0f} at first, {low:.0f} at its lowest, "
                f"{values[-1]:.0f} at the end",
                fontsize="medium",
            )
    figure.suptitle(f"{self.problem}: the critical batch size")
    return save_figure(figure, path)


def branch_figure(self: BranchedCritical, path: Path) -> Path:
    """Loss reached on an equal budget of samples against B, and against the steps it
    took, one line per checkpoint, with the measured critical batch size and B_simple."""
    figure = new_figure(11, 4.5)
    per_sample, per_step = figure.subplots(1, 2)
    for index, checkpoint in enumerate(self.checkpoints):
        color = f"C{index}"
        kept = [b for b in checkpoint.branches if math.isfinite(b.loss)]
        label = f"from step {checkpoint.step} (loss {checkpoint.start_loss:.2f})"
        per_sample.plot(
            [b.batch_size for b in kept], [b.loss for b in kept], "o-", color=color, label=label
        )
        per_step.plot(
            [b.steps for b in kept], [b.loss for b in kept], "o-", color=color, label=label
        )
        if checkpoint.critical is not None:
            per_sample.axvline(checkpoint.critical, color=color, linestyle="--", alpha=0.7)
        if math.isfinite(checkpoint.b_simple) and checkpoint.b_simple > 0:
            per_sample.axvline(checkpoint.b_simple, color=color, linestyle=":", alpha=0.7)
    per_sample.set_xscale("log", base=2)
    per_sample.set_xlabel("batch size B")
    per_sample.set_ylabel(f"training loss after {self.samples} samples")
    per_sample.set_title(
        "Per sample: equal samples (dashed: B_crit; dotted: B_simple)", fontsize="medium"
    )
    per_step.set_xscale("log", base=2)
    per_step.set_xlabel(f"optimizer steps taken ({self.samples} / B)")
    per_step.set_ylabel(f"training loss after {self.samples} samples")
    per_step.set_title("Per step: the same runs against their steps", fontsize="medium")
    for ax in (per_sample, per_step):
        ax.set_yscale("log")  # the checkpoints' losses differ by orders of magnitude
        ax.grid(True, which="both", alpha=0.3)
    per_sample.legend(fontsize="small")
    figure.suptitle(f"{self.problem}: the critical batch size, branched from checkpoints")
    return save_figure(figure, path)
