"""SIGTERM handled like Ctrl-C, so that an interrupted command leaves no partial output.

Outputs are written into temporary files and folders that are renamed into place only when
complete (:func:`jaxreg.io.atomic_dir`); their clean-up runs on any exception.
:func:`interruptible` makes SIGTERM (a scheduler's kill, a closed terminal session) raise
:class:`Interrupted`, a ``KeyboardInterrupt``, the way SIGINT raises ``KeyboardInterrupt``.

Python runs a signal handler between any two bytecodes, including inside a garbage-collector
callback or a ``__del__``, where an exception is printed as "Exception ignored" and dropped
(JAX registers such a callback; a SIGTERM was measured lost this way). So the handlers also
record the signal, and :func:`check` raises it again: the atomic writers call it just before
they rename their output into place, so a dropped signal still stops the commit. While
:func:`interruptible` runs, Python's report of such a dropped interrupt (a traceback on
stderr, ``sys.unraisablehook``) is silenced: it is not lost, only deferred.
"""

from __future__ import annotations

import contextlib
import sys

__all__ = ["Interrupted", "check", "interruptible"]

_pending: str | None = None  # the signal that arrived, until the next interruptible() body


class Interrupted(KeyboardInterrupt):
  """SIGTERM, raised like Ctrl-C so that every ``finally`` and atomic write cleans up."""


def check() -> None:
  """Raise the SIGINT/SIGTERM that arrived during :func:`interruptible`, if one did.

  Raises:
    Interrupted: a SIGTERM arrived (whether or not its first raise was dropped).
    KeyboardInterrupt: a SIGINT arrived.
  """
  if _pending == "SIGTERM":
    raise Interrupted("terminated (SIGTERM)")
  if _pending == "SIGINT":
    raise KeyboardInterrupt


@contextlib.contextmanager
def interruptible():
  """Turn SIGTERM into :class:`Interrupted` while the body runs (main thread only).

  SIGINT still raises ``KeyboardInterrupt``; both are recorded for :func:`check`.
  """
  import signal
  import threading
  global _pending
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def on_signal(signum, frame):
    global _pending
    _pending = signal.Signals(signum).name
    check()
  def on_unraisable(unraisable):
    if not (_pending and isinstance(unraisable.exc_value, KeyboardInterrupt)):
      hook(unraisable)  # anything else is reported as usual

  _pending = None
  hook = sys.unraisablehook
  sys.unraisablehook = on_unraisable
  previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    sys.unraisablehook = hook
