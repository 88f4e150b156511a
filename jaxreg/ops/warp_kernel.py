"""The warp's C++ kernel on XLA:CPU, through :mod:`jax.ffi` (``jaxreg/ops/csrc/warp_kernel.cc``).

XLA:CPU runs the scatter-add that is the adjoint of a gather-based warp on one
thread, and fuses the warp's ``[..., 3]`` coordinate cotangent poorly. The
kernel samples a channels-last ``[X, Y, Z, C]`` volume at ``N`` points on
XLA's intra-op thread pool: the value, the value with its three coordinate
derivatives, the adjoint in the volume (a parallel splat into per-chunk
buffers), and nearest-neighbour sampling of label maps. Coordinates are in
voxels of the sampled volume, array axis order; border rules as
:mod:`jaxreg.ops.warp`.

Which path runs is the caller's explicit choice (:func:`runs`, from
:func:`jaxreg.ops.warp.warp`'s ``implementation`` argument): the kernel takes only float32
images and coordinates (and integer label maps for nearest sampling) on one CPU device
(XLA cannot partition a custom call; the pure-JAX warp shards); other calls run the JAX
code. Nothing here reads the environment.

Building: :func:`load` compiles the source with a C++ compiler (``compiler``, else
``$CXX``, ``c++``, ``g++`` or ``clang++``) and the XLA FFI headers of
:func:`jax.ffi.include_dir` into a cache folder (``~/.cache/jaxreg/kernels`` unless
``cache`` says otherwise), named by a hash of the source, jaxlib's version and the
compiler, written atomically; then registers the FFI targets. Only :func:`load` and
:func:`build` compile; importing this module or calling a warp never does.

Differentiation: :func:`sample` and :func:`warp` have a JVP rule whose image part is a linear
primitive with the splat as its transpose, so forward mode, reverse mode,
``vmap`` and ``jax.checkpoint`` all work. Derivatives the kernel has no rule of
its own for (second order in the coordinates: a Hessian, a gradient penalty) fall
back to the pure-JAX code (:mod:`jaxreg.ops.trilinear`), so every order works. For one-channel images, the points' part keeps the
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

from jaxreg.ops import trilinear as _tri

__all__ = ["SOURCE", "IMPLEMENTATIONS", "KernelError", "build", "load", "loaded", "reason",
           "check_implementation",
           "runs", "sample", "warp", "nearest"]

SOURCE = Path(__file__).parent / "csrc" / "warp_kernel.cc"
IMPLEMENTATIONS = (None, "xla", "ffi")
_CACHE = os.path.join("~", ".cache", "jaxreg", "kernels")
_TARGETS = {"jaxreg_trilinear": "JaxregTrilinear",
            "jaxreg_trilinear_grad": "JaxregTrilinearGrad",
            "jaxreg_trilinear_vjp": "JaxregTrilinearVjp",
            "jaxreg_splat": "JaxregSplat",
            "jaxreg_nearest": "JaxregNearest"}
TARGETS = tuple(_TARGETS)  # the custom-call targets the kernel registers
_PADDING = {"constant": 0, "border": 1}

_lock = threading.Lock()
_state: dict = {"loaded": False, "reason": None}


class KernelError(RuntimeError):
  """The C++ kernel cannot be built or loaded, or was asked for before :func:`load`."""


def _compiler(compiler: str | None = None) -> str | None:
  if compiler is not None:
    return shutil.which(compiler)
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _library_path(cxx: str, cache: str | None) -> Path:
  import jaxlib
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), jaxlib.__version__.encode(), cxx.encode(),
               platform.machine().encode(), sys.platform.encode()):
    key.update(part)
  folder = Path(os.path.expanduser(cache or _CACHE))
  suffix = ".dylib" if sys.platform == "darwin" else ".so"
  return folder / f"jaxreg_warp_{key.hexdigest()[:16]}{suffix}"


def build(cache: str | None = None, *, compiler: str | None = None) -> Path:
  """Compile the kernel (once per source, jaxlib and compiler) and return the library.

  Args:
    cache: the folder for compiled kernels (default ``~/.cache/jaxreg/kernels``).
    compiler: the C++ compiler (default: ``$CXX``, else ``c++``, ``g++``, ``clang++``).

  Raises:
    KernelError: no C++ compiler, or it failed (the compiler's last lines).
  """
  cxx = _compiler(compiler)
  if cxx is None:
    raise KernelError("no C++ compiler found ($CXX, c++, g++ or clang++)")
  target = _library_path(cxx, cache)
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


def load(cache: str | None = None, *, compiler: str | None = None,
         required: bool = False) -> bool:
  """Build the kernel if needed and register its FFI targets in this process (once).

  After this, warps with ``implementation=None`` use the kernel where it applies.

  Args:
    cache: as :func:`build`.
    compiler: as :func:`build`.
    required: raise instead of returning False when it cannot be built.

  Returns:
    Whether the kernel is loaded; when False, :func:`reason` says why.

  Raises:
    KernelError: ``required`` and the kernel cannot be built or loaded.
  """
  with _lock:
    if not _state["loaded"]:
      try:
        lib = ctypes.cdll.LoadLibrary(str(build(cache, compiler=compiler)))
        for name, symbol in _TARGETS.items():
          jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)),
                                      platform="cpu")
        _state["loaded"], _state["reason"] = True, None
      except (KernelError, OSError, AttributeError) as e:
        _state["reason"] = str(e)
    if required and not _state["loaded"]:
      raise KernelError(f"the warp kernel cannot be built: {_state['reason']}")
    return _state["loaded"]


def loaded() -> bool:
  """Whether :func:`load` has registered the kernel in this process (builds nothing)."""
  return _state["loaded"]


def reason() -> str | None:
  """Why the last :func:`load` failed, or None."""
  return _state["reason"]


def _multi_device_mesh() -> bool:
  m = jax.sharding.get_abstract_mesh()
  return not m.empty and m.size > 1


def check_implementation(implementation) -> None:
  """Raises ValueError unless ``implementation`` is one of :data:`IMPLEMENTATIONS`."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be None, 'xla' or 'ffi', got {implementation!r}")


