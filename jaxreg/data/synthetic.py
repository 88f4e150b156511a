"""Synthetic pairs: one CT deformed by a known smooth field (random smooth motion,
breathing-like craniocaudal motion, residual rigid misalignment, intensity changes),
exact ground truth for training and evaluation."""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence

import jax
import numpy as np
import scipy.ndimage as ndi

from jaxreg.ops import fields as _fields
from jaxreg.ops import grid as _grid
from jaxreg.ops import warp as _warp

_compose = jax.jit(_fields.compose)
_warp_jit = jax.jit(_warp.warp, static_argnames=("order", "padding", "cval"))


def _warp_numpy(image: np.ndarray, disp: np.ndarray, *, order: int = 1, cval: float = 0.0,
                padding: str = "constant") -> np.ndarray:
  """:func:`jaxreg.ops.warp.warp` (``image(x + disp(x))``, ``disp`` ``[X, Y, Z, 3]`` voxels)
  by scipy's ``map_coordinates``: the same rule (``cval`` at each trilinear corner outside, or
  the edge for ``"border"``; nearest rounds half up), float64 coordinates, no JAX."""
  coords = np.indices(disp.shape[:3], np.float64) + np.moveaxis(disp, -1, 0)
  mode = "grid-constant" if padding == "constant" else "nearest"
  return ndi.map_coordinates(image, coords, order=order, mode=mode, cval=cval, prefilter=False)


