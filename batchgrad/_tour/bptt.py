"""Chapter: why backpropagation through time sums the gradient over steps.

The adding problem (Hochreiter and Schmidhuber, 1997): each of 32 sequences is 100
steps of ``(value in [0, 1], marker in {0, 1})`` with exactly two markers, one in
the first 10 steps and one before the middle; the target is the sum of the two
marked values, and the squared error is read at the last step only. Four cells of
32 units, in float64, at a fixed initialisation: a tanh RNN, a GRU, an LSTM, and an
LSTM whose forget gate starts open (bias 3). The chapter measures

1. that `bg.time_contributions`, one term per step, sums to the gradient autograd
   gives on the whole sequence;
2. on a variant with a target at every step (the running sum of the marked
   values), that ``reduction="mean"`` and ``"sum"`` differ by the factor ``N`` only,
   and what that does to SGD and Adam;
3. how the gradient reaching the state decays back through time, cell by cell;
4. what truncated BPTT (`bg.tbptt`) drops as its window ``k1`` shrinks, and that
   chunked `bg.bptt` drops nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .._bptt import bptt, tbptt, time_contributions
from .._errors import NonFiniteError
from .._loss import Loss
from .._reduction import Reduction
from .._report import Table, new_figure, save_figure, sci
from . import Answer, Chapter, Context, one_thread

BATCH, STEPS, HIDDEN = 32, 100, 32
FORGET_BIAS = 3.0
CELLS = {  # key: (label, torch module, forget-gate bias or None for the default init)
    "rnn": ("tanh RNN", nn.RNN, None),
    "gru": ("GRU", nn.GRU, None),
    "lstm": ("LSTM", nn.LSTM, None),
    "lstm_open": (f"LSTM, b_f = {FORGET_BIAS:g}", nn.LSTM, FORGET_BIAS),
}
K1S = (1, 2, 5, 10, 20, 50, STEPS)  # divisors of STEPS: every window is k1 steps long
CHUNKS = (1, 10, STEPS)
TRAIN_STEPS = 5
SGD_LR, ADAM_LR, ADAM_EPS = 0.5, 1e-2, 1e-8
MARKER_WEIGHTS = "rnn.weight_ih_l0"  # its column 1 reads the marker channel


class Recurrent(nn.Module):
    """A one-layer recurrent cell reading ``[batch, time, 2]`` and a linear readout."""

    def __init__(self, cell: Callable[..., nn.RNNBase], forget_bias: float | None = None) -> None:
        super().__init__()
        self.rnn = cell(2, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, 1)
        if forget_bias is not None:  # LSTM gates are stacked (input, forget, cell, output)
            with torch.no_grad():
                self.rnn.get_parameter("bias_ih_l0")[HIDDEN : 2 * HIDDEN] = forget_bias
                self.rnn.get_parameter("bias_hh_l0")[HIDDEN : 2 * HIDDEN] = 0.0

    def forward(self, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        out, state = self.rnn(x, state)
        return self.head(out).squeeze(-1), state


def step_fn(model: nn.Module, chunk: dict[str, Tensor], state: Any) -> tuple[Loss, Any]:
    """Squared error at the steps the mask keeps; the state is the cell's (h or (h, c))."""
    prediction, state = model(chunk["x"], state)
    return Loss.from_values((prediction - chunk["target"]) ** 2, chunk["mask"]), state


