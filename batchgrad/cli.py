"""The ``batchgrad`` command line: ``tour``, ``check``, ``compare``, ``advise``, ``critical``."""

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
from typing import TYPE_CHECKING, Any

# Only what --help needs is imported here; torch, rich and the engines load with the
# command that uses them, so `batchgrad --help` does not wait for them.
if TYPE_CHECKING:
    from rich.console import Console

    from ._check import CheckReport
    from ._fit import BatchSize
    from ._problem import OnProgress, Problem

DEFAULT_LRS = "0.01,0.03,0.1,0.3,1,3"
"""`batchgrad._problem.DEFAULT_LR_GRID`, spelled out so --help needs no import."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) is None:
        parser.print_help()
        return 0
    from rich.console import Console

    from ._errors import BatchError
    from ._threads import torch_threads

    console = Console()
    try:
        with torch_threads(_threads(args)):
            result: int = args.command(args, console)
    except BatchError as error:
        if args.traceback:
            raise
        _print_error(error)
        return 2
    return result


def _print_error(error: BaseException) -> None:
    """One line on stderr: the error's type and message, no markup, no wrapping."""
    from rich.console import Console

    message = " ".join(str(error).split())
    Console(stderr=True).print(
        f"{type(error).__name__}: {message}", markup=False, highlight=False, soft_wrap=True
    )


def _threads(args: argparse.Namespace) -> int | None:
    """``--threads``, or one thread for the embedded problems and the tour (tiny models);
    a factory's model gets its default in the command, once it is built."""
    if args.threads is not None:
        return int(args.threads)
    return 1 if getattr(args, "factory", None) is None else None


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"int ≥ {low}"
    return parse


