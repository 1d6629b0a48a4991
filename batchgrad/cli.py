"""The ``batchgrad`` command line: ``tour``, ``check``, ``compare`` and ``advise``."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table
from torch import nn

from . import __version__
from ._advise import advise
from ._check import CheckReport, check, check_data_parallel
from ._compare import compare
from ._errors import BatchError, ConfigError
from ._fit import BatchSize
from ._problem import DEFAULT_LR_GRID, OnProgress, Problem, digits_problem
from ._report import sci, write_json
from ._split import batch_length


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    console = Console()
    try:
        result: int = args.command(args, console)
    except BatchError as error:
        console.print(f"[bold red]{type(error).__name__}:[/bold red] {error}")
        return 2
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchgrad", description="Exact gradients however a batch is split."
    )
    parser.add_argument("--version", action="version", version=f"batchgrad {__version__}")
    verbs = parser.add_subparsers(required=True, metavar="COMMAND")

    tour = verbs.add_parser("tour", help="answer the batch questions on embedded data")
    tour.add_argument(
        "--out",
        type=Path,
        default=Path("batchgrad-tour"),
        help="report folder (default: %(default)s)",
    )
    tour.add_argument("--chapter", action="append", help="run only this chapter (repeatable)")
    tour.set_defaults(command=_tour)

    chk = verbs.add_parser(
        "check",
        help="prove micro-batching gives the whole-batch gradient on your model",
        description="FACTORY is a function with no arguments returning (model, loss_fn, batch) "
        "or (model, loss_fn, batch, micro_batch_size); MODULE is an importable module or a "
        ".py file.",
    )
    chk.add_argument("factory", metavar="MODULE:FACTORY")
    chk.add_argument("--micro-batch-size", type=int, help="overrides the factory's")
    chk.add_argument("--reduction", choices=["mean", "sum"], default="mean")
    chk.add_argument("--tolerance", type=float, help="default: rounding of the model's dtype")
    chk.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="split the batch over N local gloo processes (DistributedDataParallel) and "
        "compare with one process on the whole batch",
    )
    chk.set_defaults(command=_check)

    lrs = ",".join(f"{lr:g}" for lr in DEFAULT_LR_GRID)
    cmp = verbs.add_parser(
        "compare",
        help="train with full-batch, stochastic and mini-batch SGD side by side",
        description="Train the same initial model with plain SGD at each batch size, each at "
        "the learning rate that does best in a short sweep, and plot the training loss "
        f"against epochs, steps, samples seen and wall time. {_FACTORY_HELP}",
    )
    cmp.add_argument("factory", metavar="MODULE:FACTORY", nargs="?", help=_FACTORY_DEFAULT)
    cmp.add_argument(
        "--batch-sizes",
        default="1,16,128,full",
        help="comma-separated batch sizes, 'full' for full-batch (default: %(default)s)",
    )
    cmp.add_argument("--epochs", type=int, default=10, help="per regime (default: %(default)s)")
    cmp.add_argument("--lrs", default=lrs, help="the learning rates swept (default: %(default)s)")
    cmp.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (default: 0)")
    cmp.add_argument(
        "--keep-last-batch",
        action="store_true",
        help="train on each epoch's short last batch too (default: skip it; the loss read "
        "right after a step on a few samples is lifted by it)",
    )
    cmp.add_argument(
        "--out",
        type=Path,
        default=Path("batchgrad-compare"),
        help="folder for compare.json, compare.png and compare.md (default: %(default)s)",
    )
    cmp.set_defaults(command=_compare)

    adv = verbs.add_parser(
        "advise",
        help="measure the gradient noise scale and recommend a batch size",
        description="Run SGD briefly, measure the gradient noise scale B_simple from the "
        "micro-batch and batch gradients of each step (McCandlish et al. 2018), and "
        f"recommend a batch size and learning rate with the reasons. {_FACTORY_HELP}",
    )
    adv.add_argument("factory", metavar="MODULE:FACTORY", nargs="?", help=_FACTORY_DEFAULT)
    adv.add_argument("--batch-size", type=int, default=64, help="measure at (default: 64)")
    adv.add_argument(
        "--micro-batches", type=int, default=4, help="per batch, at least 2 (default: 4)"
    )
    adv.add_argument("--steps", type=int, default=200, help="SGD steps (default: %(default)s)")
    adv.add_argument("--lr", type=float, help="SGD's lr (default: the best of --lrs)")
    adv.add_argument("--lrs", default=lrs, help="the learning rates swept (default: %(default)s)")
    adv.add_argument("--out", type=Path, help="write advise.json into this folder")
    adv.set_defaults(command=_advise)
    return parser


_FACTORY_HELP = (
    "FACTORY is a function with no arguments returning (model, loss_fn, data) or (model, "
    "loss_fn, data, eval_data): loss_fn(model, batch) -> bg.Loss (a mean over samples), data "
    "and eval_data tensors or tuples/dicts of tensors holding the whole training and held-out "
    "sets; MODULE is an importable module or a .py file."
)
_FACTORY_DEFAULT = "default: scikit-learn's digits with an MLP 64-64-10 (embedded)"


def _tour(args: argparse.Namespace, console: Console) -> int:
    from ._tour import chapter_slugs, run_tour

    unknown = set(args.chapter or ()) - set(chapter_slugs())
    if unknown:
        raise ConfigError(
            f"Unknown chapter(s) {sorted(unknown)}; the chapters are {chapter_slugs()}."
        )
    run_tour(args.out, only=args.chapter, console=console)
    return 0


def load_factory(spec: str) -> Callable[[], Any]:
    """``package.module:name`` or ``path/to/file.py:name`` → the named callable."""
    module_name, _, attribute = spec.rpartition(":")
    if not module_name or not attribute:
        raise ConfigError(f"Expected MODULE:FACTORY (e.g. my_project.setup:make), got {spec!r}.")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ConfigError(f"No such file: {path}.")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        if module_spec is None or module_spec.loader is None:
            raise ConfigError(f"Cannot import {path}.")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        module_spec.loader.exec_module(module)
    else:
        if "." not in sys.path:
            sys.path.insert(0, ".")  # like `python -m`: modules of the current folder
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            raise ConfigError(f"Cannot import {module_name!r}: {error}.") from error
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ConfigError(f"{module_name} has no callable named {attribute!r}.")
    return factory  # type: ignore[no-any-return]


@dataclass(frozen=True)
class FactoryRef:
    """A picklable handle on ``MODULE:FACTORY``: processes load and call it themselves."""

    spec: str

    def __call__(self) -> Any:
        return load_factory(self.spec)()


def _problem(spec: str | None) -> Problem:
    """The embedded digits problem, or the one ``MODULE:FACTORY`` builds."""
    if spec is None:
        return digits_problem()
    made = load_factory(spec)()
    if not isinstance(made, tuple) or len(made) not in (3, 4):
        length = f" of length {len(made)}" if isinstance(made, tuple) else ""
        raise ConfigError(
            f"{spec} must return (model, loss_fn, data) or (model, loss_fn, data, eval_data), "
            f"got {type(made).__name__}{length}."
        )
    model, loss_fn, data = made[:3]
    eval_data = made[3] if len(made) == 4 else None
    if isinstance(eval_data, int):
        raise ConfigError(
            f"{spec} returned an int as its 4th item: `check` takes a micro-batch size there, "
            f"compare and advise take the held-out data (or nothing)."
        )
    if not isinstance(model, nn.Module) or not callable(loss_fn):
        raise ConfigError(
            f"{spec} must return a torch.nn.Module and a loss_fn(model, batch) -> bg.Loss "
            f"first, got {type(model).__name__} and {type(loss_fn).__name__}."
        )
    return Problem(model, loss_fn, data, eval_data, name=spec)


def _batch_sizes(text: str) -> list[BatchSize]:
    sizes: list[BatchSize] = []
    for item in text.split(","):
        item = item.strip()
        if item == "full":
            sizes.append("full")
        elif item.isdigit() and int(item) > 0:
            sizes.append(int(item))
        else:
            raise ConfigError(
                f"--batch-sizes takes positive ints and 'full', comma-separated (e.g. "
                f"1,16,128,full), got {item!r} in {text!r}."
            )
    return sizes


def _lrs(text: str) -> list[float]:
    try:
        return [float(item) for item in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"--lrs takes comma-separated numbers (e.g. 0.01,0.1,1), got {text!r}."
        ) from None


@contextlib.contextmanager
def _progress(console: Console) -> Iterator[OnProgress]:
    """``on_progress`` drawing a rich progress bar over the training runs."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def update(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        yield update