def _compose_numpy(u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """:func:`jaxreg.ops.fields.compose` (``v(x) + u(x + v(x))``, border padding), numpy."""
  return (v + np.stack([_warp_numpy(u[..., k], v, padding="border") for k in range(3)], -1)
          ).astype(np.float32)


def _engine(engine: str):
  """``(compose, warp)`` of an engine: ``"jax"`` (compiled) or ``"numpy"`` (scipy, no JAX)."""
  if engine == "jax":
    return (lambda u, v: np.asarray(_compose(u, v))), \
        (lambda img, d, **kw: np.asarray(_warp_jit(img, d, **kw)))
  if engine == "numpy":
    return _compose_numpy, _warp_numpy
  raise ValueError(f"engine must be 'jax' or 'numpy', got {engine!r}")


def _world_to_voxel_vectors(vec_mm: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """``[..., 3]`` world vectors (mm) as voxel vectors of ``affine``'s grid (float32)."""
  lin = np.asarray(affine, np.float64)[:3, :3]
  return (np.asarray(vec_mm, np.float64) @ np.linalg.inv(lin).T).astype(np.float32)


@functools.lru_cache(maxsize=32)
def _bspline_matrix(n: int, c: int) -> np.ndarray:
  """``[n, c]`` matrix of 1-D cubic B-spline interpolation from c to n end-aligned points.

  Column j is ``scipy.ndimage.zoom`` of the unit vector e_j (``grid_mode=False``
  aligns the end points; the factor n / c fixes the output length to n). The
  interpolation is linear and separable, so a 3-D zoom is three such products.
  """
  return ndi.zoom(np.eye(c), (n / c, 1), order=3, grid_mode=False, mode="nearest")


def random_smooth_field(rng: np.random.Generator, shape, affine, *, max_mm: float,
                        control_spacing_mm: float = 40.0) -> np.ndarray:
  """A smooth random displacement with a given maximum magnitude.

  Gaussian noise on a coarse control grid (one point per ``control_spacing_mm``)
  is upsampled with cubic B-spline interpolation and scaled so that the largest
  vector is ``max_mm`` long.

  Args:
    rng: numpy random generator.
    shape: ``(X, Y, Z)`` output grid.
    affine: the grid's voxel-to-world affine (mm).
    max_mm: largest displacement magnitude in mm.
    control_spacing_mm: spacing of the control grid (larger = smoother).

  Returns:
    ``[X, Y, Z, 3]`` float32 displacement in voxels.
  """
  spacing = _grid.spacing(affine)
  extent = np.array(shape) * spacing
  ctrl = np.maximum(2, np.ceil(extent / control_spacing_mm).astype(int) + 1)
  noise = rng.normal(size=tuple(ctrl) + (3,))
  mm = noise
  for axis, (n, c) in enumerate(zip(shape, ctrl)):
    mm = np.moveaxis(np.tensordot(_bspline_matrix(int(n), int(c)), mm, axes=(1, axis)), 0, axis)
  norm = np.linalg.norm(mm, axis=-1).max()
  mm *= max_mm / max(norm, 1e-12)
  return _world_to_voxel_vectors(mm, affine).astype(np.float32)


def breathing_field(shape, affine, *, amplitude_mm: float, diaphragm_mm: float,
                    apex_mm: float, anterior_fraction: float = 0.2) -> np.ndarray:
  """A breathing-like motion: craniocaudal shift growing toward the diaphragm.

  The world superior-inferior (S) displacement is 0 at the lung apex
  (``apex_mm``, world S coordinate), grows smoothly (smoothstep) to
  ``-amplitude_mm`` (inferior: inhalation) at the diaphragm (``diaphragm_mm``),
  then decays linearly over the 150 mm below it to 30% (abdominal organs follow
  the diaphragm less). An anterior component of ``anterior_fraction`` times
  that magnitude mimics chest-wall expansion.

  Returns:
    ``[X, Y, Z, 3]`` float32 displacement in voxels.
  """
  affine = np.asarray(affine, np.float64)
  i, j, k = (np.arange(n, dtype=np.float64) for n in shape)
  s = (affine[2, 0] * i[:, None, None] + affine[2, 1] * j[None, :, None]
       + affine[2, 2] * k[None, None, :] + affine[2, 3])
  t = np.clip((apex_mm - s) / max(apex_mm - diaphragm_mm, 1e-6), 0.0, 1.0)
  profile = t * t * (3 - 2 * t)
  below = s < diaphragm_mm
  profile = np.where(below, 1.0 - 0.7 * np.clip((diaphragm_mm - s) / 150.0, 0, 1), profile)
  mm = np.zeros(tuple(shape) + (3,))
  mm[..., 2] = -amplitude_mm * profile
  mm[..., 1] = anterior_fraction * amplitude_mm * profile
  return _world_to_voxel_vectors(mm, affine).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SyntheticPair:
  """A pair with exact ground truth.

  ``warp(moving, disp)`` reproduces ``fixed`` (before its intensity changes),
  and ``warp(moving_labels, disp, order=0) == fixed_labels``.

  Attributes:
    fixed: ``[X, Y, Z]`` float32 image (same units as the source).
    moving: ``[X, Y, Z]`` float32 image (same units as the source).
    fixed_labels: ``[X, Y, Z]`` int32 label map (or None).
    moving_labels: ``[X, Y, Z]`` int32 label map (or None).
    disp: ``[X, Y, Z, 3]`` float32 true displacement in voxels (pull-back).
    affine: the shared grid's affine.
  """
  fixed: np.ndarray
  moving: np.ndarray
  fixed_labels: np.ndarray | None
  moving_labels: np.ndarray | None
  disp: np.ndarray
  affine: np.ndarray


def _lung_levels(shape, affine, labels: np.ndarray | None, lung_ids: Sequence[int]):
  """World S coordinates (mm) of the lung apex and base: from the lung labels, or
  else the top of the image and 40% of the way up from its bottom."""
  affine = np.asarray(affine, np.float64)
  if labels is not None and lung_ids:
    lung = np.argwhere(np.isin(labels, list(lung_ids)))
    if len(lung):
      s = (lung @ affine[:3, :3].T + affine[:3, 3])[:, 2]
      return float(s.max()), float(np.percentile(s, 2))
  corners = np.array(list(itertools.product(*[(0, n - 1) for n in shape])))
  s = (corners @ affine[:3, :3].T + affine[:3, 3])[:, 2]
  return float(s.max()), float(s.min() + 0.4 * (s.max() - s.min()))


def rigid_field(shape, affine, rotation_deg, shift_mm) -> np.ndarray:
  """``[X, Y, Z, 3]`` voxel displacement of a rigid map about the grid's centre.

  Fixed voxel ``x`` (world ``p = A x``) samples the source at world
  ``R (p - c) + c + t``: ``R`` from the xyz Euler angles ``rotation_deg``,
  ``c`` the grid centre, ``t = shift_mm``.
  """
  from scipy.spatial.transform import Rotation
  affine = np.asarray(affine, np.float64)
  idx = np.moveaxis(np.indices(shape), 0, -1).astype(np.float64)
  world = idx @ affine[:3, :3].T + affine[:3, 3]
  centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]
  rot = Rotation.from_euler("xyz", rotation_deg, degrees=True).as_matrix()
  moved = (world - centre) @ rot.T + centre + np.asarray(shift_mm, np.float64)
  back = (moved - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
  return (back - idx).astype(np.float32)


def synthetic_pair(image: np.ndarray, affine: np.ndarray, labels: np.ndarray | None = None, *,
                   seed: int, max_disp_mm: float = 10.0, control_spacing_mm: float = 40.0,
                   breathing_mm: float = 8.0, contrast: float = 0.1,
                   noise_std: float = 10.0, lung_ids: Sequence[int] = (10, 11, 12, 13, 14),
                   background: float = -1024.0, fine_disp_mm: float = 0.0,
                   fine_spacing_mm: float = 20.0, rigid_deg: float = 0.0,
                   rigid_mm: float = 0.0, crop: float = 0.0,
                   engine: str = "jax") -> SyntheticPair:
  """Make a fixed/moving pair from one image by a known smooth deformation.

  The moving image is the source; the fixed image is the source warped by
  ``disp`` = (random smooth motion) composed with (breathing motion), then given
  a random gamma-like contrast change and Gaussian noise. The same ``seed``
  always gives the same pair.

  Args:
    image: ``[X, Y, Z]`` source image (e.g. CT in HU).
    affine: its voxel-to-world affine (mm).
    labels: optional ``[X, Y, Z]`` label map of the source.
    seed: random seed (use :data:`TRAIN_SEED_BASE` / :data:`EVAL_SEED_BASE`
      offsets to keep training and evaluation pairs disjoint).
    max_disp_mm: largest magnitude of the random smooth component, mm.
    control_spacing_mm: smoothness of that component.
    breathing_mm: largest craniocaudal breathing shift, mm (scaled by a random
      factor in [0.5, 1]); 0 disables it.
    contrast: strength of the random intensity change (0 disables it).
    noise_std: standard deviation of added noise (image units).
    lung_ids: label ids of the lungs, used to place apex and diaphragm.
    background: value outside the image after warping.
    fine_disp_mm: largest magnitude of a second, finer smooth component (multi-scale
      motion), composed after the first, mm; 0 disables it.
    fine_spacing_mm: smoothness of that finer component.
    rigid_deg: a residual rigid misalignment, applied first: each Euler angle uniform
      in ``[-rigid_deg, rigid_deg]`` degrees; 0 (with ``rigid_mm`` 0) disables it.
    rigid_mm: each shift of that misalignment uniform in ``[-rigid_mm, rigid_mm]``
      mm; 0 (with ``rigid_deg`` 0) disables it.
    crop: a random field-of-view cut of the fixed image: up to this fraction of each
      axis is removed (set to ``background``, labels to 0) at a random end; 0 disables
      it. The truth (``disp``) is unchanged: the cut voxels simply hold no image.
      The options that are 0 draw no random numbers, so the pairs of a seed do not
      change when they are off.
    engine: ``"jax"`` (compiled warps) or ``"numpy"`` (scipy, no JAX: what data worker
      processes use); the same pair to float32 rounding (labels may differ where a sample
      falls on a rounding tie).

  Returns:
    :class:`SyntheticPair`.
  """
  image = np.asarray(image, np.float32)
  if image.ndim != 3:
    raise ValueError(f"image must be [X, Y, Z], got shape {image.shape}")
  if labels is not None and np.shape(labels) != image.shape:
    raise ValueError(f"labels shape {np.shape(labels)} differs from image shape {image.shape}")
  compose, warp = _engine(engine)
  rng = np.random.default_rng(seed)
  shape = image.shape
  disp = random_smooth_field(rng, shape, affine, max_mm=max_disp_mm,
                             control_spacing_mm=control_spacing_mm)
  if breathing_mm > 0:
    apex, base = _lung_levels(shape, affine, labels, lung_ids)
    breath = breathing_field(shape, affine, amplitude_mm=breathing_mm * rng.uniform(0.5, 1.0),
                             diaphragm_mm=base, apex_mm=apex)
    disp = compose(disp, breath)
  if fine_disp_mm > 0:
    fine = random_smooth_field(rng, shape, affine, max_mm=fine_disp_mm,
                               control_spacing_mm=fine_spacing_mm)
    disp = compose(disp, fine)
  if rigid_deg > 0 or rigid_mm > 0:
    rigid = rigid_field(shape, affine, rng.uniform(-rigid_deg, rigid_deg, 3),
                        rng.uniform(-rigid_mm, rigid_mm, 3))
    disp = compose(disp, rigid)
  fixed = warp(image, disp, cval=float(background))
  if contrast > 0:
    lo, hi = float(image.min()), float(image.max())
    gamma = np.exp(rng.uniform(-contrast, contrast))
    scaled = np.clip((fixed - lo) / max(hi - lo, 1e-6), 0, 1) ** gamma
    fixed = lo + scaled * (hi - lo)
  if noise_std > 0:
    fixed = fixed + rng.normal(scale=noise_std, size=shape)
  fixed_labels = moving_labels = None
  if labels is not None:
    moving_labels = np.asarray(labels, np.int32)
    fixed_labels = warp(moving_labels, disp, order=0)
  if crop > 0:
    keep = np.ones(shape, bool)
    for axis, n in enumerate(shape):
      cut = int(rng.uniform(0, crop) * n)
      index = [slice(None)] * 3
      index[axis] = slice(0, cut) if rng.uniform() < 0.5 else slice(n - cut, n)
      keep[tuple(index)] = False
    fixed = np.where(keep, fixed, background)
    if fixed_labels is not None:
      fixed_labels = np.where(keep, fixed_labels, 0).astype(np.int32)
  return SyntheticPair(fixed.astype(np.float32), image, fixed_labels, moving_labels,
                       disp.astype(np.float32), np.asarray(affine, np.float64))