def _number(*, positive: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            kind = "positive" if positive else "non-negative"
            raise argparse.ArgumentTypeError(f"must be a finite {kind} number, got {text}")
        return value

    parse.__name__ = "positive number" if positive else "non-negative number"
    return parse


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=_at_least(1),
        help="torch's intra-op threads (default: 1 for the embedded data and models under "
        "1M parameters, torch's default above: small models only lose time to threads)",
    )
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="show the Python traceback of a batchgrad error instead of its one-line message",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchgrad", description="Exact gradients however a batch is split."
    )
    parser.add_argument("--version", action="version", version=f"batchgrad {_version()}")
    verbs = parser.add_subparsers(metavar="COMMAND")

    tour = verbs.add_parser("tour", help="answer the batch questions on embedded data")
    tour.add_argument(
        "--out",
        type=Path,
        default=Path("batchgrad-tour"),
        help="report folder (default: %(default)s)",
    )
    tour.add_argument("--chapter", action="append", help="run only this chapter (repeatable)")
    _common(tour)
    tour.set_defaults(command=_tour)

    chk = verbs.add_parser(
        "check",
        help="prove micro-batching gives the whole-batch gradient on your model",
        description="FACTORY is a function with no arguments returning (model, loss_fn, batch) "
        "or (model, loss_fn, batch, micro_batch_size); MODULE is an importable module or a "
        ".py file.",
    )
    chk.add_argument("factory", metavar="MODULE:FACTORY")
    chk.add_argument("--micro-batch-size", type=_at_least(1), help="overrides the factory's")
    chk.add_argument("--reduction", choices=["mean", "sum"], default="mean")
    chk.add_argument(
        "--tolerance",
        type=_number(positive=False),
        help="the largest relative error called equivalent (default: the rounding of the "
        "model's dtype)",
    )
    chk.add_argument(
        "--nproc",
        type=_at_least(1),
        default=1,
        help="split the batch over N local gloo processes (DistributedDataParallel) and "
        "compare with one process on the whole batch",
    )
    chk.add_argument(
        "--fsdp",
        action="store_true",
        help="with --nproc: shard the model with FSDP2 (fully_shard on every child module "
        "with parameters, then the root) instead of DistributedDataParallel",
    )
    _common(chk)
    chk.set_defaults(command=_check)

    lrs = DEFAULT_LRS
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
    cmp.add_argument(
        "--epochs", type=_at_least(1), default=10, help="per regime (default: %(default)s)"
    )
    cmp.add_argument("--lrs", default=lrs, help="the learning rates swept (default: %(default)s)")
    cmp.add_argument(
        "--momentum", type=_number(positive=False), default=0.0, help="SGD momentum (default: 0)"
    )
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
    _common(cmp)
    cmp.set_defaults(command=_compare)

    adv = verbs.add_parser(
        "advise",
        help="measure the gradient noise scale and recommend a batch size",
        description="Run SGD briefly, measure the gradient noise scale B_simple from the "
        "micro-batch and batch gradients of each step (McCandlish et al. 2018), and "
        f"recommend a batch size and learning rate with the reasons. {_FACTORY_HELP}",
    )
    adv.add_argument("factory", metavar="MODULE:FACTORY", nargs="?", help=_FACTORY_DEFAULT)
    adv.add_argument("--batch-size", type=_at_least(2), default=64, help="measure at (default: 64)")
    adv.add_argument(
        "--micro-batches", type=_at_least(2), default=4, help="per batch, at least 2 (default: 4)"
    )
    adv.add_argument(
        "--steps", type=_at_least(1), default=200, help="SGD steps (default: %(default)s)"
    )
    adv.add_argument(
        "--lr", type=_number(positive=True), help="SGD's lr (default: the best of --lrs)"
    )
    adv.add_argument("--lrs", default=lrs, help="the learning rates swept (default: %(default)s)")
    adv.add_argument("--out", type=Path, help="write advise.json into this folder")
    _common(adv)
    adv.set_defaults(command=_advise)

    crit = verbs.add_parser(
        "critical",
        help="measure the critical batch size directly, by branching short runs",
        description="Train briefly at a small batch; from each checkpoint, branch runs at "
        "each batch size with the same budget of samples (each at the best of --lrs), and "
        "report the largest batch size whose loss stays within 10%% of the lowest (Merrill "
        "et al. 2025), next to the gradient noise scale B_simple measured there, with a "
        f"plot and a batch-size warmup schedule. {_FACTORY_HELP}",
    )
    crit.add_argument("factory", metavar="MODULE:FACTORY", nargs="?", help=_FACTORY_DEFAULT)
    crit.add_argument(
        "--batch-sizes",
        default="4,8,16,32,64,128,256,512",
        help="comma-separated batch sizes to branch at (default: %(default)s)",
    )
    crit.add_argument(
        "--samples", type=_at_least(1), default=4096, help="samples per branch (default: 4096)"
    )
    crit.add_argument(
        "--checkpoints",
        default="0,100,400",
        help="steps of training (at --warm-batch-size) before each checkpoint "
        "(default: %(default)s)",
    )
    crit.add_argument(
        "--warm-batch-size", type=_at_least(1), default=16, help="(default: %(default)s)"
    )
    crit.add_argument(
        "--warm-lr", type=_number(positive=True), default=0.3, help="(default: %(default)s)"
    )
    crit.add_argument(
        "--lrs", default="0.1,0.3,1", help="lrs each branch tries (default: %(default)s)"
    )
    crit.add_argument(
        "--out",
        type=Path,
        default=Path("batchgrad-critical"),
        help="folder for critical.json, critical.png and critical.md (default: %(default)s)",
    )
    _common(crit)
    crit.set_defaults(command=_critical)

    from .integrations import _audit_cli  # light: transformers loads when the verb runs

    _common(_audit_cli.register(verbs))
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("batchgrad")
    except PackageNotFoundError:  # a source tree that is not installed
        return "0.0.0"


_FACTORY_HELP = (
    "FACTORY is a function with no arguments returning (model, loss_fn, data) or (model, "
    "loss_fn, data, eval_data): loss_fn(model, batch) -> bg.Loss (a mean over samples), data "
    "and eval_data tensors or tuples/dicts of tensors holding the whole training and held-out "
    "sets; MODULE is an importable module or a .py file."
)
_FACTORY_DEFAULT = "default: scikit-learn's digits with an MLP 64-64-10 (embedded)"


