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

Differentiation: :func:`sample` and :func:`warp` have a JVP rule whose image part is a linear
primitive with the splat as its transpose, so forward mode, reverse mode,
``vmap`` and ``jax.checkpoint`` all work; the derivative of the image
gradient with respect to the coordinates (a second-order term) is not
implemented and raises. For one-channel images, the points' part keeps the
samples' derivatives ``[N, 1, 3]`` from one forward kernel pass (reverse mode's
points gradient is then an elementwise product: 1.3-1.8x faster with an MSE
cotangent, ``python benchmarks/warp.py --stored``); wider volumes recompute them
in the backward pass and store nothing.
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

__all__ = ["SOURCE", "MODES", "KernelError", "mode", "build", "available", "check_environment",
           "use_kernel", "status",
           "sample", "warp", "nearest"]

SOURCE = Path(__file__).parent / "csrc" / "warp_kernel.cc"
MODES = ("auto", "ffi", "jax")
_CACHE = os.path.join("~", ".cache", "jaxreg", "kernels")
_TARGETS = {"jaxreg_trilinear": "JaxregTrilinear",
            "jaxreg_trilinear_grad": "JaxregTrilinearGrad",
            "jaxreg_trilinear_vjp": "JaxregTrilinearVjp",
            "jaxreg_splat": "JaxregSplat",
            "jaxreg_nearest": "JaxregNearest"}
TARGETS = tuple(_TARGETS)  # the custom-call targets the kernel registers
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


def check_environment() -> None:
  """Fail early on a bad ``$JAXREG_WARP``, or a forced kernel that cannot be built
  (the CLI calls this first; in ``auto`` mode nothing is built here).

  Raises:
    ValueError: ``$JAXREG_WARP`` is not one of :data:`MODES`.
    KernelError: ``JAXREG_WARP=ffi`` and the kernel cannot be built.
  """
  if mode() == "ffi":
    available()


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
# ``pts [N, 3]`` are voxel coordinates (``grid=None``) or, with ``grid=(gx, gy, gz)``,
# displacements (voxels) on that output grid of N voxels: the kernel adds the grid.


def _call(name, out, *args, grid=None, **attrs):
  gx, gy, gz = grid or (0, 0, 0)
  return jax.ffi.ffi_call(name, out, vmap_method="sequential")(
      *args, grid=np.int32(grid is not None), gx=np.int64(gx), gy=np.int64(gy),
      gz=np.int64(gz), threads=_threads(), **attrs)


def _value(vol, pts, padding, cval, grid):
  """``[N, C]`` samples of ``vol [X, Y, Z, C]`` at ``pts [N, 3]``."""
  out = jax.ShapeDtypeStruct((pts.shape[0], vol.shape[3]), jnp.float32)
  return _call("jaxreg_trilinear", out, vol, pts, grid=grid,
               padding=np.int32(_PADDING[padding]), cval=np.float32(cval))


def _value_and_derivatives(vol, pts, padding, cval, grid):
  """The samples ``[N, C]`` and their derivatives along x, y, z, ``[N, C, 3]``."""
  n, c = pts.shape[0], vol.shape[3]
  out = (jax.ShapeDtypeStruct((n, c), jnp.float32), jax.ShapeDtypeStruct((n, c, 3), jnp.float32))
  return _call("jaxreg_trilinear_grad", out, vol, pts, grid=grid,
               padding=np.int32(_PADDING[padding]), cval=np.float32(cval))


def _points_vjp(vol, pts, ct, padding, cval, grid):
  """The points' gradient ``[N, 3]``: ``sum_c ct[n, c] * d sample[n, c] / d pts[n]``."""
  out = jax.ShapeDtypeStruct((pts.shape[0], 3), jnp.float32)
  return _call("jaxreg_trilinear_vjp", out, vol, pts, ct, grid=grid,
               padding=np.int32(_PADDING[padding]), cval=np.float32(cval))


def _splat(ct, pts, shape, padding, grid):
  """Adjoint of :func:`_value` in the volume: ``[X, Y, Z, C]`` from ``ct [N, C]``."""
  out = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
  return _call("jaxreg_splat", out, ct, pts, grid=grid, padding=np.int32(_PADDING[padding]))


