"""elastix's transform parameter files (``TransformParameters.0.txt`` and the chain of
``InitialTransformParameterFileName``), made dense and applied to points through transformix
(itk-elastix: ``pip install 'jaxreg[elastix]'``).

elastix's transforms map FIXED physical points to MOVING ones (LPS mm), the direction of
jaxreg's displacement: the fixed point ``p`` corresponds to the moving point ``T(p)``, so
``d(p) = T(p) - p`` (here in RAS mm). A chain is composed as elastix composes it
(``HowToCombineTransforms "Compose"``): the initial transform is applied to the point first,
``T(p) = T_1(T_0(p))``. The file's own output grid (``Size``, ``Spacing``, ``Origin``,
``Direction``: the fixed image's) is the default grid of the field; any other grid is asked of
transformix directly (no second interpolation).
"""

from __future__ import annotations

import os
import re
import tempfile

import numpy as np

from jaxreg.ops.grid import LPS
from jaxreg.types import InputError

__all__ = ["SUPPORTED", "is_parameter_file", "read_parameters", "read_chain", "grid_of",
           "displacement", "map_points"]

# what elastix writes for CT registration (RecursiveBSplineTransform: the same B-spline)
SUPPORTED = ("TranslationTransform", "EulerTransform", "SimilarityTransform",
             "AffineTransform", "BSplineTransform", "RecursiveBSplineTransform")
_INITIAL = ("InitialTransformParameterFileName", "InitialTransformParametersFileName")
_LINE = re.compile(r"^\(\s*(\w+)\s*(.*)\)$")


def is_parameter_file(path) -> bool:
  """A text file that names an elastix transform (``(Transform "...")``)."""
  try:
    with open(os.fspath(path), encoding="utf-8", errors="replace") as f:
      head = f.read(1 << 16)
  except OSError:
    return False
  return re.search(r"^\s*\(\s*Transform\s", head, re.MULTILINE) is not None


def read_parameters(path) -> dict[str, list[str]]:
  """``{name: [values as text]}`` of an elastix parameter file (``(Name v1 "v2" ...)`` lines,
  ``//`` comments).

  Raises:
    InputError: unreadable, or no ``Transform`` in it.
  """
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise InputError(f"{path}: cannot read it ({e.strerror})") from None
  params = {}
  for line in lines:
    m = _LINE.match(line.split("//")[0].strip())
    if m:
      params[m.group(1)] = [v.strip('"') for v in re.findall(r'"[^"]*"|\S+', m.group(2))]
  if "Transform" not in params:
    raise InputError(f"{path}: not an elastix transform parameter file (no (Transform ...))")
  return params


def _checked(path: str, params: dict) -> dict:
  """``params`` if jaxreg applies them as elastix would; one-line InputError otherwise."""
  kind = params["Transform"][0]
  if kind not in SUPPORTED:
    raise InputError(f"{path}: elastix transform {kind} is not supported (supported: "
                     f"{', '.join(SUPPORTED)})")
  for key in ("FixedImageDimension", "MovingImageDimension"):
    if params.get(key, ["3"])[0] != "3":
      raise InputError(f"{path}: a {params[key][0]}-D transform ({key}); jaxreg applies 3-D ones")
  if params.get("HowToCombineTransforms", ["Compose"])[0] != "Compose":
    raise InputError(f"{path}: HowToCombineTransforms {params['HowToCombineTransforms'][0]} is "
                     "not supported (only Compose, elastix's default)")
  if params.get("UseDirectionCosines", ["true"])[0].lower() != "true":
    raise InputError(f"{path}: UseDirectionCosines false (elastix < 4.7 geometry) is not "
                     "supported; register again with a current elastix")
  for key in ("Size", "Spacing", "Origin"):
    if len(params.get(key, ())) != 3:
      raise InputError(f"{path}: no 3-D {key} of the fixed image in it")
  return params


def _initial_path(path: str, name: str) -> str:
  """The file an ``InitialTransformParameterFileName`` names: as written (elastix writes the
  path it was given), else beside ``path`` (a copied or moved output folder)."""
  here = os.path.dirname(os.path.abspath(path))
  for candidate in (name, os.path.join(here, name), os.path.join(here, os.path.basename(name))):
    if os.path.isfile(candidate):
      return candidate
  raise InputError(f"{path}: its initial transform {name} is missing (looked beside it too)")


def read_chain(path) -> list[dict[str, list[str]]]:
  """The parameter maps of ``path`` and of its initial transforms, the first applied first
  (the innermost initial transform first, ``path``'s own last).

  Raises:
    InputError: a missing or unreadable file in the chain, a loop, an unsupported transform
      (the message names the file).
  """
  path, chain, seen = os.fspath(path), [], set()
  while True:
    real = os.path.realpath(path)
    if real in seen:
      raise InputError(f"{path}: the chain of initial transforms loops back to this file")
    seen.add(real)
    params = _checked(path, read_parameters(path))
    chain.append(params)
    name = next((params[k][0] for k in _INITIAL if params.get(k)), "NoInitialTransform")
    if name == "NoInitialTransform":
      return chain[::-1]
    path = _initial_path(path, name)