def _tour(args: argparse.Namespace, console: Console) -> int:
    from ._errors import ConfigError
    from ._tour import chapter_slugs, run_tour

    unknown = set(args.chapter or ()) - set(chapter_slugs())
    if unknown:
        raise ConfigError(
            f"Unknown chapter(s) {sorted(unknown)}; the chapters are {chapter_slugs()}."
        )
    run_tour(_out_dir(args.out), only=args.chapter, console=console, threads=_threads(args))
    return 0


def load_factory(spec: str) -> Callable[[], Any]:
    """``package.module:name`` or ``path/to/file.py:name`` → the named callable.

    The import leaves ``sys.path`` as it was, and puts the current folder (for a
    module) or the file's folder (for a file, whose siblings it may import) *after*
    the installed packages while it runs: a ``json.py`` or ``matplotlib.py`` lying
    there neither replaces the installed module nor runs later. A file is imported
    under a name of its own, so a factory file named ``json.py`` does not take the
    place of ``json`` in ``sys.modules`` either.
    """
    from ._errors import ConfigError

    module_name, _, attribute = spec.rpartition(":")
    if not module_name or not attribute:
        raise ConfigError(f"Expected MODULE:FACTORY (e.g. my_project.setup:make), got {spec!r}.")
    if module_name.endswith(".py"):
        path = Path(module_name).resolve()
        if not path.is_file():
            raise ConfigError(f"No such file: {module_name}.")
        unique = f"batchgrad_factory_{abs(hash(str(path))):x}_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(unique, path)
        if module_spec is None or module_spec.loader is None:
            raise ConfigError(f"Cannot import {module_name}.")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[unique] = module  # dataclasses and pickling look their module up
        try:
            with _importable_after_installed(str(path.parent)):
                module_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[unique]
            raise
    else:
        try:
            with _importable_after_installed(str(Path.cwd())):
                module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            raise ConfigError(
                f"Cannot import {module_name!r}: {error}. Run from the folder that holds it, "
                f"or give the path of its .py file."
            ) from error
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ConfigError(f"{module_name} has no callable named {attribute!r}.")
    return factory  # type: ignore[no-any-return]


@contextlib.contextmanager
def _importable_after_installed(folder: str) -> Iterator[None]:
    """``folder`` at the end of ``sys.path`` for the duration, then removed."""
    added = folder not in sys.path
    if added:
        sys.path.append(folder)
    try:
        yield
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


@dataclass(frozen=True)
class FactoryRef:
    """A picklable handle on ``MODULE:FACTORY``: processes load and call it themselves."""

    spec: str

    def __call__(self) -> Any:
        return load_factory(self.spec)()


def _made(spec: str, shape: str, lengths: tuple[int, ...]) -> tuple[Any, ...]:
    """Call the factory and check the shape of what it returns."""
    from torch import nn

    from ._errors import ConfigError

    made = load_factory(spec)()
    if not isinstance(made, tuple) or len(made) not in lengths:
        length = f" of length {len(made)}" if isinstance(made, tuple) else ""
        raise ConfigError(
            f"{spec} must return {shape}, got {type(made).__name__}{length}. Return a tuple "
            f"of those, in that order."
        )
    model, loss_fn = made[:2]
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"{spec} returned {type(model).__name__} as its 1st item; {shape} starts with "
            f"the model, a torch.nn.Module."
        )
    if not callable(loss_fn) or isinstance(loss_fn, nn.Module):
        raise ConfigError(
            f"{spec} returned {type(loss_fn).__name__} as its 2nd item; it must be "
            f"loss_fn(model, batch) -> bg.Loss (a function; wrap a criterion with "
            f"bg.Loss.from_criterion inside it)."
        )
    return made


def _checked_batch(spec: str, batch: Any, what: str, ordinal: str) -> Any:
    """``batch`` is a tensor or tuple/list/dict of tensors sharing dimension 0."""
    from ._errors import ConfigError
    from ._split import batch_length, is_structured

    if not is_structured(batch):
        raise ConfigError(
            f"{spec} returned {type(batch).__name__} as its {ordinal} item ({what}); give a "
            f"tensor or a tuple/list/dict of tensors with one row per sample."
        )
    batch_length(batch, f"the {what} of {spec}")  # a BatchShapeError names the leaves
    return batch


