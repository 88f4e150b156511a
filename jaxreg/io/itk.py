"""Images that are not NIfTI: NRRD, MetaImage and DICOM series, read through SimpleITK.

SimpleITK is an optional extra (``pip install 'jaxreg[itk]'``). Each reader returns the
array in ITK index order ``(i, j, k)`` -- the same ``[X, Y, Z]`` axis order as a NIfTI of
that image -- and the voxel-to-world affine in RAS+ mm, so a file read here overlays the same
data read from a NIfTI conversion exactly:

    p_LPS = origin + D diag(spacing) index       (ITK: direction D, LPS physical space)
    p_RAS = diag(-1, -1, 1) p_LPS                 (the NIfTI / nibabel convention)

DICOM: a folder with one CT series (or ``series=UID`` among several), slices sorted by
GDCM along the slice normal, rescale slope/intercept applied (HU). A gantry tilt (slice
positions not along the normal) or non-uniform slice spacing is refused: resampling such
series is a decision the user should make with the scanner's geometry in view.
"""

from __future__ import annotations

import contextlib
import functools
import locale
import os

import numpy as np

from jaxreg.ops.grid import LPS

__all__ = ["SUFFIXES", "is_itk_path", "read", "write", "write_displacement", "dicom_series",
           "direction",
           "write_composite", "read_transform", "read_displacement"]

SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


def _keep_locale(fn):
  """Run ``fn`` and put the process's C locale back: ITK's GDCM resets it to "C", after which
  Python's ``open()`` would default to ASCII (a summary with a non-ASCII sign then fails)."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    saved = locale.setlocale(locale.LC_ALL)
    try:
      return fn(*args, **kwargs)
    finally:
      with contextlib.suppress(locale.Error):
        locale.setlocale(locale.LC_ALL, saved)
  return wrapped


def is_itk_path(path) -> bool:
  """A NRRD or MetaImage file name, or a folder (a DICOM series)."""
  path = os.fspath(path)
  return os.path.isdir(path) or path.lower().endswith(SUFFIXES)


def _sitk(path):
  from jaxreg.types import InputError
  try:
    import SimpleITK as sitk
  except ImportError:
    raise InputError(f"{path}: reading NRRD, MetaImage and DICOM needs SimpleITK: "
                     "pip install 'jaxreg[itk]'") from None
  return sitk


def _fail(path, problem: str):
  from jaxreg.types import InputError
  raise InputError(f"{path}: {problem}")


@_keep_locale
def dicom_series(folder) -> dict[str, list[str]]:
  """Series instance UID -> its files (sorted by GDCM along the slice normal)."""
  sitk = _sitk(folder)
  ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(os.fspath(folder)) or ()
  return {uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(os.fspath(folder), uid))
          for uid in ids}


def _check_slices(folder, files: list[str], sitk) -> None:
  """Refuse a gantry tilt or non-uniform slice spacing (needs >= 2 slices with positions)."""
  positions, orientation = [], None
  for f in files:
    r = sitk.ImageFileReader()
    r.SetFileName(f)
    try:
      r.ReadImageInformation()
      positions.append([float(v) for v in r.GetMetaData("0020|0032").split("\\")])
      orientation = [float(v) for v in r.GetMetaData("0020|0037").split("\\")]
    except RuntimeError:
      return  # no positions (e.g. a single multi-frame file): ITK's geometry stands
  if len(positions) < 2 or orientation is None:
    return
  row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
  normal = np.cross(row, col)
  steps = np.diff(np.asarray(positions), axis=0)
  along = steps @ normal
  if np.any(np.abs(along) < 1e-6):
    _fail(folder, "two slices share a position (duplicate or mixed acquisitions?)")
  across = np.linalg.norm(steps - along[:, None] * normal, axis=1)
  if np.max(across / np.abs(along)) > 1e-3:
    angle = float(np.degrees(np.arctan(np.max(across / np.abs(along)))))
    _fail(folder, f"gantry tilt of {angle:.1f} deg (slices are not stacked along their "
                  "normal); resample it to an orthogonal grid first")
  if np.max(np.abs(along)) - np.min(np.abs(along)) > 0.01 * np.median(np.abs(along)):
    _fail(folder, f"non-uniform slice spacing ({np.min(np.abs(along)):.3g} to "
                  f"{np.max(np.abs(along)):.3g} mm) or missing slices; resample it first")


def _read_dicom(folder, series: str | None, sitk):
  found = dicom_series(folder)
  if not found:
    _fail(folder, "no DICOM series in this folder")
  if series is None:
    if len(found) > 1:
      _fail(folder, f"{len(found)} DICOM series here; pick one with --series UID: "
                    + ", ".join(f"{uid} ({len(f)} files)" for uid, f in found.items()))
    series = next(iter(found))
  elif series not in found:
    if len(found) > 1:
      _fail(folder, f"no series {series} here; the series are: " + ", ".join(found))
    series = next(iter(found))  # --series names a series of the other image
  files = found[series]
  _check_slices(folder, files, sitk)
  reader = sitk.ImageSeriesReader()
  reader.SetFileNames(files)
  return reader.Execute()


@_keep_locale
def read(path, series: str | None = None):
  """``(array [X, Y, Z] in ITK index order, affine [4, 4] RAS+ mm)`` of a NRRD/MetaImage file
  or a DICOM folder (``series``: the series UID where the folder holds several).

  Raises:
    jaxreg.types.InputError: SimpleITK missing, a file ITK cannot read (a .mhd whose raw file is
      missing, ...), not 3-D (a non-spatial or vector axis, a 2-D image), an empty DICOM
      folder, several series without ``series``, a gantry tilt or uneven slices.
  """
  sitk = _sitk(path)
  path = os.fspath(path)
  try:
    image = _read_dicom(path, series, sitk) if os.path.isdir(path) else sitk.ReadImage(path)
  except RuntimeError as e:  # ITK's messages span lines: keep the gist
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    gist = next((l for l in lines if "rror" in l or "not" in l), lines[-1] if lines else "")
    _fail(path, f"ITK cannot read it ({gist[:200]})")
  if image.GetNumberOfComponentsPerPixel() != 1:
    _fail(path, f"expected a scalar 3-D image, got {image.GetNumberOfComponentsPerPixel()} "
                "components per voxel (a vector or non-spatial axis)")
  if image.GetDimension() != 3:
    _fail(path, f"expected a 3-D image, got {image.GetDimension()}-D of size {image.GetSize()}")
  array = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))  # (k, j, i) -> (i, j, k)
  return array, _affine_of(image)


def _affine_of(image) -> np.ndarray:
  """The ``[4, 4]`` RAS+ affine of an ITK image (LPS origin, direction and spacing)."""
  affine = np.eye(4)
  cosines = np.asarray(image.GetDirection(), np.float64).reshape(3, 3)
  affine[:3, :3] = LPS @ cosines @ np.diag(image.GetSpacing())
  affine[:3, 3] = LPS @ np.asarray(image.GetOrigin(), np.float64)
  return affine


def _geometry(affine) -> tuple[list[float], list[float], list[float]]:
  """ITK's ``(spacing, direction, origin)`` (LPS) of a RAS+ ``[4, 4]`` affine without shear."""
  affine = np.asarray(affine, np.float64)
  spacing = np.linalg.norm(affine[:3, :3], axis=0)
  return spacing.tolist(), direction(affine), (LPS @ affine[:3, 3]).tolist()