# -------------------------------------------- linear primitives: apply, splat
# ``apply(dvol) = sample(dvol)`` (cval 0) is linear in dvol with ``splat`` as
# its transpose and vice versa; primitives (not ffi_call) so that reverse mode
# can transpose the JVP rule of :func:`trilinear`.

apply_p = Primitive("jaxreg_warp_apply")
splat_p = Primitive("jaxreg_warp_splat")


def _apply_impl(dvol, pts, *, padding, grid):
  return _value(dvol, pts, padding, 0.0, grid)


def _splat_impl(ct, pts, *, shape, padding, grid):
  return _splat(ct, pts, shape, padding, grid)


apply_p.def_impl(_apply_impl)
splat_p.def_impl(_splat_impl)
apply_p.def_abstract_eval(
    lambda dvol, pts, *, padding, grid: jax.core.ShapedArray((pts.shape[0], dvol.shape[3]),
                                                             jnp.float32))
splat_p.def_abstract_eval(
    lambda ct, pts, *, shape, padding, grid: jax.core.ShapedArray(tuple(shape), jnp.float32))
mlir.register_lowering(apply_p, mlir.lower_fun(_apply_impl, multiple_results=False),
                       platform="cpu")
mlir.register_lowering(splat_p, mlir.lower_fun(_splat_impl, multiple_results=False),
                       platform="cpu")


def _apply_transpose(ct, dvol, pts, *, padding, grid):
  assert ad.is_undefined_primal(dvol) and not ad.is_undefined_primal(pts)
  if type(ct) is ad.Zero:
    return ad.Zero(dvol.aval), None
  return splat_p.bind(ct, pts, shape=dvol.aval.shape, padding=padding, grid=grid), None


def _splat_transpose(cvol, ct, pts, *, shape, padding, grid):
  assert ad.is_undefined_primal(ct) and not ad.is_undefined_primal(pts)
  if type(cvol) is ad.Zero:
    return ad.Zero(ct.aval), None
  return apply_p.bind(cvol, pts, padding=padding, grid=grid), None


ad.primitive_transposes[apply_p] = _apply_transpose
ad.primitive_transposes[splat_p] = _splat_transpose


def _along(derivs, dpts):
  """``sum_i derivs[n, c, i] * dpts[n, i]``: the sample's change, ``[N, C]``."""
  return jnp.sum(derivs * dpts[:, None, :], axis=-1)


def _apply_jvp(primals, tangents, *, padding, grid):
  dvol, pts = primals
  ddvol, dpts = tangents
  zero = lambda t: None if type(t) is ad.Zero else t
  out = apply_p.bind(dvol, pts, padding=padding, grid=grid)
  tangent = _tangent(dvol, pts, zero(ddvol), zero(dpts), padding, 0.0, grid)
  return out, ad.Zero.from_primal_value(out) if tangent is None else tangent


def _splat_jvp(primals, tangents, *, shape, padding, grid):
  ct, pts = primals
  if type(tangents[1]) is not ad.Zero:
    _second_order()
  out = splat_p.bind(ct, pts, shape=shape, padding=padding, grid=grid)
  if type(tangents[0]) is ad.Zero:
    return out, ad.Zero.from_primal_value(out)
  return out, splat_p.bind(tangents[0], pts, shape=shape, padding=padding, grid=grid)


ad.primitive_jvps[apply_p] = _apply_jvp
ad.primitive_jvps[splat_p] = _splat_jvp

# ``moves(dpts) = sum_i d sample / d pts_i * dpts_i`` ([N, C]) is linear in dpts
# (vol, pts fixed); its transpose ``moves_t(ct)`` is the points' gradient
# ([N, 3]) computed by one kernel from vol, pts and ct, so for volumes wider than
# _STORED_CHANNELS reverse mode stores no derivative arrays and the forward pass
# samples only the values.
moves_p = Primitive("jaxreg_warp_moves")
moves_t_p = Primitive("jaxreg_warp_moves_t")