def _problem(spec: str | None) -> Problem:
    """The embedded digits problem, or the one ``MODULE:FACTORY`` builds."""
    from ._errors import ConfigError
    from ._problem import Problem, digits_problem

    if spec is None:
        return digits_problem()
    shape = "(model, loss_fn, data) or (model, loss_fn, data, eval_data)"
    made = _made(spec, shape, (3, 4))
    model, loss_fn, data = made[:3]
    eval_data = made[3] if len(made) == 4 else None
    if isinstance(eval_data, int):
        raise ConfigError(
            f"{spec} returned an int as its 4th item: `check` takes a micro-batch size there, "
            f"compare and advise take the held-out data (or nothing)."
        )
    _checked_batch(spec, data, "training data", "3rd")
    if eval_data is not None:
        _checked_batch(spec, eval_data, "held-out data", "4th")
    return Problem(model, loss_fn, data, eval_data, name=spec)


def _batch_sizes(text: str) -> list[BatchSize]:
    from ._errors import ConfigError

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
    from ._errors import ConfigError

    try:
        lrs = [float(item) for item in text.split(",")]
    except ValueError:
        lrs = []
    if not lrs or not all(0 < lr < math.inf for lr in lrs):
        raise ConfigError(
            f"--lrs takes comma-separated positive numbers (e.g. 0.01,0.1,1), got {text!r}."
        )
    return lrs


def _out_dir(path: Path, flag: str = "--out") -> Path:
    """The output folder, created; a symlink is refused rather than followed (files in
    it are written atomically, replacing a link rather than writing through it)."""
    from ._errors import ConfigError

    if path.is_symlink():
        raise ConfigError(
            f"{flag} {path} is a symbolic link; batchgrad does not write through links. "
            f"Give the real folder, or remove the link."
        )
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} exists and is not a folder; give another path.")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _progress(console: Console) -> Iterator[OnProgress]:
    """``on_progress`` over the training runs: a bar on a terminal, lines elsewhere."""
    from ._progress import progress_display

    with progress_display(console) as display:
        task = display.add_task("starting", total=None)

        def update(what: str, done: int, total: int) -> None:
            display.update(task, description=what, completed=done, total=total)

        yield update


def _model_threads(args: argparse.Namespace, model: Any) -> contextlib.AbstractContextManager[None]:
    """A factory's model: one thread when small, unless --threads says otherwise."""
    from ._threads import default_threads, torch_threads

    if args.threads is not None or args.factory is None:
        return contextlib.nullcontext()
    return torch_threads(default_threads(model))


def _compare(args: argparse.Namespace, console: Console) -> int:
    from rich.markdown import Markdown

    from ._compare import compare
    from ._report import write_json, write_text

    problem = _problem(args.factory)
    sizes, lrs = _batch_sizes(args.batch_sizes), _lrs(args.lrs)
    out = _out_dir(args.out)
    with _model_threads(args, problem.initial_model()), _progress(console) as on_progress:
        comparison = compare(
            problem,
            sizes,
            epochs=args.epochs,
            lr_grid=lrs,
            momentum=args.momentum,
            drop_last=not args.keep_last_batch,
            on_progress=on_progress,
        )
    console.print(comparison.table().to_rich())
    console.print(comparison.reach_table().to_rich())
    console.print(Markdown(comparison.findings()))
    written = [
        write_json(comparison.to_dict(), out / "compare.json"),
        comparison.figure(out / "compare.png"),
        write_text(comparison.markdown(), out / "compare.md"),
    ]
    console.print(f"Written: {', '.join(str(path) for path in written)}")
    return 0


