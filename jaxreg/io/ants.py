"""ANTs' transform pair, read and written: ``{prefix}0GenericAffine.mat`` (an ITK
``AffineTransform_double_3_3`` in MATLAB v4 form) and ``{prefix}1Warp.nii.gz`` (a vector NIfTI
``[X, Y, Z, 1, 3]``, intent 1007, of LPS millimetre displacements on the fixed grid), as
``antsRegistration`` writes them (``--collapse-output-transforms 1``, its default), with
``{prefix}1InverseWarp.nii.gz`` beside them.

Conventions, checked with antspyx 0.6.3 (``tests/test_ants.py``); ``A`` is the ``.mat`` (LPS
mm, fixed -> moving), ``u`` the warp, ``v`` the inverse warp, all in LPS physical space:

* images, moving onto fixed: ``antsApplyTransforms -r fixed -i moving -t 1Warp.nii.gz -t
  0GenericAffine.mat`` (antspyx: ``transformlist=[warp, mat]``) reads the moving image at
  ``A(x + u(x))`` for the fixed point ``x``: the warp is applied to the point first.
* images, fixed onto moving: ``-t [0GenericAffine.mat,1] -t 1InverseWarp.nii.gz``
  (``transformlist=[mat, inverse_warp], whichtoinvert=[True, False]``) reads the fixed image
  at ``y + v(y)``, ``y = A^-1 q``, for the moving point ``q``.
* points go the other way: ``antsApplyTransformsToPoints`` with the transforms that bring the
  moving *image* onto the fixed grid (``[warp, mat]``) maps *fixed* points to moving ones,
  ``x -> A(x + u(x))``; with ``[mat, inverse_warp]`` (the affine inverted) moving points to
  fixed ones.

jaxreg's total map is ``x -> x + d(x)`` (RAS mm, :mod:`jaxreg.pipeline.apply`); written as a
pair, ``u(x) = A^-1 (x + d(x)) - x`` exactly, whatever the affine stage ``A``; the inverse warp
is ``u`` inverted at each voxel centre (:func:`inverse_warp_of`), read trilinearly between them
as ANTs reads it. Files are written atomically.
"""

from __future__ import annotations

import glob
import os

import numpy as np

from jaxreg.io import nifti as _nifti
from jaxreg.io.atomic import atomic_path
from jaxreg.types import InputError

__all__ = ["AFFINE", "WARP", "INVERSE_WARP", "find_pair", "read_matrix", "write_matrix",
           "read_pair", "warp_of", "inverse_warp_of", "write_pair"]

AFFINE = "0GenericAffine.mat"
WARP = "1Warp.nii.gz"
INVERSE_WARP = "1InverseWarp.nii.gz"
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS, homogeneous (its own inverse)


