"""Accumulating bfloat16 gradients: the error of the sum, and what the float32 sum costs.

Run from the repository root::

    python benchmarks/precision.py --threads 1

**Error.** A logical batch split into 4 … 256 micro-batches, bfloat16 parameters:

- ``autograd bf16``: the hand-written loop, ``(total / N).backward()`` per
  micro-batch, autograd adding each micro-batch's gradient into the bfloat16
  ``p.grad``;
- ``batchgrad``: ``bg.accumulate`` with its default float32 running sum, rounded
  once into ``p.grad`` at the end;
- ``one rounding``: the exact gradient rounded once to bfloat16, the best a
  bfloat16 gradient can be;

each as the relative error ‖g − g₆₄‖ / ‖g₆₄‖ against the float64 gradient of the
whole batch for the same (bfloat16-rounded) parameters and data. Two workloads:
``linear`` (a loss linear in the weight: each micro-batch's gradient is computed in
one matrix product and rounded once, so only the summation differs) and ``mlp``
(an MLP with cross-entropy, whose micro-batch gradients carry bfloat16's errors of
the forward and backward too; ``whole batch bf16`` is then the floor).

**Time.** The MLP 784-256-256-10 in bfloat16, a logical batch of 256 split into 4,
16 and 64 micro-batches: the plain bfloat16 loop against ``bg.accumulate``,
interleaved rounds, ratio of the medians. Target: ≤ 1.05 at 4 and 16 micro-batches.

Writes a table, a JSON file and a plot (``--plot``, default next to the JSON).
``--quick`` runs tiny sizes in seconds (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import (
    RESULTS,
    add_run_options,
    describe,
    environment,
    interleaved,
    load_average,
    write_results,
)
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.nn import functional as F

import batchgrad as bg
from batchgrad._models import mlp
from batchgrad._report import new_figure, save_figure

TARGET_RATIO = 1.05
"""batchgrad with bfloat16 parameters may cost at most 5% more than the plain loop."""

TARGET_COUNTS = (4, 16)
DEFAULT_OUT = RESULTS / "precision.json"
METHODS = ("autograd bf16", "batchgrad", "one rounding")


@dataclass(frozen=True)
class Sizes:
    rows: int  # logical batch of the error study
    counts: tuple[int, ...]  # micro-batches of the error study
    features: int
    mlp_widths: tuple[int, ...]  # of the error study's MLP
    time_batch: int
    time_counts: tuple[int, ...]
    time_widths: tuple[int, ...]


FULL = Sizes(
    4096, (4, 8, 16, 32, 64, 128, 256), 512, (256, 256, 10), 256, (4, 16, 64), (784, 256, 256, 10)
)
QUICK = Sizes(256, (4, 16), 32, (16, 16, 4), 32, (4,), (32, 16, 4))


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.double().flatten() for p in model.parameters()])


def _rel(grad: Tensor, exact: Tensor) -> float:
    return float((grad - exact).norm() / exact.norm())


@dataclass
class Problem:
    """A bfloat16 model and data, and the loss both loops compute."""

    name: str
    model: nn.Module
    batch: tuple[Tensor, Tensor]
    total: Callable[[nn.Module, tuple[Tensor, Tensor]], Tensor]  # the micro-batch's Σ ℓ

    def loss_fn(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> bg.Loss:
        return bg.Loss(self.total(model, batch), batch[0].shape[0])

    def exact(self) -> Tensor:
        """The float64 gradient of the whole batch, same (rounded) parameters and data."""
        wide = copy.deepcopy(self.model).double()
        x, y = self.batch
        (
            self.total(wide, (x.double(), y.double() if y.is_floating_point() else y)) / len(x)
        ).backward()
        return _flat(wide)

    def autograd(self, k: int) -> Tensor:
        x, y = self.batch
        self.model.zero_grad(set_to_none=True)
        for xs, ys in zip(x.split(len(x) // k), y.split(len(x) // k), strict=True):
            (self.total(self.model, (xs, ys)) / len(x)).backward()
        return _flat(self.model)

    def batchgrad(self, k: int) -> Tensor:
        self.model.zero_grad(set_to_none=True)
        bg.accumulate(
            self.model, self.loss_fn, self.batch, micro_batch_size=len(self.batch[0]) // k
        )
        return _flat(self.model)


def _linear_total(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return model(batch[0]).float().sum()


def _ce_total(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch[0]).float(), batch[1], reduction="sum")


def problems(sizes: Sizes, seed: int) -> list[Problem]:
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(sizes.features, 8, bias=False)
    x = (torch.randn(sizes.rows, sizes.features, generator=g) + 1.0).to(torch.bfloat16)
    torch.manual_seed(seed)
    net = mlp((sizes.features, *sizes.mlp_widths)).to(torch.bfloat16)
    labels = torch.randint(0, sizes.mlp_widths[-1], (sizes.rows,), generator=g)
    xm = torch.randn(sizes.rows, sizes.features, generator=g).to(torch.bfloat16)
    return [
        Problem("linear", linear.to(torch.bfloat16), (x, torch.zeros(sizes.rows)), _linear_total),
        Problem("mlp", net, (xm, labels), _ce_total),
    ]


def error_rows(sizes: Sizes, seed: int) -> list[dict[str, Any]]:
    rows = []
    for problem in problems(sizes, seed):
        exact = problem.exact()
        once = _rel(exact.to(torch.bfloat16).double(), exact)
        whole = _rel(problem.autograd(1), exact)
        for k in sizes.counts:
            rows.append(
                {
                    "problem": problem.name,
                    "micro_batches": k,
                    "micro_batch_size": sizes.rows // k,
                    "autograd bf16": _rel(problem.autograd(k), exact),
                    "batchgrad": _rel(problem.batchgrad(k), exact),
                    "one rounding": once,
                    "whole batch bf16": whole,
                }
            )
    return rows


def time_rows(sizes: Sizes, seed: int, repeats: int | None, budget: float) -> list[dict[str, Any]]:
    torch.manual_seed(seed)
    model = mlp(sizes.time_widths).to(torch.bfloat16)
    x = torch.randn(sizes.time_batch, sizes.time_widths[0]).to(torch.bfloat16)
    y = torch.randint(0, sizes.time_widths[-1], (sizes.time_batch,))
    loss_fn = lambda m, b: bg.Loss(_ce_total(m, b), len(b[1]))  # noqa: E731
    rows = []
    for k in sizes.time_counts:
        size = sizes.time_batch // k

        def plain(size: int = size) -> None:
            model.zero_grad(set_to_none=True)
            for xs, ys in zip(x.split(size), y.split(size), strict=True):
                (_ce_total(model, (xs, ys)) / len(y)).backward()

        def ours(size: int = size) -> None:
            model.zero_grad(set_to_none=True)
            bg.accumulate(model, loss_fn, (x, y), micro_batch_size=size)

        plain()
        expected = _flat(model)
        ours()
        agreement = _rel(_flat(model), expected)  # both bf16: within their roundings
        a, b = interleaved([plain, ours], repeats, warmup=2, budget=budget, min_rounds=20)
        pa, pb = a.summary(), b.summary()
        paired = [t / s for s, t in zip(a.seconds, b.seconds, strict=True)]
        rows.append(
            {
                "micro_batches": k,
                "micro_batch_size": size,
                "rel_diff_to_plain": agreement,
                "ratio": pb["median_ms"] / pa["median_ms"],
                "ratio_min": pb["min_ms"] / pa["min_ms"],
                "ratio_paired_median": statistics.median(paired),
                "plain": pa,
                "batchgrad": pb,
            }
        )
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    names = sorted({row["problem"] for row in rows}, key=[r["problem"] for r in rows].index)
    figure = new_figure(4.2 * len(names), 3.6)
    for index, name in enumerate(names):
        ax = figure.add_subplot(1, len(names), index + 1)
        mine = [row for row in rows if row["problem"] == name]
        counts = [row["micro_batches"] for row in mine]
        for method, style in zip(METHODS, ("o-", "s-", "--"), strict=True):
            ax.plot(counts, [row[method] for row in mine], style, label=method)
        if name == "mlp":
            ax.plot(
                counts, [row["whole batch bf16"] for row in mine], ":", label="whole batch bf16"
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("micro-batches")
        ax.set_ylabel("relative error vs float64")
        ax.set_title(f"{name}, bfloat16 parameters")
        ax.legend(fontsize="small")
    return save_figure(figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed rounds (default: --budget)"
    )
    parser.add_argument("--budget", type=float, default=15.0, help="seconds of timing per count")
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default: next to --out)")
    add_run_options(parser, DEFAULT_OUT, "tiny sizes and 2 rounds: a smoke test in seconds")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else None)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    console = Console()
    env = environment()
    console.print(describe(env))
    started = time.perf_counter()
    errors = error_rows(sizes, args.seed)
    timings = time_rows(sizes, args.seed, repeats, args.budget)
    elapsed = time.perf_counter() - started

    table = Table(title="relative error of the accumulated bf16 gradient vs float64")
    for header in (
        "problem",
        "micro-\nbatches",
        *METHODS,
        "batchgrad /\none rounding",
        "whole batch\nbf16",
    ):
        table.add_column(header, justify="right")
    for row in errors:
        table.add_row(
            row["problem"],
            str(row["micro_batches"]),
            *(f"{row[m]:.2e}" for m in METHODS),
            f"{row['batchgrad'] / row['one rounding']:.2f}",
            f"{row['whole batch bf16']:.2e}",
        )
    console.print(table)
    timing = Table(
        title=f"bf16 MLP: bg.accumulate / plain bf16 loop (target ≤ {TARGET_RATIO} at 4, 16)"
    )
    for header in ("micro-\nbatches", "plain ms", "batchgrad ms", "ratio", "min ratio", "paired"):
        timing.add_column(header, justify="right")
    for row in timings:
        style = "green" if row["ratio"] <= TARGET_RATIO else "bold red"
        timing.add_row(
            str(row["micro_batches"]),
            f"{row['plain']['median_ms']:.2f}",
            f"{row['batchgrad']['median_ms']:.2f}",
            f"[{style}]{row['ratio']:.3f}[/{style}]",
            f"{row['ratio_min']:.3f}",
            f"{row['ratio_paired_median']:.3f}",
        )
    console.print(timing)
    within = all(r["ratio"] <= TARGET_RATIO for r in timings if r["micro_batches"] in TARGET_COUNTS)
    picture_path = args.plot or args.out.with_suffix(".png")
    picture_path.parent.mkdir(parents=True, exist_ok=True)
    picture = plot(errors, picture_path)
    results = {
        "benchmark": "precision",
        "environment": env,
        "settings": {
            "quick": args.quick,
            "rows": sizes.rows,
            "counts": list(sizes.counts),
            "features": sizes.features,
            "mlp_widths": list(sizes.mlp_widths),
            "time_batch": sizes.time_batch,
            "time_counts": list(sizes.time_counts),
            "time_widths": list(sizes.time_widths),
            "repeats": repeats,
            "budget_s": None if repeats else args.budget,
            "seed": args.seed,
            "target_ratio": TARGET_RATIO,
            "target_counts": list(TARGET_COUNTS),
        },
        "elapsed_s": elapsed,
        "load_average_after": load_average(),
        "within_target": within,
        "errors": errors,
        "timings": timings,
        "plot": str(picture),
    }
    write_results(args.out, results)
    console.print(f"results: {args.out}, plot: {picture} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
