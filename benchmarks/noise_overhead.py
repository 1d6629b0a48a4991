"""What measuring the gradient noise scale costs on top of `bg.accumulate`.

Run from the repository root::

    python benchmarks/noise_overhead.py

Each workload runs one logical batch in micro-batches three ways on the same model
and data, timed in interleaved rounds: ``bg.accumulate(...)``,
``bg.accumulate(..., noise=bg.NoiseScale())`` (the default: the first micro-batch is
the small batch, one gradient norm a step) and ``noise=bg.NoiseScale(small_batches=None)``
(every micro-batch but the last, as `batchgrad advise` measures: a norm and the earlier
micro-batches' sum put aside and back for each; see `batchgrad._loop._MicroBatchGrads`).
The result is the ratio of the medians to plain accumulate (target for the default: at
most 1.05). Before timing, all must leave the same gradients.

- ``mlp``: the MLP 784-256-256-10, 256 random samples in 4 micro-batches of 64;
- ``tiny_lm``: `TinyLM` (2 layers, d_model 64) on 256 counting sequences of at most
  64 tokens in 4 micro-batches of 64.

``--quick`` runs tiny sizes in seconds (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import (
    RESULTS,
    causal_lm_loss,
    classifier_loss,
    environment,
    gradients,
    interleaved,
    load_average,
    max_rel_err,
    use_threads,
    write_results,
)
from rich.console import Console
from rich.table import Table
from torch import nn

import batchgrad as bg
from batchgrad._data import counting_sequences
from batchgrad._models import TinyLM, mlp

TARGET_RATIO = 1.05
GRAD_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Workload:
    name: str
    model: nn.Module
    loss_fn: bg.LossFn
    batch: Any
    micro_batch_size: int


def workloads(quick: bool) -> list[Workload]:
    torch.manual_seed(0)
    n, micro = (16, 4) if quick else (256, 64)
    widths = (32, 16, 4) if quick else (784, 256, 256, 10)
    lm = TinyLM(vocab=16, d_model=16, heads=2, layers=1, max_len=16) if quick else TinyLM()
    return [
        Workload(
            "mlp",
            mlp(widths),
            classifier_loss,
            (torch.randn(n, widths[0]), torch.randint(0, widths[-1], (n,))),
            micro,
        ),
        Workload(
            "tiny_lm",
            lm,
            causal_lm_loss,
            counting_sequences(n, vocab=16 if quick else 32, max_len=16 if quick else 64),
            micro,
        ),
    ]


def measure(workload: Workload, rounds: int) -> dict[str, Any]:
    model, scale, every = workload.model, bg.NoiseScale(), bg.NoiseScale(small_batches=None)

    def plain() -> bg.AccumulateReport:
        model.zero_grad(set_to_none=True)
        return bg.accumulate(
            model, workload.loss_fn, workload.batch, micro_batch_size=workload.micro_batch_size
        )

    def noise_with(noise: bg.NoiseScale) -> Callable[[], bg.AccumulateReport]:
        def run() -> bg.AccumulateReport:
            model.zero_grad(set_to_none=True)
            return bg.accumulate(
                model,
                workload.loss_fn,
                workload.batch,
                micro_batch_size=workload.micro_batch_size,
                noise=noise,
            )

        return run

    with_noise, with_every = noise_with(scale), noise_with(every)
    plain()
    expected = gradients(model)
    error = 0.0
    for run in (with_noise, with_every):
        report = run()
        error = max(error, max_rel_err(gradients(model), expected))
    if not error <= GRAD_TOLERANCE:
        raise RuntimeError(f"{workload.name}: noise= changed the gradient (rel err {error:.3g})")
    base, noisy, noisy_every = interleaved([plain, with_noise, with_every], rounds)
    paired = [b / a for a, b in zip(base.seconds, noisy.seconds, strict=True)]
    return {
        "model": workload.name,
        "micro_batches": report.micro_batches,
        "micro_batch_size": workload.micro_batch_size,
        "max_grad_rel_err": error,
        "ratio": statistics.median(noisy.seconds) / statistics.median(base.seconds),
        "ratio_paired_median": statistics.median(paired),
        "ratio_every": statistics.median(noisy_every.seconds) / statistics.median(base.seconds),
        "b_simple": scale.b_simple,
        "b_simple_every": every.b_simple,
        "accumulate": base.summary(),
        "accumulate_noise": noisy.summary(),
        "accumulate_noise_every": noisy_every.summary(),
    }


def table(rows: list[dict[str, Any]]) -> Table:
    result = Table(
        title=f"bg.accumulate(noise=...) / bg.accumulate (target ≤ {TARGET_RATIO}); "
        "every: small_batches=None"
    )
    headers = ("model", "micro-batches", "accumulate ms", "+ noise ms", "ratio", "paired")
    for header in (*headers, "every"):
        result.add_column(header, justify="left" if header == "model" else "right")
    for row in rows:
        style = "green" if row["ratio"] <= TARGET_RATIO else "bold red"
        result.add_row(
            row["model"],
            f"{row['micro_batches']} × {row['micro_batch_size']}",
            f"{row['accumulate']['median_ms']:.2f}",
            f"{row['accumulate_noise']['median_ms']:.2f}",
            f"[{style}]{row['ratio']:.3f}[/{style}]",
            f"{row['ratio_paired_median']:.3f}",
            f"{row['ratio_every']:.3f}",
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 200)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: 1)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "noise_overhead.json")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument(
        "--models", nargs="+", choices=("mlp", "tiny_lm"), default=None, help="default: both"
    )
    args = parser.parse_args(argv)
    use_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 200)
    console = Console()
    env = environment()
    console.print(f"batchgrad {env['batchgrad']} ({env['batchgrad_source']}), torch {env['torch']}")
    started = time.perf_counter()
    chosen = [w for w in workloads(args.quick) if args.models is None or w.name in args.models]
    rows = [measure(workload, rounds) for workload in chosen]
    elapsed = time.perf_counter() - started
    console.print(table(rows))
    worst = max(row["ratio"] for row in rows)
    console.print(f"worst ratio {worst:.3f} (target ≤ {TARGET_RATIO}); measured in {elapsed:.0f} s")
    write_results(
        args.out,
        {
            "benchmark": "noise_overhead",
            "environment": env,
            "settings": {"quick": args.quick, "rounds": rounds, "target_ratio": TARGET_RATIO},
            "elapsed_s": elapsed,
            "load_average_after": load_average(),
            "rows": rows,
        },
    )
    console.print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
