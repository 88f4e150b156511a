"""jaxreg.io.progress: the bar's columns, rendered by rich into text."""

from rich.console import Console

from jaxreg.io.progress import progress_bar


def _render(progress) -> str:
  console = Console(record=True, width=120, color_system=None)
  console.print(progress.make_tasks_table(progress.tasks))
  return console.export_text()


def test_the_bar_shows_its_label_count_info_and_eta():
  progress, task = progress_bar("train", 10, completed=3, info=True)
  progress.update(task, advance=1, info="loss 0.5000")
  text = _render(progress)
  assert "train" in text and "4/10" in text and "loss 0.5000" in text and "ETA" in text
  assert not progress.disable and not progress.live.transient
  quiet, task = progress_bar("register", 2, enabled=False, transient=True)
  quiet.advance(task)
  assert quiet.disable and quiet.live.transient and "1/2" in _render(quiet)
  assert "loss" not in _render(quiet)  # no info column unless asked
