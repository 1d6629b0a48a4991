"""Results as a person reads them: tables in the terminal and Markdown, figures, JSON.

Figures use matplotlib's object-oriented API (`matplotlib.figure.Figure`), which
needs no display and changes no global backend. Every file is written atomically
(`write_atomic`): a run killed while writing leaves the previous file or the new
one, never a truncated one, and a symbolic link in the way is replaced, not
written through.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

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
        """A rich table whose cells wrap (fold) rather than end in "…": at 80 columns,
        in a file or a pipe, every label and number stays whole."""
        table = RichTable(title=self.title, title_justify="left")
        for index, column in enumerate(self.columns):
            table.add_column(column, justify="left" if index == 0 else "right", overflow="fold")
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
    """The figure as a PNG (its format from the suffix), written atomically."""
    with write_atomic(path) as file:
        figure.savefig(file, dpi=120, format=path.suffix.lstrip(".") or "png")
    return path


def write_json(data: Any, path: Path) -> Path:
    """JSON with non-finite floats written as strings, so any reader can load it."""
    return write_text(json.dumps(_finite(data), indent=2) + "\n", path)


def write_text(text: str, path: Path) -> Path:
    """UTF-8 text, written atomically."""
    with write_atomic(path) as file:
        file.write(text.encode())
    return path


@contextmanager
def write_atomic(path: Path) -> Iterator[IO[bytes]]:
    """A binary file to write ``path``'s new content into, put in place at the end.

    The content goes to a temporary file in the same folder (so the rename stays
    on one file system), is flushed and fsync'ed, then renamed over ``path``: the
    rename is atomic, so readers see the old file or the whole new one. On an
    error the temporary file is removed and ``path`` is untouched. The folder is
    fsync'ed too where the system allows, so the rename survives a crash.
    """
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
    )
    try:
        with os.fdopen(descriptor, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _sync_folder(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sync_folder(folder: Path) -> None:
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:  # not every system opens folders (Windows)
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _finite(data: Any) -> Any:
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    if isinstance(data, dict):
        return {str(key): _finite(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(value) for value in data]
    return data