def runs(implementation: str | None, *arrays: jax.Array) -> bool:
  """Whether a warp of ``arrays`` with this ``implementation`` runs the kernel.

  ``"xla"``: never. ``"ffi"``: where the kernel applies (float32 arrays, CPU backend,
  no multi-device mesh). ``None``: likewise, when :func:`load` has run in this process.

  Raises:
    ValueError: an unknown ``implementation``.
    KernelError: ``"ffi"`` before :func:`load`.
  """
  check_implementation(implementation)
  if implementation == "xla":
    return False
  if implementation == "ffi" and not _state["loaded"]:
    raise KernelError("implementation='ffi' needs the C++ kernel: call jaxreg.load_kernel() "
                      "first (it compiles jaxreg/ops/csrc/warp_kernel.cc once)"
                      + (f"; the last load failed: {_state['reason']}" if _state["reason"] else ""))
  if not _state["loaded"] or jax.default_backend() != "cpu" or _multi_device_mesh():
    return False
  return all(a.dtype == jnp.float32 for a in arrays)


# ------------------------------------------------------------------ raw calls
# ``pts [N, 3]`` are voxel coordinates (``grid=None``) or, with ``grid=(gx, gy, gz)``,
# displacements (voxels) on that output grid of N voxels: the kernel adds the grid.


def _call(name, out, *args, grid=None, threads=None, **attrs):
  gx, gy, gz = grid or (0, 0, 0)
  return jax.ffi.ffi_call(name, out, vmap_method="sequential")(
      *args, grid=np.int32(grid is not None), gx=np.int64(gx), gy=np.int64(gy),
      gz=np.int64(gz), threads=np.int64(threads or 0), **attrs)


