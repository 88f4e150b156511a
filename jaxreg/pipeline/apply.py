"""Use a registration again: resample any image or label map through a folder that
``jaxreg register`` wrote (``jaxreg apply``).

The folder's ``displacement.nii.gz`` is the total transform, the affine and deformable parts
composed, on the fixed image's grid in ITK's convention (a vector NIfTI of LPS millimetre
vectors: the fixed point ``p`` maps to the moving point ``p + d(p)``). :func:`apply` pulls
any image on any grid through it in one interpolation from that image's own voxels, onto
the fixed grid or onto another reference grid (where the field is read trilinearly, its edge
value repeated beyond the fixed grid): what ``register`` does to the moving image and its
labels (:func:`jaxreg.pipeline.register.warp_outputs`), for a dose grid, a PET scan or
another label map of the moving scan. :func:`map_points` maps world points through it, fixed
to moving, or moving to fixed by inverting it point by point.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from jaxreg import io as _io
from jaxreg.io import resample as _preprocess
from jaxreg.types import Grid, InputError, Volume

__all__ = ["Transform", "FIELD", "load_registration", "load_transform_file", "apply",
           "map_points", "save"]

FIELD = "displacement.nii.gz"  # the total transform in a registration folder


@dataclasses.dataclass(frozen=True)
class Transform:
  """A registration's total map on its grid.

  Attributes:
    disp_mm: ``[*grid.shape, 3]`` float32 world displacement (RAS+ mm, array axis order of
      ``grid``): the fixed point ``p`` corresponds to the moving point ``p + d(p)``.
    grid: the fixed image's grid the field lives on.
  """
  disp_mm: np.ndarray
  grid: Grid


def load_registration(folder: str) -> Transform:
  """The total transform of a folder written by ``jaxreg register`` (``displacement.nii.gz``,
  or ``displacement.nrrd`` / ``.mha`` written with ``--output-format nrrd|mha``).

  Raises:
    InputError: not a folder, or no readable ``displacement.nii.gz`` in it (the message
      names the folder or the file).
  """
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise InputError(f"{folder}: not a registration folder (no such folder)")
  path = os.path.join(folder, FIELD)
  others = [os.path.join(folder, f"displacement{ext}") for ext in (".nrrd", ".mha")]
  if not os.path.isfile(path):
    found = [p for p in others if os.path.isfile(p)]
    if not found:  # neither --output-format nifti's file nor nrrd's / mha's
      raise InputError(f"{folder}: not a jaxreg registration folder ({FIELD} is missing)")
    from jaxreg.io import itk as itkio
    disp_mm, affine = itkio.read_displacement(found[0])
    return Transform(disp_mm, Grid(tuple(disp_mm.shape[:3]), affine))
  vox, affine = _io.load_displacement(path, convention="itk")
  disp_mm = np.asarray(vox, np.float64) @ np.asarray(affine, np.float64)[:3, :3].T
  return Transform(disp_mm.astype(np.float32), Grid(tuple(vox.shape[:3]), affine))


def load_transform_file(path: str, grid: Grid) -> Transform:
  """A transform file ITK reads (``.h5``, ``.tfm``, ``.txt``, ``.mat``: ``register
  --itk-h5``'s ``transform.h5``, an ANTs or elastix affine), made dense on ``grid``
  (:func:`jaxreg.io.itk.read_transform`; the ``itk`` extra).

  Raises:
    InputError: a file ITK cannot read as a transform.
  """
  from jaxreg.io import itk as itkio
  return Transform(itkio.read_transform(path, grid.affine, grid.shape), grid)


def _as_transform(registration) -> Transform:
  return registration if isinstance(registration, Transform) else load_registration(registration)


def apply(registration, moving: Volume, *, reference: Grid | None = None,
          order: int = 1, cval: float = 0.0, name: str = "moving") -> np.ndarray:
  """``moving`` (any grid) resampled through a registration onto ``reference``
  (``jaxreg.apply``; ``jaxreg apply --moving``).

  Args:
    registration: a folder written by ``jaxreg register``, or its :class:`Transform`
      (:func:`load_registration`).
    moving: an image or label map of the moving scan's space, with its own affine.
    reference: the output grid (default: the transform's, the fixed image's); the field is
      read there trilinearly, its edge value repeated beyond its grid.
    order: 1 trilinear, 0 nearest neighbour (label maps: values and dtype kept).
    cval: the value where a point maps outside ``moving``.
    name: how to name ``moving`` in error messages (e.g. its file).

  Returns:
    ``reference.shape`` array (float32 for ``order=1``, ``moving``'s dtype for ``order=0``).

  Raises:
    InputError: ``moving`` does not overlap the transformed reference grid in world space.
    ValueError: ``order`` not 0 or 1.
  """
  if order not in (0, 1):
    raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}")
  transform = _as_transform(registration)
  target = transform.grid if reference is None else reference
  disp = transform.disp_mm
  if reference is not None:  # world mm read at the reference voxels
    disp = _preprocess.map_field(disp, transform.grid, reference, np.eye(3))
  _check_lands(moving, target, disp, name)
  out = _preprocess.resample_moving(moving, disp, target, order=order, cval=cval)
  return out.astype(np.float32) if order == 1 else out


def _check_lands(moving: Volume, target: Grid, disp: np.ndarray, name: str) -> None:
  """InputError unless some target voxel maps inside ``moving``'s voxel box."""
  idx = np.moveaxis(np.indices(target.shape), 0, -1).reshape(-1, 3)[::97]
  world = idx @ target.affine[:3, :3].T + target.affine[:3, 3] + disp.reshape(-1, 3)[::97]
  inv = np.linalg.inv(moving.affine)
  vox = world @ inv[:3, :3].T + inv[:3, 3]
  inside = np.all((vox >= -0.5) & (vox <= np.array(moving.shape) - 0.5), axis=1)
  if not inside.any():
    raise InputError(f"{name}: does not overlap the registration's fixed space in world "
                     "coordinates (check that it belongs to the moving scan)")


def _field_at(transform: Transform, points: np.ndarray) -> np.ndarray:
  """``[N, 3]`` world displacement (mm) at world points ``[N, 3]`` (RAS mm): trilinear in
  float64, the edge value repeated beyond the grid (as :func:`jaxreg.transform_points`)."""
  import scipy.ndimage as ndi
  inv = np.linalg.inv(np.asarray(transform.grid.affine, np.float64))
  vox = (points @ inv[:3, :3].T + inv[:3, 3]).T
  field = np.asarray(transform.disp_mm, np.float64)
  return np.stack([ndi.map_coordinates(field[..., k], vox, order=1, mode="nearest")
                   for k in range(3)], -1)


def map_points(registration, points_ras, *, inverse: bool = False,
               tol_mm: float = 1e-4, max_iterations: int = 200) -> np.ndarray:
  """World points through a registration (``jaxreg.map_points``; ``jaxreg apply --points``):
  fixed to moving, ``p + d(p)`` (as
  ``transform_points``); with ``inverse``, moving to fixed: the ``p`` with ``p + d(p) = q``,
  solved for each point by the fixed-point iteration ``p <- q - d(p)`` until it moves less
  than ``tol_mm`` (it converges where the map is invertible and ``d`` changes by less than
  its distance: no folds, moderate rotations).

  Args:
    registration: a folder written by ``jaxreg register``, or its :class:`Transform`.
    points_ras: ``[N, 3]`` world points, RAS+ mm.
    inverse: map moving points to fixed ones.
    tol_mm: convergence tolerance of the inverse (mm).
    max_iterations: of the inverse.

  Returns:
    ``[N, 3]`` float64 RAS mm.

  Raises:
    ValueError: not ``[N, 3]`` finite points.
    InputError: the inverse did not converge for some points (the message counts them).
  """
  q = np.asarray(points_ras, np.float64)
  if q.ndim != 2 or q.shape[1] != 3 or not np.all(np.isfinite(q)):
    raise ValueError(f"points must be [N, 3] finite RAS mm, got shape {q.shape}")
  transform = _as_transform(registration)
  if not inverse:
    return q + _field_at(transform, q)
  p = q.copy()
  for _ in range(max_iterations):
    new = q - _field_at(transform, p)
    step = np.abs(new - p).max() if len(p) else 0.0
    p = new
    if step < tol_mm:
      break
  residual = np.linalg.norm(p + _field_at(transform, p) - q, axis=1)
  bad = int(np.sum(residual > 10 * tol_mm))
  if bad:
    raise InputError(f"the inverse map did not converge for {bad} of {len(q)} points (worst "
                     f"{residual.max():.3g} mm): a folded field there, or points far outside")
  return p


def save(path: str, array: np.ndarray, grid: Grid) -> None:
  """Write an :func:`apply` result atomically: NIfTI (``.nii``, ``.nii.gz``), or NRRD /
  MetaImage (``.nrrd``, ``.mha``, ``.mhd``; the ``itk`` extra).

  Raises:
    InputError: another extension, or a folder that does not exist.
  """
  path = os.fspath(path)
  if path.endswith((".nii", ".nii.gz")):
    _io.save(path, array, grid.affine)
    return
  from jaxreg.io import itk as itkio
  if not itkio.is_itk_path(path):
    raise InputError(f"{path}: output must end in .nii.gz, .nii, .nrrd, .mha or .mhd")
  with _io.atomic_path(path, suffix=os.path.splitext(path)[1]) as tmp:
    itkio.write(tmp, array, grid.affine)
