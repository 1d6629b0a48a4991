"""Chapter: why the running sum of bfloat16 gradients must be float32.

Bfloat16 parameters, a logical batch of 1024 rows split into 1 to 256
micro-batches, a loss linear in the weight, so that each micro-batch's gradient is
computed in one matrix product and rounded once: what differs between the two
accumulations is only how the micro-batches' gradients are added. Autograd adds
them into the bfloat16 ``p.grad``; `bg.accumulate` into a float32 running sum that
it rounds once at the end. Both are compared with the float64 gradient of the whole
batch, and with that gradient rounded once to bfloat16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._accumulate import accumulate
from .._loss import Loss
from .._report import Table, new_figure, save_figure, sci
from . import Answer, Chapter, Context, one_thread

ROWS, FEATURES, OUTPUTS = 1024, 256, 4
MICRO_BATCH_COUNTS = (1, 4, 16, 64, 256)


def _loss(model: nn.Module, x: Tensor) -> Loss:
    return Loss(model(x).float().sum(), x.shape[0])


def _rel(grad: Tensor, exact: Tensor) -> float:
    return float((grad.double() - exact).norm() / exact.norm())


def run(context: Context) -> Answer:
    with one_thread():
        generator = torch.Generator().manual_seed(0)
        model = nn.Linear(FEATURES, OUTPUTS, bias=False).to(torch.bfloat16)
        # Positive means: the micro-batches' gradients add up rather than cancel out.
        x = (torch.randn(ROWS, FEATURES, generator=generator) + 1.0).to(torch.bfloat16)
        exact = x.double().mean(0).expand(OUTPUTS, FEATURES)
        once = _rel(exact.to(torch.bfloat16), exact)
        rows: list[dict[str, Any]] = []
        for k in context.track(MICRO_BATCH_COUNTS, "summing bf16 gradients"):
            model.zero_grad(set_to_none=True)
            for part in x.split(ROWS // k):
                (_loss(model, part).total / ROWS).backward()
            assert model.weight.grad is not None
            autograd = _rel(model.weight.grad, exact)
            model.zero_grad(set_to_none=True)
            accumulate(model, _loss, x, micro_batch_size=ROWS // k)
            assert model.weight.grad is not None
            rows.append(
                {
                    "micro_batches": k,
                    "autograd_bf16": autograd,
                    "batchgrad_float32_sum": _rel(model.weight.grad, exact),
                    "one_rounding": once,
                }
            )
    figure = _figure(rows, context.out_dir / "precision_running_sum.png")
    last = rows[-1]
    summary = f"""\
**Answer.** Rounding to bfloat16 keeps 8 significant bits. Autograd adds every
micro-batch's gradient into the bfloat16 `p.grad`, so the sum is rounded after each
addition, and the later additions, onto an ever larger sum, lose the most: at
{last["micro_batches"]} micro-batches its error is **{sci(last["autograd_bf16"])}**,
{last["autograd_bf16"] / once:.1f}× that of the exact gradient rounded once
({sci(once)}). `bg.accumulate` sums bfloat16 and float16 gradients in float32 and
rounds once, at the end, into `p.grad` (still bfloat16): its error stays at one
rounding's, {sci(last["batchgrad_float32_sum"])}, however many micro-batches. Choose
the running sum's dtype with `accumulate_dtype=` (`torch.bfloat16` gives autograd's
sum back); float32 and float64 parameters are summed as autograd does, at no cost."""
    table = Table(
        f"Relative error vs float64, bfloat16 parameters, a batch of {ROWS}",
        ["micro-batches", "autograd bf16 sum", "batchgrad float32 sum", "one rounding"],
        [
            [
                str(r["micro_batches"]),
                sci(r["autograd_bf16"]),
                sci(r["batchgrad_float32_sum"]),
                sci(r["one_rounding"]),
            ]
            for r in rows
        ],
    )
    return Answer(summary, [table], [figure], {"splits": rows})


def _figure(rows: list[dict[str, Any]], path: Path) -> Path:
    figure = new_figure()
    axes = figure.subplots()
    ks = [r["micro_batches"] for r in rows]
    axes.plot(ks, [r["autograd_bf16"] for r in rows], "o-", label="autograd: bf16 p.grad")
    axes.plot(ks, [r["batchgrad_float32_sum"] for r in rows], "s-", label="batchgrad: f32 sum")
    axes.plot(ks, [r["one_rounding"] for r in rows], "k--", label="exact, rounded once")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("micro-batches per logical batch")
    axes.set_ylabel("‖g − g_f64‖ / ‖g_f64‖")
    axes.set_title("Summing bfloat16 micro-batch gradients")
    axes.legend(fontsize="small")
    return save_figure(figure, path)


CHAPTER = Chapter(
    slug="precision",
    title="Mixed precision: a float32 running sum",
    question="Why must the running sum of bfloat16 gradients be float32?",
    run=run,
    setup=(
        f"{ROWS} random rows of {FEATURES} features (mean 1) in bfloat16, and a bfloat16 "
        f"linear layer to {OUTPUTS} outputs whose summed output is the loss, so every "
        f"micro-batch's gradient is its rows' sum rounded once."
    ),
)
