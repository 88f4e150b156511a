"""Use a registration again: resample any image or label map through a registration, and
map points through it (``jaxreg apply``).

A registration here is any of (:func:`load_any`):

* a folder written by ``jaxreg register``: its ``displacement.nii.gz`` is the total transform,
  the affine and deformable parts composed, on the fixed image's grid in ITK's convention (a
  vector NIfTI of LPS millimetre vectors: the fixed point ``p`` maps to the moving point
  ``p + d(p)``);
* an ANTs pair, a folder holding ``*0GenericAffine.mat`` + ``*1Warp.nii.gz`` or their prefix
  (written by ANTs or by ``register --ants``): ``p -> A(p + u(p))``
  (:mod:`jaxreg.io.ants`);
* elastix output: a ``TransformParameters.N.txt`` (with its chain of initial transforms), or a
  folder of them (the highest ``N``), made dense by transformix (:mod:`jaxreg.io.elastix_files`);
* a displacement field file in ITK's convention (transformix's ``deformationField.nii``,
  ``.mha``, an ANTs warp alone) or a folder holding ``deformationField.*``;
* another transform file ITK reads (``.h5``, ``.tfm``, ``.txt``, ``.mat``), made dense on a
  grid the caller gives.

:func:`apply` pulls any image on any grid through it in one interpolation from that image's
own voxels, onto the fixed grid or onto another reference grid (where the field is read
trilinearly, its edge value repeated beyond the fixed grid): what ``register`` does to the
moving image and its labels (:func:`jaxreg.pipeline.register.warp_outputs`), for a dose grid,
a PET scan or another label map of the moving scan. :func:`map_points` maps world points
through it, fixed to moving, or moving to fixed by inverting it point by point.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Callable

import numpy as np

from jaxreg import io as _io
from jaxreg.io import resample as _preprocess
from jaxreg.types import Grid, InputError, Volume

__all__ = ["Transform", "FIELD", "KINDS", "kind", "load_any", "load_registration",
           "load_transform_file", "apply", "map_points", "save"]

FIELD = "displacement.nii.gz"  # the total transform in a registration folder
KINDS = ("jaxreg", "ants", "elastix", "field", "itk")
_FIELD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_ELASTIX = re.compile(r"TransformParameters\.(\d+)\.txt$")


@dataclasses.dataclass(frozen=True)
class Transform:
  """A registration's total map on its grid.

  Attributes:
    disp_mm: ``[*grid.shape, 3]`` float32 world displacement (RAS+ mm, array axis order of
      ``grid``): the fixed point ``p`` corresponds to the moving point ``p + d(p)``.
    grid: the fixed image's grid the field lives on.
    points: the map's own evaluation at world points, ``[N, 3]`` RAS mm -> ``[N, 3]`` RAS mm
      (fixed -> moving), where the file defines one finer than ``disp_mm`` read trilinearly
      (elastix: transformix at the points); None: ``disp_mm`` read trilinearly.
  """
  disp_mm: np.ndarray
  grid: Grid
  points: Callable[[np.ndarray], np.ndarray] | None = dataclasses.field(default=None,
                                                                         compare=False)


def _jaxreg_field(folder: str) -> str | None:
  """The total transform's file of a ``jaxreg register`` folder, or None."""
  for name in (FIELD, "displacement.nrrd", "displacement.mha"):
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  return None


def _elastix_file(folder: str) -> str | None:
  """The last ``TransformParameters.N.txt`` of an elastix output folder (highest ``N``)."""
  found = [(int(m.group(1)), f) for f in os.listdir(folder) if (m := _ELASTIX.match(f))]
  return os.path.join(folder, max(found)[1]) if found else None


def _field_file(folder: str) -> str | None:
  """transformix's ``deformationField.*`` in a folder, or None."""
  found = sorted(glob.glob(os.path.join(glob.escape(folder), "deformationField.*")))
  found = [f for f in found if f.lower().endswith(_FIELD_SUFFIXES)]
  return found[0] if found else None


def kind(path) -> tuple[str, tuple[str, ...]]:
  """What the registration at ``path`` is: ``(kind, files)`` with ``kind`` one of
  :data:`KINDS` (see the module docstring) and the file(s) that hold it.

  Raises:
    InputError: nothing at ``path``, a folder holding no registration, or half an ANTs pair
      (the message names the path or the missing file).
  """
  from jaxreg.io import ants, elastix_files
  path = os.fspath(path)
  if os.path.isdir(path):
    found = _jaxreg_field(path)
    if found:
      return "jaxreg", (found,)
    pair = ants.find_pair(path)
    if pair:
      return "ants", pair
    found = _elastix_file(path)
    if found:
      return "elastix", (found,)
    found = _field_file(path)
    if found:
      return "field", (found,)
    raise InputError(f"{path}: not a registration folder (no {FIELD}, no ANTs pair "
                     f"*{ants.AFFINE} + *{ants.WARP}, no elastix TransformParameters.N.txt, "
                     "no transformix deformationField)")
  if not os.path.isfile(path):
    pair = ants.find_pair(path)  # a prefix: out/ants_
    if pair:
      return "ants", pair
    raise InputError(f"{path}: not a registration folder or file (no such file or folder)")
  lower = path.lower()
  if lower.endswith(_FIELD_SUFFIXES):
    return "field", (path,)
  if lower.endswith(".txt") and elastix_files.is_parameter_file(path):
    return "elastix", (path,)
  return "itk", (path,)