def _value(vol, pts, padding, cval, grid, threads):
  """``[N, C]`` samples of ``vol [X, Y, Z, C]`` at ``pts [N, 3]``."""
  out = jax.ShapeDtypeStruct((pts.shape[0], vol.shape[3]), jnp.float32)
  return _call("jaxreg_trilinear", out, vol, pts, grid=grid, threads=threads,
               padding=np.int32(_PADDING[padding]), cval=np.float32(cval))


def _value_and_derivatives(vol, pts, padding, cval, grid, threads):
  """The samples ``[N, C]`` and their derivatives along x, y, z, ``[N, C, 3]``."""
  n, c = pts.shape[0], vol.shape[3]
  out = (jax.ShapeDtypeStruct((n, c), jnp.float32), jax.ShapeDtypeStruct((n, c, 3), jnp.float32))
  return _call("jaxreg_trilinear_grad", out, vol, pts, grid=grid, threads=threads,
               padding=np.int32(_PADDING[padding]), cval=np.float32(cval))


def _points_vjp(vol, pts, ct, padding, cval, grid, threads):
  """The points' gradient ``[N, 3]``: ``sum_c ct[n, c] * d sample[n, c] / d pts[n]``."""
  out = jax.ShapeDtypeStruct((pts.shape[0], 3), jnp.float32)
  return _call("jaxreg_trilinear_vjp", out, vol, pts, ct, grid=grid, threads=threads,
               padding=np.int32(_PADDING[padding]), cval=np.float32(cval))


def _splat(ct, pts, shape, padding, grid, threads):
  """Adjoint of :func:`_value` in the volume: ``[X, Y, Z, C]`` from ``ct [N, C]``."""
  out = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
  return _call("jaxreg_splat", out, ct, pts, grid=grid, threads=threads,
               padding=np.int32(_PADDING[padding]))


# -------------------------------------------- linear primitives: apply, splat
# ``apply(dvol) = sample(dvol)`` (cval 0) is linear in dvol with ``splat`` as
# its transpose and vice versa; primitives (not ffi_call) so that reverse mode
# can transpose the JVP rule of :func:`trilinear`.

apply_p = Primitive("jaxreg_warp_apply")
splat_p = Primitive("jaxreg_warp_splat")


def _apply_impl(dvol, pts, *, padding, grid, threads):
  return _value(dvol, pts, padding, 0.0, grid, threads)


def _splat_impl(ct, pts, *, shape, padding, grid, threads):
  return _splat(ct, pts, shape, padding, grid, threads)


apply_p.def_impl(_apply_impl)
splat_p.def_impl(_splat_impl)
apply_p.def_abstract_eval(
    lambda dvol, pts, *, padding, grid, threads: jax.core.ShapedArray((pts.shape[0], dvol.shape[3]),
                                                             jnp.float32))
splat_p.def_abstract_eval(
    lambda ct, pts, *, shape, padding, grid, threads: jax.core.ShapedArray(tuple(shape), jnp.float32))
mlir.register_lowering(apply_p, mlir.lower_fun(_apply_impl, multiple_results=False),
                       platform="cpu")
mlir.register_lowering(splat_p, mlir.lower_fun(_splat_impl, multiple_results=False),
                       platform="cpu")


def _apply_transpose(ct, dvol, pts, *, padding, grid, threads):
  assert ad.is_undefined_primal(dvol) and not ad.is_undefined_primal(pts)
  if type(ct) is ad.Zero:
    return ad.Zero(dvol.aval), None
  return splat_p.bind(ct, pts, shape=dvol.aval.shape, padding=padding, grid=grid, threads=threads), None


def _splat_transpose(cvol, ct, pts, *, shape, padding, grid, threads):
  assert ad.is_undefined_primal(ct) and not ad.is_undefined_primal(pts)
  if type(cvol) is ad.Zero:
    return ad.Zero(ct.aval), None
  return apply_p.bind(cvol, pts, padding=padding, grid=grid, threads=threads), None


