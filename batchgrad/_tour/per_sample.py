"""Chapter: the gradients of the samples in a batch are summed, then maybe averaged.

A Gaussian mixture generated in code (8192 points in 10 dimensions, 4 classes of 3
clusters each) and a ReLU MLP 10-32-32-4 in float64, at its initialisation and
after 300 steps of SGD. The chapter measures

1. on one batch of 32, that `bg.per_sample_grads` equals a loop of one-sample
   backwards, and that the batch gradient is their sum (``reduction="sum"``, and
   plain autograd on a ``"sum"`` criterion) or their sum divided by 32 (``"mean"``);
2. how the norm of the batch gradient grows with the batch size B under each
   reduction, averaged over random batches, against the prediction from the mean
   and covariance of the per-sample gradients over the whole data set; and what
   that means for one SGD or Adam step;
3. the spread of the per-sample gradient norms (`bg.per_sample_norms`) and
   per-sample clipping at their median (`bg.accumulate(..., clip_per_sample=C)`)
   against a clip-then-sum loop.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._accumulate import accumulate
from .._loss import Loss
from .._models import mlp
from .._per_sample import per_sample_grads, per_sample_norms
from .._reduction import Reduction
from .._report import Table, new_figure, save_figure, sci
from . import Answer, Chapter, Context, one_thread

SAMPLES, DIM, CLASSES, CLUSTERS = 8192, 10, 4, 3
WIDTHS = (DIM, 32, 32, CLASSES)
TRAIN_STEPS, TRAIN_BATCH, TRAIN_LR = 300, 64, 0.5
BATCH = 32  # sections 1 and 3
BATCH_SIZES = tuple(2**k for k in range(11))  # 1 ... 1024
MIN_BATCHES = 32  # random batches per batch size, at least (whole shuffled epochs)
CHUNK = 2048  # micro-batch size for per-sample gradients of the whole data set
CHECKED = 2  # batches per batch size also run through bg.accumulate
STEP_BATCH, SGD_LR, ADAM_LR, ADAM_EPS = 256, 0.1, 1e-3, 1e-8
OPACUS_EPS = 1e-6  # clipping weight min(1, C / (‖g_i‖ + 1e-6)), as Opacus writes it

Batch = tuple[Tensor, Tensor]
REDUCTIONS: tuple[tuple[Reduction, Callable[[int], int]], ...] = (
    ("sum", lambda size: 1),
    ("mean", lambda size: size),
)


def gaussian_mixture(samples: int, seed: int = 0) -> Batch:
    """Points ``[samples, DIM]`` (float64) and labels: each class is 3 unit-variance
    Gaussian clusters around random centres, so the classes overlap a little and no
    linear boundary separates them."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES * CLUSTERS, DIM, generator=generator, dtype=torch.float64)
    cluster = torch.randint(0, CLASSES * CLUSTERS, (samples,), generator=generator)
    noise = torch.randn(samples, DIM, generator=generator, dtype=torch.float64)
    return centres[cluster] + noise, cluster % CLASSES


def loss_fn(model: nn.Module, batch: Batch) -> Loss:
    x, y = batch
    return Loss.from_criterion(nn.CrossEntropyLoss(), model(x), y)


def _rows(data: Batch, index: Tensor) -> Batch:
    return data[0][index], data[1][index]


def _flat(model: nn.Module) -> Tensor:
    grads = [p.grad for p in model.parameters()]
    if any(g is None for g in grads):
        raise RuntimeError("a parameter received no gradient")
    return torch.cat([g.flatten() for g in grads if g is not None])


def _gradient(model: nn.Module, compute: Callable[[], Any]) -> tuple[Tensor, Any]:
    """The flat gradient ``compute`` leaves in ``p.grad``, and what it returns."""
    model.zero_grad(set_to_none=True)
    result = compute()
    flat = _flat(model).clone()
    model.zero_grad(set_to_none=True)
    return flat, result


def _per_sample_matrix(model: nn.Module, batch: Batch) -> Tensor:
    """``[B, parameters]``: `bg.per_sample_grads`, flattened in parameter order."""
    grads = per_sample_grads(model, loss_fn, batch, micro_batch_size=CHUNK)
    return torch.cat([grads[name].flatten(1) for name, _ in model.named_parameters()], dim=1)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _accuracy(model: nn.Module, data: Batch) -> float:
    with torch.no_grad():
        return float((model(data[0]).argmax(1) == data[1]).double().mean())


