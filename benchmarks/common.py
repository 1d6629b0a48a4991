"""What the benchmarks share: interleaved timing, the environment, the JSON file.

Run as scripts (``python benchmarks/<name>.py``), the benchmarks find this module
next to them on ``sys.path``.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import batchgrad as bg

try:
    import resource
except ImportError:  # Windows has no resource module
    resource = None  # type: ignore[assignment]

RESULTS = Path(__file__).resolve().parent / "results"


def minor_page_faults() -> int:
    """Minor page faults so far: memory the allocator took back from, or gave to, the OS."""
    if resource is None:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@dataclass
class Samples:
    """The timings of one side, in the order taken, with the page faults of each call."""

    seconds: list[float] = field(default_factory=list)
    page_faults: list[int] = field(default_factory=list)

    def take(self, step: Callable[[], object]) -> None:
        faults = minor_page_faults()
        start = time.perf_counter()
        step()
        self.seconds.append(time.perf_counter() - start)
        self.page_faults.append(minor_page_faults() - faults)

    def summary(self) -> dict[str, Any]:
        ms = sorted(1e3 * s for s in self.seconds)
        quartiles = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
        return {
            "n": len(ms),
            "median_ms": statistics.median(ms),
            "min_ms": ms[0],
            "q1_ms": quartiles[0],
            "q3_ms": quartiles[2],
            "median_page_faults": statistics.median(self.page_faults),
            "times_ms": [round(1e3 * s, 4) for s in self.seconds],
        }


def interleaved(
    steps: Sequence[Callable[[], object]], rounds: int, warmup: int = 1
) -> list[Samples]:
    """Time each step once per round, the order rotating from round to round, so that
    drift in the machine's speed hits every side alike; garbage collection paused as
    ``timeit`` does."""
    for _ in range(warmup):
        for step in steps:
            step()
    samples = [Samples() for _ in steps]
    pairs = list(zip(samples, steps, strict=True))
    gc.collect()
    gc.disable()
    try:
        for index in range(rounds):
            shift = index % len(pairs)
            for side, step in pairs[shift:] + pairs[:shift]:
                side.take(step)
    finally:
        gc.enable()
    return samples


def max_rel_err(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """The worst relative error ``‖a - e‖ / ‖e‖`` over the entries of ``expected``."""
    worst = 0.0
    for name, value in expected.items():
        reference = value.double()
        error = float((actual[name].double() - reference).norm())
        scale = float(reference.norm())
        worst = max(worst, error / scale if scale > 0 else error)
    return worst


def load_average() -> list[float] | None:
    """Other work on the machine adds noise to every timing: record how much there was."""
    try:
        return [round(load, 2) for load in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def source_version() -> str | None:
    """The commit of the batchgrad being measured, ``+dirty`` if batchgrad/ has edits."""
    root = Path(bg.__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    if commit is None:
        return None
    return commit + ("+dirty" if git("status", "--porcelain", "--", "batchgrad") else "")


def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "batchgrad": bg.__version__,
        "batchgrad_source": source_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
    }


def write_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