def _moves_impl(dpts, vol, pts, *, padding, cval, grid):
  return _along(_value_and_derivatives(vol, pts, padding, cval, grid)[1], dpts)


def _moves_t_impl(ct, vol, pts, *, padding, cval, grid):
  return _points_vjp(vol, pts, ct, padding, cval, grid)


moves_p.def_impl(_moves_impl)
moves_t_p.def_impl(_moves_t_impl)
moves_p.def_abstract_eval(
    lambda dpts, vol, pts, **_: jax.core.ShapedArray((pts.shape[0], vol.shape[3]), jnp.float32))
moves_t_p.def_abstract_eval(
    lambda ct, vol, pts, **_: jax.core.ShapedArray((pts.shape[0], 3), jnp.float32))
mlir.register_lowering(moves_p, mlir.lower_fun(_moves_impl, multiple_results=False),
                       platform="cpu")
mlir.register_lowering(moves_t_p, mlir.lower_fun(_moves_t_impl, multiple_results=False),
                       platform="cpu")


def _second_order(*_, **__):
  raise NotImplementedError("jaxreg's warp kernel: a second-order derivative through the "
                            "warp is not implemented; set JAXREG_WARP=jax")


def _transposes_to(other):
  """The transpose rule of ``moves`` (to ``moves_t``) or of ``moves_t`` (to ``moves``):
  linear in the first argument; ``vol`` and ``pts`` must be known."""
  def rule(ct, lin, vol, pts, **params):
    assert ad.is_undefined_primal(lin)
    if ad.is_undefined_primal(vol) or ad.is_undefined_primal(pts):
      _second_order()
    if type(ct) is ad.Zero:
      return ad.Zero(lin.aval), None, None
    return other().bind(ct, vol, pts, **params), None, None
  return rule


ad.primitive_transposes[moves_p] = _transposes_to(lambda: moves_t_p)
ad.primitive_transposes[moves_t_p] = _transposes_to(lambda: moves_p)
ad.primitive_jvps[moves_p] = _second_order
ad.primitive_jvps[moves_t_p] = _second_order


def _at_front(x, d, size):
  if d is None:
    return jnp.broadcast_to(x, (size,) + x.shape)
  return jnp.moveaxis(x, d, 0)


def _batch(prim, args, dims, **params):
  """Batching: a batched volume (or cotangent) alone folds the batch into channels;
  batched points loop over the batch (each call is multithreaded)."""
  (first, pts), (fd, pd) = args, dims
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  if pd is None:
    moved = jnp.moveaxis(first, fd, -1)  # [..., C, B]
    c = moved.shape[-2]
    folded = moved.reshape(moved.shape[:-2] + (c * size,))
    if prim is splat_p:
      params = dict(params, shape=tuple(params["shape"][:3]) + (c * size,))
    out = prim.bind(folded, pts, **params)
    return out.reshape(out.shape[:-1] + (c, size)), out.ndim
  return _batch_loop(prim, args, dims, **params)


batching.primitive_batchers[apply_p] = functools.partial(_batch, apply_p)
batching.primitive_batchers[splat_p] = functools.partial(_batch, splat_p)


def _batch_loop(prim, args, dims, **params):
  """Batching by a loop over the batch (each call is multithreaded)."""
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  stacked = [_at_front(a, d, size) for a, d in zip(args, dims)]
  return jax.lax.map(lambda a: prim.bind(*a, **params), tuple(stacked)), 0


batching.primitive_batchers[moves_p] = functools.partial(_batch_loop, moves_p)
batching.primitive_batchers[moves_t_p] = functools.partial(_batch_loop, moves_t_p)


# ------------------------------------------------------------------ public ops


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _trilinear(vol, pts, padding, cval, grid):
  return _value(vol, pts, padding, cval, grid)