ad.primitive_transposes[apply_p] = _apply_transpose
ad.primitive_transposes[splat_p] = _splat_transpose


def _along(derivs, dpts):
  """``sum_i derivs[n, c, i] * dpts[n, i]``: the sample's change, ``[N, C]``."""
  return jnp.sum(derivs * dpts[:, None, :], axis=-1)


# ------------------------------------------- the pure-JAX twins (higher orders)
# Derivatives the kernel has no rule of its own for are those of these XLA
# functions of (vol [X, Y, Z, C], pts [N, 3]), equal to the kernel's to float32 rounding.


def _xla_points(pts, grid):
  """Coordinates ``[N, 3]``: ``pts``, plus the output grid's voxel indices when on a grid."""
  if grid is None:
    return pts
  axes = [jnp.arange(n, dtype=pts.dtype) for n in grid]
  return pts + jnp.stack(jnp.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def _xla_value(vol, pts, padding, cval, grid):
  p = _xla_points(pts, grid)
  xyz = (p[:, 0], p[:, 1], p[:, 2])
  return jnp.stack([_tri.trilinear(vol[..., c], *xyz, padding, cval)
                    for c in range(vol.shape[3])], axis=-1)


def _xla_derivatives(vol, pts, padding, cval, grid):
  """``[N, C, 3]``: each channel's derivatives along x, y, z."""
  p = _xla_points(pts, grid)
  xyz = (p[:, 0], p[:, 1], p[:, 2])
  return jnp.stack([jnp.stack(_tri.coordinate_derivatives(vol[..., c], xyz, padding, cval), -1)
                    for c in range(vol.shape[3])], axis=1)


def _xla_splat(ct, pts, shape, padding, grid):
  """The transpose of sampling (cval 0) in the volume, ``[X, Y, Z, C]``."""
  zeros = jnp.zeros(shape, ct.dtype)
  return jax.linear_transpose(lambda v: _xla_value(v, pts, padding, 0.0, grid), zeros)(ct)[0]


def _instantiate(tangent, primal):
  return jnp.zeros_like(primal) if type(tangent) is ad.Zero else tangent


def _apply_jvp(primals, tangents, *, padding, grid, threads):
  dvol, pts = primals
  ddvol, dpts = tangents
  zero = lambda t: None if type(t) is ad.Zero else t
  out = apply_p.bind(dvol, pts, padding=padding, grid=grid, threads=threads)
  tangent = _tangent(dvol, pts, zero(ddvol), zero(dpts), padding, 0.0, grid, threads)
  return out, ad.Zero.from_primal_value(out) if tangent is None else tangent


def _splat_jvp(primals, tangents, *, shape, padding, grid, threads):
  ct, pts = primals
  dct, dpts = tangents
  out = splat_p.bind(ct, pts, shape=shape, padding=padding, grid=grid, threads=threads)
  tangent = None
  if type(dct) is not ad.Zero:
    tangent = splat_p.bind(dct, pts, shape=shape, padding=padding, grid=grid, threads=threads)
  if type(dpts) is not ad.Zero:  # second order: the XLA twin's derivative
    _, moved = jax.jvp(lambda p: _xla_splat(ct, p, shape, padding, grid), (pts,), (dpts,))
    tangent = moved if tangent is None else tangent + moved
  return out, ad.Zero.from_primal_value(out) if tangent is None else tangent


ad.primitive_jvps[apply_p] = _apply_jvp
ad.primitive_jvps[splat_p] = _splat_jvp

# ``moves(dpts) = sum_i d sample / d pts_i * dpts_i`` ([N, C]) is linear in dpts
# (vol, pts fixed); its transpose ``moves_t(ct)`` is the points' gradient
# ([N, 3]) computed by one kernel from vol, pts and ct, so for volumes wider than
# _STORED_CHANNELS reverse mode stores no derivative arrays and the forward pass
# samples only the values.
moves_p = Primitive("jaxreg_warp_moves")
moves_t_p = Primitive("jaxreg_warp_moves_t")


def _moves_impl(dpts, vol, pts, *, padding, cval, grid, threads):
  return _along(_value_and_derivatives(vol, pts, padding, cval, grid, threads)[1], dpts)


def _moves_t_impl(ct, vol, pts, *, padding, cval, grid, threads):
  return _points_vjp(vol, pts, ct, padding, cval, grid, threads)


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


def _moves_xla(lin, vol, pts, padding, cval, grid):
  return _along(_xla_derivatives(vol, pts, padding, cval, grid), lin)


def _moves_t_xla(ct, vol, pts, padding, cval, grid):
  return jnp.einsum("nc,nci->ni", ct, _xla_derivatives(vol, pts, padding, cval, grid))


def _linear_in_first_jvp(prim, twin):
  """JVP of ``moves``/``moves_t``: the primitive itself for the linear argument's
  tangent, the XLA twin's derivative for ``vol`` and ``pts`` (second order)."""
  def rule(primals, tangents, **params):
    lin, vol, pts = primals
    dlin, dvol, dpts = tangents
    out = prim.bind(lin, vol, pts, **params)
    tangent = None
    if type(dlin) is not ad.Zero:
      tangent = prim.bind(dlin, vol, pts, **params)
    if type(dvol) is not ad.Zero or type(dpts) is not ad.Zero:
      statics = (params["padding"], params["cval"], params["grid"])
      _, moved = jax.jvp(lambda v, p: twin(lin, v, p, *statics), (vol, pts),
                         (_instantiate(dvol, vol), _instantiate(dpts, pts)))
      tangent = moved if tangent is None else tangent + moved
    return out, ad.Zero.from_primal_value(out) if tangent is None else tangent
  return rule


def _transposes_to(other):
  """The transpose rule of ``moves`` (to ``moves_t``) or of ``moves_t`` (to ``moves``):
  linear in the first argument, with ``vol`` and ``pts`` known (the JVP rules above
  keep every other dependence in XLA code)."""
  def rule(ct, lin, vol, pts, **params):
    assert ad.is_undefined_primal(lin)
    assert not ad.is_undefined_primal(vol) and not ad.is_undefined_primal(pts)
    if type(ct) is ad.Zero:
      return ad.Zero(lin.aval), None, None
    return other().bind(ct, vol, pts, **params), None, None
  return rule


ad.primitive_transposes[moves_p] = _transposes_to(lambda: moves_t_p)
ad.primitive_transposes[moves_t_p] = _transposes_to(lambda: moves_p)
ad.primitive_jvps[moves_p] = _linear_in_first_jvp(moves_p, _moves_xla)
ad.primitive_jvps[moves_t_p] = _linear_in_first_jvp(moves_t_p, _moves_t_xla)


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


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _trilinear(vol, pts, padding, cval, grid, threads):
  return _value(vol, pts, padding, cval, grid, threads)


def _tangent(vol, pts, dvol, dpts, padding, cval, grid, threads, derivs=None):
  """The sample's change ``[N, C]`` for tangents ``dvol`` and ``dpts`` (None: zero):
  the two linear parts, image and points; None when both are zero. ``derivs``: the
  samples' derivatives ``[N, C, 3]`` when kept from the forward pass (else the points'
  part is ``moves``, recomputed from the corners)."""
  parts = []
  if dpts is not None and derivs is not None:
    parts.append(_along(derivs, dpts))
  elif dpts is not None:
    parts.append(moves_p.bind(dpts, vol, pts, padding=padding, cval=float(cval), grid=grid,
                              threads=threads))
  if dvol is not None:
    parts.append(apply_p.bind(dvol, pts, padding=padding, grid=grid, threads=threads))
  return sum(parts[1:], parts[0]) if parts else None


# Up to this many channels, a derivative with respect to the points keeps the
# sample's derivatives ``[N, C, 3]`` from the forward kernel (one pass over the
# corners gives value and derivatives), so reverse mode's points gradient is one
# elementwise product instead of a second kernel pass: images (C = 1) and the
# loss path. Wider volumes (a displacement field warped in a composition,
# C = 3) store nothing and recompute in the backward pass (``moves_t``).
_STORED_CHANNELS = 1


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _trilinear_with_derivatives(vol, pts, padding, cval, grid, threads):
  return _value_and_derivatives(vol, pts, padding, cval, grid, threads)


@_trilinear_with_derivatives.defjvp
def _trilinear_with_derivatives_jvp(padding, cval, grid, threads, primals, tangents):
  # Second order (the kept derivatives differentiated again): the XLA twin's rule.
  return jax.jvp(lambda v, p: (_xla_value(v, p, padding, cval, grid),
                               _xla_derivatives(v, p, padding, cval, grid)), primals, tangents)


@functools.partial(_trilinear.defjvp, symbolic_zeros=True)
def _trilinear_jvp(padding, cval, grid, threads, primals, tangents):
  vol, pts = primals
  zero = lambda t: None if isinstance(t, SymbolicZero) else t
  dvol, dpts = map(zero, tangents)
  if dpts is not None and vol.shape[3] <= _STORED_CHANNELS:
    out, derivs = _trilinear_with_derivatives(vol, pts, padding, cval, grid, threads)
  else:
    # _trilinear, not the raw call: a second derivative then meets this rule
    # again (and the linear parts' own rules), not an undifferentiable ffi_call.
    out, derivs = _trilinear(vol, pts, padding, cval, grid, threads), None
  tangent = _tangent(vol, pts, dvol, dpts, padding, cval, grid, threads, derivs)
  return out, jnp.zeros_like(out) if tangent is None else tangent


def sample(vol: jax.Array, coords: jax.Array, padding: str, cval: float, *,
           threads: int | None = None) -> jax.Array:
  """Trilinear samples of ``vol [X, Y, Z, C]`` (float32) at ``coords [..., 3]``.

  ``coords`` are voxel coordinates of ``vol`` (array axis order); the result
  is ``[..., C]``, equal to :func:`jaxreg.ops.warp.sample` to float32 rounding.
  ``threads`` caps the kernel's threads (None: the pool's size).
  """
  out = _trilinear(vol, coords.reshape(-1, 3), padding, float(cval), None, threads)
  return out.reshape(coords.shape[:-1] + (vol.shape[3],))


def warp(vol: jax.Array, disp: jax.Array, padding: str, cval: float, *,
         threads: int | None = None) -> jax.Array:
  """``out(x) = vol(x + disp(x))``: ``vol [X, Y, Z, C]`` and ``disp [X, Y, Z, 3]``
  (voxels, array axis order), float32; returns ``[X, Y, Z, C]``."""
  grid = tuple(int(n) for n in disp.shape[:3])
  out = _trilinear(vol, disp.reshape(-1, 3), padding, float(cval), grid, threads)
  return out.reshape(grid + (vol.shape[3],))


def nearest(vol: jax.Array, pts: jax.Array, padding: str, cval, *, on_grid: bool,
            threads: int | None = None) -> jax.Array:
  """Nearest-neighbour samples (round half up) of ``vol [X, Y, Z, C]``, dtype kept.

  ``pts [..., 3]``: voxel coordinates, or with ``on_grid`` displacements (voxels)
  on the grid ``pts.shape[:3]`` (a warp). Not differentiable: for label maps.
  Returns ``pts.shape[:-1] + (C,)``.
  """
  grid = tuple(int(n) for n in pts.shape[:3]) if on_grid else None
  out = jax.ShapeDtypeStruct((int(np.prod(pts.shape[:-1])), vol.shape[3]), vol.dtype)
  res = _call("jaxreg_nearest", out, vol, pts.reshape(-1, 3), grid=grid, threads=threads,
              padding=np.int32(_PADDING[padding]), cval=np.float64(cval))
  return res.reshape(pts.shape[:-1] + (vol.shape[3],))
