"""The progress bar every long stage shows: what runs, the bar, done/total, the stage's own figures,
time elapsed and (for runs of known length) time left.
"""

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


def stage_bar(
    title: str,
    figures: str = "",
    *,
    console: Console | None = None,
    count: bool = True,
    eta: bool = True,
    transient: bool = False,
    disable: bool = False,
) -> Progress:
    """A rich Progress for one stage: `title` (markup; may use {task.description} and {task.fields[...]}),
    the bar, done/total (`count`), `figures` (a format of the task's fields, e.g. "loss {task.fields[loss]:.3f}"),
    elapsed and, with `eta`, remaining time."""
    columns = [TextColumn(title), BarColumn()]
    if count:
        columns.append(MofNCompleteColumn())
    if figures:
        columns.append(TextColumn(figures))
    columns.append(TimeElapsedColumn())
    if eta:
        columns.append(TimeRemainingColumn())
    return Progress(*columns, console=console, transient=transient, disable=disable)