def _tangent(vol, pts, dvol, dpts, padding, cval, grid, derivs=None):
  """The sample's change ``[N, C]`` for tangents ``dvol`` and ``dpts`` (None: zero):
  the two linear parts, image and points; None when both are zero. ``derivs``: the
  samples' derivatives ``[N, C, 3]`` when kept from the forward pass (else the points'
  part is ``moves``, recomputed from the corners)."""
  parts = []
  if dpts is not None and derivs is not None:
    parts.append(_along(derivs, dpts))
  elif dpts is not None:
    parts.append(moves_p.bind(dpts, vol, pts, padding=padding, cval=float(cval), grid=grid))
  if dvol is not None:
    parts.append(apply_p.bind(dvol, pts, padding=padding, grid=grid))
  return sum(parts[1:], parts[0]) if parts else None


# Up to this many channels, a derivative with respect to the points keeps the
# sample's derivatives ``[N, C, 3]`` from the forward kernel (one pass over the
# corners gives value and derivatives), so reverse mode's points gradient is one
# elementwise product instead of a second kernel pass: images (C = 1) and the
# loss path. Wider volumes (a displacement field warped in a composition,
# C = 3) store nothing and recompute in the backward pass (``moves_t``).
_STORED_CHANNELS = 1


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _trilinear_with_derivatives(vol, pts, padding, cval, grid):
  return _value_and_derivatives(vol, pts, padding, cval, grid)


_trilinear_with_derivatives.defjvp(lambda *_: _second_order())


@functools.partial(_trilinear.defjvp, symbolic_zeros=True)
def _trilinear_jvp(padding, cval, grid, primals, tangents):
  vol, pts = primals
  zero = lambda t: None if isinstance(t, SymbolicZero) else t
  dvol, dpts = map(zero, tangents)
  if dpts is not None and vol.shape[3] <= _STORED_CHANNELS:
    out, derivs = _trilinear_with_derivatives(vol, pts, padding, cval, grid)
  else:
    # _trilinear, not the raw call: a second derivative then meets this rule
    # again (and the linear parts' own rules), not an undifferentiable ffi_call.
    out, derivs = _trilinear(vol, pts, padding, cval, grid), None
  tangent = _tangent(vol, pts, dvol, dpts, padding, cval, grid, derivs)
  return out, jnp.zeros_like(out) if tangent is None else tangent


def sample(vol: jax.Array, coords: jax.Array, padding: str, cval: float) -> jax.Array:
  """Trilinear samples of ``vol [X, Y, Z, C]`` (float32) at ``coords [..., 3]``.

  ``coords`` are voxel coordinates of ``vol`` (array axis order); the result
  is ``[..., C]``, equal to :func:`jaxreg.warp.sample` to float32 rounding.
  """
  out = _trilinear(vol, coords.reshape(-1, 3), padding, float(cval), None)
  return out.reshape(coords.shape[:-1] + (vol.shape[3],))


def warp(vol: jax.Array, disp: jax.Array, padding: str, cval: float) -> jax.Array:
  """``out(x) = vol(x + disp(x))``: ``vol [X, Y, Z, C]`` and ``disp [X, Y, Z, 3]``
  (voxels, array axis order), float32; returns ``[X, Y, Z, C]``."""
  grid = tuple(int(n) for n in disp.shape[:3])
  out = _trilinear(vol, disp.reshape(-1, 3), padding, float(cval), grid)
  return out.reshape(grid + (vol.shape[3],))


def nearest(vol: jax.Array, pts: jax.Array, padding: str, cval, *, on_grid: bool) -> jax.Array:
  """Nearest-neighbour samples (round half up) of ``vol [X, Y, Z, C]``, dtype kept.

  ``pts [..., 3]``: voxel coordinates, or with ``on_grid`` displacements (voxels)
  on the grid ``pts.shape[:3]`` (a warp). Not differentiable: for label maps.
  Returns ``pts.shape[:-1] + (C,)``.
  """
  grid = tuple(int(n) for n in pts.shape[:3]) if on_grid else None
  out = jax.ShapeDtypeStruct((int(np.prod(pts.shape[:-1])), vol.shape[3]), vol.dtype)
  res = _call("jaxreg_nearest", out, vol, pts.reshape(-1, 3), grid=grid,
              padding=np.int32(_PADDING[padding]), cval=np.float64(cval))
  return res.reshape(pts.shape[:-1] + (vol.shape[3],))
