"""The ``batchgrad`` command line: ``batchgrad tour``, ``batchgrad check MODULE:FACTORY``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from . import __version__
from ._check import CheckReport, check, check_data_parallel
from ._errors import BatchError, ConfigError
from ._report import sci
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
    return parser


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
        console.print(
            f"[yellow]finding[/yellow] [bold]{finding.module or 'model'}[/bold]: {finding.message}"
        )
    verdict = "[bold green]OK" if report.ok else "[bold red]NOT EQUIVALENT"
    console.print(
        f"{verdict}[/]: max relative error {sci(report.max_rel_err)} "
        f"(tolerance {sci(report.tolerance)}); the naive recipe (micro-batch mean / "
        f"micro-batches{' per rank, averaged over ranks' if ranks else ''}) is off by "
        f"{sci(report.naive_rel_err)}."
    )


if __name__ == "__main__":
    raise SystemExit(main())
