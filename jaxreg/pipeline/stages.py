"""The register pipeline's stage cache: jitted stages kept across processes as
serialized StableHLO (:mod:`jax.export`). Opt-in: off unless turned on.

JAX's persistent compilation cache skips XLA's compilation in a second process,
but not the Python tracing and the lowering to StableHLO that come before it: a
warm ``jaxreg register`` spends ~1.4 s of its few seconds of registration on them
(2 cores; the refinement level and the affine optimiser are most of it). A
:class:`Stage` is :func:`jax.jit` of a pipeline function; inside
``with enabled(folder):`` (the CLI turns it on beside JAX's persistent cache) it
also writes each traced and lowered version to ``folder`` the first time it meets
it, and a later process deserializes that file instead of tracing again. Outside
that block a stage is plain :func:`jax.jit`, and nothing is written: library
functions are never wrapped, and enabling JAX's own persistent cache does not turn
this on.

A file is keyed by everything that can change the program: the function's
module and name, a hash of jaxreg's own source files and of the file defining
the function, the jax and jaxlib versions, the backend and its devices,
``XLA_FLAGS``, the dtype flags, whether the C++ warp kernel is loaded, the static
arguments' values (the warp's ``implementation`` and ``threads`` among them) and
the other arguments' shapes, dtypes and tree structure. Anything not covered falls
back to the plain jitted function: a call inside another transformation (tracers),
arrays spread over several devices, an active mesh, and any failure to export,
write or read (a damaged file is written again).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import inspect
import os
import tempfile
import threading

import jax

__all__ = ["Stage", "enabled", "folder", "source_hash", "status"]

_SUBDIR = "jaxreg-exported"
_folder: contextvars.ContextVar[str | None] = contextvars.ContextVar("jaxreg_stages", default=None)
_lock = threading.Lock()
_calls: dict = {}  # key -> jitted Exported.call, per process
_status = {"loaded": 0, "exported": 0, "fallback": 0, "reason": None}


@contextlib.contextmanager
def enabled(folder: str | None):
  """Keep the stages called in this block (this thread and context) in ``folder``;
  ``None`` leaves them plain :func:`jax.jit`. Typically ``<JAX cache>/jaxreg-exported``
  (:func:`jaxreg.pipeline.compilation.stage_folder`)."""
  token = _folder.set(os.path.abspath(folder) if folder else None)
  try:
    yield
  finally:
    _folder.reset(token)


def folder() -> str | None:
  """Where the stages are kept now, or None when the cache is off (the default)."""
  return _folder.get()


@functools.cache
def _file_hash(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _module_hash(fun) -> str:
  """SHA-256 of the file that defines ``fun`` (a stage outside jaxreg is keyed by its own
  source too), or "" when it has none."""
  try:
    path = inspect.getsourcefile(fun)
  except TypeError:
    path = None
  return _file_hash(path) if path and os.path.isfile(path) else ""


@functools.cache
def source_hash() -> str:
  """SHA-256 over jaxreg's ``.py`` files (their paths and contents)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  h = hashlib.sha256()
  for dirpath, dirnames, files in os.walk(root):
    dirnames.sort()
    for name in sorted(f for f in files if f.endswith(".py")):
      path = os.path.join(dirpath, name)
      h.update(os.path.relpath(path, root).encode())
      with open(path, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


def status() -> dict:
  """Counts of stage calls in this process: ``loaded`` (from a file), ``exported``
  (traced and written), ``fallback`` (plain jit), and the last fallback's reason."""
  return dict(_status)


def _kernel_use() -> bool:
  """Whether the C++ warp kernel is loaded (then ``implementation=None`` traces it)."""
  from jaxreg.ops import warp_kernel
  return warp_kernel.loaded()


def _environment() -> tuple:
  import jaxlib
  return (source_hash(), jax.__version__, jaxlib.__version__, jax.default_backend(),
          tuple(d.device_kind for d in jax.devices()), os.environ.get("XLA_FLAGS", ""),
          bool(jax.config.jax_enable_x64), _kernel_use())


def _describe(leaf) -> str:
  if leaf is None:
    return "None"
  aval = jax.typeof(leaf)
  return str(aval) + (" weak" if getattr(aval, "weak_type", False) else "")


def _single_device(leaves) -> bool:
  for x in leaves:
    if isinstance(x, jax.core.Tracer):
      return False
    if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
      return False
  return True


def _why_not(leaves) -> str | None:
  if folder() is None:
    return "the stage cache is off"
  if not _single_device(leaves):
    return "traced or multi-device arguments"
  m = jax.sharding.get_abstract_mesh()
  if not m.empty:
    return "inside a mesh context"
  return None


def _write_atomic(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _disabled_checks():
  from jax import export

  from jaxreg.ops import warp_kernel as warp_ffi
  return [export.DisabledSafetyCheck.custom_call(t) for t in warp_ffi.TARGETS]


def _exported_call(jitted, name, module_hash, args, kwargs, statics, unkeyed):
  """The jitted ``Exported.call`` for these arguments: from memory, from its file,
  or exported now (and written)."""
  from jax import export
  leaves, tree = jax.tree.flatten((args, kwargs))
  keyed = sorted((k, v) for k, v in statics.items() if k not in unkeyed)
  key_text = repr((name, module_hash, _environment(), keyed, str(tree),
                   [_describe(x) for x in leaves]))
  key = hashlib.sha256(key_text.encode()).hexdigest()
  with _lock:
    call = _calls.get(key)
  if call is not None:
    return call, None
  path = os.path.join(folder(), f"{name}-{key[:32]}.bin")
  exp, how = None, "loaded"
  if os.path.isfile(path):
    try:
      with open(path, "rb") as f:
        exp = export.deserialize(bytearray(f.read()))
    except Exception:  # damaged or foreign: export again and overwrite it
      exp = None
  if exp is None:
    exp = export.export(jitted, disabled_checks=_disabled_checks())(*args, **kwargs, **statics)
    _write_atomic(path, exp.serialize())
    how = "exported"
  call = jax.jit(exp.call)
  with _lock:
    _calls[key] = call
  return call, how


class Stage:
  """:func:`jax.jit` of a pipeline function (static arguments by keyword only, named in
  ``static_argnames``), kept on disk inside :func:`enabled` (see the module docstring).

  ``unkeyed`` names static arguments left out of the file's key because their
  ``repr`` differs between processes (a Flax ``GraphDef``, a ``PyTreeDef``): the
  caller must pass a keyed static argument that determines them (e.g. a hash of
  the model's config).

  The result is the jitted function's, to the bit: the exported program is the one
  ``jax.jit`` would lower. :meth:`jitted` is the plain jitted function.

  Raises:
    TypeError: a name in ``static_argnames`` or ``unkeyed`` is not a keyword parameter
      of ``fun``, or ``unkeyed`` names a non-static argument (checked here, once).
  """

  def __init__(self, fun, *, static_argnames: tuple[str, ...] = (), unkeyed: tuple[str, ...] = ()):
    params = inspect.signature(fun).parameters
    keyword = {n for n, p in params.items()
               if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    bad = [n for n in static_argnames if n not in keyword]
    if bad:
      raise TypeError(f"Stage({fun.__qualname__}): static_argnames {bad} are not keyword "
                      f"parameters of it")
    if not set(unkeyed) <= set(static_argnames):
      raise TypeError(f"Stage({fun.__qualname__}): unkeyed {sorted(set(unkeyed) - set(static_argnames))} "
                      "are not static arguments")
    self._fun = fun
    self._static = tuple(static_argnames)
    self._unkeyed = frozenset(unkeyed)
    self._name = f"{fun.__module__}.{fun.__qualname__}"
    # One jit of its own function object per kernel state: JAX's trace cache (keyed by
    # the function, shared by every jax.jit of it) does not see whether the kernel is
    # loaded, which changes what ``implementation=None`` traces.
    self._by_kernel: dict = {}
    functools.update_wrapper(self, fun)

  def jitted(self):
    """The plain jitted function for the current kernel state."""
    kernel = _kernel_use()
    with _lock:
      if kernel not in self._by_kernel:
        traced = functools.wraps(self._fun)(lambda *a, **k: self._fun(*a, **k))
        self._by_kernel[kernel] = jax.jit(traced, static_argnames=self._static)
      return self._by_kernel[kernel]

  def __call__(self, *args, **kwargs):
    statics = {k: kwargs.pop(k) for k in self._static if k in kwargs}
    jitted = self.jitted()
    reason = _why_not(jax.tree.leaves((args, kwargs), is_leaf=lambda x: x is None))
    if reason is None:
      try:
        exported, how = _exported_call(jitted, self._name, _module_hash(self._fun), args, kwargs,
                                       statics, self._unkeyed)
      except Exception as e:  # export unsupported here (a custom call, a missing package)
        exported, reason = None, f"{type(e).__name__}: {e}"
      if exported is not None:
        if how is not None:
          _status[how] += 1
        return exported(*args, **kwargs)
    _status["fallback"] += 1
    _status["reason"] = reason
    return jitted(*args, **kwargs, **statics)
