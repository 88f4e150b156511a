"""The pure-JAX trilinear and nearest-neighbour sampling core (XLA on every backend).

Sampling is a flat-index gather: each coordinate array is floored separately, the 8
trilinear corners become int32 indices into the flattened volume, and each channel is
gathered as a scalar array (gathering rows of a channels-last ``[N, C]`` array is ~20x
slower on XLA:CPU). A large multi-channel image (``_SEQUENTIAL_VALUES``) is sampled one
channel at a time and recomputed in the backward pass, which bounds reverse mode's
memory. Coordinates are in voxels of the sampled volume, array axis order; the border
rules are :mod:`jaxreg.ops.warp`'s. The public functions are :func:`jaxreg.ops.warp.warp`
and :func:`jaxreg.ops.warp.sample`; the C++ kernel (:mod:`jaxreg.ops.warp_kernel`) falls
back to this module for derivatives it has no rule of its own for.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

__all__ = ["trilinear", "coordinate_derivatives", "sample_xyz"]


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


def coordinate_derivatives(vol, coords, padding, cval):
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
def trilinear(vol, x, y, z, padding, cval):
  """Trilinear samples of one ``[X, Y, Z]`` volume at coordinate arrays ``x, y, z``
  (voxels), with a hand-written JVP (twice differentiable: its rule is plain JAX)."""
  return _trilinear_value(vol, x, y, z, padding, cval)


@functools.partial(trilinear.defjvp, symbolic_zeros=True)
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
    derivs = coordinate_derivatives(vol, (x, y, z), padding, cval)
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
    return [trilinear(v, *xyz, padding, cval) for v in vols]
  one = jax.checkpoint(lambda v: trilinear(v, *xyz, padding, cval))
  out = jax.lax.map(one, jnp.stack(vols))
  return [out[k] for k in range(len(vols))]


def sample_xyz(image, xyz, order, padding, cval):
  """Samples of ``image`` at the coordinate arrays ``xyz = [x, y, z]`` (voxels; no
  stacking: cheaper); ``order`` 1 trilinear, 0 nearest."""
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
