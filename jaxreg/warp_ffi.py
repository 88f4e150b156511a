"""The warp's C++ kernel on XLA:CPU, through :mod:`jax.ffi` (``jaxreg/csrc/warp_kernel.cc``).

XLA:CPU runs the scatter-add that is the adjoint of a gather-based warp on one
thread, and fuses the warp's ``[..., 3]`` coordinate cotangent poorly. The
kernel samples a channels-last ``[X, Y, Z, C]`` volume at ``N`` points on
XLA's intra-op thread pool: the value, the value with its three coordinate
derivatives, the adjoint in the volume (a parallel splat into per-chunk
buffers), and nearest-neighbour sampling of label maps. Coordinates are in
voxels of the sampled volume, array axis order; border rules as
:mod:`jaxreg.warp`.

Which path runs (:func:`use_kernel`): ``JAXREG_WARP=ffi`` forces the kernel
(an error if it cannot be built), ``JAXREG_WARP=jax`` the pure-JAX warp; by
default (``auto``) the kernel runs on CPU when it builds. In every mode it
takes only float32 images and coordinates (other dtypes run the JAX code) and
runs outside a multi-device mesh (XLA cannot partition a custom call; the pure-JAX
warp shards). On GPU/TPU the pure-JAX warp always runs.

Building: on first use the source is compiled with ``$CXX`` (else ``c++`` or
``g++``) and the XLA FFI headers of :func:`jax.ffi.include_dir` into
``~/.cache/jaxreg/kernels`` (``$JAXREG_KERNEL_CACHE`` moves it), named by a
hash of the source, jaxlib's version and the compiler, written atomically. A
machine without a compiler gets one informational line on stderr and the
pure-JAX warp. ``JAXREG_WARP_THREADS=n`` caps the kernel's threads (default:
the pool's size).

Differentiation: :func:`trilinear` has a JVP rule whose image part is a linear
primitive with the splat as its transpose, so forward mode, reverse mode,
``vmap`` and ``jax.checkpoint`` all work; the derivative of the image
gradient with respect to the coordinates (a second-order term) is not
implemented and raises.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

__all__ = ["SOURCE", "MODES", "mode", "build", "available", "use_kernel", "status",
           "trilinear", "nearest"]

SOURCE = Path(__file__).parent / "csrc" / "warp_kernel.cc"
MODES = ("auto", "ffi", "jax")
_CACHE = os.path.join("~", ".cache", "jaxreg", "kernels")
_TARGETS = {"jaxreg_trilinear": "JaxregTrilinear",
            "jaxreg_trilinear_grad": "JaxregTrilinearGrad",
            "jaxreg_splat": "JaxregSplat",
            "jaxreg_nearest": "JaxregNearest"}
_PADDING = {"constant": 0, "border": 1}

_lock = threading.Lock()
_state: dict = {"loaded": None, "reason": None, "told": False}


class KernelError(RuntimeError):
  """The C++ kernel was forced (``JAXREG_WARP=ffi``) but cannot be built or loaded."""


def mode() -> str:
  """``$JAXREG_WARP`` (``auto``, ``ffi`` or ``jax``; default ``auto``).

  Raises:
    ValueError: another value.
  """
  value = os.environ.get("JAXREG_WARP", "auto").strip().lower() or "auto"
  if value not in MODES:
    raise ValueError(f"JAXREG_WARP must be one of {', '.join(MODES)}, got {value!r}")
  return value


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _library_path(cxx: str) -> Path:
  import jaxlib
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), jaxlib.__version__.encode(), cxx.encode(),
               platform.machine().encode(), sys.platform.encode()):
    key.update(part)
  folder = Path(os.path.expanduser(os.environ.get("JAXREG_KERNEL_CACHE", _CACHE)))
  suffix = ".dylib" if sys.platform == "darwin" else ".so"
  return folder / f"jaxreg_warp_{key.hexdigest()[:16]}{suffix}"


def build() -> Path:
  """Compile the kernel (once per source, jaxlib and compiler) and return the library.

  Raises:
    KernelError: no C++ compiler, or it failed (the compiler's last lines).
  """
  cxx = _compiler()
  if cxx is None:
    raise KernelError("no C++ compiler found ($CXX, c++, g++ or clang++)")
  target = _library_path(cxx)
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".tmp")
  os.close(fd)
  cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno",
         f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
  if sys.platform == "darwin":
    cmd.insert(1, "-undefined")
    cmd.insert(2, "dynamic_lookup")
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
      tail = " ".join(done.stderr.strip().splitlines()[-3:])[-400:]
      raise KernelError(f"{Path(cxx).name} failed (exit {done.returncode}): {tail}")
    os.replace(tmp, target)  # atomic: a concurrent build writes the same bytes
  except (OSError, subprocess.SubprocessError) as e:
    raise KernelError(f"{Path(cxx).name} could not run: {e}") from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return target


def _load() -> bool:
  """Build and register the FFI targets once per process; False (with a reason) if not."""
  with _lock:
    if _state["loaded"] is None:
      try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
        for name, symbol in _TARGETS.items():
          jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)),
                                      platform="cpu")
        _state["loaded"] = True
      except (KernelError, OSError, AttributeError) as e:
        _state["loaded"], _state["reason"] = False, str(e)
    return _state["loaded"]


def available() -> bool:
  """Whether the kernel is built and registered in this process (builds it if needed).

  Raises:
    KernelError: it cannot be, and ``JAXREG_WARP=ffi`` forces it.
  """
  ok = _load()
  if not ok and mode() == "ffi":
    raise KernelError(f"JAXREG_WARP=ffi but the warp kernel cannot be built: {_state['reason']}")
  if not ok and not _state["told"]:
    _state["told"] = True
    print(f"jaxreg: using the pure-JAX warp (the C++ kernel cannot be built: "
          f"{_state['reason']})", file=sys.stderr)
  return ok


def _multi_device_mesh() -> bool:
  m = jax.sharding.get_abstract_mesh()
  return not m.empty and m.size > 1


def use_kernel(*arrays: jax.Array) -> bool:
  """Whether a warp of these float32 arrays runs the kernel here (see the module docstring).

  Raises:
    KernelError: ``JAXREG_WARP=ffi`` and the kernel cannot be built.
  """
  m = mode()
  if m == "jax" or jax.default_backend() != "cpu" or _multi_device_mesh():
    return False
  if any(a.dtype != jnp.float32 for a in arrays):
    return False  # the kernel is float32; other dtypes take the JAX code in every mode
  return available()


def status() -> dict:
  """What this process uses: ``{"mode", "kernel": bool, "reason"}`` (for metrics/benchmarks)."""
  m = mode()
  ok = m != "jax" and jax.default_backend() == "cpu" and _load()
  return {"mode": m, "kernel": bool(ok), "reason": _state["reason"]}


def _threads() -> np.int64:
  return np.int64(int(os.environ.get("JAXREG_WARP_THREADS", "0") or 0))


# ------------------------------------------------------------------ raw calls


def _call(name, out, *args, **attrs):
  return jax.ffi.ffi_call(name, out, vmap_method="sequential")(*args, threads=_threads(),
                                                               **attrs)


def _value(vol, x, y, z, padding, cval):
  """``[N, C]`` samples of ``vol [X, Y, Z, C]`` at ``x, y, z [N]`` (voxels)."""
  out = jax.ShapeDtypeStruct((x.shape[0], vol.shape[3]), jnp.float32)
  return _call("jaxreg_trilinear", out, vol, x, y, z, padding=np.int32(_PADDING[padding]),
               cval=np.float32(cval))


def _value_and_derivatives(vol, x, y, z, padding, cval):
  """The samples and their derivatives along x, y, z: four ``[N, C]`` arrays."""
  out = jax.ShapeDtypeStruct((x.shape[0], vol.shape[3]), jnp.float32)
  return _call("jaxreg_trilinear_grad", (out,) * 4, vol, x, y, z,
               padding=np.int32(_PADDING[padding]), cval=np.float32(cval))


def _splat(ct, x, y, z, shape, padding):
  """Adjoint of :func:`_value` in the volume: ``[X, Y, Z, C]`` from ``ct [N, C]``."""
  out = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
  return _call("jaxreg_splat", out, ct, x, y, z, padding=np.int32(_PADDING[padding]))


# -------------------------------------------- linear primitives: apply, splat
# ``apply(dvol) = sample(dvol)`` (cval 0) is linear in dvol with ``splat`` as
# its transpose and vice versa; primitives (not ffi_call) so that reverse mode
# can transpose the JVP rule of :func:`trilinear`.

apply_p = Primitive("jaxreg_warp_apply")
splat_p = Primitive("jaxreg_warp_splat")


def _apply_impl(dvol, x, y, z, *, padding):
  return _value(dvol, x, y, z, padding, 0.0)


def _splat_impl(ct, x, y, z, *, shape, padding):
  return _splat(ct, x, y, z, shape, padding)


apply_p.def_impl(_apply_impl)
splat_p.def_impl(_splat_impl)
apply_p.def_abstract_eval(
    lambda dvol, x, y, z, *, padding: jax.core.ShapedArray((x.shape[0], dvol.shape[3]),
                                                           jnp.float32))
splat_p.def_abstract_eval(
    lambda ct, x, y, z, *, shape, padding: jax.core.ShapedArray(tuple(shape), jnp.float32))
mlir.register_lowering(apply_p, mlir.lower_fun(_apply_impl, multiple_results=False),
                       platform="cpu")
mlir.register_lowering(splat_p, mlir.lower_fun(_splat_impl, multiple_results=False),
                       platform="cpu")


def _apply_transpose(ct, dvol, x, y, z, *, padding):
  assert ad.is_undefined_primal(dvol) and not ad.is_undefined_primal(x)
  if type(ct) is ad.Zero:
    return ad.Zero(dvol.aval), None, None, None
  return splat_p.bind(ct, x, y, z, shape=dvol.aval.shape, padding=padding), None, None, None


def _splat_transpose(cvol, ct, x, y, z, *, shape, padding):
  assert ad.is_undefined_primal(ct) and not ad.is_undefined_primal(x)
  if type(cvol) is ad.Zero:
    return ad.Zero(ct.aval), None, None, None
  return apply_p.bind(cvol, x, y, z, padding=padding), None, None, None


ad.primitive_transposes[apply_p] = _apply_transpose
ad.primitive_transposes[splat_p] = _splat_transpose


def _coordinate_tangent(vol, coords, tangents, padding, cval):
  """``sum_i d sample / d coord_i * dcoord_i`` (``[N, C]``) or None when all are zero."""
  live = [type(t) is not ad.Zero for t in tangents]
  if not any(live):
    return None
  _, *derivs = _value_and_derivatives(vol, *coords, padding, cval)
  return sum(d * t[:, None] for d, t, ok in zip(derivs, tangents, live) if ok)


def _apply_jvp(primals, tangents, *, padding):
  dvol, x, y, z = primals
  out = apply_p.bind(dvol, x, y, z, padding=padding)
  tangent = None
  if type(tangents[0]) is not ad.Zero:
    tangent = apply_p.bind(tangents[0], x, y, z, padding=padding)
  extra = _coordinate_tangent(dvol, (x, y, z), tangents[1:], padding, 0.0)
  if extra is not None:
    tangent = extra if tangent is None else tangent + extra
  return out, ad.Zero.from_primal_value(out) if tangent is None else tangent


def _splat_jvp(primals, tangents, *, shape, padding):
  ct, x, y, z = primals
  if any(type(t) is not ad.Zero for t in tangents[1:]):
    raise NotImplementedError(
        "jaxreg's warp kernel: the derivative of the image gradient with respect to the "
        "coordinates (second order) is not implemented; set JAXREG_WARP=jax")
  out = splat_p.bind(ct, x, y, z, shape=shape, padding=padding)
  if type(tangents[0]) is ad.Zero:
    return out, ad.Zero.from_primal_value(out)
  return out, splat_p.bind(tangents[0], x, y, z, shape=shape, padding=padding)


ad.primitive_jvps[apply_p] = _apply_jvp
ad.primitive_jvps[splat_p] = _splat_jvp


def _at_front(x, d, size):
  if d is None:
    return jnp.broadcast_to(x, (size,) + x.shape)
  return jnp.moveaxis(x, d, 0)


def _batch(prim, args, dims, **params):
  """Batching: a batched volume (or cotangent) alone folds the batch into channels;
  batched coordinates loop over the batch (each call is multithreaded)."""
  first, *coords = args
  fd, *cds = dims
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  if all(d is None for d in cds):
    moved = jnp.moveaxis(first, fd, -1)  # [..., C, B]
    c = moved.shape[-2]
    folded = moved.reshape(moved.shape[:-2] + (c * size,))
    if prim is splat_p:
      params = dict(params, shape=tuple(params["shape"][:3]) + (c * size,))
    out = prim.bind(folded, *coords, **params)
    return out.reshape(out.shape[:-1] + (c, size)), out.ndim
  stacked = [_at_front(a, d, size) for a, d in zip(args, dims)]
  out = jax.lax.map(lambda a: prim.bind(*a, **params), tuple(stacked))
  return out, 0


batching.primitive_batchers[apply_p] = functools.partial(_batch, apply_p)
batching.primitive_batchers[splat_p] = functools.partial(_batch, splat_p)


# ------------------------------------------------------------------ public ops


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def _trilinear(vol, x, y, z, padding, cval):
  return _value(vol, x, y, z, padding, cval)


@functools.partial(_trilinear.defjvp, symbolic_zeros=True)
def _trilinear_jvp(padding, cval, primals, tangents):
  vol, x, y, z = primals
  dvol, *dcoords = tangents
  live = [not isinstance(t, SymbolicZero) for t in dcoords]
  if any(live):
    out, *derivs = _value_and_derivatives(vol, x, y, z, padding, cval)
    tangent = sum(d * t[:, None] for d, t, ok in zip(derivs, dcoords, live) if ok)
  else:
    out, tangent = _value(vol, x, y, z, padding, cval), None
  if not isinstance(dvol, SymbolicZero):
    image_part = apply_p.bind(dvol, x, y, z, padding=padding)
    tangent = image_part if tangent is None else tangent + image_part
  return out, jnp.zeros_like(out) if tangent is None else tangent


def trilinear(vol: jax.Array, x: jax.Array, y: jax.Array, z: jax.Array, padding: str,
              cval: float) -> jax.Array:
  """Trilinear samples of ``vol [X, Y, Z, C]`` (float32) at coordinate arrays x, y, z.

  ``x, y, z`` share one shape ``S`` (voxels of ``vol``, array axis order); the
  result is ``S + (C,)``, equal to :func:`jaxreg.warp.sample` to float32 rounding.
  """
  shape = x.shape
  flat = [c.reshape(-1) for c in (x, y, z)]
  out = _trilinear(vol, *flat, padding, float(cval))
  return out.reshape(shape + (vol.shape[3],))


def nearest(vol: jax.Array, x: jax.Array, y: jax.Array, z: jax.Array, padding: str,
            cval) -> jax.Array:
  """Nearest-neighbour samples (round half up) of ``vol [X, Y, Z, C]``, dtype kept.

  Not differentiable: meant for label maps. Shapes as :func:`trilinear`.
  """
  shape = x.shape
  flat = [c.reshape(-1) for c in (x, y, z)]
  out = jax.ShapeDtypeStruct((flat[0].shape[0], vol.shape[3]), vol.dtype)
  res = _call("jaxreg_nearest", out, vol, *flat, padding=np.int32(_PADDING[padding]),
              cval=np.float64(cval))
  return res.reshape(shape + (vol.shape[3],))
