"""`batchgrad tour`: each question batchgrad answers, measured on embedded data.

The tour is a list of chapters. A chapter asks one question, runs a small
experiment and returns its answer, tables, figures and raw data; the runner shows
them in the terminal and writes a report folder (``report.md``, ``results.json``
and PNG figures). A new capability adds a chapter module and a line to `CHAPTERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.markdown import Markdown

from .. import __version__
from .._progress import ProgressLike, progress_display
from .._report import Table, write_json, write_text
from .._threads import torch_threads

T = TypeVar("T")


@dataclass
class Context:
    """What a chapter gets: where to write figures, and a way to show progress."""

    out_dir: Path
    progress: ProgressLike

    def track(self, items: Sequence[T], description: str) -> Iterator[T]:
        task = self.progress.add_task(description, total=len(items))
        for item in items:
            yield item
            self.progress.advance(task)
        self.progress.remove_task(task)


@dataclass
class Answer:
    """A chapter's result: Markdown prose, tables, figure paths and JSON-able data."""

    summary: str
    tables: list[Table] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Chapter:
    """A question, and the experiment that answers it.

    Attributes:
        setup: the data and the model the chapter measures on, in a sentence.
    """

    slug: str
    title: str
    question: str
    run: Callable[[Context], Answer]
    setup: str = ""


THREADS: list[int | None] = [1]
"""The threads the chapters run on (`run_tour`'s ``threads``; one by default)."""


def one_thread() -> AbstractContextManager[None]:
    """The chapters' thread count: one unless `run_tour` was given another
    (`batchgrad._threads`: the tour's models are too small to share)."""
    return torch_threads(THREADS[0])


def _chapters() -> list[Chapter]:
    from . import accumulation, batch_size, bptt, data_parallel, per_sample, precision, trainers

    return [
        per_sample.CHAPTER,
        accumulation.CHAPTER,
        precision.CHAPTER,
        data_parallel.CHAPTER,
        bptt.CHAPTER,
        batch_size.CHAPTER,
        trainers.CHAPTER,
    ]


def chapter_slugs() -> list[str]:
    return [chapter.slug for chapter in _chapters()]


def run_tour(
    out_dir: Path,
    only: Iterable[str] | None = None,
    console: Console | None = None,
    threads: int | None = 1,
) -> dict[str, Answer]:
    """Run the chapters (all, or those named in ``only``) and write the report folder.

    ``threads``: torch's intra-op threads for the chapters (None: torch's default).
    """
    console = console or Console()
    THREADS[0] = threads
    wanted = set(only) if only is not None else None
    chapters = [c for c in _chapters() if wanted is None or c.slug in wanted]
    out_dir.mkdir(parents=True, exist_ok=True)
    answers: dict[str, Answer] = {}
    with progress_display(console) as progress:
        context = Context(out_dir, progress)
        for number, chapter in enumerate(chapters, start=1):
            console.rule(f"[bold]{number}. {chapter.title}")
            console.print(f"[italic]{chapter.question}[/italic]\n")
            console.print(f"[bold]Data and model.[/bold] {chapter.setup}\n", highlight=False)
            answer = chapter.run(context)
            answers[chapter.slug] = answer
            for table in answer.tables:
                console.print(table.to_rich())
            console.print(Markdown(answer.summary))
            for figure in answer.figures:
                console.print(f"[dim]figure: {figure}[/dim]")
    _write_report(out_dir, chapters, answers)
    console.print(f"\nReport written to [bold]{out_dir / 'report.md'}[/bold]")
    return answers


def _write_report(out_dir: Path, chapters: list[Chapter], answers: dict[str, Answer]) -> None:
    parts = [
        f"# The batchgrad tour\n\nbatchgrad {__version__}. Every number below was "
        f"measured in this run, on embedded data.\n"
    ]
    for number, chapter in enumerate(chapters, start=1):
        answer = answers[chapter.slug]
        parts.append(f"## {number}. {chapter.title}\n\n*{chapter.question}*\n")
        parts.append(f"**Data and model.** {chapter.setup}\n")
        parts += [table.to_markdown() + "\n" for table in answer.tables]
        parts.append(answer.summary + "\n")
        parts += [f"![{figure.stem}]({figure.name})\n" for figure in answer.figures]
    write_text("\n".join(parts), out_dir / "report.md")
    write_json(
        {"version": __version__, "chapters": {slug: a.data for slug, a in answers.items()}},
        out_dir / "results.json",
    )