@_keep_locale
def read_displacement(path) -> tuple[np.ndarray, np.ndarray]:
  """``(disp_mm [X, Y, Z, 3] float32 world RAS+ mm, affine [4, 4])`` of an ITK vector image of
  LPS millimetre vectors (what :func:`write_displacement` writes: NRRD, MetaImage).

  Raises:
    jaxreg.types.InputError: unreadable, or not a 3-D field of 3-vectors.
  """
  sitk = _sitk(path)
  path = os.fspath(path)
  try:
    image = sitk.ReadImage(path, sitk.sitkVectorFloat64)
  except RuntimeError as e:
    _fail(path, f"ITK cannot read it as a vector field ({str(e).strip().splitlines()[-1][:200]})")
  if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 3:
    _fail(path, f"expected a 3-D field of 3-vectors, got {image.GetDimension()}-D with "
                f"{image.GetNumberOfComponentsPerPixel()} components")
  lps = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0, 3))
  if not np.all(np.isfinite(lps)):
    _fail(path, "displacement field has NaN or infinite values")
  return (lps * np.diag(LPS)).astype(np.float32), _affine_of(image)


@_keep_locale
def write(path, array: np.ndarray, affine: np.ndarray) -> None:
  """Write ``array [X, Y, Z]`` with its RAS affine as NRRD/MetaImage (the inverse of :func:`read`).

  The affine's columns give spacing (their norms) and direction; it must have no shear.
  """
  sitk = _sitk(path)
  image = _placed(sitk.GetImageFromArray(np.transpose(np.asarray(array), (2, 1, 0))), affine)
  sitk.WriteImage(image, os.fspath(path), useCompression=True)


