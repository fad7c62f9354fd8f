"""Progress a person can follow anywhere: rich bars in a terminal, timestamped lines always.

Bars are transient and drawn by the main process only; when stdout is not a terminal
(a cluster's log file) rich draws none, and the timestamped lines are the record.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

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
                    disable=not enabled, transient=transient,
                    # rich's default 10 Hz redraw thread took up to ~0.3 ms of a small
                    # model's step at a terminal (benchmarks/host_overhead.py)
                    refresh_per_second=2)


def log_line(console: Console, text: str) -> None:
    """Print `text` as one line, prefixed by the local date and time."""
    console.print(f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S} {text}", highlight=False,
                  markup=False, soft_wrap=True)


def duration(seconds: float) -> str:
    """Seconds as h:mm:ss (days spelled out past 24 h)."""
    return str(datetime.timedelta(seconds=round(max(seconds, 0))))


@dataclass(frozen=True)
class Position:
    """Where a run stands: epoch `epoch` (1-based) of `epochs` in generation m of 0..M."""

    generation: int
    last_generation: int
    epoch: int
    epochs: int

    def label(self) -> str:
        """"gen m/M epoch k/N", as bars and log lines show it."""
        return (f"gen {self.generation}/{self.last_generation} "
                f"epoch {self.epoch}/{self.epochs}")

    def eta(self, seconds_per_epoch: float) -> str:
        """Time left in this generation and in the whole run, once epoch `epoch` is done."""
        generation, run = eta_seconds(seconds_per_epoch, self.epochs, self.epoch,
                                      self.last_generation - self.generation)
        return f"ETA gen {duration(generation)}, run {duration(run)}"


def mean_epoch_seconds(history: list[dict]) -> float | None:
    """The mean time of the epochs in metrics rows `history`, the ETA's pace; None if empty."""
    return sum(row["seconds"] for row in history) / len(history) if history else None


def eta_seconds(seconds_per_epoch: float | None, epochs: int, done: int,
                later_generations: int) -> tuple[float | None, float | None]:
    """(this generation's, the whole run's) seconds left; None before any epoch is measured.

    Training passes only: evaluation, checkpoints, cache builds and analysis come on top.
    """
    if seconds_per_epoch is None:
        return None, None
    left = seconds_per_epoch * (epochs - done)
    return left, left + seconds_per_epoch * epochs * later_generations
