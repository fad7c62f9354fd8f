"""Progress bars for long work, drawn by the main process only."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bar(enabled: bool = True, console: Console | None = None,
                 transient: bool = True) -> Progress:
    """A rich bar: description, count, elapsed and remaining time, and an `info` field."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[info]}"), console=console,
                    disable=not enabled, transient=transient)
