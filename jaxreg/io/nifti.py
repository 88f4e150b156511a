"""NIfTI images in and out, with affines, and ITK-compatible displacement fields.

:func:`load` / :func:`load_labels` read NIfTI (nibabel) and, with the ``itk`` extra,
NRRD (``.nrrd``/``.nhdr``), MetaImage (``.mha``/``.mhd``) and a folder holding a DICOM
CT series (:mod:`jaxreg.io.itk`, SimpleITK); every format arrives in the same array order
and RAS affine. Outputs are NIfTI.

Arrays are numpy, indexed ``[x, y, z]`` (nibabel's array order); every volume
travels with its 4x4 voxel-to-world affine (RAS+ mm, nibabel's convention).
Displacements are in voxels inside jaxreg; the files written here are in the
convention their readers expect:

* ``convention="itk"``: a vector NIfTI ``[X, Y, Z, 1, 3]`` (intent 1007) of
  millimetre vectors in ITK's LPS frame on the fixed image's grid, as read by
  SimpleITK's ``DisplacementFieldTransform``, ANTs' ``antsApplyTransforms``
  and 3D Slicer. It maps a fixed-space physical point ``p`` to the moving-space
  point ``p + d(p)``.
* ``convention="voxel"``: ``[X, Y, Z, 3]`` voxel displacements in array order
  (Learn2Reg's ``disp_*.nii.gz``).
"""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np

from jaxreg.io.atomic import atomic_path
from jaxreg.ops import grid as _grid
from jaxreg.types import InputError, Volume

__all__ = [
    "load",
    "load_labels",
    "save",
    "save_displacement",
    "load_displacement",
    "check_same_grid",
    "reindexed",
    "CONVENTIONS",
]

CONVENTIONS = ("itk", "voxel")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _fail(path, problem: str):
  raise InputError(f"{path}: {problem}")


def _check_path(path) -> None:
  """The input exists and, if it is a file, is not empty (every reader's first check)."""
  if not os.path.exists(path):
    _fail(path, "no such file")
  if os.path.isfile(path) and os.path.getsize(path) == 0:
    _fail(path, "file is empty")


