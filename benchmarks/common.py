"""What the benchmarks share: interleaved timing, the gradient check, the loss functions
a user writes, the environment, the JSON file.

Run as scripts (``python benchmarks/<name>.py``), the benchmarks find this module
next to them on ``sys.path``.
"""

from __future__ import annotations

import argparse
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
from torch import Tensor, nn

import batchgrad as bg
from batchgrad._data import IGNORE_INDEX, TokenBatch

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

    def summary(self, unit: str = "ms") -> dict[str, Any]:
        """Order statistics, mean and spread in ``unit`` (``"ms"`` or ``"s"``), the
        median page faults, and every time in the order taken; each key ends in the unit
        (``median_ms``, ``times_ms``)."""
        scale = {"ms": 1e3, "s": 1.0}[unit]
        times = sorted(scale * s for s in self.seconds)
        quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        return {
            "n": len(times),
            f"median_{unit}": statistics.median(times),
            f"min_{unit}": times[0],
            f"max_{unit}": times[-1],
            f"mean_{unit}": statistics.fmean(times),
            f"stdev_{unit}": statistics.stdev(times) if len(times) > 1 else 0.0,
            f"q1_{unit}": quartiles[0],
            f"q3_{unit}": quartiles[2],
            # A side that page-faults much more than the others is paying for the
            # allocator's reaction to the interleaving as much as for its own work.
            "median_page_faults": statistics.median(self.page_faults),
            f"times_{unit}": [round(scale * s, 4) for s in self.seconds],
        }


def interleaved(
    steps: Sequence[Callable[[], object]],
    rounds: int | None,
    warmup: int = 1,
    *,
    budget: float = 0.0,
    min_rounds: int = 1,
    max_rounds: int | None = None,
) -> list[Samples]:
    """Time each step once per round, the order rotating from round to round, so that
    drift in the machine's speed hits every side alike; garbage collection paused as
    ``timeit`` does.

    ``warmup`` untimed rounds first (in the order given, collection not paused), then
    ``rounds`` timed rounds, or with ``rounds=None`` as many as fit in ``budget``
    seconds, at least ``min_rounds`` and at most ``max_rounds``.
    """
    for _ in range(warmup):
        for step in steps:
            step()

    def more(index: int, elapsed: float) -> bool:
        if rounds is not None:
            return index < rounds
        under_cap = max_rounds is None or index < max_rounds
        return index < min_rounds or (elapsed < budget and under_cap)

    samples = [Samples() for _ in steps]
    pairs = list(zip(samples, steps, strict=True))
    gc.collect()
    gc.disable()
    start = time.perf_counter()
    try:
        index = 0
        while more(index, time.perf_counter() - start):
            shift = index % len(pairs)
            for side, step in pairs[shift:] + pairs[:shift]:
                side.take(step)
            index += 1
    finally:
        gc.enable()
    return samples


class GradientMismatchError(RuntimeError):
    """Two ways to one gradient disagree: their timings would compare different things."""


def gradients(model: nn.Module) -> dict[str, Tensor]:
    """A copy of every gradient ``model`` holds, by parameter name."""
    return {
        name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None
    }


def max_rel_err(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> float:
    """The worst relative error ``‖a - e‖ / ‖e‖`` over the parameters; gradients for
    different parameters raise `GradientMismatchError`."""
    if actual.keys() != expected.keys():
        raise GradientMismatchError(
            f"The gradients are for different parameters: "
            f"{sorted(actual.keys() ^ expected.keys())}."
        )
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
    except (AttributeError, OSError):  # not available on this platform
        return None


def source_version() -> str | None:
    """The commit of the batchgrad being measured, ``+dirty`` if batchgrad/ has edits."""
    root = Path(bg.__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):  # no git, or not a checkout
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    if commit is None:
        return None
    return commit + ("+dirty" if git("status", "--porcelain", "--", "batchgrad") else "")


def environment(**extra: Any) -> dict[str, Any]:
    """The versions, the machine, the threads and the load; ``extra`` adds a benchmark's
    own entries."""
    return {
        "torch": torch.__version__,
        "batchgrad": bg.__version__,
        "batchgrad_source": source_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "load_average": load_average(),
        **extra,
    }


def describe(env: dict[str, Any], *also: str) -> str:
    """One line on what is measured and where, for the top of a benchmark's output."""
    return ", ".join(
        [
            f"batchgrad {env['batchgrad']} ({env['batchgrad_source']})",
            f"torch {env['torch']}",
            *also,
            f"{env['torch_threads']} thread(s)",
            env["platform"],
            f"load average {env['load_average']}",
        ]
    )


def time_on_ranks(
    model: nn.Module, steps: dict[str, Callable[[], object]], repeats: int
) -> dict[str, list[float]]:
    """Seconds of each step on this rank, ``repeats`` times, interleaved so that drift
    hits every method alike; the ranks start each step together (a barrier)."""
    import torch.distributed as dist

    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            model.zero_grad(set_to_none=True)
            dist.barrier()
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def use_threads(requested: int | None) -> int:
    """Set torch's intra-op threads: ``requested``, or one. Every model here is small
    (see `batchgrad._threads`): more threads only add synchronisation, and on a busy
    machine they stall each other; both sides of a ratio run on the same count."""
    count = requested if requested is not None else 1
    torch.set_num_threads(count)
    return count


def add_run_options(parser: argparse.ArgumentParser, out: Path, quick: str) -> None:
    """``--threads``, ``--seed``, ``--out`` (default ``out``) and ``--quick`` (``quick``
    says what it runs)."""
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: 1)"
    )
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed (default: 0)")
    parser.add_argument("--out", type=Path, default=out, help=f"JSON results (default: {out})")
    parser.add_argument("--quick", action="store_true", help=quick)


def write_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


# -- the loss functions a user writes ---------------------------------------------------

_CROSS_ENTROPY = nn.CrossEntropyLoss()


def classifier_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> bg.Loss:
    """Cross-entropy of ``model(inputs)`` against one label per sample."""
    inputs, labels = batch
    return bg.Loss.from_criterion(_CROSS_ENTROPY, model(inputs), labels)


def causal_lm_loss(model: nn.Module, batch: TokenBatch) -> bg.Loss:
    """The next-token loss over the tokens that are not padding."""
    return bg.Loss.from_causal_lm(model(batch.input_ids), batch.labels, IGNORE_INDEX)
