"""The elastix B-spline baseline, through itk-elastix (``pip install 'jaxreg[baselines]'``).

:func:`run` runs elastix with the parameter map of :func:`parameter_map`
(stated here so results can be reproduced with elastix itself) and returns the
dense displacement on the fixed grid in the same convention as
:class:`jaxreg.pipeline.register.Registration`: world RAS+ millimetres, fixed point ``p``
corresponds to moving point ``p + d(p)``. ITK works in LPS; the conversion
(flip of the first two world axes, array axes reversed) lives here only.

The parameter map: elastix's default ``bspline`` map, 3 resolutions (smoothing
pyramids), final control-point spacing 15 mm, ``AdvancedMattesMutualInformation``
+ ``TransformBendingEnergyPenalty`` (weights 1 and 1),
``AdaptiveStochasticGradientDescent`` for 250 iterations per resolution with
2048 random samples, a fixed ``RandomSeed`` (so repeated runs agree), linear
interpolation during optimisation.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np

from jaxreg.ops.grid import LPS
from jaxreg.types import Volume

__all__ = ["available", "parameter_map", "run", "to_itk", "MISSING"]

MISSING = ("the elastix baseline needs itk-elastix: pip install 'jaxreg[baselines]'")



def available() -> bool:
  """Whether itk-elastix can be imported."""
  try:
    import itk  # noqa: F401
    return hasattr(itk, "elastix_registration_method")
  except ImportError:
    return False


def _itk():
  try:
    import itk
  except ImportError as e:
    raise ImportError(MISSING) from e
  return itk


def parameter_map(*, grid_spacing_mm: float = 15.0, iterations: int = 250,
                  resolutions: int = 3, seed: int = 0) -> dict[str, list[str]]:
  """The B-spline parameter map (see the module docstring), as ``{name: [values]}``."""
  itk = _itk()
  base = itk.ParameterObject.New().GetDefaultParameterMap("bspline", resolutions,
                                                          float(grid_spacing_mm))
  params = {k: list(base[k]) for k in base.keys()}
  params.update({
      "MaximumNumberOfIterations": [str(int(iterations))],
      "NumberOfSpatialSamples": ["2048"],
      "RandomSeed": [str(int(seed))],
      "WriteResultImage": ["false"],
      "ResultImagePixelType": ["float"],
  })
  return params


def to_itk(volume: Volume):
  """A jaxreg :class:`~jaxreg.types.Volume` as a float32 ``itk.Image`` with its geometry.

  NIfTI's RAS+ affine becomes ITK's LPS origin, spacing and direction; the
  array axes (i, j, k) become ITK's (x, y, z) index axes.
  """
  itk = _itk()
  affine = np.asarray(volume.affine, np.float64)
  lin = LPS @ affine[:3, :3]
  spacing = np.linalg.norm(lin, axis=0)
  image = itk.image_from_array(np.ascontiguousarray(
      np.asarray(volume.array, np.float32).transpose(2, 1, 0)))
  image.SetOrigin([float(v) for v in LPS @ affine[:3, 3]])
  image.SetSpacing([float(v) for v in spacing])
  image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(lin / spacing)))
  return image


def run(fixed: Volume, moving: Volume, *, params: dict | None = None
             ) -> tuple[np.ndarray, float]:
  """Register ``moving`` to ``fixed`` with elastix.

  Args:
    fixed: image (HU) with its affine.
    moving: image (HU) with its affine; any grid that overlaps ``fixed``.
    params: a parameter map (default :func:`parameter_map`).

  Returns:
    ``(displacement, seconds)``: ``[*fixed.shape, 3]`` float32 world RAS+ mm on
    the fixed grid (fixed ``p`` <-> moving ``p + d(p)``), and the wall time of
    registration + field computation.

  Raises:
    ImportError: itk-elastix is not installed (message says how to install it).
  """
  itk = _itk()
  t0 = time.time()
  fixed_itk, moving_itk = to_itk(fixed), to_itk(moving)
  obj = itk.ParameterObject.New()
  obj.AddParameterMap(params or parameter_map())
  # (itk-elastix 0.25.4 crashed with number_of_threads=2 and a B-spline map: left at default)
  _, transform = itk.elastix_registration_method(fixed_itk, moving_itk, parameter_object=obj,
                                                 log_to_console=False)
  with tempfile.TemporaryDirectory(prefix="jaxreg-transformix-") as tmp:
    # transformix writes deformationField.nii into its output folder (default: the cwd)
    field = itk.transformix_deformation_field(moving_itk, transform, output_directory=tmp,
                                              log_to_console=False)
  d_lps = np.asarray(itk.array_from_image(field), np.float64).transpose(2, 1, 0, 3)
  d_ras = (d_lps @ LPS).astype(np.float32)  # LPS is its own inverse and symmetric
  return d_ras, time.time() - t0