def find_pair(path) -> tuple[str, str] | None:
  """``(affine file, warp file)`` of the ANTs pair at ``path``: a folder holding one pair
  (``*0GenericAffine.mat`` + ``*1Warp.nii.gz``), or a prefix (``out/ants_``); None where
  neither file is there.

  Raises:
    InputError: half a pair (the message names the missing file), or several pairs in a
      folder.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    mats = sorted(glob.glob(os.path.join(glob.escape(path), "*" + AFFINE)))
    warps = sorted(glob.glob(os.path.join(glob.escape(path), "*" + WARP)))
    prefixes = sorted({f[:-len(AFFINE)] for f in mats} | {f[:-len(WARP)] for f in warps})
    if not prefixes:
      return None
    if len(prefixes) > 1:
      names = ", ".join(os.path.basename(p) or "''" for p in prefixes)
      raise InputError(f"{path}: several ANTs pairs here (prefixes {names}): give the prefix, "
                       "e.g. folder/ants_")
    prefix = prefixes[0]
  else:
    prefix = path
    if not (os.path.isfile(prefix + AFFINE) or os.path.isfile(prefix + WARP)):
      return None
  pair = prefix + AFFINE, prefix + WARP
  for have, missing in (pair, pair[::-1]):
    if not os.path.isfile(missing):
      raise InputError(f"{missing}: missing: an incomplete ANTs pair ({os.path.basename(have)} "
                       f"without {os.path.basename(missing)})")
  return pair


def read_matrix(path) -> np.ndarray:
  """The ``[4, 4]`` world matrix (RAS+ mm, fixed -> moving) of an ITK affine ``.mat`` (MATLAB
  v4: ``AffineTransform_{double,float}_3_3`` or ``MatrixOffsetTransformBase_*_3_3``, 12
  parameters: the LPS matrix row by row, then the translation; ``fixed``: the centre ``c``;
  ``p -> M (p - c) + t + c``).

  Raises:
    InputError: not such a file.
  """
  import scipy.io
  try:
    data = scipy.io.loadmat(os.fspath(path))
  except Exception as e:  # scipy raises ValueError, TypeError, ... on other files
    raise InputError(f"{path}: not an ITK affine .mat file ({str(e).splitlines()[0][:120]})"
                     ) from None
  names = [k for k in data if k.endswith("_3_3") and ("Affine" in k or "MatrixOffset" in k)]
  if not names or np.size(data[names[0]]) != 12:
    found = ", ".join(k for k in data if not k.startswith("__")) or "nothing"
    raise InputError(f"{path}: expected a 3-D ITK AffineTransform in this .mat, found {found}")
  params = np.asarray(data[names[0]], np.float64).ravel()
  centre = np.asarray(data.get("fixed", np.zeros(3)), np.float64).ravel()
  if centre.size != 3 or not np.all(np.isfinite(params)) or not np.all(np.isfinite(centre)):
    raise InputError(f"{path}: bad affine parameters (centre {centre.size} values, or not finite)")
  lps = np.eye(4)
  lps[:3, :3] = params[:9].reshape(3, 3)
  lps[:3, 3] = params[9:] + centre - lps[:3, :3] @ centre
  return _FLIP @ lps @ _FLIP


def write_matrix(path, matrix: np.ndarray) -> None:
  """Write the world matrix ``matrix`` (``[4, 4]`` RAS+ mm, fixed -> moving) as ANTs'
  ``0GenericAffine.mat`` (``AffineTransform_double_3_3`` in LPS, centre 0), atomically; the
  bytes SimpleITK's ``WriteTransform`` writes for that transform."""
  import scipy.io
  lps = _FLIP @ np.asarray(matrix, np.float64) @ _FLIP
  params = np.concatenate([lps[:3, :3].ravel(), lps[:3, 3]])[:, None]
  with atomic_path(os.fspath(path), suffix=".mat") as tmp:
    scipy.io.savemat(tmp, {"AffineTransform_double_3_3": params, "fixed": np.zeros((3, 1))},
                     format="4")


def _world(shape, affine: np.ndarray) -> np.ndarray:
  """``[*shape, 3]`` float64 world (RAS mm) voxel centres of a grid."""
  idx = np.moveaxis(np.indices(tuple(shape), dtype=np.float64), 0, -1)
  return idx @ np.asarray(affine, np.float64)[:3, :3].T + np.asarray(affine, np.float64)[:3, 3]


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
  return points @ matrix[:3, :3].T + matrix[:3, 3]