def grid_of(params: dict) -> tuple[tuple[int, int, int], np.ndarray]:
  """``(shape, affine [4, 4] voxel -> RAS mm)`` of the output grid of a parameter map (the fixed
  image's: ``Size``, ``Spacing``, ``Origin``, ``Direction``, LPS)."""
  shape = tuple(int(v) for v in params["Size"])
  spacing = np.array([float(v) for v in params["Spacing"]])
  direction = np.array([float(v) for v in params.get("Direction", np.eye(3).ravel())])
  affine = np.eye(4)
  affine[:3, :3] = LPS @ direction.reshape(3, 3) @ np.diag(spacing)
  affine[:3, 3] = LPS @ np.array([float(v) for v in params["Origin"]])
  if any(int(v) for v in params.get("Index", ["0"] * 3)):  # a region that starts elsewhere
    affine[:3, 3] = affine[:3, :3] @ np.array([float(v) for v in params["Index"]]) + affine[:3, 3]
  return shape, affine


def _itk(path):
  try:
    import itk
  except ImportError:
    itk = None
  if itk is None or not hasattr(itk, "TransformixFilter"):
    raise InputError(f"{path}: applying elastix transforms needs itk-elastix: "
                     "pip install 'jaxreg[elastix]'")
  return itk


def _on_grid(params: dict, shape, affine) -> dict:
  """A copy of ``params`` whose output grid is ``(shape, affine)`` (RAS, no shear), with no
  initial transform (the chain is given to transformix as a whole) and cheap resampling."""
  affine = np.asarray(affine, np.float64)
  spacing = np.linalg.norm(affine[:3, :3], axis=0)
  cosines = LPS @ affine[:3, :3] / spacing
  cosines[np.abs(cosines) < 1e-12] = 0.0
  text = lambda values: [repr(float(v)) for v in values]
  out = {k: list(v) for k, v in params.items() if k not in _INITIAL}
  out.update({"Size": [str(int(n)) for n in shape], "Index": ["0", "0", "0"],
              "Spacing": text(spacing), "Origin": text(LPS @ affine[:3, 3]),
              "Direction": text(cosines.ravel()),
              "InitialTransformParameterFileName": ["NoInitialTransform"],
              "ResampleInterpolator": ["FinalNearestNeighborInterpolator"],
              "FixedInternalImagePixelType": ["float"],
              "MovingInternalImagePixelType": ["float"], "WriteResultImage": ["false"]})
  return out


def _transformix(path, chain: list[dict], shape, affine, mesh=None):
  """A finished ``itk.TransformixFilter`` for ``chain`` on the grid ``(shape, affine)``: the
  deformation field, or ``mesh``'s points mapped; its files go to a temporary folder."""
  itk = _itk(path)
  objects = itk.ParameterObject.New()
  for params in chain:
    objects.AddParameterMap(_on_grid(params, shape, affine))
  dummy = itk.image_from_array(np.zeros((2, 2, 2), np.float32))
  with tempfile.TemporaryDirectory(prefix="jaxreg-transformix-") as tmp:
    f = itk.TransformixFilter.New(dummy)
    f.SetTransformParameterObject(objects)
    f.SetOutputDirectory(tmp)
    f.SetLogToConsole(False)
    if mesh is None:
      f.ComputeDeformationFieldOn()
    else:
      f.SetInputMesh(mesh)
    try:
      f.UpdateLargestPossibleRegion()
    except RuntimeError as e:
      lines = [l.strip() for l in str(e).splitlines() if l.strip()]
      gist = next((l for l in lines if "rror" in l), lines[-1] if lines else "")
      raise InputError(f"{path}: transformix cannot apply it ({gist[:200]})") from None
  return f


def displacement(path, shape=None, affine=None) -> tuple[np.ndarray, np.ndarray]:
  """The transform of the elastix parameter file ``path`` (and its initial transforms) made
  dense by transformix: ``(disp_mm [X, Y, Z, 3] float32 world RAS mm, affine [4, 4])`` on the
  grid ``(shape, affine)`` (default: the file's fixed grid, :func:`grid_of`), fixed ``p`` ->
  moving ``p + d(p)``.

  Raises:
    InputError: :func:`read_chain`'s, itk-elastix missing, or transformix refusing the maps.
  """
  chain = read_chain(path)
  if shape is None or affine is None:
    shape, affine = grid_of(chain[-1])
  f = _transformix(path, chain, shape, affine)
  lps = np.asarray(f.GetOutputDeformationField(), np.float64).transpose(2, 1, 0, 3)
  return (lps @ LPS).astype(np.float32), np.asarray(affine, np.float64)


def map_points(path, points_ras: np.ndarray) -> np.ndarray:
  """World points through the transform of ``path`` as transformix maps them (fixed ->
  moving): ``[N, 3]`` RAS mm in, ``[N, 3]`` float64 RAS mm out (transformix holds points in
  float32: ~1e-5 mm at 300 mm from the origin).

  Raises:
    InputError: as :func:`displacement`.
  """
  points = np.asarray(points_ras, np.float64).reshape(-1, 3)
  if len(points) == 0:
    return points.copy()
  chain = read_chain(path)
  itk = _itk(path)
  mesh = itk.Mesh[itk.F, 3].New()
  mesh.SetPoints(itk.vector_container_from_array((points @ LPS).astype(np.float32).ravel()))
  shape, affine = grid_of(chain[-1])
  f = _transformix(path, chain, shape, affine, mesh=mesh)
  out = np.asarray(itk.array_from_vector_container(f.GetOutputMesh().GetPoints()), np.float64)
  return out.reshape(-1, 3) @ LPS
