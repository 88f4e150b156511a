"""The demons baseline: SimpleITK's multi-resolution fast symmetric-forces demons.

Install SimpleITK with ``pip install 'jaxreg[dev]'`` (or ``pip install SimpleITK``).

:func:`run` returns the dense displacement on the fixed grid in the same
convention as :class:`jaxreg.pipeline.register.Registration` and
:func:`jaxreg.eval.elastix.run`: world RAS+ millimetres, fixed point ``p``
corresponds to moving point ``p + d(p)``. ITK works in LPS; the conversion
(flip of the first two world axes, array axes reversed) lives here only
(:func:`to_sitk` for images, :func:`to_ras` for fields).

The method, stated so that results can be reproduced with SimpleITK itself:

1. Both images become float32 ``sitk.Image`` s with their own geometry
   (:func:`to_sitk`). The moving image is resampled onto the fixed grid
   (identity transform, linear interpolation, ``hu_window[0]`` outside it).
2. Both are clipped to ``hu_window`` (HU); with ``histogram_match`` the moving
   image's histogram is matched to the fixed one
   (``sitk.HistogramMatchingImageFilter``: 256 histogram levels, 15 match
   points, ``ThresholdAtMeanIntensity`` on).
3. For each level (``shrink[l]``, ``iterations[l]``), coarse to fine: both
   images are smoothed with a recursive Gaussian of sigma ``0.5 * shrink``
   voxels (skipped at factor 1) and subsampled with ``sitk.Shrink`` by that
   factor (per axis at most a quarter of the axis length, so a level keeps at
   least 4 voxels per axis). The current displacement field (physical mm, so
   it needs no rescaling) is resampled onto the level's grid (linear, nearest
   extrapolation at the edges; zero at the first level), and
   ``sitk.FastSymmetricForcesDemonsRegistrationFilter`` runs exactly
   ``iterations[l]`` iterations from it (``MaximumRMSError`` 0, so no early
   stop) with ``SmoothDisplacementField`` on and ``StandardDeviations``
   ``smoothing_sigma`` (voxels of the level); every other filter setting is
   SimpleITK's default (``MaximumUpdateStepLength`` 0.5,
   ``UseImageSpacing`` on, ``IntensityDifferenceThreshold`` 0.001).
4. The last level's field is resampled onto the full fixed grid (unless it is
   already on it) and converted to world RAS+ mm (:func:`to_ras`).

Parameters of :func:`run` (defaults): ``shrink=(4, 2, 1)``,
``iterations=(50, 50, 50)``, ``smoothing_sigma=1.5`` voxels,
``hu_window=(-1000, 1000)`` HU, ``histogram_match=True``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np

from jaxreg.ops.grid import LPS
from jaxreg.types import Volume

__all__ = ["available", "displacement_field", "run", "to_ras", "to_sitk", "MISSING"]

MISSING = "the demons baseline needs SimpleITK: pip install 'jaxreg[baselines]'"

_HISTOGRAM_LEVELS = 256
_MATCH_POINTS = 15


def available() -> bool:
  """Whether SimpleITK can be imported."""
  try:
    import SimpleITK  # noqa: F401
    return True
  except ImportError:
    return False


def _sitk():
  try:
    import SimpleITK as sitk
  except ImportError as e:
    raise ImportError(MISSING) from e
  return sitk


def _positive_ints(values, name: str) -> tuple[int, ...]:
  try:
    values = tuple(values)
  except TypeError as e:
    raise ValueError(f"{name} must be a sequence of positive ints, got {values!r}") from e
  if not values:
    raise ValueError(f"{name} must have at least one level, got {values!r}")
  for v in values:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name} must be positive ints, got {values!r}")
  return tuple(int(v) for v in values)


def _check_options(shrink, iterations, smoothing_sigma, hu_window):
  """Validated ``(shrink, iterations, sigma, (lo, hi))``; ValueError naming the bad value."""
  shrink = _positive_ints(shrink, "shrink")
  iterations = _positive_ints(iterations, "iterations")
  if len(shrink) != len(iterations):
    raise ValueError(f"shrink and iterations need one entry per level, got shrink={shrink} "
                     f"({len(shrink)} levels) and iterations={iterations} "
                     f"({len(iterations)} levels)")
  try:
    sigma = float(smoothing_sigma)
  except (TypeError, ValueError) as e:
    raise ValueError(f"smoothing_sigma must be a positive number, got {smoothing_sigma!r}") from e
  if not (math.isfinite(sigma) and sigma > 0):
    raise ValueError(f"smoothing_sigma must be a positive number (voxels), got {smoothing_sigma!r}")
  try:
    lo, hi = (float(v) for v in hu_window)
  except (TypeError, ValueError) as e:
    raise ValueError(f"hu_window must be (lo, hi) in HU, got {hu_window!r}") from e
  if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
    raise ValueError(f"hu_window needs finite lo < hi, got {hu_window!r}")
  return shrink, iterations, sigma, (lo, hi)


def to_sitk(volume: Volume):
  """A jaxreg :class:`~jaxreg.types.Volume` as a float32 ``SimpleITK.Image`` with its geometry.

  NIfTI's RAS+ affine becomes ITK's LPS origin, spacing and direction (the
  first two world rows change sign); the array axes (i, j, k) become ITK's
  (x, y, z) index axes.

  Examples:
    >>> import numpy as np
    >>> affine = np.diag([-2.0, 3.0, 4.0, 1.0]); affine[:3, 3] = [10, 20, 30]
    >>> image = to_sitk(Volume(np.zeros((5, 6, 7)), affine))
    >>> image.GetSize(), image.GetSpacing(), image.GetOrigin()
    ((5, 6, 7), (2.0, 3.0, 4.0), (-10.0, -20.0, 30.0))
    >>> image.GetDirection()
    (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
  """
  sitk = _sitk()
  affine = np.asarray(volume.affine, np.float64)
  lin = LPS @ affine[:3, :3]
  spacing = np.linalg.norm(lin, axis=0)
  image = sitk.GetImageFromArray(np.ascontiguousarray(
      np.asarray(volume.array, np.float32).transpose(2, 1, 0)))
  image.SetOrigin([float(v) for v in LPS @ affine[:3, 3]])
  image.SetSpacing([float(v) for v in spacing])
  from jaxreg.io.itk import direction
  image.SetDirection(direction(affine))  # denormal cosines zeroed: ITK's SVD fails on them
  return image


def to_ras(field) -> np.ndarray:
  """An ITK displacement field (LPS mm vectors, index x, y, z) as jaxreg's ``[X, Y, Z, 3]``
  float32 array of world RAS+ mm vectors (array axes i, j, k)."""
  sitk = _sitk()
  d_lps = np.asarray(sitk.GetArrayFromImage(field), np.float64).transpose(2, 1, 0, 3)
  return (d_lps @ LPS).astype(np.float32)  # LPS is its own inverse and symmetric


def _identity(sitk):
  return sitk.Transform(3, sitk.sitkIdentity)


def _resample_field(sitk, field, reference):
  """``field`` (vector, mm) on ``reference``'s grid: linear, nearest value beyond its edges."""
  return sitk.Resample(field, reference, _identity(sitk), sitk.sitkLinear, 0.0,
                       sitk.sitkVectorFloat64, True)


def _level(sitk, image, factor: int):
  """``image`` Gaussian-smoothed (sigma ``0.5 * factor`` voxels) and shrunk by ``factor``."""
  size = image.GetSize()
  factors = [max(1, min(factor, n // 4)) for n in size]
  if max(factors) == 1:
    return image
  sigma_mm = [0.5 * f * s if f > 1 else 0.0 for f, s in zip(factors, image.GetSpacing())]
  smooth = sitk.SmoothingRecursiveGaussianImageFilter()
  smooth.SetSigma(sigma_mm)  # physical units (the filter uses the image spacing)
  return sitk.Shrink(smooth.Execute(image), factors)


def displacement_field(fixed: Volume, moving: Volume, *, shrink: Sequence[int] = (4, 2, 1),
                       iterations: Sequence[int] = (50, 50, 50), smoothing_sigma: float = 1.5,
                       hu_window: Sequence[float] = (-1000.0, 1000.0),
                       histogram_match: bool = True):
  """The demons field in ITK's own form (what :func:`run` converts).

  Arguments as :func:`run`.

  Returns:
    ``SimpleITK.Image`` of ``sitkVectorFloat64`` on the fixed image's grid (as
    :func:`to_sitk` ``(fixed)``): LPS mm vectors, usable as a
    ``sitk.DisplacementFieldTransform`` that maps fixed points to moving points.
  """
  shrink, iterations, sigma, (lo, hi) = _check_options(shrink, iterations, smoothing_sigma,
                                                       hu_window)
  sitk = _sitk()
  fixed_image = to_sitk(fixed)
  moving_image = sitk.Resample(to_sitk(moving), fixed_image, _identity(sitk), sitk.sitkLinear,
                               lo, sitk.sitkFloat32)
  fixed_image = sitk.Clamp(fixed_image, sitk.sitkFloat32, lo, hi)
  moving_image = sitk.Clamp(moving_image, sitk.sitkFloat32, lo, hi)
  if histogram_match:
    matcher = sitk.HistogramMatchingImageFilter()
    matcher.SetNumberOfHistogramLevels(_HISTOGRAM_LEVELS)
    matcher.SetNumberOfMatchPoints(_MATCH_POINTS)
    matcher.ThresholdAtMeanIntensityOn()
    moving_image = matcher.Execute(moving_image, fixed_image)

  field = None
  for factor, n_iter in zip(shrink, iterations):
    fixed_level = _level(sitk, fixed_image, factor)
    moving_level = _level(sitk, moving_image, factor)
    if field is None:
      field = sitk.Image(fixed_level.GetSize(), sitk.sitkVectorFloat64, 3)
      field.CopyInformation(fixed_level)
    else:
      field = _resample_field(sitk, field, fixed_level)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(n_iter)
    demons.SetMaximumRMSError(0.0)  # run all n_iter iterations
    demons.SetSmoothDisplacementField(True)
    demons.SetStandardDeviations(sigma)
    field = demons.Execute(fixed_level, moving_level, field)

  if (field.GetSize() != fixed_image.GetSize() or field.GetOrigin() != fixed_image.GetOrigin()
      or field.GetSpacing() != fixed_image.GetSpacing()):
    field = _resample_field(sitk, field, fixed_image)
  return field


def run(fixed: Volume, moving: Volume, *, shrink: Sequence[int] = (4, 2, 1),
             iterations: Sequence[int] = (50, 50, 50), smoothing_sigma: float = 1.5,
             hu_window: Sequence[float] = (-1000.0, 1000.0), histogram_match: bool = True
             ) -> tuple[np.ndarray, float]:
  """Register ``moving`` to ``fixed`` with multi-resolution demons (see the module docstring).

  Args:
    fixed: CT image (HU) with its affine.
    moving: CT image (HU) with its affine; any grid that overlaps ``fixed``.
    shrink: per level, coarse to fine, the integer shrink factor of both images.
    iterations: per level, the number of demons iterations (same length as ``shrink``).
    smoothing_sigma: standard deviation (voxels of each level) of the Gaussian
      that smooths the displacement field after every iteration.
    hu_window: ``(lo, hi)`` HU both images are clipped to; ``lo`` is also the
      moving image's value outside its field of view.
    histogram_match: match the moving image's histogram to the fixed one's.

  Returns:
    ``(displacement, seconds)``: ``[*fixed.shape, 3]`` float32 world RAS+ mm on
    the fixed grid (fixed ``p`` <-> moving ``p + d(p)``), and the wall time of
    conversion, registration and field conversion.

  Raises:
    ValueError: bad options (the message names them).
    ImportError: SimpleITK is not installed (message says how to install it).
  """
  _check_options(shrink, iterations, smoothing_sigma, hu_window)
  _sitk()
  t0 = time.perf_counter()
  field = displacement_field(fixed, moving, shrink=shrink, iterations=iterations,
                             smoothing_sigma=smoothing_sigma, hu_window=hu_window,
                             histogram_match=histogram_match)
  disp = to_ras(field)
  return disp, time.perf_counter() - t0