def warp_of(disp_mm: np.ndarray, matrix: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """ANTs' warp ``u = A^-1 (x + d(x)) - x`` of a total map ``x -> x + d(x)`` and its affine
  part ``A``: ``[X, Y, Z, 3]`` float32 world RAS mm on the grid of ``affine``, such that
  ``x -> A (x + u(x))`` is the total map (``disp_mm``: ``[X, Y, Z, 3]`` RAS mm there;
  ``matrix``: ``[4, 4]`` RAS mm)."""
  world = _world(np.shape(disp_mm)[:3], affine)
  inv = np.linalg.inv(np.asarray(matrix, np.float64))
  return (_apply(inv, world + np.asarray(disp_mm, np.float64)) - world).astype(np.float32)


def _read_at(field: np.ndarray, affine: np.ndarray, points: np.ndarray) -> np.ndarray:
  """``[..., 3]`` float64: ``field`` (``[X, Y, Z, 3]`` on the grid of ``affine``) read
  trilinearly at world points ``[..., 3]`` (RAS mm), its edge value repeated beyond the grid."""
  import scipy.ndimage as ndi
  inv = np.linalg.inv(np.asarray(affine, np.float64))
  vox = np.moveaxis(_apply(inv, points), -1, 0)
  return np.stack([ndi.map_coordinates(field[..., k], vox, order=1, mode="nearest")
                   for k in range(3)], -1)


def inverse_warp_of(u_mm: np.ndarray, affine: np.ndarray, *,
                    start_mm: np.ndarray | None = None,
                    tol_mm: float = 1e-3, max_iterations: int = 50) -> np.ndarray:
  """ANTs' inverse warp ``v`` of the warp ``u`` (``[X, Y, Z, 3]`` world RAS mm on the grid of
  ``affine``): at each voxel centre ``y``, ``v(y) = x - y`` with ``x + u(x) = y`` (``u`` read
  trilinearly, as ITK reads it), by the fixed-point iteration ``x <- y - u(x)`` from
  ``y + start_mm`` (default ``y``) until it moves less than ``tol_mm``, at most
  ``max_iterations`` times (where ``u`` folds it stops there). Then ``q -> y + v(y)``,
  ``y = A^-1 q``, inverts ``x -> A (x + u(x))`` up to reading ``v`` between voxels.

  Returns:
    ``[X, Y, Z, 3]`` float32 world RAS mm on the same grid.
  """
  u = np.asarray(u_mm, np.float64)
  y = _world(u.shape[:3], affine)
  x = y if start_mm is None else y + np.asarray(start_mm, np.float64)
  for _ in range(max_iterations):
    new = y - _read_at(u, affine, x)
    step = np.abs(new - x).max() if x.size else 0.0
    x = new
    if step < tol_mm:
      break
  return (x - y).astype(np.float32)


def _inverse_start(inverse_mm: np.ndarray, matrix: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """``I(A y) - y`` at the voxel centres ``y``: where an inverse map ``I(q) = q +
  inverse_mm(q)`` (moving -> fixed, on the grid of ``affine``) puts ``W^-1(y)``."""
  y = _world(np.shape(inverse_mm)[:3], affine)
  q = _apply(np.asarray(matrix, np.float64), y)
  return q + _read_at(np.asarray(inverse_mm, np.float64), affine, q) - y


def _save_warp(path: str, mm: np.ndarray, affine: np.ndarray) -> None:
  vox = np.asarray(mm, np.float64) @ np.linalg.inv(np.asarray(affine, np.float64)[:3, :3]).T
  _nifti.save_displacement(path, vox.astype(np.float32), affine, convention="itk")


def write_pair(prefix: str, disp_mm: np.ndarray, matrix: np.ndarray, affine: np.ndarray, *,
               inverse_mm: np.ndarray | None = None) -> list[str]:
  """Write a total map as ANTs writes a registration: ``{prefix}0GenericAffine.mat`` (``A``
  = ``matrix``) and ``{prefix}1Warp.nii.gz`` (:func:`warp_of`), and with ``inverse_mm``
  ``{prefix}1InverseWarp.nii.gz``: the warp inverted at each voxel (:func:`inverse_warp_of`),
  from where the inverse map puts the point, so that the pair's inverse inverts the pair;
  each file atomically.

  Args:
    prefix: the files' common start (``folder/ants_``).
    disp_mm: ``[X, Y, Z, 3]`` world RAS mm total displacement (fixed ``x`` -> ``x + d(x)``)
      on the fixed grid.
    matrix: ``[4, 4]`` the affine part (RAS mm, fixed -> moving; the identity without one).
    affine: ``[4, 4]`` voxel -> RAS mm of the fixed grid.
    inverse_mm: ``[X, Y, Z, 3]`` RAS mm, the inverse map's displacement (moving ``q`` ->
      ``q + inverse_mm(q)``) on the same grid, or None (no inverse warp).

  Returns:
    the paths written.
  """
  paths = [prefix + AFFINE, prefix + WARP]
  write_matrix(paths[0], matrix)
  u = warp_of(disp_mm, matrix, affine)
  _save_warp(paths[1], u, affine)
  if inverse_mm is not None:
    paths.append(prefix + INVERSE_WARP)
    start = _inverse_start(inverse_mm, matrix, affine)
    _save_warp(paths[2], inverse_warp_of(u, affine, start_mm=start), affine)
  return paths


def read_pair(affine_path, warp_path) -> tuple[np.ndarray, np.ndarray]:
  """The total map of an ANTs pair (written by ANTs or by :func:`write_pair`) on the warp's
  grid: ``(disp_mm [X, Y, Z, 3] float32 world RAS mm, affine [4, 4])`` with ``x -> x +
  d(x) = A (x + u(x))`` (fixed -> moving). ``d`` is affine in ``u``, so reading it
  trilinearly between voxels gives ANTs' map exactly there.

  Raises:
    InputError: an unreadable file (the message names it).
  """
  matrix = read_matrix(affine_path)
  vox, affine = _nifti.load_displacement(os.fspath(warp_path), convention="itk")
  affine = np.asarray(affine, np.float64)
  u = np.asarray(vox, np.float64) @ affine[:3, :3].T
  world = _world(vox.shape[:3], affine)
  return (_apply(matrix, world + u) - world).astype(np.float32), affine