def _train(model: nn.Module, data: Batch, context: Context) -> None:
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=TRAIN_LR)
    for _ in context.track(range(TRAIN_STEPS), "training the MLP"):
        index = torch.randint(0, SAMPLES, (TRAIN_BATCH,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        accumulate(model, loss_fn, _rows(data, index))
        optimizer.step()


def _backward(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """Plain autograd on the summed loss of ``(x, y)``."""
    loss_fn(model, (x, y)).total.backward()


def _one_batch(model: nn.Module, batch: Batch) -> dict[str, Any]:
    """Section 1: per-sample gradients of one batch, and what the batch gradient is."""
    x, y = batch
    size = len(y)
    grads = _per_sample_matrix(model, batch)
    loop = torch.stack(
        [
            _gradient(model, partial(_backward, model, x[i : i + 1], y[i : i + 1]))[0]
            for i in range(size)
        ]
    )
    mean, _ = _gradient(model, lambda: accumulate(model, loss_fn, batch, reduction="mean"))
    summed, _ = _gradient(model, lambda: accumulate(model, loss_fn, batch, reduction="sum"))
    autograd_sum, _ = _gradient(
        model, lambda: nn.CrossEntropyLoss(reduction="sum")(model(x), y).backward()
    )
    autograd_mean, _ = _gradient(model, lambda: nn.CrossEntropyLoss()(model(x), y).backward())
    direction = summed / summed.norm()
    projections = grads @ direction  # they add up to ‖Σ g_i‖
    return {
        "batch": size,
        "parameters": grads.shape[1],
        "per_sample_vs_loop": _rel(grads, loop),
        "accumulate_mean_vs_mean": _rel(mean, grads.mean(0)),
        "accumulate_sum_vs_sum": _rel(summed, grads.sum(0)),
        "autograd_sum_loss_vs_sum": _rel(autograd_sum, grads.sum(0)),
        "autograd_mean_loss_vs_mean": _rel(autograd_mean, grads.sum(0) / size),
        "sum_over_mean_norm": float(summed.norm() / mean.norm()),
        "sum_norm": float(summed.norm()),
        "sum_of_per_sample_norms": float(grads.norm(dim=1).sum()),
        "projections": projections.tolist(),
        "projections_sum_vs_norm": abs(float(projections.sum() / summed.norm()) - 1),
        "against_batch_gradient": int((projections < 0).sum()),
    }


def _statistics(grads: Tensor, norms: Tensor, model: nn.Module, data: Batch) -> dict[str, float]:
    """Mean ``μ`` and total variance ``tr Σ`` of the per-sample gradients over the data set,
    and how far `bg.per_sample_norms` is from the norms of the materialised gradients."""
    mean = grads.mean(0)
    materialised = grads.norm(dim=1)
    mean_sq = float(mean.pow(2).sum())
    trace = float(materialised.pow(2).mean()) - mean_sq  # mean ‖g_i − μ‖²
    return {
        "mean_grad_norm": math.sqrt(mean_sq),
        "trace_covariance": trace,
        "noise_scale": trace / mean_sq,
        "accuracy": _accuracy(model, data),
        "norms_vs_materialised": float(((norms - materialised).abs() / materialised).max()),
    }


def _predicted_mean_norm(stats: dict[str, float], size: int) -> float:
    """RMS of ‖mean of B per-sample gradients‖, B drawn without replacement."""
    shrink = (SAMPLES - size) / (SAMPLES - 1)
    return math.sqrt(stats["mean_grad_norm"] ** 2 + stats["trace_covariance"] / size * shrink)


def _growth(
    model: nn.Module,
    data: Batch,
    grads: Tensor,
    stats: dict[str, float],
    context: Context,
    label: str,
) -> list[dict[str, Any]]:
    """Section 2: RMS batch-gradient norms under both reductions, for each batch size.

    The batches are those of shuffled epochs (enough epochs for at least
    `MIN_BATCHES` batches); each batch's sum is read off the per-sample gradients of
    the whole data set, and the first `CHECKED` batches of each size are also run
    through `bg.accumulate` under both reductions, to check they are that sum and
    that sum divided by B.
    """
    generator = torch.Generator().manual_seed(2)
    rows = []
    for size in context.track(BATCH_SIZES, f"batch sizes, {label}"):
        epochs = max(1, -(-MIN_BATCHES * size // SAMPLES))
        sums = []
        checked = 0.0
        for epoch in range(epochs):
            order = torch.randperm(SAMPLES, generator=generator)[: SAMPLES // size * size]
            which = torch.empty(SAMPLES, dtype=torch.long)
            which[order] = torch.arange(len(order)) // size  # the batch of each sample
            epoch_sums = grads.new_zeros(SAMPLES // size, grads.shape[1])
            epoch_sums.index_add_(0, which, grads)  # one pass over the gradients, no copy
            sums.append(epoch_sums)
            for index in range(CHECKED if epoch == 0 else 0):
                batch = _rows(data, order[index * size : (index + 1) * size])
                for reduction, divisor in REDUCTIONS:
                    compute = partial(accumulate, model, loss_fn, batch, reduction=reduction)
                    found, _ = _gradient(model, compute)
                    checked = max(checked, _rel(found, epoch_sums[index] / divisor(size)))
        norms = torch.cat(sums).norm(dim=1)
        sum_norm = float(norms.pow(2).mean().sqrt())
        mean_pred = _predicted_mean_norm(stats, size)
        rows.append(
            {
                "batch": size,
                "batches": len(norms),
                "sum_vs_predicted": sum_norm / (size * mean_pred) - 1,
                "sum_norm": sum_norm,
                "mean_norm": sum_norm / size,
                "sum_norm_predicted": size * mean_pred,
                "mean_norm_predicted": mean_pred,
                "accumulate_rel_err": checked,
            }
        )
    return rows


def _one_step(model: nn.Module, batch: Batch) -> list[dict[str, Any]]:
    """One optimiser step from the same weights under each reduction and learning rate."""
    size = len(batch[1])
    runs: list[tuple[str, Reduction, Callable[[Any], torch.optim.Optimizer]]] = [
        ("SGD, mean, lr", "mean", lambda p: torch.optim.SGD(p, lr=SGD_LR)),
        ("SGD, sum, same lr", "sum", lambda p: torch.optim.SGD(p, lr=SGD_LR)),
        ("SGD, sum, lr / B", "sum", lambda p: torch.optim.SGD(p, lr=SGD_LR / size)),
        ("Adam, mean, lr", "mean", lambda p: torch.optim.Adam(p, lr=ADAM_LR, eps=ADAM_EPS)),
        ("Adam, sum, same lr", "sum", lambda p: torch.optim.Adam(p, lr=ADAM_LR, eps=ADAM_EPS)),
        (
            "Adam, sum, same lr, ε × B",
            "sum",
            lambda p: torch.optim.Adam(p, lr=ADAM_LR, eps=ADAM_EPS * size),
        ),
    ]
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    updates = {}
    for name, reduction, make in runs:
        copied = copy.deepcopy(model)
        optimizer = make(copied.parameters())
        optimizer.zero_grad(set_to_none=True)
        accumulate(copied, loss_fn, batch, reduction=reduction)
        optimizer.step()
        updates[name] = torch.cat([p.detach().flatten() for p in copied.parameters()]) - start
    rows = []
    for name, update in updates.items():
        reference = updates["Adam, mean, lr" if name.startswith("Adam") else "SGD, mean, lr"]
        rows.append(
            {
                "run": name,
                "update_norm": float(update.norm()),
                "vs_mean_rel_diff": _rel(update, reference),
            }
        )
    return rows


def _clipping(model: nn.Module, batch: Batch) -> dict[str, Any]:
    """Section 3: per-sample norms of one batch and per-sample clipping at their median."""
    size = len(batch[1])
    grads = _per_sample_matrix(model, batch)
    materialised = grads.norm(dim=1)
    norms = per_sample_norms(model, loss_fn, batch)
    clip = float(norms.quantile(0.5))  # between the two middle norms: half are clipped
    clipped, report = _gradient(
        model, lambda: accumulate(model, loss_fn, batch, clip_per_sample=clip)
    )
    opacus = (clip / (materialised + OPACUS_EPS)).clamp(max=1.0)
    exact = (clip / materialised).clamp(max=1.0)
    reference = (opacus[:, None] * grads).sum(0) / size
    unclipped = grads.mean(0)
    return {
        "batch": size,
        "norms": norms.tolist(),
        "norms_vs_materialised": float(((norms - materialised).abs() / materialised).max()),
        "clip": clip,
        "clipped": report.clipped,
        "clipped_reference": float((clip / (materialised + 1e-6) < 1).double().mean()),
        "vs_reference": _rel(clipped, reference),
        "vs_exact_min": _rel(clipped, (exact[:, None] * grads).sum(0) / size),
        "norm_ratio": float(clipped.norm() / unclipped.norm()),
        "cosine": float(clipped @ unclipped / (clipped.norm() * unclipped.norm())),
    }


def run(context: Context) -> Answer:
    with one_thread():
        return _run(context)


def _run(context: Context) -> Answer:
    data = gaussian_mixture(SAMPLES)
    torch.manual_seed(0)
    model = mlp(WIDTHS).double()
    states = {"init": copy.deepcopy(model)}
    _train(model, data, context)
    states["trained"] = model
    labels = {"init": "at initialisation", "trained": f"after {TRAIN_STEPS} SGD steps"}

    order = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(3))
    batch = _rows(data, order[:BATCH])
    one = _one_batch(model, batch)
    stats, growth, all_norms = {}, {}, {}
    for key, state in states.items():
        grads = _per_sample_matrix(state, data)
        norms = per_sample_norms(state, loss_fn, data, micro_batch_size=CHUNK)
        stats[key] = _statistics(grads, norms, state, data)
        growth[key] = _growth(state, data, grads, stats[key], context, labels[key])
        all_norms[key] = norms.tolist()
        del grads
    steps = _one_step(model, _rows(data, order[:STEP_BATCH]))
    clipping = _clipping(model, batch)

    figures = [
        _projection_figure(one, context.out_dir / "per_sample_sum.png"),
        _growth_figure(growth, stats, labels, context.out_dir / "per_sample_batch_size.png"),
        _norms_figure(clipping, all_norms, labels, context.out_dir / "per_sample_norms.png"),
    ]
    tables = _tables(one, growth, stats, labels, steps, clipping)
    summary = _summary(one, growth, stats, steps, clipping)
    data_out = {
        "data": {"samples": SAMPLES, "dim": DIM, "classes": CLASSES, "clusters": CLUSTERS},
        "model": {"widths": list(WIDTHS), "parameters": one["parameters"]},
        "one_batch": one,
        "batch_size": {
            "sizes": list(BATCH_SIZES),
            "states": {key: {**stats[key], "rows": growth[key]} for key in states},
        },
        "one_step": {"batch": STEP_BATCH, "sgd_lr": SGD_LR, "adam_lr": ADAM_LR, "runs": steps},
        "clipping": clipping,
        "norm_quantiles": {key: _quantiles(values) for key, values in all_norms.items()},
    }
    return Answer(summary, tables, figures, data_out)


def _quantiles(values: list[float]) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    levels = {"min": 0.0, "p10": 0.1, "median": 0.5, "p90": 0.9, "max": 1.0}
    return {name: float(t.quantile(q)) for name, q in levels.items()}


def _tables(
    one: dict[str, Any],
    growth: dict[str, list[dict[str, Any]]],
    stats: dict[str, dict[str, float]],
    labels: dict[str, str],
    steps: list[dict[str, Any]],
    clipping: dict[str, Any],
) -> list[Table]:
    b = one["batch"]
    exactness = Table(
        f"One batch of {b} samples, float64: the batch gradient and the per-sample gradients g_i",
        ["gradient", "equals", "relative error"],
        [
            ["bg.per_sample_grads", f"{b} one-sample backwards", sci(one["per_sample_vs_loop"])],
            ['bg.accumulate, "sum"', "Σ g_i", sci(one["accumulate_sum_vs_sum"])],
            ['bg.accumulate, "mean"', f"Σ g_i / {b}", sci(one["accumulate_mean_vs_mean"])],
            ['CrossEntropyLoss("sum").backward()', "Σ g_i", sci(one["autograd_sum_loss_vs_sum"])],
            [
                'CrossEntropyLoss("mean").backward()',
                f"Σ g_i / {b}",
                sci(one["autograd_mean_loss_vs_mean"]),
            ],
        ],
    )
    header = ["B"]
    for key in growth:
        header += [f"‖Σ g_i‖, {labels[key]}", "‖mean‖"]
    rows = []
    for index, size in enumerate(BATCH_SIZES):
        row = [str(size)]
        for key in growth:
            r = growth[key][index]
            row += [f"{r['sum_norm']:.3g}", f"{r['mean_norm']:.3g}"]
        rows.append(row)
    noise = ", ".join(f"{labels[key]}: B_noise = {stats[key]['noise_scale']:.0f}" for key in growth)
    norms = Table(
        f"Batch-gradient norm, RMS over the batches of shuffled epochs (≥ {MIN_BATCHES} "
        f"per B); {noise}",
        header,
        rows,
    )
    step = Table(
        f"One optimiser step from the trained weights, batch of {STEP_BATCH}",
        ["run", "‖Δθ‖", "‖Δθ − Δθ_mean‖ / ‖Δθ_mean‖"],
        [[r["run"], f"{r['update_norm']:.3g}", sci(r["vs_mean_rel_diff"])] for r in steps],
    )
    clip = Table(
        f"Per-sample clipping of the batch of {clipping['batch']} at C = median norm "
        f"= {clipping['clip']:.3g}",
        ["quantity", "value"],
        [
            ["bg.per_sample_norms vs norms of the g_i", sci(clipping["norms_vs_materialised"])],
            ["fraction clipped (report.clipped)", f"{clipping['clipped']:.3f}"],
            ["fraction with C / (‖g_i‖ + 1e-6) < 1", f"{clipping['clipped_reference']:.3f}"],
            ["bg.accumulate vs Σ min(1, C/(‖g_i‖+1e-6)) g_i / B", sci(clipping["vs_reference"])],
            ["bg.accumulate vs Σ min(1, C/‖g_i‖) g_i / B", sci(clipping["vs_exact_min"])],
            ["‖clipped‖ / ‖unclipped‖", f"{clipping['norm_ratio']:.3f}"],
            ["cosine(clipped, unclipped)", f"{clipping['cosine']:.3f}"],
        ],
    )
    return [exactness, norms, step, clip]


def _summary(
    one: dict[str, Any],
    growth: dict[str, list[dict[str, Any]]],
    stats: dict[str, dict[str, float]],
    steps: list[dict[str, Any]],
    clipping: dict[str, Any],
) -> str:
    b = one["batch"]
    worst = max(
        one[k]
        for k in (
            "per_sample_vs_loop",
            "accumulate_mean_vs_mean",
            "accumulate_sum_vs_sum",
            "autograd_sum_loss_vs_sum",
            "autograd_mean_loss_vs_mean",
        )
    )
    init, trained = growth["init"], growth["trained"]
    checked = max(r["accumulate_rel_err"] for rows in growth.values() for r in rows)
    off = max(abs(r["sum_vs_predicted"]) for rows in growth.values() for r in rows)
    big = BATCH_SIZES[-1]
    runs = {r["run"]: r for r in steps}
    sgd_ratio = runs["SGD, sum, same lr"]["update_norm"] / runs["SGD, mean, lr"]["update_norm"]
    norms = clipping["norms"]
    return f"""\
**Answer.** Summed. A batch's loss is a sum of per-sample terms, so its gradient is
the sum of the per-sample gradients `g_i`; `"mean"` divides that sum by B
afterwards. On a batch of {b}, `bg.per_sample_grads` gives each `g_i` (the same as
{b} one-sample backwards), and `bg.accumulate` with `reduction="sum"` or `"mean"`,
like plain `backward()` of a `"sum"` or a `"mean"` criterion, gives `Σ g_i` or
`Σ g_i / {b}`, to within {sci(worst)}. The `g_i` do not agree:
{one["against_batch_gradient"]} of the {b} point against the batch gradient (first
figure), and their sum has norm {one["sum_norm"]:.3g}, while their norms add up to
{one["sum_of_per_sample_norms"]:.3g}.

**How the update grows with B.** Over random batches (shuffled epochs of the
{SAMPLES} points), the mean square of `‖Σ g_i‖` is `B² ‖μ‖² + B tr Σ` (μ and Σ: mean
and covariance of the `g_i` over the data set; thin lines in the second figure, at
most {off:.1%} from the measured RMS). So the `"sum"` norm grows roughly like √B
while B is below the noise scale `B_noise = tr Σ / ‖μ‖²` and like B above it, and
the `"mean"` norm falls like 1/√B until it levels off at `‖μ‖`. At initialisation
(B_noise = {stats["init"]["noise_scale"]:.0f}), from B = 1 to {big} the `"sum"` norm
grows **{init[-1]["sum_norm"] / init[0]["sum_norm"]:.0f}×** and the `"mean"` norm falls
{init[0]["mean_norm"] / init[-1]["mean_norm"]:.1f}×, to within
{init[-1]["mean_norm"] / stats["init"]["mean_grad_norm"] - 1:.1%} of `‖μ‖`.
After {TRAIN_STEPS} SGD steps (accuracy {stats["init"]["accuracy"]:.0%} →
{stats["trained"]["accuracy"]:.0%}) `‖μ‖` is about the same
({stats["init"]["mean_grad_norm"]:.2f} → {stats["trained"]["mean_grad_norm"]:.2f}) but
`tr Σ` is {stats["trained"]["trace_covariance"] / stats["init"]["trace_covariance"]:.1f}×
larger: B_noise = {stats["trained"]["noise_scale"]:.0f}, and over the same range
`"sum"` grows {trained[-1]["sum_norm"] / trained[0]["sum_norm"]:.0f}× while `"mean"`
falls {trained[0]["mean_norm"] / trained[-1]["mean_norm"]:.0f}×. The `"mean"` gradient
is independent of B only for B ≫ B_noise. (For the first {CHECKED} batches of each
size, `bg.accumulate` was run under both reductions too: within {sci(checked)} of
the sum and of the sum / B.)

**What it means for the learning rate.** With `"sum"`, the SGD step is B times the
`"mean"` step ({sgd_ratio:.0f}× on a batch of {STEP_BATCH}), so `lr_sum = lr_mean / B`
gives the same update ({sci(runs["SGD, sum, lr / B"]["vs_mean_rel_diff"])} apart; B is a
power of two, so the division is exact). Adam divides by the gradient's own scale,
so the reduction barely matters to it: {sci(runs["Adam, sum, same lr"]["vs_mean_rel_diff"])}
apart, all of it through ε (with ε × B as well:
{sci(runs["Adam, sum, same lr, ε × B"]["vs_mean_rel_diff"])}). With `"mean"`, a larger
B does not by itself make the step larger. Whether the learning rate *should* then
grow with B is a separate question, about noise: the linear scaling rule (Goyal et
al., 2017) raises it in proportion to B, and in the local quadratic model of
McCandlish et al. (2018) the best SGD learning rate goes as `1 / (1 + B_noise / B)`,
about linear in B below B_noise and flat above it, where the `tr Σ / B` noise is
already small. Those are models and heuristics to tune with, not identities like
the ones measured here.

**Per-sample norms and clipping.** The norms spread widely (third figure): in the
batch of {b} on the trained model, from {min(norms):.2g} to {max(norms):.2g}, since
well-classified points have almost no gradient. `bg.per_sample_norms` (which never
forms the `g_i` for linear layers) matches the norms of the materialised `g_i` to
{sci(clipping["norms_vs_materialised"])}, and to
{sci(max(s["norms_vs_materialised"] for s in stats.values()))} on all {SAMPLES} points.
Clipping each `g_i` to the median norm C = {clipping["clip"]:.3g}, as DP-SGD does,
clips {clipping["clipped"]:.0%} of the samples (`report.clipped`) and equals a
clip-then-sum loop to {sci(clipping["vs_reference"])}. batchgrad, like Opacus, scales
by `min(1, C / (‖g_i‖ + 1e-6))`, which is {sci(clipping["vs_exact_min"])} from the
exact `min(1, C / ‖g_i‖)`. Here clipping shortens the batch gradient to
{clipping["norm_ratio"]:.0%} of its norm and turns it (cosine
{clipping["cosine"]:.2f}): the samples with large gradients lose most of their weight.

```python
grads = bg.per_sample_grads(model, loss_fn, batch)  # {{name: [B, *p.shape]}}
norms = bg.per_sample_norms(model, loss_fn, batch)  # [B]
report = bg.accumulate(model, loss_fn, batch, clip_per_sample=C)
```
"""


def _quantile(values: list[float], q: float) -> float:
    return float(torch.tensor(values, dtype=torch.float64).quantile(q))


def _projection_figure(one: dict[str, Any], path: Path) -> Path:
    figure = new_figure()
    axes = figure.subplots()
    values = sorted(one["projections"], reverse=True)
    colours = ["tab:blue" if v >= 0 else "tab:red" for v in values]
    axes.bar(range(len(values)), values, color=colours)
    axes.axhline(0.0, color="black", linewidth=0.8)
    axes.set_xlabel(f"sample of the batch of {one['batch']} (sorted)")
    axes.set_ylabel("g_i · ĝ, ĝ = Σ g / ‖Σ g‖")
    axes.set_title(
        f"Per-sample gradients along the batch gradient: they add up to "
        f"‖Σ g_i‖ = {one['sum_norm']:.3g}",
        fontsize="medium",
    )
    return save_figure(figure, path)


def _growth_figure(
    growth: dict[str, list[dict[str, Any]]],
    stats: dict[str, dict[str, float]],
    labels: dict[str, str],
    path: Path,
) -> Path:
    figure = new_figure(width=10.0)
    panels = figure.subplots(1, len(growth), sharey=True)
    for axes, (key, rows) in zip(panels, growth.items(), strict=True):
        sizes = [r["batch"] for r in rows]
        for reduction, style, colour in (("sum", "o", "tab:blue"), ("mean", "s", "tab:orange")):
            axes.plot(
                sizes,
                [r[f"{reduction}_norm"] for r in rows],
                style,
                color=colour,
                label=f'"{reduction}", measured',
            )
            axes.plot(
                sizes,
                [r[f"{reduction}_norm_predicted"] for r in rows],
                "-",
                color=colour,
                linewidth=0.8,
                label=f'"{reduction}", from μ and Σ',
            )
        noise = stats[key]["noise_scale"]
        axes.axvline(noise, color="gray", linestyle=":", label="B_noise = tr Σ / ‖μ‖²")
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xlabel("batch size B")
        axes.set_title(f"{labels[key]}: B_noise = {noise:.0f}")
    panels[0].set_ylabel("RMS ‖batch gradient‖")
    panels[0].legend(fontsize="small")
    return save_figure(figure, path)


def _norms_figure(
    clipping: dict[str, Any],
    all_norms: dict[str, list[float]],
    labels: dict[str, str],
    path: Path,
) -> Path:
    figure = new_figure(width=10.0)
    batch_axes, data_axes = figure.subplots(1, 2)
    norms = sorted(clipping["norms"], reverse=True)
    clip = clipping["clip"]
    colours = ["tab:red" if n > clip else "tab:blue" for n in norms]
    batch_axes.bar(range(len(norms)), norms, color=colours)
    batch_axes.axhline(clip, color="black", linestyle="--", label=f"C = median = {clip:.3g}")
    batch_axes.set_yscale("log")
    batch_axes.set_xlabel(f"sample of the batch of {clipping['batch']} (sorted; red: clipped)")
    batch_axes.set_ylabel("‖g_i‖")
    batch_axes.set_title("Per-sample gradient norms, trained model")
    batch_axes.legend(fontsize="small")
    low = min(min(v) for v in all_norms.values())
    high = max(max(v) for v in all_norms.values())
    bins = torch.logspace(math.log10(low), math.log10(high), 60).tolist()
    for key, values in all_norms.items():
        data_axes.hist(values, bins=bins, histtype="step", label=labels[key])
    data_axes.set_xscale("log")
    data_axes.set_xlabel("‖g_i‖")
    data_axes.set_ylabel("samples")
    data_axes.set_title(f"All {SAMPLES} samples")
    data_axes.legend(fontsize="small")
    return save_figure(figure, path)


CHAPTER = Chapter(
    slug="summed-or-averaged",
    title="Per-sample gradients: summed, then maybe averaged",
    question="Are the gradients of the samples in a batch summed or averaged?",
    run=run,
    setup=(
        "A Gaussian mixture generated in code (8192 points in 10 dimensions, 4 classes) and a"
        " ReLU MLP 10-32-32-4 in float64, at its initialisation and after 300 steps of SGD."
    ),
)
