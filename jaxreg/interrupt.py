"""SIGTERM handled like Ctrl-C, so that an interrupted command leaves no partial output.

Outputs are written into temporary files and folders that are renamed into place only when
complete (:func:`jaxreg.io.atomic_dir`); their clean-up runs on any exception. SIGINT already
raises ``KeyboardInterrupt``; :func:`interruptible` makes SIGTERM (a scheduler's kill, a
closed terminal session) raise :class:`Interrupted`, a ``KeyboardInterrupt``, the same way.
"""

from __future__ import annotations

import contextlib

__all__ = ["Interrupted", "interruptible"]


class Interrupted(KeyboardInterrupt):
  """SIGTERM, raised like Ctrl-C so that every ``finally`` and atomic write cleans up."""


@contextlib.contextmanager
def interruptible():
  """Turn SIGTERM into :class:`Interrupted` while the body runs (main thread only)."""
  import signal
  import threading
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def on_term(signum, frame):
    raise Interrupted("terminated (SIGTERM)")
  previous = signal.signal(signal.SIGTERM, on_term)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
