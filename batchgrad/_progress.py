"""Progress of long work: a live bar in a terminal, plain lines anywhere else.

A rich progress bar redraws itself in place, which a log file or a pipe cannot
show: there it prints nothing for the whole run. `progress_display` gives the bar
on a terminal and, otherwise, `LineProgress`, which prints a line when a task
starts or changes what it does, and while it advances at most one every few
seconds, so a user reading a log sees the work advance.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from rich.console import Console


class ProgressLike(Protocol):
    """The part of `rich.progress.Progress` the CLI and the tour use."""

    @property
    def console(self) -> Console: ...

    def add_task(self, description: str, *, total: float | None = ...) -> Any: ...

    def update(self, task_id: Any, **fields: Any) -> None: ...

    def advance(self, task_id: Any, advance: float = ...) -> None: ...

    def remove_task(self, task_id: Any) -> None: ...


class LineProgress:
    """Progress as plain lines: ``what (done/total, seconds)``.

    Example:
        >>> from rich.console import Console
        >>> progress = LineProgress(Console(width=80, color_system=None), every=0)
        >>> task = progress.add_task("sweep", total=2)
        progress: sweep (0/2, 0 s)
        >>> progress.update(task, description="lr 0.1", completed=1)
        progress: lr 0.1 (1/2, 0 s)
        >>> progress.remove_task(task)
    """

    def __init__(self, console: Console, every: float = 5.0) -> None:
        self._console = console
        self.every = every
        self._tasks: dict[int, dict[str, Any]] = {}
        self._next = 0
        self._started = time.perf_counter()

    @property
    def console(self) -> Console:
        return self._console

    def add_task(self, description: str, *, total: float | None = None) -> int:
        task = self._next
        self._next += 1
        self._tasks[task] = {"description": description, "completed": 0, "total": total}
        self._print(task)
        return task

    def update(self, task_id: int, **fields: Any) -> None:
        state = self._tasks[task_id]
        changed = "description" in fields and fields["description"] != state["description"]
        state.update({k: v for k, v in fields.items() if k in state})
        if changed:  # a new stage of the work: always worth a line
            self._print(task_id)

    def advance(self, task_id: int, advance: float = 1) -> None:
        state = self._tasks[task_id]
        state["completed"] += advance
        done = state["total"] is not None and state["completed"] >= state["total"]
        if done or time.perf_counter() - state["printed"] >= self.every:
            self._print(task_id)

    def remove_task(self, task_id: int) -> None:
        self._tasks.pop(task_id, None)

    def _print(self, task_id: int) -> None:
        state = self._tasks[task_id]
        state["printed"] = time.perf_counter()
        total = state["total"]
        count = f"{state['completed']:.0f}/{total:.0f}, " if total is not None else ""
        seconds = time.perf_counter() - self._started
        self.console.print(
            f"progress: {state['description']} ({count}{seconds:.0f} s)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


@contextmanager
def progress_display(console: Console) -> Iterator[ProgressLike]:
    """A rich progress bar on a terminal, `LineProgress` elsewhere."""
    if console.is_terminal:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console, transient=True) as bar:
            yield bar
    else:
        yield LineProgress(console)
