"""Progress bars for long work: rich on a terminal, silent when output is not a terminal."""
from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], description: str = "", total: int | None = None) -> Iterable[T]:
    if os.environ.get("COMPRESS_NO_PROGRESS"):
        yield from items
        return
    if not sys.stderr.isatty():
        yield from _logged(items, description, total)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        yield from bar.track(items, total=total, description=description)


def _logged(items: Iterable[T], description: str, total: int | None) -> Iterable[T]:
    """Without a terminal (CI logs, nohup): one line at every tenth of the work."""
    import time

    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    if not total or total < 20:
        yield from items
        return
    start, every = time.monotonic(), max(1, total // 10)
    for i, item in enumerate(items, 1):
        yield item
        if i % every == 0 or i == total:
            print(f"{description}: {i}/{total} ({time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)