def _compare(args: argparse.Namespace, console: Console) -> int:
    problem = _problem(args.factory)
    with _progress(console) as on_progress:
        comparison = compare(
            problem,
            _batch_sizes(args.batch_sizes),
            epochs=args.epochs,
            lr_grid=_lrs(args.lrs),
            momentum=args.momentum,
            drop_last=not args.keep_last_batch,
            on_progress=on_progress,
        )
    console.print(comparison.table().to_rich())
    console.print(comparison.reach_table().to_rich())
    console.print(Markdown(comparison.findings()))
    args.out.mkdir(parents=True, exist_ok=True)
    written = [
        write_json(comparison.to_dict(), args.out / "compare.json"),
        comparison.figure(args.out / "compare.png"),
        args.out / "compare.md",
    ]
    written[2].write_text(comparison.markdown())
    console.print(f"Written: {', '.join(str(path) for path in written)}")
    return 0


def _advise(args: argparse.Namespace, console: Console) -> int:
    problem = _problem(args.factory)
    with _progress(console) as on_progress:
        advice = advise(
            problem,
            args.batch_size,
            args.micro_batches,
            steps=args.steps,
            lr=args.lr,
            lr_grid=_lrs(args.lrs),
            on_progress=on_progress,
        )
    lo, hi = advice.b_range
    console.print(
        f"Gradient noise scale at batch size {advice.measured_batch_size}: "
        f"[bold]B_simple = {advice.b_simple:.1f} ± {advice.b_simple_std:.1f}[/bold] "
        f"(B from {lo:.0f} to {hi:.0f})"
    )
    for table in (advice.sweep_table(), advice.verification_table()):
        if table is not None:
            console.print(table.to_rich())
    if advice.batch_size is None:
        console.print(
            f"[bold yellow]Inconclusive — run more steps[/bold yellow] (about "
            f"{advice.steps_needed}: --steps {advice.steps_needed})"
            if advice.nearest_batch_size is not None
            else "[bold yellow]No recommendation[/bold yellow]: ‖G‖² is not above the noise"
        )
    else:
        lr = (
            "no lr checked trained"
            if advice.recommended_lr is None
            else (f"SGD lr {advice.recommended_lr:.3g}, checked")
        )
        console.print(f"Recommended batch size: [bold]{advice.batch_size}[/bold] ({lr})")
        console.print(advice.table().to_rich())
    console.print(Markdown(advice.text))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = write_json(advice.to_dict(), args.out / "advise.json")
        console.print(f"Written: {path}")
    return 0


