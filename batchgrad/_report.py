"""Results as a person reads them: tables in the terminal and Markdown, figures, JSON.

Figures use matplotlib's object-oriented API (`matplotlib.figure.Figure`), which
needs no display and changes no global backend.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table as RichTable

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class Table:
    """A titled table of already formatted cells."""

    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[str]]

    def to_rich(self) -> RichTable:
        table = RichTable(title=self.title, title_justify="left")
        for index, column in enumerate(self.columns):
            table.add_column(column, justify="left" if index == 0 else "right")
        for row in self.rows:
            table.add_row(*row)
        return table

    def to_markdown(self) -> str:
        lines = [
            f"**{self.title}**",
            "",
            "| " + " | ".join(self.columns) + " |",
            "|" + "|".join("---" for _ in self.columns) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def sci(value: float) -> str:
    """A relative error or tiny number, readably: ``3.1e-08``; ``nan``; ``0``."""
    if math.isnan(value):
        return "nan"
    if value == 0:
        return "0"
    return f"{value:.1e}"


def new_figure(width: float = 6.4, height: float = 4.0) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save_figure(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=120)
    return path


def write_json(data: Any, path: Path) -> Path:
    """JSON with non-finite floats written as strings, so any reader can load it."""
    path.write_text(json.dumps(_finite(data), indent=2) + "\n")
    return path


def _finite(data: Any) -> Any:
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    if isinstance(data, dict):
        return {str(key): _finite(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(value) for value in data]
    return data
