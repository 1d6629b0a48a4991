"""Chapter: DDP + accumulation is still the same gradient.

Two local gloo processes share a logical batch of 32 variable-length sequences:
sorted by length, so rank 0 holds the short ones and far fewer tokens than rank 1
(as a length-grouped sampler does). Each rank accumulates its 16 sequences in
micro-batches through `DistributedDataParallel`; the result is compared with one
process on the whole batch, for batchgrad and for the usual DDP loop (each rank's
micro-batch means divided by its micro-batch count, then DDP's average).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._check import CheckReport, _data_parallel_check
from .._data import TokenBatch
from .._distributed import launch
from .._models import TinyLM
from .._report import Table, new_figure, save_figure, sci
from . import Answer, Chapter, Context
from .accumulation import lm_loss, orderings

RANKS = 2
MICRO_BATCH_SIZES = (16, 8, 4, 2)  # per rank, of its 16 sequences


def make() -> tuple[nn.Module, Any, TokenBatch]:
    """The model, loss and logical batch every process builds (deterministically)."""
    torch.manual_seed(0)
    model = TinyLM(vocab=32, d_model=64, heads=4, layers=2, max_len=48).double()
    return model, lm_loss, orderings()["sorted by length"]


def _measure(sizes: tuple[int, ...]) -> list[CheckReport | None]:
    return [_data_parallel_check(make, size, "mean", None) for size in sizes]


def run(context: Context) -> Answer:
    with context.progress.console.status(f"running {RANKS} gloo processes"):
        reports = launch(_measure, RANKS, MICRO_BATCH_SIZES, timeout=600)[0]
    batch = make()[2]
    tokens = (batch.labels[:, 1:] != -100).sum(dim=1)
    per_rank = [int(tokens[:16].sum()), int(tokens[16:].sum())]
    rows = []
    for size, report in zip(MICRO_BATCH_SIZES, reports, strict=True):
        if report is None:
            raise RuntimeError("rank 0 returned no report")
        rows.append(
            {
                "micro_batch_size": size,
                "micro_batches_per_rank": 16 // size,
                "naive_rel_err": report.naive_rel_err,
                "batchgrad_rel_err": report.max_rel_err,
            }
        )
    worst_naive = max(r["naive_rel_err"] for r in rows)
    worst = max(r["batchgrad_rel_err"] for r in rows)
    no_accumulation = rows[0]["naive_rel_err"]
    table = Table(
        f"{RANKS} processes, rank 0: {per_rank[0]} tokens, rank 1: {per_rank[1]} tokens (float64)",
        ["micro-batch size", "micro-batches per rank", "usual DDP loop", "batchgrad"],
        [
            [
                str(r["micro_batch_size"]),
                str(r["micro_batches_per_rank"]),
                sci(r["naive_rel_err"]),
                sci(r["batchgrad_rel_err"]),
            ]
            for r in rows
        ],
    )
    summary = f"""\
**Answer.** Yes, if the count is global. DDP averages the ranks' gradients, and
the usual loop averages micro-batch means on each rank, so a token on a rank or in
a micro-batch with few tokens weighs more. Even with no accumulation at all (one
micro-batch per rank) that is {sci(no_accumulation)} off here, because rank 0
holds {per_rank[0]} tokens and rank 1 {per_rank[1]}; with accumulation it reaches
{sci(worst_naive)}. batchgrad sums unit losses on every rank, agrees on the global
count with a tiny all-reduce of a few numbers, lets DDP synchronise once, in the last
micro-batch's backward, and divides by `N(B) / world_size`: at most
{sci(worst)} from one process on the whole batch. The code is the single-process
code with the model wrapped:

```python
model = DistributedDataParallel(model)            # under torchrun
report = bg.accumulate(model, loss_fn, local_batch, micro_batch_size=4)
```
"""
    figure = _figure(rows, context.out_dir / "data_parallel_error.png")
    return Answer(summary, [table], [figure], {"tokens_per_rank": per_rank, "splits": rows})


def _figure(rows: list[dict[str, Any]], path: Path) -> Path:
    figure = new_figure()
    axes = figure.subplots()
    positions = range(len(rows))
    width = 0.4
    axes.bar(
        [p - width / 2 for p in positions],
        [r["naive_rel_err"] for r in rows],
        width,
        label="usual DDP loop",
    )
    axes.bar(
        [p + width / 2 for p in positions],
        [r["batchgrad_rel_err"] for r in rows],
        width,
        label="batchgrad",
    )
    axes.set_xticks(list(positions), [str(r["micro_batches_per_rank"]) for r in rows])
    axes.set_yscale("log")
    axes.set_xlabel("micro-batches per rank (2 ranks)")
    axes.set_ylabel("‖g − g_one_process‖ / ‖g_one_process‖")
    axes.set_title("DDP + accumulation vs one process on the whole batch")
    axes.legend(fontsize="small")
    return save_figure(figure, path)


CHAPTER = Chapter(
    slug="data-parallel",
    title="DDP + accumulation is still the same gradient",
    question="Is DDP with gradient accumulation still the big-batch gradient?",
    run=run,
    setup=(
        "32 variable-length sequences (2 to 48 tokens) of a counting task generated in code "
        "and a small causal transformer LM (2 layers, width 64) in float64, on two local gloo"
        " processes (CPU); sorted by length, so the ranks hold very different token counts."
    ),
)
