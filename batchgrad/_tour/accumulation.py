"""Chapter: accumulating over small batches and still getting the big-batch gradient.

A small causal transformer LM on variable-length sequences (2 to 48 tokens), a
logical batch of 32 split into 1 to 32 micro-batches, in random order and sorted
by length (as length-bucketing samplers do). For each split, `bg.check` measures
the relative error against the whole batch of batchgrad and of the common recipe
``micro_batch_mean / K``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._check import check
from .._data import TokenBatch, counting_sequences
from .._loss import Loss
from .._models import TinyLM
from .._plots import LOG_FLOOR, mark_floor, on_log_axis
from .._report import Table, new_figure, save_figure, sci
from . import Answer, Chapter, Context

LOGICAL_BATCH = 32
MICRO_BATCH_COUNTS = (1, 2, 4, 8, 16, 32)
WEIGHTS_SPLIT = 4  # micro-batches in the token-weight figure


def lm_loss(model: nn.Module, batch: TokenBatch) -> Loss:
    return Loss.from_causal_lm(model(batch.input_ids), batch.labels)


def orderings() -> dict[str, TokenBatch]:
    """The logical batch of 32 sequences, in random order and sorted by length."""
    shuffled = counting_sequences(LOGICAL_BATCH, min_len=2, max_len=48, seed=0)
    lengths = (shuffled.labels != -100).sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    bucketed = TokenBatch(shuffled.input_ids[order], shuffled.labels[order])
    return {"random order": shuffled, "sorted by length": bucketed}


def run(context: Context) -> Answer:
    torch.manual_seed(0)
    model32 = TinyLM(vocab=32, d_model=64, heads=4, layers=2, max_len=48)
    model64 = TinyLM(vocab=32, d_model=64, heads=4, layers=2, max_len=48).double()
    model64.load_state_dict(model32.state_dict())
    batches = orderings()

    rows: list[dict[str, Any]] = []
    cases = [(name, k) for name in batches for k in MICRO_BATCH_COUNTS]
    for name, k in context.track(cases, "checking splits"):
        batch, size = batches[name], LOGICAL_BATCH // k
        in32 = check(model32, lm_loss, batch, size, probe=False)
        in64 = check(model64, lm_loss, batch, size, probe=False)
        rows.append(
            {
                "order": name,
                "micro_batches": k,
                "micro_batch_size": size,
                "tokens_per_micro_batch": list(in32.micro_batch_counts),
                "naive_rel_err": in32.naive_rel_err,
                "batchgrad_rel_err_float32": in32.max_rel_err,
                "batchgrad_rel_err_float64": in64.max_rel_err,
            }
        )
    findings = check(model32, lm_loss, batches["random order"], 8).findings

    weights = _token_weights(batches["sorted by length"], WEIGHTS_SPLIT)
    figures = [
        _error_figure(rows, context.out_dir / "accumulation_error.png"),
        _weights_figure(weights, context.out_dir / "accumulation_token_weights.png"),
    ]
    worst_naive = max(r["naive_rel_err"] for r in rows)
    worst32 = max(r["batchgrad_rel_err_float32"] for r in rows)
    worst64 = max(r["batchgrad_rel_err_float64"] for r in rows)
    heaviest = max(weights["naive_relative_weight"])
    summary = f"""\
**Answer.** Sum the loss over the units (here: predicted tokens) of each
micro-batch, backpropagate that sum, and divide the accumulated gradient *once* by
the number of units in the whole logical batch. That is `bg.accumulate`:

```python
loss_fn = lambda model, b: bg.Loss.from_causal_lm(model(b.input_ids), b.labels)
report = bg.accumulate(model, loss_fn, batch, micro_batch_size=8)
```

