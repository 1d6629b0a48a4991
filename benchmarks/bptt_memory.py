"""The memory and time of `bg.bptt` against full backpropagation through time.

Run from the repository root::

    python benchmarks/bptt_memory.py

An LSTM (input 32, hidden 256) with a linear head regresses a target vector at every
step of T = 2000 time steps, batch 32; the loss is the mean squared error over the
steps of the whole batch. Its gradient is computed, side by side in one run:

- ``full BPTT``: plain PyTorch, the whole sequence through ``nn.LSTM`` at once with a
  graph, then ``(total / count).backward()``;
- ``bg.bptt``: ``bg.bptt(model, step_fn, (inputs, targets), chunk=c)`` for chunks of
  T/100, T/20 and T/5 steps. It runs the chunks once without a graph, keeping the
  state at each chunk boundary, then recomputes them last to first with a graph and
  backpropagates each, carrying the gradient of the state backwards.

``step_fn`` runs ``nn.LSTM(batch_first=True)`` over a whole chunk (the fused kernel)
from the state ``(h, c)``, so both sides do the same arithmetic, in different pieces.

Measured:

1. **Correctness first.** Each method runs once; bg.bptt's gradients must equal full
   BPTT's to a relative error of 1e-4 per parameter (float32 rounding accumulates
   over 2000 steps), or the run stops with exit status 1.
2. **Saved activations**, in that same run: `torch.autograd.graph.saved_tensors_hooks`
   sees every tensor autograd saves for backward. The pack hook counts each saved
   tensor's storage (once, however many tensors share it) until autograd frees it;
   the peak of the live bytes is the activation memory of the method. Storages of
   the parameters and of the input sequence are left out: they live anyway. bg.bptt
   also keeps, through its backward, the state ``(h, c)`` entering each chunk but the
   first (their storages measured) and each chunk's random-number state; the
   "+ states" column adds them, and the memory ratio uses that sum.
3. **Time**: after a warm-up round, interleaved rounds of every method (the order
   rotating), timed with `time.perf_counter` with garbage collection paused; the
   median per method, as a ratio to full BPTT's.

Targets, printed and never asserted: at chunk = T/20, saved-activation memory with the
boundary states at most 1/8 of full BPTT's, and time at most 1.6 × full BPTT's.

Options: ``--steps``, ``--hidden``, ``--batch``, ``--features``, ``--chunks 20,100,400``
(default T/100, T/20, T/5), ``--repeats N`` timed rounds, ``--warmup``, ``--threads N``
(``torch.set_num_threads``), ``--seed``, ``--out`` (the JSON file), and ``--quick``
(tiny sizes, a few seconds: a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from common import (
    RESULTS,
    GradientMismatchError,
    add_run_options,
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

import batchgrad as bg

TARGET_DIVISOR = 20
"""The targets are for chunks of T / 20 steps."""

TARGET_MEMORY_RATIO = 1 / 8
"""bg.bptt's saved activations plus boundary states, at most 1/8 of full BPTT's."""

TARGET_TIME_RATIO = 1.6
"""bg.bptt may take at most 1.6 × the time of full BPTT."""

GRAD_TOLERANCE = 1e-4
"""Largest relative gradient error (per parameter, float32) against full BPTT."""

FULL_BPTT = "full BPTT"
DEFAULT_OUT = RESULTS / "bptt_memory.json"

Sequence = tuple[Tensor, Tensor]
State = tuple[Tensor, Tensor] | None


@dataclass(frozen=True)
class Sizes:
    """The sizes of one run."""

    steps: int
    hidden: int
    batch: int
    features: int
    repeats: int
    warmup: int


FULL = Sizes(steps=2000, hidden=256, batch=32, features=32, repeats=5, warmup=1)
QUICK = Sizes(steps=100, hidden=32, batch=8, features=4, repeats=2, warmup=1)


def default_chunks(steps: int) -> tuple[int, ...]:
    """T/100, T/20 and T/5 steps (at least 1)."""
    return tuple(sorted({max(1, steps // divisor) for divisor in (100, 20, 5)}))


# -- the model, the data and the two ways to its gradient -------------------------------


class Regressor(nn.Module):
    """An LSTM and a linear head that predicts a target vector at every time step."""

    def __init__(self, features: int, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, features)


def step_fn(model: nn.Module, chunk: Sequence, state: State) -> tuple[bg.Loss, State]:
    """One chunk ``[batch, steps, features]`` from ``state``: one unit per (sample, step)."""
    inputs, targets = chunk
    outputs, state = model.lstm(inputs, state)
    errors = (model.head(outputs) - targets).pow(2).mean(-1)  # [batch, steps]
    return bg.Loss.from_values(errors), state


def full_bptt(model: nn.Module, sequence: Sequence) -> None:
    model.zero_grad(set_to_none=True)
    loss, _ = step_fn(model, sequence, None)
    (loss.total / loss.count).backward()


def chunked_bptt(model: nn.Module, sequence: Sequence, chunk: int) -> None:
    model.zero_grad(set_to_none=True)
    bg.bptt(model, step_fn, sequence, chunk=chunk)


@dataclass(frozen=True)
class Method:
    name: str
    chunk: int | None  # None: the whole sequence
    run: Callable[[], None]


def methods(model: nn.Module, sequence: Sequence, chunks: Iterable[int]) -> list[Method]:
    def chunked(chunk: int) -> Callable[[], None]:
        return lambda: chunked_bptt(model, sequence, chunk)

    return [
        Method(FULL_BPTT, None, lambda: full_bptt(model, sequence)),
        *(Method("bg.bptt", chunk, chunked(chunk)) for chunk in chunks),
    ]


# -- saved activations ------------------------------------------------------------------


class _Saved:
    """What the pack hook returns: the saved tensor, released when autograd frees it."""

    __slots__ = ("key", "tensor", "tracker")

    def __init__(self, tensor: Tensor, tracker: SavedTensors, key: int) -> None:
        self.tensor, self.tracker, self.key = tensor, tracker, key

    def __del__(self) -> None:
        self.tracker.release(self.key)


class SavedTensors:
    """The live bytes of the storages autograd saves for backward, and their peak.

    A storage counts once while any saved tensor uses it; those of ``exclude`` (the
    parameters, the input data) do not count.
    """

    def __init__(self, exclude: Iterable[Tensor]) -> None:
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.users: dict[int, int] = {}  # storage data_ptr -> live saved tensors using it
        self.sizes: dict[int, int] = {}  # storage data_ptr -> its bytes
        self.live = self.peak = 0

    def pack(self, tensor: Tensor) -> Tensor | _Saved:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.excluded:
            return tensor
        if key not in self.users:
            self.users[key], self.sizes[key] = 0, storage.nbytes()
            self.live += self.sizes[key]
            self.peak = max(self.peak, self.live)
        self.users[key] += 1
        return _Saved(tensor, self, key)

    @staticmethod
    def unpack(saved: Tensor | _Saved) -> Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved

    def release(self, key: int) -> None:
        self.users[key] -= 1
        if self.users[key] == 0:
            del self.users[key]
            self.live -= self.sizes.pop(key)

    @contextmanager
    def watching(self) -> Iterator[SavedTensors]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield self


def storage_bytes(tensors: Iterable[Tensor]) -> int:
    """The bytes of the distinct storages behind ``tensors``."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def boundary_bytes(model: nn.Module, sequence: Sequence, chunk: int) -> int:
    """What bg.bptt keeps between its passes: the state ``(h, c)`` entering every chunk
    but the first, as its forward makes it, and the random-number state of every chunk.
    """
    inputs, targets = sequence
    with torch.no_grad():
        _, state = step_fn(model, (inputs[:, :chunk], targets[:, :chunk]), None)
    assert state is not None
    chunks = -(-inputs.shape[1] // chunk)
    return (chunks - 1) * storage_bytes(state) + chunks * storage_bytes([torch.get_rng_state()])


# -- checking and timing ----------------------------------------------------------------


def check(
    model: nn.Module, sequence: Sequence, todo: list[Method], steps: int
) -> list[dict[str, Any]]:
    """Run each method once under the hooks: its saved-activation peak and gradient error."""
    exclude = [*model.parameters(), *sequence]
    rows: list[dict[str, Any]] = []
    expected: dict[str, Tensor] = {}  # full BPTT's gradient, the first method's
    for method in todo:
        with SavedTensors(exclude).watching() as saved:
            method.run()
        if saved.live:
            raise RuntimeError(f"{method.name}: {saved.live} saved bytes were never freed.")
        grads = gradients(model)
        expected = expected or grads
        error = max_rel_err(grads, expected)
        chunk = method.chunk or steps
        chunks = -(-steps // chunk)
        boundary = boundary_bytes(model, sequence, chunk) if method.chunk else 0
        if not error <= GRAD_TOLERANCE:
            raise GradientMismatchError(
                f"bg.bptt with chunks of {chunk} steps: its gradient differs from full "
                f"BPTT's (max relative error {error:.3g} > {GRAD_TOLERANCE:g})."
            )
        rows.append(
            {
                "method": method.name,
                "chunk": chunk,
                "chunks": chunks,
                "saved_peak_bytes": saved.peak,
                "boundary_state_bytes": boundary,
                "total_bytes": saved.peak + boundary,
                "max_grad_rel_err": error,
            }
        )
    full = rows[0]["total_bytes"]
    for row in rows:
        row["memory_ratio"] = row["total_bytes"] / full
    return rows


# -- reporting --------------------------------------------------------------------------


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f}"


def _styled(value: float, target: float | None) -> str:
    if target is None:
        return f"{value:.3f}"
    style = "green" if value <= target else "bold red"
    return f"[{style}]{value:.3f}[/{style}]"


def results_table(rows: list[dict[str, Any]], target_chunk: int) -> Table:
    table = Table(
        title=f"bg.bptt / full BPTT (targets at chunk T/{TARGET_DIVISOR} = {target_chunk}: "
        f"memory ≤ 1/8, time ≤ {TARGET_TIME_RATIO})"
    )
    table.add_column("method", no_wrap=True)
    headers = (
        "chunk",
        "saved\npeak MB",  # the peak of the saved activations
        "+ states\nMB",  # plus the boundary states bg.bptt keeps
        "memory\nratio",
        "median\ntime s",
        "time\nratio",
        "grad\nrel err",  # the largest over the parameters
    )
    for header in headers:
        table.add_column(header, justify="right")
    for row in rows:
        targeted = row["method"] != FULL_BPTT and row["chunk"] == target_chunk
        table.add_row(
            row["method"],
            str(row["chunk"]),
            _mb(row["saved_peak_bytes"]),
            _mb(row["total_bytes"]),
            _styled(row["memory_ratio"], TARGET_MEMORY_RATIO if targeted else None),
            f"{row['time']['median_s']:.3f}",
            _styled(row["time_ratio"], TARGET_TIME_RATIO if targeted else None),
            f"{row['max_grad_rel_err']:.1e}",
        )
    return table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Saved-activation memory and time of bg.bptt against full BPTT."
    )
    parser.add_argument("--steps", type=int, help=f"time steps T (default: {FULL.steps})")
    parser.add_argument("--hidden", type=int, help=f"LSTM hidden size (default: {FULL.hidden})")
    parser.add_argument("--batch", type=int, help=f"sequences (default: {FULL.batch})")
    parser.add_argument("--features", type=int, help=f"input size (default: {FULL.features})")
    parser.add_argument(
        "--chunks",
        type=lambda text: tuple(int(c) for c in text.split(",")),
        help="bg.bptt chunk sizes, comma-separated (default: T/100,T/20,T/5)",
    )
    parser.add_argument("--repeats", type=int, help=f"timed rounds (default: {FULL.repeats})")
    parser.add_argument("--warmup", type=int, help=f"untimed rounds first (default: {FULL.warmup})")
    add_run_options(parser, DEFAULT_OUT, "tiny sizes and 2 rounds: a smoke test in seconds")
    args = parser.parse_args(argv)
    for name in ("steps", "hidden", "batch", "features", "repeats", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be at least 0")
    if args.chunks is not None and min(args.chunks) < 1:
        parser.error("--chunks must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    base = QUICK if args.quick else FULL
    given = {name: getattr(args, name) for name in Sizes.__dataclass_fields__}
    sizes = replace(base, **{name: value for name, value in given.items() if value is not None})
    chunks = args.chunks or default_chunks(sizes.steps)
    target_chunk = max(1, sizes.steps // TARGET_DIVISOR)
    use_threads(args.threads)
    env = environment(mkldnn=torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)
    console.print(
        describe(env),
        f"LSTM {sizes.features}-{sizes.hidden}, T = {sizes.steps} steps, batch {sizes.batch}; "
        f"bg.bptt chunks {', '.join(map(str, chunks))}; {sizes.repeats} timed rounds",
        sep="\n",
    )

    torch.manual_seed(args.seed)
    model = Regressor(sizes.features, sizes.hidden)
    shape = (sizes.batch, sizes.steps, sizes.features)
    sequence = (torch.randn(shape), torch.randn(shape))
    todo = methods(model, sequence, chunks)

    started = time.perf_counter()
    console.print("  gradients and saved activations ...")
    try:
        rows = check(model, sequence, todo, sizes.steps)
    except GradientMismatchError as error:
        console.print(f"[bold red]ABORTED:[/bold red] {error}")
        return 1
    console.print(f"  timing: {sizes.warmup} warm-up + {sizes.repeats} rounds ...")
    runs = [method.run for method in todo]
    interleaved(runs, sizes.warmup, warmup=0)  # warm-up rounds, timed as below and dropped
    timed = interleaved(runs, sizes.repeats, warmup=0)
    for row, samples in zip(rows, timed, strict=True):
        row["time"] = samples.summary("s")
        row["time_ratio"] = row["time"]["median_s"] / rows[0]["time"]["median_s"]
        row["time_ratio_min"] = row["time"]["min_s"] / rows[0]["time"]["min_s"]
        paired = zip(samples.seconds, timed[0].seconds, strict=True)
        row["time_ratio_paired_median"] = statistics.median(t / f for t, f in paired)
    elapsed = time.perf_counter() - started

    console.print(results_table(rows, target_chunk))
    targeted = [r for r in rows if r["method"] != FULL_BPTT and r["chunk"] == target_chunk]
    within = None
    if targeted:
        row = targeted[0]
        within = (
            row["memory_ratio"] <= TARGET_MEMORY_RATIO and row["time_ratio"] <= TARGET_TIME_RATIO
        )
        verdict = "within" if within else "[bold red]outside[/bold red]"
        console.print(
            f"chunk {target_chunk}: memory ratio {row['memory_ratio']:.3f}, time ratio "
            f"{row['time_ratio']:.3f} (of the minima {row['time_ratio_min']:.3f}, median of "
            f"the per-round ratios {row['time_ratio_paired_median']:.3f}): {verdict} the "
            f"targets; measured in {elapsed:.0f} s"
        )
    if args.quick:
        console.print("(--quick: a smoke test; its sizes are too small to judge anything)")

    results = {
        "benchmark": "bptt_memory",
        "environment": env,
        "settings": {
            "quick": args.quick,
            **sizes.__dict__,
            "chunks": list(chunks),
            "seed": args.seed,
            "grad_tolerance": GRAD_TOLERANCE,
            "target_chunk": target_chunk,
            "target_memory_ratio": TARGET_MEMORY_RATIO,
            "target_time_ratio": TARGET_TIME_RATIO,
        },
        "elapsed_s": elapsed,
        "load_average_after": load_average(),
        "within_targets": within,
        "rows": rows,
    }
    write_results(args.out, results)
    console.print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