def _advise(args: argparse.Namespace, console: Console) -> int:
    from rich.markdown import Markdown

    from ._advise import advise
    from ._report import write_json

    problem = _problem(args.factory)
    lrs = _lrs(args.lrs)
    out = None if args.out is None else _out_dir(args.out)
    with _model_threads(args, problem.initial_model()), _progress(console) as on_progress:
        advice = advise(
            problem,
            args.batch_size,
            args.micro_batches,
            steps=args.steps,
            lr=args.lr,
            lr_grid=lrs,
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
    if out is not None:
        path = write_json(advice.to_dict(), out / "advise.json")
        console.print(f"Written: {path}")
    return 0


def _ints(text: str, flag: str, low: int) -> list[int]:
    from ._errors import ConfigError

    items = [item.strip() for item in text.split(",")]
    if not items or not all(item.isdigit() and int(item) >= low for item in items):
        raise ConfigError(f"{flag} takes comma-separated ints ≥ {low}, got {text!r}.")
    return [int(item) for item in items]


def _critical(args: argparse.Namespace, console: Console) -> int:
    from rich.markdown import Markdown

    from ._branch import branch_critical_batch
    from ._report import write_json, write_text

    problem = _problem(args.factory)
    sizes = _ints(args.batch_sizes, "--batch-sizes", 1)
    stops = _ints(args.checkpoints, "--checkpoints", 0)
    lrs = _lrs(args.lrs)
    out = _out_dir(args.out)
    with _model_threads(args, problem.initial_model()), _progress(console) as on_progress:
        measured = branch_critical_batch(
            problem,
            sizes,
            samples=args.samples,
            checkpoints=stops,
            warm_batch_size=args.warm_batch_size,
            warm_lr=args.warm_lr,
            lr_grid=lrs,
            on_progress=on_progress,
        )
    console.print(measured.table().to_rich())
    console.print(Markdown(measured.text()))
    written = [
        write_json(measured.to_dict(), out / "critical.json"),
        measured.figure(out / "critical.png"),
        write_text(measured.markdown(), out / "critical.md"),
    ]
    console.print(f"Written: {', '.join(str(path) for path in written)}")
    return 0


def _check(args: argparse.Namespace, console: Console) -> int:
    from ._check import check, check_data_parallel
    from ._errors import ConfigError
    from ._split import batch_length

    shape = "(model, loss_fn, batch) or (model, loss_fn, batch, micro_batch_size)"
    made = _made(args.factory, shape, (3, 4))
    model, loss_fn, batch = made[:3]
    _checked_batch(args.factory, batch, "batch", "3rd")
    given = made[3] if len(made) == 4 else None
    if given is not None and (isinstance(given, bool) or not isinstance(given, int) or given < 1):
        raise ConfigError(
            f"{args.factory} returned {given!r} as its 4th item, the micro-batch size; give "
            f"an int ≥ 1 (or leave it out and pass --micro-batch-size)."
        )
    size = args.micro_batch_size or given
    if size is None:  # an uneven split by default: the case the naive recipe gets wrong
        size = max(1, math.ceil(batch_length(batch) / 3.5))
    with _model_threads(args, model):
        if args.nproc > 1:
            with console.status(f"comparing across {args.nproc} gloo processes"):
                report = check_data_parallel(
                    FactoryRef(args.factory),
                    args.nproc,
                    size,
                    reduction=args.reduction,
                    tolerance=args.tolerance,
                    fsdp=args.fsdp,
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
    from rich.table import Table

    from ._report import sci

    table = Table()
    for column in ("parameter", "batchgrad rel err", "naive rel err"):
        table.add_column(column, justify="left" if column == "parameter" else "right")
    for name, error in report.per_param.items():
        table.add_row(name, sci(error), sci(report.naive_per_param[name]))
    table.add_section()
    table.add_row("[bold]all parameters", sci(report.max_rel_err), sci(report.naive_rel_err))
    console.print(table)
    for finding in report.findings:
        console.print("finding: " + finding.message, markup=False)  # it names the module
    verdict = "[bold green]OK" if report.ok else "[bold red]NOT EQUIVALENT"
    recipe = (
        "micro-batch mean / micro-batches"
        if report.reduction == "mean"
        else ("micro-batch sum / micro-batches")
    )
    console.print(
        f"{verdict}[/]: max relative error {sci(report.max_rel_err)} "
        f"(tolerance {sci(report.tolerance)}); the naive recipe ({recipe}"
        f"{' per rank, averaged over ranks' if ranks else ''}) is off by "
        f"{sci(report.naive_rel_err)}."
    )


if __name__ == "__main__":
    raise SystemExit(main())