def _read_nifti(path) -> nib.Nifti1Image:
  path = os.fspath(path)
  _check_path(path)
  try:
    img = nib.load(path)
  except Exception as e:  # nibabel raises many types for unreadable files
    _fail(path, f"not a readable NIfTI image ({type(e).__name__}: {e})")
  if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
    _fail(path, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
  return img


def _raw_pixdim(img, path) -> np.ndarray:
  """pixdim[1:4] as stored: nibabel silently turns 0 into 1 and -x into x on load."""
  try:
    with nib.openers.ImageOpener(os.fspath(path)) as f:
      raw = type(img.header).from_fileobj(f, check=False)
  except Exception as e:
    _fail(path, f"header cannot be read ({type(e).__name__}: {e})")
  return np.asarray(raw["pixdim"][1:4], dtype=np.float64)


def _checked_affine(img, path) -> np.ndarray:
  affine = np.asarray(img.affine, dtype=np.float64)
  zooms = _raw_pixdim(img, path)
  if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
    _fail(path, f"voxel spacing must be positive, header pixdim says {zooms.tolist()}")
  _check_plausible_affine(path, affine)
  return affine


def _check_plausible_affine(path, affine: np.ndarray) -> None:
  """Finite, invertible, and voxel sizes between 1 um and 1 m."""
  try:
    _grid.check_affine(affine)
  except ValueError as e:
    _fail(path, str(e))
  col = np.linalg.norm(affine[:3, :3], axis=0)
  if np.any(col < 1e-3) or np.any(col > 1e3):
    _fail(path, f"implausible voxel spacing {col.tolist()} mm")


def _read_array(img, path, dtype=None) -> np.ndarray:
  stored = np.dtype(img.get_data_dtype())
  if stored.kind not in "biuf":
    _fail(path, f"unsupported voxel type {stored} (need integer or real values)")
  try:
    if dtype is not None and np.issubdtype(dtype, np.floating):
      data = img.get_fdata(dtype=dtype)  # scaled, without a float64 copy
    else:
      data = np.asanyarray(img.dataobj)
  except Exception as e:  # truncated or corrupt data
    _fail(path, f"image data cannot be read, the file may be truncated ({type(e).__name__}: {e})")
  if data.ndim > 3:  # drop trailing singleton axes: (X, Y, Z, 1) is 3-D
    extra = data.shape[3:]
    if all(s == 1 for s in extra):
      data = data.reshape(data.shape[:3])
  if data.ndim != 3:
    _fail(path, f"expected a 3-D image, got shape {tuple(data.shape)}")
  if min(data.shape) < 2:
    _fail(path, f"every axis needs at least 2 voxels, got shape {tuple(data.shape)}")
  return np.asarray(data, dtype=dtype) if dtype is not None else np.asarray(data)


def _check_geometry(path, array: np.ndarray, affine: np.ndarray) -> None:
  """The checks a NIfTI's header gets, for an image read by another reader."""
  if array.ndim != 3:
    _fail(path, f"expected a 3-D image, got shape {tuple(array.shape)}")
  if min(array.shape) < 2:
    _fail(path, f"every axis needs at least 2 voxels, got shape {tuple(array.shape)}")
  if array.dtype.kind not in "biuf":
    _fail(path, f"unsupported voxel type {array.dtype} (need integer or real values)")
  _check_plausible_affine(path, affine)


def _read(path, dtype=None, series: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """``(array, affine)`` of a NIfTI, NRRD or MetaImage file or a DICOM folder."""
  from jaxreg.io import itk as itkio
  if itkio.is_itk_path(path):
    _check_path(path)
    array, affine = itkio.read(path, series)
    _check_geometry(path, array, affine)
    return (array.astype(dtype) if dtype is not None else array), affine
  img = _read_nifti(path)
  affine = _checked_affine(img, path)
  return _read_array(img, path, dtype), affine


def load(path, dtype=np.float32, *, series: str | None = None) -> Volume:
  """Read a 3-D image with its affine: NIfTI, or NRRD / MetaImage / a DICOM folder.

  NIfTI scaling (``scl_slope``/``scl_inter``) and DICOM rescale slope/intercept
  are applied, so CT arrives in HU. Formats other than NIfTI need the ``itk``
  extra (SimpleITK); see :mod:`jaxreg.io.itk` for their geometry.

  Args:
    path: file (``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) or
      a folder holding a DICOM series.
    dtype: numpy dtype of the returned array.
    series: DICOM series instance UID, where the folder holds several.

  Returns:
    :class:`Volume` ``(array [X, Y, Z], affine [4, 4])``.

  Raises:
    InputError: missing, empty, unreadable or truncated file, not 3-D,
      non-finite voxels, non-positive spacing, singular or non-finite affine;
      a DICOM folder with no series, several without ``series``, a gantry tilt.
  """
  array, affine = _read(path, dtype, series)
  if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
    n = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    _fail(path, f"{n} voxels are NaN or infinite")
  return Volume(array, affine)


def load_labels(path, *, like: Volume | None = None, like_path=None,
                allow_empty: bool = False) -> Volume:
  """Read an integer label map, optionally checking it lies on an image's grid.

  Args:
    path: label file, in any format :func:`load` reads.
    like: the image the labels belong to; its grid must match.
    like_path: that image's file name, for the error message.
    allow_empty: accept a map with no foreground voxel.

  Returns:
    :class:`Volume` with an ``int32`` array.

  Raises:
    InputError: as :func:`load`, plus non-integer values, negative labels, an
      empty map, or a grid that differs from ``like``'s.
  """
  raw, affine = _read(path)
  if np.issubdtype(raw.dtype, np.floating):
    if not np.all(np.isfinite(raw)):
      _fail(path, "label map has NaN or infinite values")
    if not np.array_equal(raw, np.round(raw)):
      _fail(path, "label map has non-integer values (is it an image, not labels?)")
  if raw.min() < 0:
    _fail(path, f"label map has negative values (min {raw.min()})")
  labels = raw.astype(np.int32)
  if not allow_empty and not labels.any():
    _fail(path, "label map is empty (no voxel is labelled)")
  volume = Volume(labels, affine)
  if like is not None:
    volume = reindexed(volume, like) or volume  # the same voxels in another axis order
    check_same_grid(like, volume, like_path or "image", path)
  return volume


def reindexed(volume: Volume, like: Volume, atol_mm: float = 1e-3) -> Volume | None:
  """``volume`` on ``like``'s grid when both hold the same voxel centres in another axis
  order or direction (a DICOM series stacked the other way, a transposed export); else None.

  Only permutations and flips of the axes: no value is interpolated.
  """
  m = np.linalg.solve(like.affine, volume.affine)  # volume index -> like index
  perm = np.round(m[:3, :3])
  if not (np.allclose(m[:3, :3], perm, atol=1e-4) and np.all(np.abs(perm).sum(0) == 1)
          and np.all(np.abs(perm).sum(1) == 1)):
    return None
  order = [int(np.flatnonzero(perm[i])[0]) for i in range(3)]  # like axis i <- volume axis
  array = np.transpose(volume.array, order)
  for i, j in enumerate(order):
    if perm[i, j] < 0:
      array = np.flip(array, axis=i)
  if array.shape != like.shape:
    return None
  # transposing and flipping maps volume index v to P v + c with c_i = 0 on kept axes and
  # n_i - 1 on flipped ones: the two grids must hold exactly the same voxel centres
  c = np.array([0.0 if perm[i, j] > 0 else like.shape[i] - 1 for i, j in enumerate(order)])
  if not np.allclose(like.affine[:3, :3] @ (m[:3, 3] - c), 0, atol=atol_mm):
    return None
  return Volume(np.ascontiguousarray(array), like.affine)


def check_same_grid(a: Volume, b: Volume, a_name="first", b_name="second", atol_mm=1e-3) -> None:
  """Raise :class:`InputError` unless two volumes share shape and affine."""
  if a.shape != b.shape:
    raise InputError(f"{b_name}: grid {b.shape} differs from {a_name}'s grid {a.shape}")
  if not np.allclose(a.affine, b.affine, atol=atol_mm):
    raise InputError(
        f"{b_name}: affine differs from {a_name}'s affine "
        f"(max difference {np.abs(a.affine - b.affine).max():.3g} mm)")


def _suffix(path: str) -> str:
  for s in (".nii.gz", ".nii"):
    if path.endswith(s):
      return s
  raise InputError(f"{path}: output name must end in .nii or .nii.gz")


def _nifti(array: np.ndarray, affine: np.ndarray, intent: str | None = None) -> nib.Nifti1Image:
  img = nib.Nifti1Image(array, affine)
  img.set_qform(affine, code=1)  # scanner coordinates
  img.set_sform(affine, code=1)
  img.header.set_xyzt_units("mm")
  if intent is not None:
    img.header.set_intent(intent)
  return img


def _write(img: nib.Nifti1Image, path, compresslevel: int | None = None) -> None:
  """``img`` to ``path`` atomically; a ``.nii.gz`` at gzip ``compresslevel`` (None:
  nibabel's, 1)."""
  path = os.fspath(path)
  with atomic_path(path, _suffix(path)) as tmp:
    if compresslevel is None or not path.endswith(".gz"):
      nib.save(img, tmp)
      return
    with gzip.open(tmp, "wb", compresslevel=compresslevel) as f:
      f.write(img.to_bytes())


def save(path, array, affine) -> None:
  """Write a 3-D volume as NIfTI, atomically (temporary file + rename).

  Args:
    path: output ``.nii`` or ``.nii.gz``.
    array: ``[X, Y, Z]`` array (numpy or JAX); its dtype is kept (bool is
      written as uint8, float64 as float32).
    affine: ``[4, 4]`` voxel-to-world matrix (RAS+ mm) of ``array``'s grid.
  """
  array = np.asarray(array)
  if array.ndim != 3:
    raise InputError(f"{path}: save expects a 3-D array, got shape {array.shape}")
  _grid.check_affine(affine)
  if array.dtype == bool:
    array = array.astype(np.uint8)
  elif array.dtype == np.float64:
    array = array.astype(np.float32)
  _write(_nifti(array, np.asarray(affine, np.float64)), path)


def _check_convention(convention: str) -> None:
  if convention not in CONVENTIONS:
    raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")


FIELD_COMPRESSLEVEL = 0
"""gzip level of the displacement fields :func:`save_displacement` writes: 0 (stored).
Float32 fields hardly compress (level 1 saved 8% of a 144x144x133 field's 33 MB and cost
0.95 s of a 2-core machine's time, level 6 8%, 1.1 s; 2026-12-07); the ``.gz`` file is
read like any other."""


def save_displacement(path, disp_vox, affine, convention: str = "itk", *,
                      compresslevel: int = FIELD_COMPRESSLEVEL) -> None:
  """Write a displacement field in the convention its readers expect, atomically.

  Args:
    path: output ``.nii`` / ``.nii.gz``.
    disp_vox: ``[X, Y, Z, 3]`` displacement in voxels of the grid ``affine``
      describes, component ``i`` along array axis ``i``.
    affine: ``[4, 4]`` voxel-to-world matrix (RAS+ mm) of the field's grid
      (the fixed image's).
    convention: ``"itk"`` (vector NIfTI ``[X, Y, Z, 1, 3]``, mm, LPS; for
      SimpleITK / ANTs / 3D Slicer) or ``"voxel"`` (``[X, Y, Z, 3]`` voxels).
    compresslevel: gzip level of a ``.nii.gz`` (0-9; default
      :data:`FIELD_COMPRESSLEVEL`, 0: stored, the fastest).

  Raises:
    ValueError: bad shape, affine or convention; InputError: bad path.
  """
  _check_convention(convention)
  disp = np.asarray(disp_vox, dtype=np.float32)
  if disp.ndim != 4 or disp.shape[-1] != 3:
    raise ValueError(f"disp_vox must be [X, Y, Z, 3] voxels, got shape {disp.shape}")
  if not np.all(np.isfinite(disp)):
    raise ValueError(f"{path}: refusing to write a displacement field with NaN/Inf values")
  _grid.check_affine(affine)
  affine = np.asarray(affine, np.float64)
  if convention == "voxel":
    _write(_nifti(disp, affine), path, compresslevel)
    return
  # one float32 product with the float64 matrix rounded once (~1e-7 relative)
  lps_mm = disp @ (affine[:3, :3].T @ _grid.LPS).astype(np.float32)
  _write(_nifti(lps_mm[:, :, :, None, :], affine, intent="vector"), path,
         compresslevel)


def load_displacement(path, convention: str = "itk") -> tuple[np.ndarray, np.ndarray]:
  """Read a displacement field written by :func:`save_displacement` (or ITK/ANTs/Learn2Reg).

  Args:
    path: the field's file.
    convention: ``"itk"`` or ``"voxel"``, as written.

  Returns:
    ``(disp_vox [X, Y, Z, 3] float32 voxels, affine [4, 4])``.

  Raises:
    InputError: unreadable file or a shape that is not a 3-D vector field.
  """
  _check_convention(convention)
  img = _read_nifti(path)
  affine = _checked_affine(img, path)
  try:
    data = np.asarray(img.dataobj, dtype=np.float64)
  except Exception as e:
    _fail(path, f"field data cannot be read ({type(e).__name__}: {e})")
  if data.ndim == 5 and data.shape[3] == 1:
    data = data[:, :, :, 0, :]
  if data.ndim != 4 or data.shape[-1] != 3:
    _fail(path, f"expected a [X, Y, Z, 3] or [X, Y, Z, 1, 3] vector field, got {data.shape}")
  if not np.all(np.isfinite(data)):
    _fail(path, "displacement field has NaN or infinite values")
  if convention == "voxel":
    return data.astype(np.float32), affine
  ras_mm = data @ _grid.LPS
  return (ras_mm @ np.linalg.inv(affine[:3, :3]).T).astype(np.float32), affine
