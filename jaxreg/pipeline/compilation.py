"""JAX compilation: the persistent cache, and counting compilations.

:func:`enable_cache` points JAX's persistent compilation cache at a folder
(default ``~/.cache/jaxreg/jax``; ``"off"`` disables it), so a second process reuses the code
the first compiled. :class:`CompileCounter` counts the XLA compilations (and
persistent-cache hits among them) made while it is active, through
:mod:`jax.monitoring`: numeric code dispatched op by op outside ``jit`` shows
up there as many small compilations. It also reports how many of
:mod:`jaxreg.pipeline.stages`'s stages were loaded from or written to disk meanwhile.
"""

from __future__ import annotations

import os
import threading

import jax

from jaxreg.pipeline import stages as _stages

__all__ = ["DEFAULT_CACHE", "cache_dir", "enable_cache", "CompileCounter"]

DEFAULT_CACHE = os.path.join("~", ".cache", "jaxreg", "jax")
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_OFF = ("off", "0", "false", "none", "")


def cache_dir(path: str | None = None) -> str | None:
  """The cache folder to use: ``path``, else the default; None when ``path`` is ``off``
  (or ``0``, ``false``, ``none``, empty)."""
  value = path if path is not None else DEFAULT_CACHE
  if value.strip().lower() in _OFF:
    return None
  return os.path.expanduser(value)


def enable_cache(path: str | None = None, *, min_compile_seconds: float = 0.0) -> str | None:
  """Turn on JAX's persistent compilation cache in :func:`cache_dir` (``path``).

  Compilations that take at least ``min_compile_seconds`` are stored. Returns the
  folder, or None when the cache is disabled. A folder that cannot be created
  leaves the cache off (compilation still works, only slower), never an error.
  """
  folder = cache_dir(path)
  if folder is None:
    return None
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError:
    return None
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return folder


class CompileCounter:
  """Counts XLA compilations while active (``with CompileCounter() as c: ...``).

  Attributes:
    compilations: compilation requests (each new function/shape/dtype
      combination: a persistent-cache hit counts here too, it is cheap).
    cache_hits: those served from the persistent cache.
    seconds: time spent in them (compiling or reading the cache).
    stages: :func:`jaxreg.pipeline.stages.status` counts (``loaded``, ``exported``,
      ``fallback``) added while active, summed over threads.
  """

  _lock = threading.Lock()
  _active: list["CompileCounter"] = []
  _registered = False

  def __init__(self):
    self.compilations = 0
    self.cache_hits = 0
    self.seconds = 0.0
    self.stages = {"loaded": 0, "exported": 0, "fallback": 0}
    self._stages0 = None

  @classmethod
  def _register(cls):
    if cls._registered:
      return

    def on_duration(event, duration, **kwargs):
      if event == _COMPILE_EVENT:
        for c in list(cls._active):
          c.compilations += 1
          c.seconds += float(duration)

    def on_event(event, **kwargs):
      if event == _HIT_EVENT:
        for c in list(cls._active):
          c.cache_hits += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    cls._registered = True

  def __enter__(self) -> "CompileCounter":
    with self._lock:
      self._register()
      self._active.append(self)
    self._stages0 = _stages.status()
    return self

  def __exit__(self, *exc) -> None:
    with self._lock:
      self._active.remove(self)
    now = _stages.status()
    self.stages = {k: now[k] - self._stages0[k] for k in self.stages}

  def as_dict(self) -> dict:
    """The counts as ``metrics.json`` writes them: ``programs_compiled`` (XLA compiled
    them here) and ``programs_loaded`` (read from the persistent cache) split
    ``xla_compilations``; ``stages_*`` count the exported stages."""
    return {"programs_compiled": self.compilations - self.cache_hits,
            "programs_loaded": self.cache_hits,
            "xla_compilations": self.compilations, "xla_cache_hits": self.cache_hits,
            "compile_seconds": round(self.seconds, 3),
            **{f"stages_{k}": v for k, v in self.stages.items()}}