The common recipe, `(micro_batch_mean / K).backward()`, gives a token of
micro-batch *k* the weight `1 / (K · tokens_k)` instead of `1 / tokens_total`. With
sequences sorted by length into {WEIGHTS_SPLIT} micro-batches, a token of the
shortest sequences counts **{heaviest:.1f}×** what it should; over all splits the
naive gradient is up to **{worst_naive:.0%}** off. batchgrad's gradient equals the
whole batch's to rounding: at most {sci(worst32)} in float32 and {sci(worst64)} in
float64. Split into one micro-batch, or into micro-batches with equal token counts,
the two recipes agree; that is the only case where the naive one is right.
{"" if not findings else "Findings: " + "; ".join(f.message for f in findings)}"""
    tables = [
        Table(
            f"Relative error vs the whole batch of 32 sequences, {order}",
            ["micro-batches", "size", "tokens per micro-batch", "naive", "batchgrad f32", "f64"],
            [
                [
                    str(r["micro_batches"]),
                    str(r["micro_batch_size"]),
                    f"{min(r['tokens_per_micro_batch'])}–{max(r['tokens_per_micro_batch'])}",
                    sci(r["naive_rel_err"]),
                    sci(r["batchgrad_rel_err_float32"]),
                    sci(r["batchgrad_rel_err_float64"]),
                ]
                for r in rows
                if r["order"] == order
            ],
        )
        for order in batches
    ]
    return Answer(
        summary,
        tables,
        figures,
        {"splits": rows, "token_weights": weights, "findings": [f.message for f in findings]},
    )


def _token_weights(batch: TokenBatch, micro_batches: int) -> dict[str, list[float]]:
    """Each sequence's weight per token under the naive recipe, relative to exact."""
    tokens = (batch.labels[:, 1:] != -100).sum(dim=1).double()
    size = len(tokens) // micro_batches
    per_micro_batch = tokens.reshape(micro_batches, size).sum(dim=1)
    naive = 1 / (micro_batches * per_micro_batch.repeat_interleave(size))
    return {
        "tokens": tokens.tolist(),
        "naive_relative_weight": (naive * tokens.sum()).tolist(),
    }


def _error_figure(rows: list[dict[str, Any]], path: Any) -> Any:
    figure = new_figure()
    axes = figure.subplots()
    zeros = False
    # One micro-batch makes either recipe exact, and float64 rounding can cancel out:
    # errors of exactly 0 are drawn at a floor, which the figure marks.
    for order, style in (("random order", "o-"), ("sorted by length", "s-")):
        mine = [r for r in rows if r["order"] == order]
        ks = [r["micro_batches"] for r in mine]
        lines = [("naive_rel_err", style, f"naive, {order}")]
        if order == "random order":
            lines += [
                ("batchgrad_rel_err_float32", "^-", "batchgrad, f32"),
                ("batchgrad_rel_err_float64", "v-", "batchgrad, f64"),
            ]
        for key, line_style, label in lines:
            values, clamped = on_log_axis([r[key] for r in mine])
            zeros |= clamped
            axes.plot(ks, values, line_style, label=label)
    if zeros:
        mark_floor(axes)
        axes.set_ylim(bottom=LOG_FLOOR / 3)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("micro-batches per logical batch")
    axes.set_ylabel("‖g − g_whole‖ / ‖g_whole‖")
    axes.set_title("Accumulated gradient vs whole batch")
    axes.legend(fontsize="small", loc="center right")
    return save_figure(figure, path)


def _weights_figure(weights: dict[str, list[float]], path: Any) -> Any:
    figure = new_figure()
    axes = figure.subplots()
    positions = range(len(weights["tokens"]))
    axes.bar(positions, weights["naive_relative_weight"], label="naive: mean / K")
    axes.axhline(1.0, color="black", linestyle="--", label="batchgrad (exact)")
    axes.set_xlabel("sequence (sorted by length)")
    axes.set_ylabel("weight of each of its tokens / exact weight")
    axes.set_title(f"Token weights, {WEIGHTS_SPLIT} micro-batches sorted by length")
    axes.legend(fontsize="small")
    return save_figure(figure, path)


CHAPTER = Chapter(
    slug="accumulation",
    title="Gradient accumulation that equals the big batch",
    question="How do I accumulate the loss over small batches and still get the "
    "big-batch gradient?",
    run=run,
    setup=(
        "32 variable-length sequences (2 to 48 tokens) of a counting task generated in code, "
        "and a small causal transformer LM (2 layers, width 64, 4 heads), in float32 and "
        "float64."
    ),
)
