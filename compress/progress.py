"""Progress bars for long work: rich on a terminal, silent when output is not a terminal."""
from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], description: str = "", total: int | None = None) -> Iterable[T]:
    if not sys.stderr.isatty() or os.environ.get("COMPRESS_NO_PROGRESS"):
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        yield from bar.track(items, total=total, description=description)
