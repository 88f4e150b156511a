"""Differentiable resampling of volumes: the pull-back warp.

``warp(image, u)(x) = image(x + u(x))`` for every voxel ``x`` of the output
grid, with ``u`` in voxels. Sampling is a flat-index gather: each coordinate
array is floored separately, the 8 trilinear corners become int32 indices into
the flattened volume, and each channel is gathered as a scalar array (gathering
rows of a channels-last ``[N, C]`` array is ~20x slower on XLA:CPU). A large
multi-channel image (``_SEQUENTIAL_VALUES``) is sampled one channel at a time and
recomputed in the backward pass, which bounds reverse mode's memory.

On CPU, float32 trilinear warps and nearest-neighbour warps of label maps run
a multithreaded C++ kernel instead (:mod:`jaxreg.warp_ffi`, built on first use;
``JAXREG_WARP=jax`` forces this module's code, which runs anywhere). Both give
the same values and gradients to float32 rounding.

Border rule (``padding``):

* ``"constant"``: every corner outside the volume contributes ``cval``
  (per-corner padding). Equals ``scipy.ndimage.map_coordinates(...,
  mode="grid-constant")``, ``jax.scipy.ndimage.map_coordinates(...,
  mode="constant")`` and torch ``grid_sample(padding_mode="zeros",
  align_corners=True)`` for ``cval=0``.
* ``"border"``: corner indices are clamped to the volume, i.e. the edge value
  extends outwards. Equals scipy ``mode="nearest"`` and torch
  ``padding_mode="border"``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from jaxreg import mesh as _mesh
from jaxreg import warp_ffi as _ffi

__all__ = ["sample", "warp", "warp_batch", "PADDINGS"]

PADDINGS = ("constant", "border")


def _check_options(order: int, padding: str) -> None:
  if order not in (0, 1):
    raise ValueError(f"order must be 0 (nearest) or 1 (trilinear), got {order!r}")
  if padding not in PADDINGS:
    raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")


def _axis_terms(c: jax.Array, n: int, padding: str):
  """Lower/upper corner index and weights along one axis.

  Returns ``(i0, i1, w0, w1)``: clamped int32 indices and the linear weights,
  with weights of out-of-volume corners set to zero for constant padding.
  """
  f = jnp.floor(c)
  t = c - f
  i0 = f.astype(jnp.int32)
  i1 = i0 + 1
  w0, w1 = 1.0 - t, t
  if padding == "constant":
    w0 = jnp.where((i0 >= 0) & (i0 < n), w0, 0.0)
    w1 = jnp.where((i1 >= 0) & (i1 < n), w1, 0.0)
  return jnp.clip(i0, 0, n - 1), jnp.clip(i1, 0, n - 1), w0, w1


def _trilinear_value(vol, x, y, z, padding, cval):
  """Trilinear samples of one ``[X, Y, Z]`` volume at coordinate arrays x, y, z."""
  nx, ny, nz = vol.shape
  flat = vol.reshape(-1)
  (x0, x1, wx0, wx1), (y0, y1, wy0, wy1), (z0, z1, wz0, wz1) = (
      _axis_terms(c, n, padding) for c, n in zip((x, y, z), vol.shape))
  out = 0.0
  for ix, wx in ((x0 * ny, wx0), (x1 * ny, wx1)):
    for iy, wy in ((y0, wy0), (y1, wy1)):
      ixy = (ix + iy) * nz
      wxy = wx * wy
      for iz, wz in ((z0, wz0), (z1, wz1)):
        out = out + wxy * wz * flat[ixy + iz]
  if padding == "constant" and cval != 0:
    # Corners outside the volume carry weight (1 - sum of in-volume weights).
    # (A where, not a product, so that cval=nan marks only such samples.)
    outside = 1.0 - (wx0 + wx1) * (wy0 + wy1) * (wz0 + wz1)
    out = out + jnp.where(outside > 0, cval * outside, 0.0)
  return out


def _coordinate_derivatives(vol, coords, padding, cval):
  """``d sample / d coord`` along each axis, as three arrays shaped like x.

  The volume is padded (``cval`` layers for constant padding, the edge for
  border padding) with one extra layer at the high end, so the corners of any
  clamped point are ``idx + const`` in the flat padded array, and the
  derivative along an axis is a bilinear sample of that axis's forward
  difference, ``roll(flat, -stride) - flat`` (4 gathers per axis). Each axis
  is its own gather fusion: XLA:CPU runs a fused gather several times faster
  than one it materialises to share between outputs.
  """
  lo = 1 if padding == "constant" else 0
  pad = [(lo, lo + 1)] * 3
  if padding == "constant":
    padded = jnp.pad(vol, pad, constant_values=cval)
  else:
    padded = jnp.pad(vol, pad, mode="edge")
  mx, my, mz = padded.shape
  flat = padded.reshape(-1)
  strides = (my * mz, mz, 1)
  base, fracs, inside = 0, [], []
  for c, n, stride in zip(coords, vol.shape, strides):
    cc = jnp.clip(c, -lo, n - 1 + lo)
    f = jnp.floor(cc)
    fracs.append(cc - f)
    base = base + (f.astype(jnp.int32) + lo) * stride
    inside.append((c >= -lo) & (c <= n - 1 + lo))
  derivs = []
  for axis, stride in enumerate(strides):
    diff = jnp.roll(flat, -stride) - flat
    others = [k for k in range(3) if k != axis]
    out = 0.0
    for a in (0, 1):
      for b in (0, 1):
        ta, tb = fracs[others[0]], fracs[others[1]]
        w = (ta if a else 1.0 - ta) * (tb if b else 1.0 - tb)
        out = out + w * diff[base + a * strides[others[0]] + b * strides[others[1]]]
    derivs.append(jnp.where(inside[axis], out, 0.0))
  return derivs


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def _trilinear(vol, x, y, z, padding, cval):
  return _trilinear_value(vol, x, y, z, padding, cval)


@functools.partial(_trilinear.defjvp, symbolic_zeros=True)
def _trilinear_jvp(padding, cval, primals, tangents):
  # A hand-written rule: autodiff of the gather formulation shares the 8
  # corner gathers between the three coordinate derivatives, which makes XLA
  # materialise them (~3x slower backward on CPU). Linear in the tangents, so
  # reverse mode (and the image's scatter-add cotangent) follows by transposition.
  vol, x, y, z = primals
  dvol, dx, dy, dz = tangents
  out = _trilinear_value(vol, x, y, z, padding, cval)
  tangent = jnp.zeros_like(out)
  if not isinstance(dvol, SymbolicZero):
    tangent = tangent + _trilinear_value(dvol, x, y, z, padding, 0.0)
  if any(not isinstance(d, SymbolicZero) for d in (dx, dy, dz)):
    derivs = _coordinate_derivatives(vol, (x, y, z), padding, cval)
    for deriv, d in zip(derivs, (dx, dy, dz)):
      if not isinstance(d, SymbolicZero):
        tangent = tangent + deriv * d
  return out, tangent


def _nearest(vols, coords, padding, cval):
  """Nearest-neighbour samples (round half up, as scipy) of each volume."""
  shape = vols[0].shape
  nx, ny, nz = shape
  idx = [jnp.floor(c + 0.5).astype(jnp.int32) for c in coords]
  inside = None
  if padding == "constant":
    inside = functools.reduce(
        jnp.logical_and, [(i >= 0) & (i < n) for i, n in zip(idx, shape)])
  ix, iy, iz = (jnp.clip(i, 0, n - 1) for i, n in zip(idx, shape))
  flat = (ix * ny + iy) * nz + iz
  outs = [v.reshape(-1)[flat] for v in vols]
  if inside is not None:
    outs = [jnp.where(inside, o, jnp.asarray(cval, o.dtype)) for o in outs]
  return outs


def _check_image(image, name: str = "image") -> None:
  if np.ndim(image) not in (3, 4):
    raise ValueError(
        f"{name} must be [X, Y, Z] or [X, Y, Z, C], got shape {np.shape(image)}")


def sample(image: jax.Array, coords: jax.Array, *, order: int = 1,
           padding: str = "constant", cval: float = 0.0) -> jax.Array:
  """Sample a volume at arbitrary voxel coordinates.

  Args:
    image: ``[X, Y, Z]`` or ``[X, Y, Z, C]`` volume.
    coords: ``[..., 3]`` voxel coordinates into ``image`` (array axis order).
    order: 1 for trilinear (differentiable in ``image`` and ``coords``), 0 for
      nearest neighbour (rounding half up; for label maps; keeps ``image``'s
      dtype).
    padding: ``"constant"`` or ``"border"`` (see the module docstring).
    cval: value outside the volume for ``padding="constant"`` (a Python float).

  Returns:
    ``[...]`` or ``[..., C]`` samples. Trilinear output is floating point.

  Raises:
    ValueError: bad rank, trailing size of ``coords``, ``order`` or ``padding``.
  """
  _check_options(order, padding)
  _check_image(image)
  if np.ndim(coords) < 1 or np.shape(coords)[-1] != 3:
    raise ValueError(f"coords must be [..., 3] voxel coordinates, got shape {np.shape(coords)}")
  coords = jnp.asarray(coords)
  out = _kernel(image, coords, order, padding, cval, on_grid=False)
  if out is not None:
    return out
  return _sample_xyz(image, [coords[..., i] for i in range(3)], order, padding, cval)


def _kernel(image, points, order, padding, cval, on_grid: bool):
  """The C++ kernel's result (:mod:`jaxreg.warp_ffi`), or None where it does not
  apply: it takes float32 trilinear sampling, and nearest on integer/bool label
  maps, with float32 ``points [..., 3]`` (coordinates, or with ``on_grid``
  displacements on the grid ``points.shape[:3]``)."""
  image = jnp.asarray(image)
  if order == 1:
    if not _ffi.use_kernel(image, points):
      return None
  elif jnp.issubdtype(image.dtype, jnp.floating) or not _ffi.use_kernel(points):
    return None
  vol = image if image.ndim == 4 else image[..., None]
  if order == 0:
    out = _ffi.nearest(vol, points, padding, cval, on_grid=on_grid)
  elif on_grid:
    out = _ffi.warp(vol, points, padding, cval)
  else:
    out = _ffi.sample(vol, points, padding, cval)
  return out if image.ndim == 4 else out[..., 0]


# A multi-channel image of at least this many values (channels x voxels) is sampled
# one channel at a time under ``lax.map``, each channel's work recomputed in the
# backward pass (``jax.checkpoint``; the C++ kernel recomputes its wide images too):
# reverse mode then keeps no derivative arrays and only one channel's gather
# temporaries (its padded copy, three forward differences, the corner indices) are
# alive at a time. In the paper-scale train step (7.9 M voxels, 14-label soft Dice,
# K = 4 compositions) sampling all channels at once needed 17.0 GiB on one device and
# 7.1 GiB per device at space = 8; one at a time 11.1 and 1.8 (benchmarks/memory.py,
# XLA:CPU). It costs time (shared corner indices are recomputed per channel): on 2
# CPU cores a 14-channel warp's field gradient at 128³ took 657 ms instead of 307,
# a composition's fwd+bwd 337 instead of 297; smaller images keep the fast form.
_SEQUENTIAL_VALUES = 2 ** 24


def _trilinear_channels(vols, xyz, padding, cval):
  """Trilinear samples of each ``[X, Y, Z]`` volume in ``vols`` at coordinates ``xyz``."""
  if len(vols) < 2 or len(vols) * vols[0].size < _SEQUENTIAL_VALUES:
    return [_trilinear(v, *xyz, padding, cval) for v in vols]
  one = jax.checkpoint(lambda v: _trilinear(v, *xyz, padding, cval))
  out = jax.lax.map(one, jnp.stack(vols))
  return [out[k] for k in range(len(vols))]


def _sample_xyz(image, xyz, order, padding, cval):
  """:func:`sample` with the coordinates as three arrays (no stacking: cheaper)."""
  image = jnp.asarray(image)
  if order == 1 and not jnp.issubdtype(image.dtype, jnp.floating):
    image = image.astype(jnp.result_type(xyz[0].dtype, jnp.float32))
  if not jnp.issubdtype(xyz[0].dtype, jnp.floating):
    xyz = [c.astype(jnp.float32) for c in xyz]
  has_channels = image.ndim == 4
  vols = [image[..., k] for k in range(image.shape[3])] if has_channels else [image]
  if order == 1:
    outs = _trilinear_channels(vols, xyz, padding, float(cval))
  else:
    outs = _nearest(vols, xyz, padding, cval)
  return jnp.stack(outs, axis=-1) if has_channels else outs[0]


def warp(image: jax.Array, disp: jax.Array, *, order: int = 1,
         padding: str = "constant", cval: float = 0.0) -> jax.Array:
  """Pull-back warp: ``out(x) = image(x + disp(x))``.

  Args:
    image: ``[X, Y, Z]`` or ``[X, Y, Z, C]`` volume (the moving image).
    disp: ``[X, Y, Z, 3]`` displacement in **voxels** of the output (fixed)
      grid, component ``i`` along array axis ``i``. ``image`` must lie on the
      same grid.
    order: 1 trilinear, 0 nearest neighbour (label maps; dtype kept).
    padding: ``"constant"`` (``cval`` outside, per corner) or ``"border"``
      (edge value extends outwards).
    cval: value outside the volume for ``padding="constant"``.

  Returns:
    Warped volume, same shape as ``image``.

  Raises:
    ValueError: wrong ranks, or ``disp``'s grid differs from ``image``'s.

  Examples:
    >>> import jax.numpy as jnp
    >>> img = jnp.arange(4.0)[:, None, None] * jnp.ones((4, 2, 2))
    >>> shift = jnp.zeros((4, 2, 2, 3)).at[..., 0].set(1.0)
    >>> warp(img, shift, padding="border")[:, 0, 0].tolist()
    [1.0, 2.0, 3.0, 3.0]
  """
  _check_image(image)
  if np.ndim(disp) != 4 or np.shape(disp)[-1] != 3:
    raise ValueError(f"disp must be [X, Y, Z, 3] (voxels), got shape {np.shape(disp)}")
  if tuple(np.shape(disp)[:3]) != tuple(np.shape(image)[:3]):
    raise ValueError(
        f"disp grid {tuple(np.shape(disp)[:3])} differs from image grid "
        f"{tuple(np.shape(image)[:3])}; resample one onto the other first")
  disp = jnp.asarray(disp)
  _check_options(order, padding)
  if not jnp.issubdtype(disp.dtype, jnp.floating):
    disp = disp.astype(jnp.float32)
  out = _kernel(image, disp, order, padding, cval, on_grid=True)
  if out is not None:
    return out
  shape = disp.shape[:3]
  axes = [jnp.arange(n, dtype=disp.dtype) for n in shape]
  grid = jnp.meshgrid(*axes, indexing="ij")
  # On a spatially sharded mesh each device computes its own slab of the output from
  # the whole moving image (a no-op otherwise; jaxreg.mesh).
  xyz = [_mesh.spatial(g + disp[..., i], batched=False) for i, g in enumerate(grid)]
  return _mesh.spatial(_sample_xyz(image, xyz, order, padding, cval), batched=False)


def warp_batch(image: jax.Array, disp: jax.Array, *, order: int = 1,
               padding: str = "constant", cval: float = 0.0) -> jax.Array:
  """:func:`warp` over a leading batch axis.

  Args:
    image: ``[B, X, Y, Z]`` or ``[B, X, Y, Z, C]``.
    disp: ``[B, X, Y, Z, 3]`` displacements in voxels.
    order, padding, cval: as in :func:`warp`.

  Returns:
    ``[B, ...]`` warped volumes, same shape as ``image``.
  """
  if np.ndim(image) not in (4, 5) or np.ndim(disp) != 5:
    raise ValueError(
        f"warp_batch needs image [B, X, Y, Z(, C)] and disp [B, X, Y, Z, 3], got "
        f"image {np.shape(image)} and disp {np.shape(disp)}")
  if np.shape(image)[0] != np.shape(disp)[0]:
    raise ValueError(
        f"batch sizes differ: image {np.shape(image)} vs disp {np.shape(disp)}")
  fn = functools.partial(warp, order=order, padding=padding, cval=cval)
  return _mesh.vmap(fn, np.shape(image)[0])(image, disp)
