"""What the entry points read from the environment (and nothing else in jaxreg does).

The command line (``jaxreg``, ``train.py``, ``evaluate.py``) and the benchmarks call
:func:`configure` once; it reads these variables and turns them into explicit
arguments and one-time process set-up:

* ``JAXREG_WARP``: ``auto`` (default: load the C++ warp kernel, XLA where it cannot be
  built, with one line on stderr saying so), ``ffi`` (the kernel or an error), ``jax``
  (XLA only). Returned as the warp's ``implementation`` (``None``, ``"ffi"``, ``"xla"``).
* ``JAXREG_KERNEL_CACHE``: where the compiled kernel is kept (default
  ``~/.cache/jaxreg/kernels``).
* ``JAXREG_JAX_CACHE``: JAX's persistent compilation cache folder, or ``off``
  (default ``~/.cache/jaxreg/jax``).
* ``JAXREG_EXPORTED``: ``off`` keeps the register stages out of the stage cache
  (:mod:`jaxreg.pipeline.stages`), which otherwise lives beside JAX's cache.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from jaxreg.ops import warp_kernel
from jaxreg.pipeline import compilation
from jaxreg.types import InputError

__all__ = ["Settings", "warp_implementation", "configure", "WARP_MODES"]

WARP_MODES = {"auto": None, "ffi": "ffi", "jax": "xla"}
_OFF = ("off", "0", "false", "no", "none", "")


@dataclasses.dataclass(frozen=True)
class Settings:
  """The process set-up :func:`configure` made.

  Attributes:
    implementation: the warp's ``implementation`` argument to pass down.
    kernel: whether the C++ kernel is loaded.
    jax_cache: JAX's persistent compilation cache folder, or None (off).
    stage_folder: the register stage cache folder, or None (off).
  """
  implementation: str | None
  kernel: bool
  jax_cache: str | None
  stage_folder: str | None


def warp_implementation() -> str | None:
  """``$JAXREG_WARP`` as the warp's ``implementation``.

  Raises:
    InputError: a value other than ``auto``, ``ffi`` or ``jax``.
  """
  value = os.environ.get("JAXREG_WARP", "auto").strip().lower() or "auto"
  if value not in WARP_MODES:
    raise InputError(f"JAXREG_WARP must be one of {', '.join(WARP_MODES)}, got {value!r}")
  return WARP_MODES[value]


def configure(jax_cache: str | None = None, *, kernel: bool = True,
              quiet: bool = False) -> Settings:
  """Read the environment (module docstring) and set the process up: the compilation
  cache, and the C++ warp kernel unless ``JAXREG_WARP=jax`` or ``kernel=False``.

  Args:
    jax_cache: a ``--jax-cache`` flag's value (wins over ``$JAXREG_JAX_CACHE``).
    kernel: load the warp kernel (a command that warps nothing need not).
    quiet: no line on stderr when the kernel cannot be built.

  Raises:
    InputError: a bad ``$JAXREG_WARP``.
    KernelError: ``JAXREG_WARP=ffi`` and the kernel cannot be built.
  """
  implementation = warp_implementation()
  loaded = False
  if kernel and implementation != "xla":
    loaded = warp_kernel.load(os.environ.get("JAXREG_KERNEL_CACHE") or None,
                              required=implementation == "ffi")
    if not loaded and not quiet:
      print(f"jaxreg: using the pure-JAX warp (the C++ kernel cannot be built: "
            f"{warp_kernel.reason()})", file=sys.stderr)
  if jax_cache is None:
    jax_cache = os.environ.get("JAXREG_JAX_CACHE")
  folder = compilation.enable_cache(jax_cache)
  stage_folder = None
  if folder is not None and os.environ.get("JAXREG_EXPORTED", "on").strip().lower() not in _OFF:
    stage_folder = os.path.join(folder, "jaxreg-exported")
  return Settings(implementation, loaded, folder, stage_folder)
