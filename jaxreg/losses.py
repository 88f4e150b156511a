"""Differentiable similarity measures and regularisers, one sample at a time.

Every function takes single-sample arrays (images ``[X, Y, Z]``, fields
``[X, Y, Z, 3]`` in voxels, label probabilities ``[X, Y, Z, C]``) and returns a
scalar; ``jax.vmap`` them for batches. Similarities are values to maximise and
losses values to minimise: each docstring says which a function returns.

References:
  Balakrishnan et al., `VoxelMorph: A Learning Framework for Deformable Medical
  Image Registration <https://arxiv.org/abs/1809.05231>`_, IEEE TMI 2019 (local
  NCC, diffusion regulariser); Rueckert et al., `Nonrigid registration using
  free-form deformations <https://doi.org/10.1109/42.796284>`_, IEEE TMI 1999
  (bending energy).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg import fields as _fields

__all__ = [
    "box_sum",
    "local_ncc",
    "global_ncc",
    "mse",
    "diffusion",
    "bending_energy",
    "soft_dice",
    "folding",
]


def _check_same(a, b, name_a: str, name_b: str) -> None:
  if np.shape(a) != np.shape(b):
    raise ValueError(f"{name_a} and {name_b} must have the same shape, got "
                     f"{np.shape(a)} and {np.shape(b)}")


def _check_volume(x, name: str) -> None:
  if np.ndim(x) != 3:
    raise ValueError(f"{name} must be a single [X, Y, Z] volume, got shape {np.shape(x)}")


def box_sum(x: jax.Array, window: int) -> jax.Array:
  """Sum over a centred ``window**3`` box at every voxel, zero outside the volume.

  Computed with cumulative sums (two subtractions per axis), independent of
  the window size; equals ``scipy.ndimage.uniform_filter(x, window,
  mode="constant") * window**3``.

  Args:
    x: ``[X, Y, Z]`` volume.
    window: odd box width in voxels.

  Returns:
    ``[X, Y, Z]`` box sums.
  """
  if window < 1 or window % 2 == 0:
    raise ValueError(f"window must be a positive odd int, got {window}")
  r = window // 2
  for axis in range(x.ndim):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r + 1, r)
    c = jnp.cumsum(jnp.pad(x, pad), axis=axis)
    x = (jax.lax.slice_in_dim(c, window, c.shape[axis], axis=axis)
         - jax.lax.slice_in_dim(c, 0, c.shape[axis] - window, axis=axis))
  return x


def local_ncc(fixed: jax.Array, warped: jax.Array, *, window: int = 9,
              eps: float = 1e-5) -> jax.Array:
  """Mean squared local normalised cross-correlation (a similarity, in [0, 1]).

  .. math::
    \\mathrm{LNCC} = \\frac{1}{N} \\sum_x
      \\frac{\\mathrm{cov}_x(F, W)^2}{\\mathrm{var}_x(F)\\,\\mathrm{var}_x(W) + \\epsilon}

  with (co)variances (as sums, not means) over the voxels of the
  ``window**3`` box centred at ``x`` that lie inside the volume. Unlike a
  zero-padded box (VoxelMorph), the border does not count as image structure:
  a constant image scores 0 everywhere. Use ``-local_ncc`` as a loss.

  Args:
    fixed: ``[X, Y, Z]`` fixed image.
    warped: ``[X, Y, Z]`` warped moving image.
    window: box width in voxels (odd).
    eps: added to the denominator (constant regions score 0, not NaN).

  Returns:
    scalar similarity.
  """
  _check_volume(fixed, "fixed")
  _check_same(fixed, warped, "fixed", "warped")
  n = box_sum(jnp.ones(fixed.shape, fixed.dtype), window)  # in-volume voxels per box
  sf, sw = box_sum(fixed, window), box_sum(warped, window)
  sff, sww = box_sum(fixed * fixed, window), box_sum(warped * warped, window)
  sfw = box_sum(fixed * warped, window)
  cross = sfw - sf * sw / n
  var_f = jnp.maximum(sff - sf * sf / n, 0.0)
  var_w = jnp.maximum(sww - sw * sw / n, 0.0)
  return jnp.mean(cross * cross / (var_f * var_w + eps))


def global_ncc(fixed: jax.Array, warped: jax.Array, *, eps: float = 1e-8) -> jax.Array:
  """Normalised cross-correlation over the whole volume (a similarity, in [-1, 1])."""
  _check_same(fixed, warped, "fixed", "warped")
  f = fixed - jnp.mean(fixed)
  w = warped - jnp.mean(warped)
  return jnp.sum(f * w) / jnp.sqrt(jnp.sum(f * f) * jnp.sum(w * w) + eps)


def mse(fixed: jax.Array, warped: jax.Array) -> jax.Array:
  """Mean squared intensity difference (a loss)."""
  _check_same(fixed, warped, "fixed", "warped")
  return jnp.mean((fixed - warped) ** 2)


def diffusion(disp: jax.Array) -> jax.Array:
  """Diffusion regulariser (a loss): mean squared forward difference, averaged over axes.

  ``(1/3) sum_j mean_x sum_i (u_i(x + e_j) - u_i(x))**2`` with ``disp`` in
  voxels, so a field ``u(x) = A x`` scores ``(1/3) sum_ij A_ij**2``.

  Args:
    disp: ``[X, Y, Z, 3]`` displacement in voxels.
  """
  _fields.check_field(disp)
  terms = [jnp.mean(jnp.sum(jnp.diff(disp, axis=j) ** 2, axis=-1)) for j in range(3)]
  return sum(terms) / 3.0


def bending_energy(disp: jax.Array) -> jax.Array:
  """Bending energy (a loss): mean squared second derivatives over the interior.

  ``mean_x sum_i [sum_j (d_jj u_i)**2 + 2 sum_{j<k} (d_jk u_i)**2]`` with
  central second differences (``u(x+e) - 2u(x) + u(x-e)`` and the four-point
  mixed difference) on voxels at least one voxel from the border; exact for
  quadratic fields. Units: voxels**-2 times the field's voxels**2.

  Args:
    disp: ``[X, Y, Z, 3]`` displacement in voxels (every axis >= 3 voxels).
  """
  _fields.check_field(disp)
  if min(disp.shape[:3]) < 3:
    raise ValueError(f"bending_energy needs >= 3 voxels per axis, got {disp.shape}")
  inner = (slice(1, -1),) * 3
  total = 0.0
  for j in range(3):
    plus = jnp.roll(disp, -1, axis=j)
    minus = jnp.roll(disp, 1, axis=j)
    total = total + jnp.sum((plus - 2 * disp + minus)[inner] ** 2, axis=-1)
    for k in range(j + 1, 3):
      mixed = (jnp.roll(plus, -1, axis=k) - jnp.roll(plus, 1, axis=k)
               - jnp.roll(minus, -1, axis=k) + jnp.roll(minus, 1, axis=k)) / 4.0
      total = total + 2.0 * jnp.sum(mixed[inner] ** 2, axis=-1)
  return jnp.mean(total)


def soft_dice(fixed_probs: jax.Array, warped_probs: jax.Array, *, eps: float = 1e-6,
              skip_background: bool = True) -> jax.Array:
  """Mean soft Dice over classes (a similarity, in [0, 1]).

  ``2 sum(p q) / (sum(p) + sum(q))`` per class; warp one-hot moving labels
  trilinearly (:func:`jaxreg.warp.warp` on ``[X, Y, Z, C]``) to get
  ``warped_probs``. Classes absent from both maps are left out of the mean.

  Args:
    fixed_probs: ``[X, Y, Z, C]`` fixed one-hot labels / probabilities.
    warped_probs: ``[X, Y, Z, C]`` warped moving label probabilities.
    eps: numerical floor of the denominator.
    skip_background: leave class 0 out.
  """
  _check_same(fixed_probs, warped_probs, "fixed_probs", "warped_probs")
  if np.ndim(fixed_probs) != 4:
    raise ValueError(f"label probabilities must be [X, Y, Z, C], got {np.shape(fixed_probs)}")
  axes = (0, 1, 2)
  inter = jnp.sum(fixed_probs * warped_probs, axis=axes)
  denom = jnp.sum(fixed_probs, axis=axes) + jnp.sum(warped_probs, axis=axes)
  present = denom > eps
  if skip_background:
    present = present.at[0].set(False)
  dice = 2 * inter / jnp.maximum(denom, eps)
  return jnp.sum(jnp.where(present, dice, 0.0)) / jnp.maximum(jnp.sum(present), 1)


def folding(disp: jax.Array, *, margin: float = 0.0) -> jax.Array:
  """Folding penalty (a loss): ``mean(relu(margin - det J))``, 0 for a fold-free field.

  Args:
    disp: ``[X, Y, Z, 3]`` displacement in voxels.
    margin: penalise determinants below this (0: only folds).
  """
  return jnp.mean(jax.nn.relu(margin - _fields.jacobian_determinant(disp)))