def _check(args: argparse.Namespace, console: Console) -> int:
    made = load_factory(args.factory)()
    if not isinstance(made, tuple) or len(made) not in (3, 4):
        raise ConfigError(
            f"{args.factory} must return (model, loss_fn, batch) or (model, loss_fn, batch, "
            f"micro_batch_size), got {type(made).__name__}"
            f"{f' of length {len(made)}' if isinstance(made, tuple) else ''}."
        )
    model, loss_fn, batch = made[:3]
    size = args.micro_batch_size or (made[3] if len(made) == 4 else None)
    if size is None:  # an uneven split by default: the case the naive recipe gets wrong
        size = max(1, math.ceil(batch_length(batch) / 3.5))
    if args.nproc > 1:
        with console.status(f"comparing across {args.nproc} gloo processes"):
            report = check_data_parallel(
                FactoryRef(args.factory),
                args.nproc,
                size,
                reduction=args.reduction,
                tolerance=args.tolerance,
            )
    else:
        with console.status("comparing whole-batch, accumulated and naive gradients"):
            report = check(
                model, loss_fn, batch, size, reduction=args.reduction, tolerance=args.tolerance
            )
    _print_check(report, size, console)
    return 0 if report.ok else 1


def _print_check(report: CheckReport, size: int, console: Console) -> None:
    ranks = f" on {report.world_size} ranks" if report.world_size > 1 else ""
    console.print(
        f"Gradient vs one process on the whole batch: {report.micro_batches} micro-batches"
        f"{ranks} of ≤ {size} samples "
        f"(units per micro-batch: {', '.join(map(str, report.micro_batch_counts))}), "
        f"reduction={report.reduction!r}"
    )
    table = Table()
    for column in ("parameter", "batchgrad rel err", "naive rel err"):
        table.add_column(column, justify="left" if column == "parameter" else "right")
    for name, error in report.per_param.items():
        table.add_row(name, sci(error), sci(report.naive_per_param[name]))
    table.add_section()
    table.add_row("[bold]all parameters", sci(report.max_rel_err), sci(report.naive_rel_err))
    console.print(table)
    for finding in report.findings:
        console.print(f"[yellow]finding:[/yellow] {finding.message}")  # it names the module
    verdict = "[bold green]OK" if report.ok else "[bold red]NOT EQUIVALENT"
    console.print(
        f"{verdict}[/]: max relative error {sci(report.max_rel_err)} "
        f"(tolerance {sci(report.tolerance)}); the naive recipe (micro-batch mean / "
        f"micro-batches{' per rank, averaged over ranks' if ranks else ''}) is off by "
        f"{sci(report.naive_rel_err)}."
    )


if __name__ == "__main__":
    raise SystemExit(main())
