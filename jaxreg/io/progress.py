"""A terminal progress bar with the elapsed time and an ETA (rich), for long loops."""

from __future__ import annotations

__all__ = ["progress_bar"]


def progress_bar(label: str, total: int, *, enabled: bool = True, completed: int = 0,
                 info: bool = False, transient: bool = False):
  """``(progress, task)``: a ``rich.progress.Progress`` (use it as a context manager; off
  when not ``enabled``) and its one task, ``total`` units, ``completed`` done already.

  Columns: ``label``, the bar, done/total, with ``info`` a free text (``update(task,
  info=...)``), the elapsed time, "ETA" and the time remaining. ``transient``: the bar is
  erased when it stops.
  """
  from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
  )
  columns = [TextColumn(label), BarColumn(), MofNCompleteColumn()]
  if info:
    columns.append(TextColumn("{task.fields[info]}"))
  columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
  progress = Progress(*columns, transient=transient, disable=not enabled)
  task = progress.add_task(label, total=total, completed=completed,
                           **({"info": ""} if info else {}))
  return progress, task