def adding_problem(batch: int, steps: int, *, every_step: bool, seed: int) -> dict[str, Tensor]:
    """``x`` [batch, steps, 2], ``target`` and boolean ``mask`` [batch, steps], float64.

    One marker in the first 10 steps, the other before ``steps // 2``, so the
    dependency spans at least half the sequence. With ``every_step`` the target at step
    t is the sum of the marked values seen so far and every step is a unit;
    otherwise only the last step is, with the sum of both marked values.
    """
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(batch, steps, generator=generator, dtype=torch.float64)
    first = torch.randint(0, 10, (batch,), generator=generator)
    second = torch.randint(10, steps // 2, (batch,), generator=generator)
    markers = torch.zeros(batch, steps, dtype=torch.float64)
    rows = torch.arange(batch)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    running = torch.cumsum(values * markers, dim=1)
    if every_step:
        mask = torch.ones(batch, steps, dtype=torch.bool)
        target = running
    else:
        mask = torch.zeros(batch, steps, dtype=torch.bool)
        mask[:, -1] = True
        target = running[:, -1:].expand(batch, steps).clone()
    return {"x": torch.stack([values, markers], dim=-1), "target": target, "mask": mask}


def make_model(key: str) -> nn.Module:
    _, cell, forget_bias = CELLS[key]
    torch.manual_seed(0)
    return Recurrent(cell, forget_bias).double()


def _flat(model: nn.Module) -> Tensor:
    grads = [p.grad for p in model.parameters()]
    if any(g is None for g in grads):
        raise RuntimeError("a parameter received no gradient")
    return torch.cat([g.flatten() for g in grads if g is not None])


def _autograd(model: nn.Module, sequence: dict[str, Tensor]) -> dict[str, Tensor]:
    """Plain BPTT: the whole sequence in one graph, the loss's mean, `backward`."""
    model.zero_grad(set_to_none=True)
    loss, _ = step_fn(model, sequence, None)
    (loss.total / loss.count).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _gradient(model: nn.Module, compute: Callable[[], Any]) -> tuple[Tensor, Any]:
    """The flat gradient a batchgrad call leaves in ``p.grad``, and its report."""
    model.zero_grad(set_to_none=True)
    report = compute()
    flat = _flat(model).clone()
    model.zero_grad(set_to_none=True)
    return flat, report


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _cosine(a: Tensor, b: Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def _cat(grads: dict[str, Tensor], names: list[str]) -> Tensor:
    return torch.cat([grads[name].flatten() for name in names])


def _cell_study(key: str, sequence: dict[str, Tensor]) -> dict[str, Any]:
    """Sections 1, 3 and 4 for one cell on the last-step adding problem."""
    model = make_model(key)
    names = [name for name, _ in model.named_parameters()]
    exact = _autograd(model, sequence)
    g = _cat(exact, names)
    contributions = time_contributions(model, step_fn, sequence)
    per_step = contributions.grads
    summed = _cat({n: per_step[n].sum(dim=0) for n in names}, names)
    state_norms = contributions.state_grad_norms.tolist()

    truncation = []
    marker = exact[MARKER_WEIGHTS][:, 1]
    offset = sum(exact[n].numel() for n in names[: names.index(MARKER_WEIGHTS)])
    for k1 in K1S:
        flat, _ = _gradient(model, partial(tbptt, model, step_fn, sequence, k1=k1))
        # Only the last window holds a unit: tbptt keeps exactly the last k1 terms.
        kept = _cat({n: per_step[n][STEPS - k1 :].sum(dim=0) for n in names}, names)
        weights = flat[offset : offset + exact[MARKER_WEIGHTS].numel()]
        marker_tbptt = weights.reshape(exact[MARKER_WEIGHTS].shape)[:, 1]
        truncation.append(
            {
                "k1": k1,
                "rel_err": _rel(flat, g),
                "cosine": _cosine(flat, g),
                "marker_weights_rel_err": _rel(marker_tbptt, marker),
                "last_k1_contributions_vs_tbptt": _rel(kept, flat),
            }
        )
    chunked = []
    for chunk in CHUNKS:
        flat, report = _gradient(model, partial(bptt, model, step_fn, sequence, chunk=chunk))
        chunked.append({"chunk": chunk, "chunks": report.chunks, "rel_err": _rel(flat, g)})
    return {
        "cell": CELLS[key][0],
        "parameters": g.numel(),
        "contributions_sum_rel_err": _rel(summed, g),
        "state_grad_norms": state_norms,
        "step_norms": contributions.step_norms.tolist(),
        # From the state one step before the loss back to the first state.
        "state_grad_ratio": state_norms[0] / state_norms[STEPS - 2],
        "truncation": truncation,
        "chunked_bptt": chunked,
    }


class _Run(NamedTuple):
    optimizer: str
    reduction: Reduction
    lr: float
    eps: float = ADAM_EPS


def _train(sequence: dict[str, Tensor], spec: _Run) -> tuple[list[Tensor], float]:
    """The flat parameters before and after each of `TRAIN_STEPS` steps of exact BPTT,
    and the final loss (mean over the units); NaN from where a run blows up."""
    model = make_model("lstm")
    params = list(model.parameters())
    opt: torch.optim.Optimizer = (
        torch.optim.SGD(params, lr=spec.lr)
        if spec.optimizer == "SGD"
        else torch.optim.Adam(params, lr=spec.lr, eps=spec.eps)
    )
    trajectory = [_flat_params(params)]
    for _ in range(TRAIN_STEPS):
        opt.zero_grad(set_to_none=True)
        try:
            bptt(model, step_fn, sequence, chunk=25, reduction=spec.reduction)
        except NonFiniteError:
            trajectory.append(torch.full_like(trajectory[0], float("nan")))
            continue
        opt.step()
        trajectory.append(_flat_params(params))
    with torch.no_grad():
        loss, _ = step_fn(model, sequence, None)
    return trajectory, float(loss.mean())


def _flat_params(params: list[nn.Parameter]) -> Tensor:
    return torch.cat([p.detach().flatten() for p in params])


def _mean_vs_sum(context: Context) -> dict[str, Any]:
    """Section 2: the two reductions, and what each optimizer makes of them."""
    sequence = adding_problem(BATCH, STEPS, every_step=True, seed=1)
    model = make_model("lstm")
    g_mean, report = _gradient(model, lambda: bptt(model, step_fn, sequence, chunk=25))
    g_sum, _ = _gradient(model, lambda: bptt(model, step_fn, sequence, chunk=25, reduction="sum"))
    count = float(report.count)
    runs = {
        "SGD, mean": _Run("SGD", "mean", SGD_LR),
        "SGD, sum, lr / N": _Run("SGD", "sum", SGD_LR / count),
        "SGD, sum, same lr": _Run("SGD", "sum", SGD_LR),
        "Adam, mean": _Run("Adam", "mean", ADAM_LR),
        "Adam, sum, same lr": _Run("Adam", "sum", ADAM_LR),
        "Adam, sum, same lr, eps × N": _Run("Adam", "sum", ADAM_LR, ADAM_EPS * count),
    }
    results = {
        name: _train(sequence, spec) for name, spec in context.track(list(runs.items()), "training")
    }
    pairs = []
    for name, reference in (
        ("SGD, sum, lr / N", "SGD, mean"),
        ("SGD, sum, same lr", "SGD, mean"),
        ("Adam, sum, same lr", "Adam, mean"),
        ("Adam, sum, same lr, eps × N", "Adam, mean"),
    ):
        (ours, loss), (theirs, reference_loss) = results[name], results[reference]
        pairs.append(
            {
                "run": name,
                "reference": reference,
                "lr": runs[name].lr,
                "eps": runs[name].eps,
                "reference_lr": runs[reference].lr,
                # After each step: how far apart the runs are, relative to how far the
                # reference moved from the initial parameters.
                "param_rel_diff": [
                    float((a - b).norm() / (b - theirs[0]).norm())
                    for a, b in zip(ours[1:], theirs[1:], strict=True)
                ],
                "final_loss": loss,
                "reference_final_loss": reference_loss,
            }
        )
    return {
        "count": count,
        "initial_loss": report.loss,
        "norm_ratio": float(g_sum.norm() / g_mean.norm()),
        "cosine": _cosine(g_sum, g_mean),
        "sum_over_count_rel_err": _rel(g_sum / count, g_mean),
        "training_steps": TRAIN_STEPS,
        "training": pairs,
    }


def run(context: Context) -> Answer:
    with one_thread():
        sequence = adding_problem(BATCH, STEPS, every_step=False, seed=0)
        cells = {key: _cell_study(key, sequence) for key in context.track(list(CELLS), "cells")}
        rescaling = _mean_vs_sum(context)
    figures = [
        _contributions_figure(cells, context.out_dir / "bptt_time_contributions.png"),
        _truncation_figure(cells, context.out_dir / "bptt_truncation.png"),
        _rescaling_figure(rescaling, context.out_dir / "bptt_mean_vs_sum.png"),
    ]
    return Answer(
        _summary(cells, rescaling),
        _tables(cells, rescaling),
        figures,
        {
            "task": {
                "problem": "adding",
                "batch": BATCH,
                "steps": STEPS,
                "hidden": HIDDEN,
                "dtype": "float64",
                "forget_bias": FORGET_BIAS,
            },
            "cells": cells,
            "mean_vs_sum": rescaling,
        },
    )


def _summary(cells: dict[str, dict[str, Any]], rescaling: dict[str, Any]) -> str:
    worst_sum = max(c["contributions_sum_rel_err"] for c in cells.values())
    worst_chunked = max(r["rel_err"] for c in cells.values() for r in c["chunked_bptt"])
    kept_vs_tbptt = max(
        r["last_k1_contributions_vs_tbptt"] for c in cells.values() for r in c["truncation"]
    )
    by_k1 = {key: {r["k1"]: r for r in c["truncation"]} for key, c in cells.items()}
    missed = max(
        abs(r["marker_weights_rel_err"] - 1)
        for c in cells.values()
        for r in c["truncation"]
        if r["k1"] <= STEPS // 2
    )
    sgd, wrong, adam, adam_eps = rescaling["training"]
    count = int(rescaling["count"])
    ratio = {key: sci(c["state_grad_ratio"]) for key, c in cells.items()}
    open_half = by_k1["lstm_open"][STEPS // 2]
    return f"""\
**Answer.** Because the weights are *shared*. A recurrent cell applies the same `W`
at every step, so the loss depends on `W` through its {STEPS} uses `W_1 … W_T`, and
the chain rule adds their partial derivatives: `∂L/∂W = Σ_t ∂L/∂W_t`. Each term
`c_t = ∂L/∂W_t` is one way the weights moved the loss; the sum is the derivative,
not a convention, and averaging the terms over time would be the gradient of
`L / T`, a loss whose scale depends on the sequence length. Measured on the adding
problem ({BATCH} sequences of {STEPS} steps, loss at the last step, float64): the
{STEPS} terms from `bg.time_contributions` add up to the gradient autograd gives on
the whole sequence within **{sci(worst_sum)}** for all four cells.

Averaging belongs to the *loss*, and is a division of that sum by `N`, the units
of the whole batch. With a target at every step (`N` = {BATCH} × {STEPS} =
{count}), `reduction="mean"` and `"sum"` give gradients with cosine
{rescaling["cosine"]:.15f} and norm ratio {rescaling["norm_ratio"]:.9f}: a pure
rescaling, which acts through the learning rate only. SGD on the sum with `lr / N`
lands where SGD on the mean with `lr` does: after {TRAIN_STEPS} steps they differ
by {sci(sgd["param_rel_diff"][-1])} of the distance travelled. With the *same* lr
the first step is {count} times as long, and the run blows up (loss
{wrong["final_loss"]:.3g} vs {wrong["reference_final_loss"]:.3g}). Adam divides
each step by the gradient's own running scale, so the same lr gives nearly the same
run ({sci(adam["param_rel_diff"][-1])} apart); the remainder is `eps`, which does
not scale: Adam on the sum with `eps × N` is the mean's run to
{sci(adam_eps["param_rel_diff"][-1])}.

How much each term holds depends on the cell. Between the state one step before the
loss and the first state, the gradient reaching the state is multiplied by
{ratio["rnn"]} in the tanh RNN, {ratio["gru"]} in the GRU and {ratio["lstm"]} in the
LSTM: at PyTorch's default initialisation the gates sit near sigmoid(0) = 0.5, so at
first the gated cells forget, and their gradients vanish, as fast as the plain one.
With its forget gate opened (bias {FORGET_BIAS:g}, sigmoid ≈ 0.95) the LSTM carries
the gradient across the whole sequence: {ratio["lstm_open"]}.

Truncated BPTT drops terms of the sum. With the loss at the last step,
`bg.tbptt(k1=k1)` is exactly the sum of the last `k1` terms (within
{sci(kept_vs_tbptt)}). Both markers lie in the first half, so for every `k1` up to
{STEPS // 2} the gradient of the weights that read the marker channel is exactly
zero (relative error 1 within {sci(missed)}): the truncated gradient cannot see the
dependency the task is about. At `k1 = 1` it is {sci(by_k1["rnn"][1]["rel_err"])}
off for the RNN and {sci(by_k1["lstm_open"][1]["rel_err"])} for the open LSTM,
which at `k1 = {STEPS // 2}` is still {sci(open_half["rel_err"])} off (cosine
{open_half["cosine"]:.2f}). For the other cells truncation looks cheap
({sci(by_k1["rnn"][20]["rel_err"])} at `k1 = 20` for the RNN) only because the exact
gradient has already lost those terms. `bg.bptt` keeps every term while holding one
chunk's graph at a time: with chunks of {", ".join(str(c) for c in CHUNKS)} steps it
is at most {sci(worst_chunked)} from plain BPTT.

```python
def step_fn(model, chunk, state):  # chunk: time slices of every [batch, time, ...] tensor
    prediction, state = model(chunk["x"], state)
    loss = bg.Loss.from_values((prediction - chunk["target"]) ** 2, chunk["mask"])
    return loss, state

model.zero_grad(set_to_none=True)
report = bg.bptt(model, step_fn, sequence, chunk=10)   # exact gradient, bounded memory
terms = bg.time_contributions(model, step_fn, sequence)  # the terms of the sum
```"""


def _tables(cells: dict[str, dict[str, Any]], rescaling: dict[str, Any]) -> list[Table]:
    keys = list(cells)
    labels = [cells[k]["cell"] for k in keys]
    contributions = Table(
        f"Per-step terms vs the whole-sequence gradient (adding problem, {BATCH} × "
        f"{STEPS} steps, float64)",
        ["cell", "parameters", "‖Σ_t c_t − g‖ / ‖g‖", f"‖∂L/∂h_0‖ / ‖∂L/∂h_{STEPS - 2}‖"],
        [
            [
                cells[k]["cell"],
                str(cells[k]["parameters"]),
                sci(cells[k]["contributions_sum_rel_err"]),
                sci(cells[k]["state_grad_ratio"]),
            ]
            for k in keys
        ],
    )
    gradients = Table(
        f"reduction='sum' vs 'mean', a target at every step (LSTM, N = {int(rescaling['count'])})",
        ["measure", "value"],
        [
            ["cosine(g_sum, g_mean)", f"{rescaling['cosine']:.15f}"],
            ["‖g_sum‖ / ‖g_mean‖", f"{rescaling['norm_ratio']:.9f}"],
            ["‖g_sum / N − g_mean‖ / ‖g_mean‖", sci(rescaling["sum_over_count_rel_err"])],
        ],
    )
    training = Table(
        f"{TRAIN_STEPS} optimizer steps on exact BPTT gradients: how far apart the runs "
        f"land, ‖θ − θ_ref‖ / ‖θ_ref − θ_0‖",
        ["run", "lr", "reference run", "lr", "apart", "final loss", "reference's"],
        [
            [
                r["run"],
                f"{r['lr']:.3g}",
                r["reference"],
                f"{r['reference_lr']:.3g}",
                sci(r["param_rel_diff"][-1]),
                f"{r['final_loss']:.3g}",
                f"{r['reference_final_loss']:.3g}",
            ]
            for r in rescaling["training"]
        ],
    )
    truncation = Table(
        "bg.tbptt(k1) vs the exact gradient: relative error (cosine)",
        ["k1", *labels],
        [
            [
                str(k1),
                *(
                    f"{sci(row['rel_err'])} ({row['cosine']:.3f})"
                    for k in keys
                    for row in cells[k]["truncation"]
                    if row["k1"] == k1
                ),
            ]
            for k1 in K1S
        ],
    )
    chunked = Table(
        "bg.bptt in chunks vs plain BPTT: relative error",
        ["chunk", *labels],
        [
            [
                str(chunk),
                *(
                    sci(row["rel_err"])
                    for k in keys
                    for row in cells[k]["chunked_bptt"]
                    if row["chunk"] == chunk
                ),
            ]
            for chunk in CHUNKS
        ],
    )
    return [contributions, gradients, training, truncation, chunked]


def _positive(values: list[float]) -> list[float]:
    """Zeros have no place on a log scale."""
    return [v if v > 0 else float("nan") for v in values]


def _contributions_figure(cells: dict[str, dict[str, Any]], path: Path) -> Path:
    figure = new_figure(10.0, 4.0)
    state_axes, step_axes = figure.subplots(1, 2)
    steps = list(range(STEPS))
    for cell in cells.values():
        state_axes.plot(steps, _positive(cell["state_grad_norms"]), label=cell["cell"])
        step_axes.plot(steps, _positive(cell["step_norms"]), label=cell["cell"])
    state_axes.set_ylabel("‖∂L/∂h_t‖ (h_t: state after step t)")
    state_axes.set_title("Gradient reaching the state")
    step_axes.set_ylabel("‖c_t‖, step t's term of ∂L/∂W")
    step_axes.set_title("Each step's contribution")
    for axes in (state_axes, step_axes):
        axes.set_yscale("log")
        axes.set_xlabel("time step t (loss at the last step)")
        axes.axvline(STEPS // 2, color="grey", linestyle=":", linewidth=1)
    state_axes.plot([], [], color="grey", linestyle=":", label="markers lie before this")
    state_axes.legend(fontsize="small")
    return save_figure(figure, path)


def _truncation_figure(cells: dict[str, dict[str, Any]], path: Path) -> Path:
    figure = new_figure()
    axes = figure.subplots()
    for cell in cells.values():
        rows = cell["truncation"]
        (line,) = axes.plot(
            [r["k1"] for r in rows],
            _positive([r["rel_err"] for r in rows]),
            "o-",
            label=f"tbptt, {cell['cell']}",
        )
        chunked = cell["chunked_bptt"]
        axes.plot(
            [r["chunk"] for r in chunked],
            _positive([r["rel_err"] for r in chunked]),
            "x--",
            color=line.get_color(),
            alpha=0.6,
        )
    axes.plot([], [], "kx--", alpha=0.6, label="bg.bptt, chunk = x (exact)")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("k1 (tbptt window) or chunk (bptt), steps")
    axes.set_ylabel("‖g − g_BPTT‖ / ‖g_BPTT‖")
    axes.set_title(f"Truncated vs exact BPTT, T = {STEPS} (at k1 or chunk = T: 0)")
    axes.legend(fontsize="small")
    return save_figure(figure, path)


def _rescaling_figure(rescaling: dict[str, Any], path: Path) -> Path:
    figure = new_figure()
    axes = figure.subplots()
    steps = list(range(1, TRAIN_STEPS + 1))
    # A run that blew up leaves a gap.
    for row, style in zip(rescaling["training"], ("o-", "s-", "^-", "v--"), strict=True):
        axes.plot(
            steps,
            _positive(row["param_rel_diff"]),
            style,
            label=f"{row['run']}  vs  {row['reference']}",
        )
    axes.set_yscale("log")
    axes.set_xticks(steps)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("‖θ − θ_ref‖ / ‖θ_ref − θ_0‖")
    axes.set_title(f"reduction='sum' vs 'mean' (N = {int(rescaling['count'])})")
    axes.legend(fontsize="small")
    return save_figure(figure, path)


CHAPTER = Chapter(
    slug="bptt",
    title="Backpropagation through time: summed over steps",
    question="Why are BPTT gradients summed over time, not averaged?",
    run=run,
    setup=(
        "The adding problem generated in code (32 sequences of 100 steps) and four recurrent "
        "cells of 32 units in float64: a tanh RNN, a GRU, an LSTM, and an LSTM with its "
        "forget gate open."
    ),
)
