"""``batchgrad audit MODULE:FACTORY``: the stock Trainer's step against the exact one.

Registered by `batchgrad.cli`; transformers is imported only when the verb runs.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import ConfigError

if TYPE_CHECKING:  # rich and the reports load when the verb runs: --help stays fast
    from rich.console import Console


def register(verbs: Any) -> argparse.ArgumentParser:
    """Add the ``audit`` verb to the CLI's sub-parsers; the CLI adds its common flags."""
    audit: argparse.ArgumentParser = verbs.add_parser(
        "audit",
        help="how far the Hugging Face Trainer's gradient is from the exact one on your setup",
        description="FACTORY is a function with no arguments returning a transformers.Trainer "
        "(model, TrainingArguments, data collator, dataset), not yet trained; MODULE is an "
        "importable module or a .py file. One optimizer step is run with the stock Trainer and "
        "one with batchgrad's, each on a copy of the model from the same weights.",
    )
    audit.add_argument("factory", metavar="MODULE:FACTORY")
    audit.add_argument("--json", type=Path, help="also write the figures to this file")
    audit.set_defaults(command=_audit)
    return audit


def _audit(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    from .._report import write_json
    from ..cli import load_factory

    try:
        import transformers

        from .transformers import audit
    except ImportError as error:
        raise ConfigError(
            f"batchgrad audit needs the transformers extra: pip install 'batchgrad[transformers]' "
            f"({error})."
        ) from error
    setup = load_factory(args.factory)()
    if not isinstance(setup, transformers.Trainer):
        raise ConfigError(
            f"{args.factory} must return a transformers.Trainer, got {type(setup).__name__}."
        )
    with console.status("one optimizer step with the stock Trainer and with the exact one"):
        report = audit(setup)
    table = Table(title=f"stock Trainer vs exact gradient, {type(setup.model).__name__}")
    for column in ("rel err", "cosine", "scale", "N(B)", "stock count", "micro-batch units"):
        table.add_column(column, justify="right")
    stock = "-" if report.stock_count is None else f"{report.stock_count:g}"
    table.add_row(
        f"{report.rel_err:.3g}",
        f"{report.cosine:.6f}",
        f"{report.scale:.4g}",
        f"{report.count:g}",
        stock,
        " ".join(f"{c:g}" for c in report.micro_batch_counts),
    )
    console.print(table)
    for reason in report.reasons or ("The stock Trainer's gradient is exact here.",):
        console.print(f"- {reason}")
    if args.json is not None:
        write_json(dataclasses.asdict(report), args.json)
    return 0