def direction(affine: np.ndarray) -> list[float]:
  """ITK's direction cosines (LPS, row-major) of a RAS affine, with entries below 1e-12 set to
  exactly 0: ITK inverts the direction matrix by SVD, which fails on denormal entries (an
  affine built from a rotation by 90 degrees holds values like 5e-308), and then maps
  physical points wrongly."""
  affine = np.asarray(affine, np.float64)
  cosines = LPS @ affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
  cosines[np.abs(cosines) < 1e-12] = 0.0
  return cosines.ravel().tolist()


def _vector_image(sitk, disp_mm: np.ndarray, affine: np.ndarray):
  """A float64 ITK vector image of LPS millimetre vectors on the grid of ``affine``."""
  lps = np.asarray(disp_mm, np.float64) * np.diag(LPS)
  return _placed(sitk.GetImageFromArray(np.transpose(lps, (2, 1, 0, 3)), isVector=True), affine)


def _placed(image, affine):
  """``image`` with the spacing, direction and origin of ``affine`` (:func:`_geometry`)."""
  spacing, cosines, origin = _geometry(affine)
  image.SetSpacing(spacing)
  image.SetDirection(cosines)
  image.SetOrigin(origin)
  return image


@_keep_locale
def write_composite(path, matrix: np.ndarray, deformable_mm: np.ndarray,
                    affine: np.ndarray) -> None:
  """Write ``p -> M (p + u(p))`` as one ITK composite transform file (``.h5``), atomically:
  an ``AffineTransform`` (``matrix``, world RAS+ ``[4, 4]``, stored in LPS) and a
  ``DisplacementFieldTransform`` (``deformable_mm``: ``[X, Y, Z, 3]`` RAS+ mm ``u`` on the
  grid of ``affine``, stored as LPS vectors), the field applied first, as ITK applies the
  last transform of a composite first. SimpleITK's ``ReadTransform``, 3D Slicer and ANTs
  (``antsApplyTransforms -t file.h5``) read it.
  """
  from jaxreg.io.atomic import atomic_path
  sitk = _sitk(path)
  flip = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS, homogeneous
  m = flip @ np.asarray(matrix, np.float64) @ flip
  linear = sitk.AffineTransform(3)
  linear.SetMatrix(m[:3, :3].ravel().tolist())
  linear.SetTranslation(m[:3, 3].tolist())
  field = sitk.DisplacementFieldTransform(_vector_image(sitk, deformable_mm, affine))
  with atomic_path(path, suffix=".h5") as tmp:
    sitk.WriteTransform(sitk.CompositeTransform([linear, field]), tmp)


@_keep_locale
def read_transform(path, grid_affine: np.ndarray, shape) -> np.ndarray:
  """Any transform file ITK reads (``.h5``, ``.tfm``, ``.txt``, ``.mat``: ANTs' and
  elastix's affine files included) made dense on a grid: ``[*shape, 3]`` world RAS+ mm
  displacement, fixed point ``p`` -> ``p + d(p)``.

  Raises:
    InputError: a file ITK cannot read as a transform (the message names it).
  """
  sitk = _sitk(path)
  from jaxreg.types import InputError
  try:
    transform = sitk.ReadTransform(os.fspath(path))
  except RuntimeError as e:
    raise InputError(f"{path}: not a transform file ITK reads "
                     f"({str(e).strip().splitlines()[-1]})") from None
  spacing, cosines, origin = _geometry(grid_affine)
  to_field = sitk.TransformToDisplacementFieldFilter()
  to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
  to_field.SetSize([int(n) for n in shape])
  to_field.SetOutputSpacing(spacing)
  to_field.SetOutputDirection(cosines)
  to_field.SetOutputOrigin(origin)
  lps = np.transpose(sitk.GetArrayFromImage(to_field.Execute(transform)), (2, 1, 0, 3))
  return (lps * np.diag(LPS)).astype(np.float32)


@_keep_locale
def write_displacement(path, disp_mm: np.ndarray, affine: np.ndarray) -> None:
  """Write a displacement as an ITK vector image (NRRD/MetaImage) in ITK's convention.

  ``disp_mm``: ``[X, Y, Z, 3]`` world (RAS+) millimetres on the grid of ``affine``; the
  file holds LPS millimetre vectors on that grid, what SimpleITK's
  ``DisplacementFieldTransform`` and 3D Slicer read (fixed point ``p`` -> ``p + d(p)``).
  """
  sitk = _sitk(path)
  sitk.WriteImage(_vector_image(sitk, disp_mm, affine), os.fspath(path), useCompression=True)
