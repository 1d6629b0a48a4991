"""What `bg.accumulate` costs over the hand-written accumulation loop.

Run from the repository root::

    python benchmarks/accumulate_overhead.py

A logical batch of 256 samples is split into 1, 4, 16 and 64 micro-batches
(micro-batch sizes 256, 64, 16 and 4) for two workloads:

- ``mlp``: the MLP 784-256-256-10 on random inputs and labels, cross-entropy;
- ``tiny_lm``: `TinyLM` on 256 counting sequences of varying length (at most 64
  tokens), the causal-LM loss over the tokens that are not padding.

Each configuration is timed two ways on the same model and the same micro-batches:

- ``plain``: the correct loop a careful engineer writes without batchgrad: clear
  the gradients, count the units of the whole logical batch first, then call
  ``(F.cross_entropy(..., reduction="sum") / count).backward()`` per micro-batch;
- ``batchgrad``: ``model.zero_grad(set_to_none=True)`` and ``bg.accumulate(model,
  loss_fn, batch, micro_batch_size=...)`` with the `bg.Loss` helpers.

Before timing, both are run once and must leave the same gradients (relative error
at most 1e-5 per parameter); otherwise the run stops. Then, after a warm-up, the two
are timed in interleaved pairs (the order alternating from pair to pair) with
`time.perf_counter`, so drift in the machine's speed hits both alike. The result is
the ratio of the medians, batchgrad / plain; the ratio of the minima and the median
of the per-pair ratios (robust to the machine slowing down for a while) are second
opinions. Absolute times only describe the machine the run was made on.

Options: ``--repeats N`` times N pairs per configuration (by default as many as fit
in ``--budget`` seconds), ``--threads N`` sets ``torch.set_num_threads``, ``--out``
chooses the JSON file, and ``--quick`` runs tiny sizes in a few seconds (a smoke
test, not a measurement).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from common import (
    RESULTS,
    GradientMismatchError,
    Samples,
    add_run_options,
    causal_lm_loss,
    classifier_loss,
    describe,
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
from torch import Tensor, nn
from torch.nn import functional as F

import batchgrad as bg
from batchgrad._data import IGNORE_INDEX, TokenBatch, counting_sequences
from batchgrad._models import TinyLM, mlp

TARGET_RATIO = 1.05
"""batchgrad may cost at most 5% more than the hand-written loop."""

GRAD_TOLERANCE = 1e-5
"""Largest relative gradient error (per parameter, float32) between the two loops."""

MIN_PAIRS, MAX_PAIRS = 30, 5000
"""Bounds on the timed pairs of one configuration when timing to a budget (the language
model's steps take a quarter of a second on a 2-core CPU: fewer pairs leave its ratios
a few percent of noise)."""

DEFAULT_OUT = RESULTS / "accumulate_overhead.json"

ClassifierBatch = tuple[Tensor, Tensor]
PlainStep = Callable[[nn.Module, Any, int], None]


@dataclass(frozen=True)
class Sizes:
    """The sizes of one run: the logical batch, its splits and both models."""

    logical_batch: int
    micro_batch_counts: tuple[int, ...]
    mlp_widths: tuple[int, ...]
    lm_vocab: int
    lm_d_model: int
    lm_heads: int
    lm_layers: int
    lm_max_len: int


FULL = Sizes(
    logical_batch=256,
    micro_batch_counts=(1, 4, 16, 64),
    mlp_widths=(784, 256, 256, 10),
    lm_vocab=32,
    lm_d_model=64,
    lm_heads=4,
    lm_layers=2,
    lm_max_len=64,
)
QUICK = Sizes(
    logical_batch=16,
    micro_batch_counts=(1, 4),
    mlp_widths=(32, 16, 4),
    lm_vocab=16,
    lm_d_model=16,
    lm_heads=2,
    lm_layers=1,
    lm_max_len=16,
)


@dataclass(frozen=True)
class Workload:
    """A model and a logical batch, with both ways of accumulating its gradient."""

    name: str
    model: nn.Module
    batch: Any
    loss_fn: bg.LossFn
    plain_step: PlainStep


# -- the batchgrad side: the loss functions a user writes (common.py) ------------------


def batchgrad_step(workload: Workload, micro_batch_size: int) -> None:
    workload.model.zero_grad(set_to_none=True)
    bg.accumulate(
        workload.model, workload.loss_fn, workload.batch, micro_batch_size=micro_batch_size
    )


# -- the plain side: correct accumulation written by hand ------------------------------


def plain_classifier_step(model: nn.Module, batch: ClassifierBatch, micro_batch_size: int) -> None:
    inputs, labels = batch
    model.zero_grad(set_to_none=True)
    count = labels.shape[0]
    for x, y in zip(inputs.split(micro_batch_size), labels.split(micro_batch_size), strict=True):
        (F.cross_entropy(model(x), y, reduction="sum") / count).backward()


def plain_causal_lm_step(model: nn.Module, batch: TokenBatch, micro_batch_size: int) -> None:
    model.zero_grad(set_to_none=True)
    count = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())  # tokens of the whole batch
    chunks = zip(
        batch.input_ids.split(micro_batch_size), batch.labels.split(micro_batch_size), strict=True
    )
    for input_ids, labels in chunks:
        logits = model(input_ids)
        total = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        (total / count).backward()


def build_workloads(sizes: Sizes, seed: int) -> list[Workload]:
    n = sizes.logical_batch
    torch.manual_seed(seed)
    classifier = mlp(sizes.mlp_widths)
    inputs = torch.randn(n, sizes.mlp_widths[0])
    labels = torch.randint(0, sizes.mlp_widths[-1], (n,))
    torch.manual_seed(seed)
    lm = TinyLM(
        vocab=sizes.lm_vocab,
        d_model=sizes.lm_d_model,
        heads=sizes.lm_heads,
        layers=sizes.lm_layers,
        max_len=sizes.lm_max_len,
    )
    sequences = counting_sequences(n, vocab=sizes.lm_vocab, max_len=sizes.lm_max_len, seed=seed)
    return [
        Workload("mlp", classifier, (inputs, labels), classifier_loss, plain_classifier_step),
        Workload("tiny_lm", lm, sequences, causal_lm_loss, plain_causal_lm_step),
    ]


# -- checking and timing ---------------------------------------------------------------


def verify(workload: Workload, micro_batch_size: int) -> float:
    """Run both loops once; they must leave the same gradients."""
    workload.plain_step(workload.model, workload.batch, micro_batch_size)
    expected = gradients(workload.model)
    batchgrad_step(workload, micro_batch_size)
    error = max_rel_err(gradients(workload.model), expected)
    if not error <= GRAD_TOLERANCE:
        raise GradientMismatchError(
            f"{workload.name} with micro-batches of {micro_batch_size}: batchgrad and the "
            f"plain loop disagree (max relative gradient error {error:.3g} > "
            f"{GRAD_TOLERANCE:g}); the timings would compare different computations."
        )
    return error


def plain_step_with_norm(workload: Workload, micro_batch_size: int) -> None:
    """The plain loop plus the global gradient norm batchgrad reports (and checks)."""
    workload.plain_step(workload.model, workload.batch, micro_batch_size)
    grads = [p.grad for p in workload.model.parameters() if p.grad is not None]
    float(torch.nn.utils.get_total_norm(grads))


def time_pairs(
    workload: Workload, micro_batch_size: int, *, repeats: int | None, budget: float = 0.0
) -> tuple[Samples, Samples, Samples]:
    """Time interleaved rounds (plain, plain + norm, batchgrad), the order rotating.

    ``repeats`` rounds, or with ``repeats=None`` as many as fit in ``budget`` seconds
    (at least `MIN_PAIRS`, at most `MAX_PAIRS`).
    """

    def plain_step() -> None:
        workload.plain_step(workload.model, workload.batch, micro_batch_size)

    def plain_norm() -> None:
        plain_step_with_norm(workload, micro_batch_size)

    def batchgrad() -> None:
        batchgrad_step(workload, micro_batch_size)

    plain, with_norm, ours = interleaved(
        [plain_step, plain_norm, batchgrad],
        repeats,
        warmup=0,
        budget=budget,
        min_rounds=MIN_PAIRS,
        max_rounds=MAX_PAIRS,
    )
    return plain, with_norm, ours


def measure(
    workload: Workload,
    micro_batches: int,
    logical_batch: int,
    *,
    repeats: int | None,
    warmup: int,
    budget: float,
) -> dict[str, Any]:
    """Check, warm up and time one configuration; one row of the results."""
    micro_batch_size = logical_batch // micro_batches
    grad_error = verify(workload, micro_batch_size)
    time_pairs(workload, micro_batch_size, repeats=warmup)  # timed as below, then dropped
    plain_samples, norm_samples, batchgrad_samples = time_pairs(
        workload, micro_batch_size, repeats=repeats, budget=budget
    )
    plain, batchgrad = plain_samples.summary(), batchgrad_samples.summary()
    with_norm = norm_samples.summary()
    paired = [b / p for p, b in zip(plain_samples.seconds, batchgrad_samples.seconds, strict=True)]
    return {
        "model": workload.name,
        "micro_batches": micro_batches,
        "micro_batch_size": micro_batch_size,
        "repeats": plain["n"],
        "max_grad_rel_err": grad_error,
        "ratio": batchgrad["median_ms"] / plain["median_ms"],
        "ratio_min": batchgrad["min_ms"] / plain["min_ms"],
        "ratio_paired_median": statistics.median(paired),
        "ratio_vs_plain_with_norm": batchgrad["median_ms"] / with_norm["median_ms"],
        "plain": plain,
        "plain_with_norm": with_norm,
        "batchgrad": batchgrad,
    }


# -- reporting -------------------------------------------------------------------------


def _micro_batches(count: int) -> str:
    return f"{count} micro-batch" + ("" if count == 1 else "es")


def results_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title=f"bg.accumulate / hand-written loop (target ≤ {TARGET_RATIO})")
    table.add_column("model")
    for header in ("micro-\nbatches", "micro-\nbatch\nsize", "plain\nms", "batchgrad\nms", "ratio"):
        table.add_column(header, justify="right")
    table.add_column("min\nratio", justify="right", style="dim")
    table.add_column("paired\nratio", justify="right", style="dim")
    table.add_column("ratio vs\nplain +\ngrad norm", justify="right")
    for row in rows:
        style = "green" if row["ratio"] <= TARGET_RATIO else "bold red"
        table.add_row(
            row["model"],
            str(row["micro_batches"]),
            str(row["micro_batch_size"]),
            f"{row['plain']['median_ms']:.2f}",
            f"{row['batchgrad']['median_ms']:.2f}",
            f"[{style}]{row['ratio']:.3f}[/{style}]",
            f"{row['ratio_min']:.3f}",
            f"{row['ratio_paired_median']:.3f}",
            f"{row['ratio_vs_plain_with_norm']:.3f}",
        )
    return table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time bg.accumulate against the hand-written accumulation loop."
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed pairs per configuration (default: as many as fit in --budget)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=20.0,
        help="seconds of timing per configuration when --repeats is not given (default: 20)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed pairs first (default: 3)")
    add_run_options(parser, DEFAULT_OUT, "tiny sizes and 2 repeats: a smoke test in seconds")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    sizes = QUICK if args.quick else FULL
    repeats: int | None = args.repeats if args.repeats is not None else (2 if args.quick else None)
    warmup = 1 if args.quick else args.warmup
    use_threads(args.threads)
    env = environment()
    console.print(
        describe(env),
        f"logical batch {sizes.logical_batch}, "
        + (f"{repeats} timed pairs" if repeats else f"~{args.budget:g} s of timing")
        + " per configuration",
        sep="\n",
    )

    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    try:
        for workload in build_workloads(sizes, args.seed):
            for micro_batches in sizes.micro_batch_counts:
                console.print(f"  {workload.name}: {_micro_batches(micro_batches)} ...")
                rows.append(
                    measure(
                        workload,
                        micro_batches,
                        sizes.logical_batch,
                        repeats=repeats,
                        warmup=warmup,
                        budget=args.budget,
                    )
                )
    except GradientMismatchError as error:
        console.print(f"[bold red]ABORTED:[/bold red] {error}")
        return 1
    elapsed = time.perf_counter() - started

    console.print(results_table(rows))
    worst = max(rows, key=lambda row: row["ratio"])
    within = worst["ratio"] <= TARGET_RATIO
    verdict = "within" if within else "[bold red]above[/bold red]"
    console.print(
        f"worst ratio {worst['ratio']:.3f} ({worst['model']}, "
        f"{_micro_batches(worst['micro_batches'])}): {verdict} the target {TARGET_RATIO}; "
        f"measured in {elapsed:.0f} s"
    )
    if args.quick:
        console.print("(--quick: a smoke test; its sizes are too small to judge overhead)")

    results = {
        "benchmark": "accumulate_overhead",
        "environment": env,
        "settings": {
            "quick": args.quick,
            "logical_batch": sizes.logical_batch,
            "micro_batch_counts": list(sizes.micro_batch_counts),
            "mlp_widths": list(sizes.mlp_widths),
            "lm": {
                "vocab": sizes.lm_vocab,
                "d_model": sizes.lm_d_model,
                "heads": sizes.lm_heads,
                "layers": sizes.lm_layers,
                "max_len": sizes.lm_max_len,
            },
            "repeats": repeats,
            "budget_s": None if repeats else args.budget,
            "warmup": warmup,
            "seed": args.seed,
            "grad_tolerance": GRAD_TOLERANCE,
            "target_ratio": TARGET_RATIO,
        },
        "elapsed_s": elapsed,
        "load_average_after": load_average(),
        "within_target": within,
        "rows": rows,
    }
    write_results(args.out, results)
    console.print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