def _read_field(path: str) -> Transform:
  """A displacement field file in ITK's convention (LPS mm vectors, fixed -> moving)."""
  if path.lower().endswith((".nii", ".nii.gz")):
    vox, affine = _io.load_displacement(path, convention="itk")
    disp_mm = np.asarray(vox, np.float64) @ np.asarray(affine, np.float64)[:3, :3].T
    return Transform(disp_mm.astype(np.float32), Grid(tuple(vox.shape[:3]), affine))
  from jaxreg.io import itk as itkio
  disp_mm, affine = itkio.read_displacement(path)
  return Transform(disp_mm, Grid(tuple(disp_mm.shape[:3]), affine))


def load_any(path, grid: Grid | None = None) -> Transform:
  """The total transform of any registration jaxreg reads (:func:`kind`: a ``jaxreg
  register`` folder, an ANTs pair, elastix parameter files, a displacement field, an ITK
  transform file).

  Args:
    path: the folder, file or ANTs prefix.
    grid: where to make a transform file dense: needed for an ITK transform file; an elastix
      file is made dense there by transformix (default: its fixed grid); folders, ANTs pairs
      and fields have their own grid and ignore it.

  Raises:
    InputError: :func:`kind`'s, an unreadable or unsupported file (the message names it), or
      an ITK transform file without ``grid``.
  """
  which, files = kind(path)
  if which in ("jaxreg", "field"):
    return _read_field(files[0])
  if which == "ants":
    from jaxreg.io import ants
    disp_mm, affine = ants.read_pair(*files)
    return Transform(disp_mm, Grid(tuple(disp_mm.shape[:3]), affine))
  if which == "elastix":
    import functools

    from jaxreg.io import elastix_files
    shape, affine = (None, None) if grid is None else (grid.shape, grid.affine)
    disp_mm, affine = elastix_files.displacement(files[0], shape, affine)
    return Transform(disp_mm, Grid(tuple(disp_mm.shape[:3]), affine),
                     points=functools.partial(elastix_files.map_points, files[0]))
  if grid is None:
    raise InputError(f"{files[0]}: a transform file needs a reference grid to be made dense on "
                     "(--reference)")
  from jaxreg.io import itk as itkio
  return Transform(itkio.read_transform(files[0], grid.affine, grid.shape), grid)


def load_registration(folder) -> Transform:
  """The total transform of a registration folder (or ANTs prefix, or a file that carries
  its own grid): :func:`load_any` without a grid. A ``jaxreg register`` folder holds
  ``displacement.nii.gz``, or ``displacement.nrrd`` / ``.mha`` written with ``--output-format
  nrrd|mha``.

  Raises:
    InputError: not a registration (the message names the folder or the file).
  """
  return load_any(folder)


def load_transform_file(path: str, grid: Grid) -> Transform:
  """A transform file made dense on ``grid``: one ITK reads (``.h5``, ``.tfm``, ``.txt``,
  ``.mat``: ``register --itk-h5``'s ``transform.h5``, an ANTs affine;
  :func:`jaxreg.io.itk.read_transform`, the ``itk`` extra), or an elastix parameter file
  (:func:`load_any`).

  Raises:
    InputError: a file that is no transform jaxreg reads.
  """
  return load_any(path, grid)


def _as_transform(registration) -> Transform:
  return registration if isinstance(registration, Transform) else load_any(registration)


def apply(registration, moving: Volume, *, reference: Grid | None = None,
          order: int = 1, cval: float = 0.0, name: str = "moving") -> np.ndarray:
  """``moving`` (any grid) resampled through a registration onto ``reference``
  (``jaxreg.apply``; ``jaxreg apply --moving``).

  Args:
    registration: a registration folder, file or ANTs prefix (:func:`load_any`), or its
      :class:`Transform`.
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
  # every 97th voxel in C order, without the whole grid's index array (GBs for a large CT)
  idx = np.stack(np.unravel_index(np.arange(0, int(np.prod(target.shape)), 97),
                                  target.shape), -1)
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
  fixed to moving, ``T(p) = p + d(p)`` (as ``transform_points``; an elastix transform as
  transformix maps the points, :attr:`Transform.points`); with ``inverse``, moving to fixed:
  the ``p`` with ``T(p) = q``, solved for each point by the fixed-point iteration
  ``p <- p - (T(p) - q)`` until it moves less than ``tol_mm`` (it converges where the map is
  invertible and ``d`` changes by less than its distance: no folds, moderate rotations).

  Args:
    registration: a registration folder, file or ANTs prefix (:func:`load_any`), or its
      :class:`Transform`.
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
  forward = transform.points or (lambda p: p + _field_at(transform, p))
  if not inverse:
    return np.asarray(forward(q), np.float64)
  p = q.copy()
  for _ in range(max_iterations):
    new = p - (forward(p) - q)
    step = np.abs(new - p).max() if len(p) else 0.0
    p = new
    if step < tol_mm:
      break
  residual = np.linalg.norm(forward(p) - q, axis=1) if len(p) else np.zeros(0)
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
