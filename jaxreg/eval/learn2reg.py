"""Learn2Reg, as the challenge scores it: submission files and the official metrics.

A re-implementation (not a copy) of the rules of the challenge's evaluation code,
``evaluation/evaluation.py`` and ``evaluation/utils.py`` of github.com/MDL-UzL/L2R
(commit 8847509, February 2025), with the ``surface-distance`` package it vendors:

* **Submission.** One file per pair, ``disp_{F}_{M}`` with ``F``/``M`` the four-digit
  subject ids of the fixed/moving image file names (``Task_0001_0000.nii.gz``: subject
  ``0001``, modality ``0000``). The short name is accepted only for a fixed modality
  ``0000`` and a moving ``0001``; every other pair is ``disp_{F}_{Fmod}_{M}_{Mmod}``
  (:func:`submission_name`). ``.npz`` (one array, read as float32; float16 is the
  challenge's compact form) or ``.nii.gz`` (read with ``get_fdata``: float64, affine
  ignored). The array is ``[X, Y, Z, 3]``: the fixed image's array shape, then the
  displacement in **voxels** along the array axes, pull-back: fixed voxel ``i`` <-> moving
  voxel ``i + u(i)``.
* **Warp.** The moving labels at ``i + u(i)``: nearest neighbour (``floor(x + 0.5)``), and
  background (0) where any coordinate lies outside ``[0, n - 1]``: even half a voxel past
  the last voxel centre (``scipy.ndimage.map_coordinates``, ``order=0``, ``mode="constant"``).
* **Dice / HD95** per label of the task's list, ``nan`` where the label is missing from
  the fixed or the (unwarped) moving map, averaged with ``nanmean``. HD95 is the
  surface-distance package's robust Hausdorff distance at 95 with spacing 1, i.e. in
  **voxels**: surface elements on the voxel corners, each weighted by its marching-cubes
  area, the area-weighted 95th percentile of each direction, the larger of the two
  (:func:`hd95`); ``inf`` if the warped label vanished.
* **SDlogJ**: the standard deviation of ``log(clip(det J + 3, 1e-9, 1e9))`` (the official
  code adds 3 before the log) over the grid less 2 voxels at every face, ``J = I + grad u``
  by central differences; with ``masked_evaluation`` (LungCT, NLST, AbdomenMRCT) only
  where the fixed mask is 1.
* **TRE** (mm): ``|(p + u(p) - q) * moving spacing|`` with ``u`` interpolated by cubic
  splines (``map_coordinates``' default ``order=3``, ``mode="constant"``) at the fixed
  keypoints ``p`` (voxels), ``q`` the moving keypoints (voxels).
* **Summary** over pairs of each case mean: mean, std (``ddof=0``) and the "30" column,
  ``np.quantile`` at 0.3 for Dice and HD95 and at 0.7 for SDlogJ and TRE (:data:`METRICS`).
  The code ranks nothing.

Arrays are numpy; ``[X, Y, Z]`` is the array axis order of the NIfTI data (no reorientation).
"""

from __future__ import annotations

import functools
import itertools
import os
import re
from collections.abc import Sequence

import numpy as np
import scipy.ndimage as ndi

from jaxreg.types import InputError

__all__ = ["METRICS", "FORMATS", "image_ids", "submission_name", "submission_names",
           "submission_field", "write_field", "read_field", "warp_labels", "dice", "hd95",
           "surfel_areas", "jacobian_determinant", "sdlogj", "tre", "case_scores",
           "summary_stats"]

# metric -> (unit, higher is better, quantile of the official "30" column)
METRICS = {"l2r_dice": ("", True, 0.3), "l2r_hd95": ("voxels", False, 0.3),
           "l2r_sdlogj": ("", False, 0.7), "l2r_tre": ("mm", False, 0.7)}
# file format -> stored dtype
FORMATS = {"npz": np.float16, "nii.gz": np.float32}
_IDS = re.compile(r"_(\d{4})_(\d{4})\.nii\.gz$")


# --- submission files -----------------------------------------------------------------


def image_ids(path: str) -> tuple[str, str] | None:
  """``(subject, modality)`` of a Learn2Reg image file name (``LungCT_0001_0000.nii.gz`` ->
  ``("0001", "0000")``), or None for a name not of that form."""
  m = _IDS.search(os.path.basename(path))
  return (m.group(1), m.group(2)) if m else None


def submission_name(fixed: tuple[str, str], moving: tuple[str, str]) -> str:
  """The file stem the official code looks for: ``disp_{F}_{M}`` for a fixed modality
  ``0000`` and a moving ``0001`` (e.g. LungCT, NLST), else ``disp_{F}_{Fmod}_{M}_{Mmod}``
  (e.g. AbdomenCTCT's ``0000`` -> ``0000`` pairs; evaluation.py lines 45-64)."""
  (fs, fm), (ms, mm) = fixed, moving
  return f"disp_{fs}_{ms}" if (fm, mm) == ("0000", "0001") else f"disp_{fs}_{fm}_{ms}_{mm}"


def submission_names(pairs: Sequence[tuple[str | None, str | None]]) -> list[str]:
  """The file stem of each ``(fixed path, moving path)`` pair.

  Learn2Reg file names give their ids; if any pair lacks them (``--data demo``, a CSV
  of other names) every pair is numbered instead: pair ``k`` as subject ``k`` (4 digits,
  from 0000), modality 0000 -> 0001, i.e. ``disp_{k:04d}_{k:04d}``.

  Raises:
    InputError: two pairs would write the same file.
  """
  ids = [(image_ids(f or ""), image_ids(m or "")) for f, m in pairs]
  if any(f is None or m is None for f, m in ids):
    ids = [((f"{k:04d}", "0000"), (f"{k:04d}", "0001")) for k in range(len(pairs))]
  names = [submission_name(f, m) for f, m in ids]
  seen = {}
  for (f, m), name in zip(pairs, names):
    if name in seen:
      raise InputError(f"{f}: pairs {seen[name]} and {f} -> {m} would both be written as "
                       f"{name}")
    seen[name] = f"{f} -> {m}"
  return names


def submission_field(disp_mm: np.ndarray, fixed_affine: np.ndarray, moving_affine: np.ndarray,
                     dtype=np.float16) -> np.ndarray:
  """A world displacement as the challenge wants it, values rounded to ``dtype``.

  Args:
    disp_mm: ``[X, Y, Z, 3]`` world displacement (mm, the affines' frame) on the fixed
      grid: fixed voxel ``i`` (world ``A_f i``) <-> moving world ``A_f i + d(i)``.
    fixed_affine: ``[4, 4]`` voxel-to-world matrix of the fixed image.
    moving_affine: ``[4, 4]`` voxel-to-world matrix of the moving image.
    dtype: the stored precision (:data:`FORMATS`).

  Returns:
    ``[X, Y, Z, 3]`` float32 ``u(i) = A_m^-1 (A_f i + d(i)) - i``: moving voxel index minus
    fixed voxel index, per array axis (``disp_mm`` in fixed voxels where the grids agree).
  """
  disp_mm = np.asarray(disp_mm, np.float64)
  shape = disp_mm.shape[:3]
  inv = np.linalg.inv(np.asarray(moving_affine, np.float64))
  m = inv @ np.asarray(fixed_affine, np.float64)
  # 3x3 products written out: a BLAS call per voxel batch is slower than these on [N, 3]
  u = m[:3, 3] + sum(disp_mm[..., b, None] * inv[:3, b] for b in range(3))
  if not np.allclose(m[:3, :3], np.eye(3), rtol=0, atol=1e-9):
    lin = m[:3, :3] - np.eye(3)
    for b, n in enumerate(shape):
      i = np.arange(n, dtype=np.float64).reshape([-1 if a == b else 1 for a in range(3)] + [1])
      u += i * lin[:, b]
  return u.astype(dtype).astype(np.float32)


def write_field(folder: str, name: str, field: np.ndarray, fmt: str = "npz",
                affine: np.ndarray | None = None) -> str:
  """Write one submission file ``folder/name.{npz,nii.gz}`` and return its path.

  ``npz``: one float16 array (key ``arr_0``, what the 2023 grand-challenge container
  reads), compressed. ``nii.gz``: float32 (NIfTI has no float16) with ``affine`` (the
  fixed image's; the official code ignores it).
  """
  if fmt not in FORMATS:
    raise InputError(f"{name}: unknown submission format {fmt!r}; choose from {list(FORMATS)}")
  path = os.path.join(folder, f"{name}.{fmt}")
  data = np.asarray(field).astype(FORMATS[fmt])
  if fmt == "npz":
    np.savez_compressed(path, data)
  else:
    import nibabel as nib
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else np.asarray(affine)), path)
  return path


def read_field(path: str) -> np.ndarray:
  """A submission file read as the official code reads it (utils.py ``load_disp``):
  ``.nii.gz`` as float64 data, ``.npz`` its single array as float32.

  Raises:
    InputError: another extension, or an ``.npz`` with more than one array.
  """
  if path.endswith(".nii.gz"):
    import nibabel as nib
    return nib.load(path).get_fdata()
  if path.endswith(".npz"):
    with np.load(path) as z:
      if len(z.files) != 1:
        raise InputError(f"{path}: an .npz submission holds one array, found {z.files}")
      return z[z.files[0]].astype(np.float32)
  raise InputError(f"{path}: a submission file is .npz or .nii.gz")


# --- labels -------------------------------------------------------------------------


def warp_labels(moving_labels: np.ndarray, field: np.ndarray) -> np.ndarray:
  """The moving labels ``[X', Y', Z']`` pulled onto the fixed grid through ``field``
  ``[X, Y, Z, 3]`` (voxels): nearest neighbour, 0 outside ``[0, n - 1]`` on any axis."""
  grid = np.meshgrid(*(np.arange(n) for n in field.shape[:3]), indexing="ij")
  coords = [g + np.asarray(field[..., a], np.float64) for a, g in enumerate(grid)]
  return ndi.map_coordinates(np.asarray(moving_labels), coords, order=0, mode="constant",
                             cval=0)


def _scored(fixed, moving, warped, labels):
  """Per label: ``(label, fixed mask, warped mask)``, or masks None where the label is
  missing from ``fixed`` or ``moving`` (the unwarped moving map, as the official code
  checks)."""
  present = set(np.unique(fixed).tolist()) & set(np.unique(moving).tolist())
  for k in labels:
    yield (int(k), fixed == k, warped == k) if k in present else (int(k), None, None)


def _dice(f: np.ndarray, w: np.ndarray) -> float:
  return 2.0 * np.count_nonzero(f & w) / (np.count_nonzero(f) + np.count_nonzero(w))


def dice(fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray,
         labels: Sequence[int]) -> dict[int, float]:
  """``{label: 2 |F & W| / (|F| + |W|)}``; ``nan`` where the label is missing from
  ``fixed`` or ``moving`` (the unwarped moving map, as the official code checks)."""
  return {k: float("nan") if f is None else _dice(f, w)
          for k, f, w in _scored(fixed, moving, warped, labels)}


# The 2x2x2 cell: corner offsets (bit b of a cell code is corner _CORNERS[b]) and faces.
_CORNERS = tuple(itertools.product((0, 1), repeat=3))


def _faces() -> list[list[tuple]]:
  """The cube's 6 faces, each as its 4 corners in cyclic order."""
  out = []
  for axis, side in itertools.product(range(3), (0, 1)):
    u, v = [a for a in range(3) if a != axis]
    face = []
    for p, q in ((0, 0), (1, 0), (1, 1), (0, 1)):
      c = [0, 0, 0]
      c[axis], c[u], c[v] = side, p, q
      face.append(tuple(c))
    out.append(face)
  return out


def _cell_polygons(code: int) -> list[np.ndarray]:
  """The marching-cubes surface of one cell: polygons ``[K, 3]`` through the midpoints
  of the edges whose corners differ. The smaller side (the corners set in ``code``, or
  the others if more than 4 are set) is cut off corner by corner on an ambiguous face."""
  inside = {c for b, c in enumerate(_CORNERS) if code >> b & 1}
  if len(inside) > 4:
    inside = set(_CORNERS) - inside
  links = {}
  for face in _faces():
    edges = [frozenset((face[i], face[(i + 1) % 4])) for i in range(4)]
    cut = [e for e in edges if len(e & inside) == 1]
    if len(cut) == 2:
      segments = [cut]
    elif len(cut) == 4:  # ambiguous: one segment around each inside corner
      segments = [[e for e in edges if c in e] for c in face if c in inside]
    else:
      segments = []
    for a, b in segments:
      links.setdefault(a, []).append(b)
      links.setdefault(b, []).append(a)
  polygons, seen = [], set()
  for start in links:
    if start in seen:
      continue
    loop, prev = [start], None
    seen.add(start)
    while True:
      step = [e for e in links[loop[-1]] if e != prev and e not in seen]
      if not step:
        break
      prev = loop[-1]
      loop.append(step[0])
      seen.add(step[0])
    polygons.append(np.array([np.mean([c for c in e], axis=0) for e in loop], np.float64))
  return polygons


def _triangle_area(a, b, c) -> float:
  return 0.5 * float(np.linalg.norm(np.cross(b - a, c - a)))


def _widest_triangulation(poly: np.ndarray) -> list[tuple[int, int, int]]:
  """The triangulation of a (possibly non-planar) polygon with the largest total area."""
  @functools.lru_cache(maxsize=None)
  def best(i: int, j: int) -> tuple[float, tuple]:
    if j - i < 2:
      return 0.0, ()
    options = []
    for k in range(i + 1, j):
      (a1, t1), (a2, t2) = best(i, k), best(k, j)
      options.append((a1 + a2 + _triangle_area(poly[i], poly[k], poly[j]), t1 + t2 + ((i, k, j),)))
    return max(options, key=lambda o: o[0])
  return list(best(0, len(poly) - 1)[1])


@functools.lru_cache(maxsize=1)
def _cell_triangles() -> tuple[tuple[np.ndarray, ...], ...]:
  """Per cell code, its surface triangles ``[3, 3]`` (corner coordinates in voxels)."""
  out = []
  for code in range(256):
    tris = []
    for poly in _cell_polygons(code):
      tris += [poly[list(t)] for t in _widest_triangulation(poly)]
    out.append(tuple(tris))
  return tuple(out)


@functools.lru_cache(maxsize=8)
def _surfel_areas(spacing: tuple[float, float, float]) -> np.ndarray:
  s = np.asarray(spacing, np.float64)
  return np.array([sum(_triangle_area(*(t * s)) for t in tris) for tris in _cell_triangles()])


def surfel_areas(spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
  """``[256]`` the surface area (voxel units scaled by ``spacing``) in a 2x2x2 cell per
  code (bit ``b``: corner ``itertools.product((0, 1), repeat=3)[b]`` inside).

  The marching-cubes surface through edge midpoints (:func:`_cell_polygons`), each
  polygon triangulated for the largest area: the table the surface-distance package
  hard-codes as triangle normals (equal for all 256 cells at unit spacing: a single
  corner ``sqrt(3)/8``, an edge ``sqrt(2)/2``, a face 1). Anisotropic spacing scales the
  triangles' corners, as the package scales its normals.
  """
  return _surfel_areas(tuple(float(x) for x in spacing))


def _cell_codes(mask: np.ndarray) -> np.ndarray:
  """``[X + 1, Y + 1, Z + 1]`` code of each voxel corner: the 2x2x2 voxels around it
  (outside the array counts as background)."""
  p = np.pad(mask.astype(np.uint8), 1)
  n = [s - 1 for s in p.shape]
  code = np.zeros(n, np.uint8)
  for b, (i, j, k) in enumerate(_CORNERS):
    code |= p[i:i + n[0], j:j + n[1], k:k + n[2]] << b
  return code


def _percentile_distance(dist: np.ndarray, area: np.ndarray, percent: float) -> float:
  """The area-weighted percentile: sort by (distance, area), the first surface element at
  which the cumulative area fraction reaches ``percent``."""
  if not len(dist):
    return float("inf")
  order = np.lexsort((area, dist))
  cum = np.cumsum(area[order]) / np.sum(area)
  return float(dist[order][min(int(np.searchsorted(cum, percent / 100.0)), len(dist) - 1)])


def _robust_hausdorff(a: np.ndarray, b: np.ndarray, spacing, percent: float = 95.0) -> float:
  """Robust Hausdorff distance between the surfaces of two masks (surface-element based,
  see :func:`hd95`); ``inf`` if one mask is empty (``nan`` if both are)."""
  both = a | b
  if not both.any():
    return float("nan")
  box = []
  for axis in range(3):
    hit = np.flatnonzero(both.any(axis=tuple(x for x in range(3) if x != axis)))
    box.append(slice(int(hit[0]), int(hit[-1]) + 1))
  box = tuple(box)
  areas = surfel_areas(spacing)
  codes = [_cell_codes(m[box]) for m in (a, b)]
  border = [(c != 0) & (c != 255) for c in codes]
  if not border[0].any() or not border[1].any():
    return float("inf")
  dist = [ndi.distance_transform_edt(~m, sampling=spacing) for m in border]
  to_b = _percentile_distance(dist[1][border[0]], areas[codes[0][border[0]]], percent)
  to_a = _percentile_distance(dist[0][border[1]], areas[codes[1][border[1]]], percent)
  return max(to_b, to_a)


def hd95(fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray, labels: Sequence[int],
         spacing=(1.0, 1.0, 1.0)) -> dict[int, float]:
  """``{label: HD95}`` as the challenge computes it, in voxels (``spacing`` 1).

  Surface elements sit on the voxel corners whose 2x2x2 cell is neither all inside nor
  all outside the label (the array border counts as outside), each weighted by its
  marching-cubes area (:func:`surfel_areas`). For each element of one surface, the
  Euclidean distance to the nearest element of the other; per direction the
  area-weighted 95th percentile; the larger of the two. ``nan`` where the label is
  missing from ``fixed`` or ``moving``; ``inf`` where the warp lost it.
  """
  return {k: float("nan") if f is None else _robust_hausdorff(f, w, spacing)
          for k, f, w in _scored(fixed, moving, warped, labels)}


# --- field and keypoints -------------------------------------------------------------


def jacobian_determinant(field: np.ndarray) -> np.ndarray:
  """``[X - 4, Y - 4, Z - 4]`` ``det(I + grad u)`` of ``[X, Y, Z, 3]`` (voxels) by central
  differences ``(u[i + 1] - u[i - 1]) / 2``, 2 voxels dropped at every face."""
  u = np.asarray(field, np.float64)
  if u.ndim != 4 or u.shape[-1] != 3 or min(u.shape[:3]) < 5:
    raise ValueError(f"field must be [X, Y, Z, 3] with >= 5 voxels per axis, got {u.shape}")
  inner = tuple(slice(2, n - 2) for n in u.shape[:3])
  j = np.empty(tuple(n - 4 for n in u.shape[:3]) + (3, 3))
  for a in range(3):
    hi = list(inner)
    lo = list(inner)
    hi[a] = slice(3, u.shape[a] - 1)
    lo[a] = slice(1, u.shape[a] - 3)
    j[..., :, a] = 0.5 * (u[tuple(hi)] - u[tuple(lo)])
  j += np.eye(3)
  return (j[..., 0, 0] * (j[..., 1, 1] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 1])
          - j[..., 0, 1] * (j[..., 1, 0] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 0])
          + j[..., 0, 2] * (j[..., 1, 0] * j[..., 2, 1] - j[..., 1, 1] * j[..., 2, 0]))


def sdlogj(field: np.ndarray, mask: np.ndarray | None = None) -> float:
  """The challenge's SDlogJ: ``std(log(clip(det J + 3, 1e-9, 1e9)))`` over the grid less 2
  voxels at every face (:func:`jacobian_determinant`); with ``mask`` (``[X, Y, Z]``, the
  fixed mask) over its voxels equal to 1 only. Zero for any affine field."""
  v = np.log(np.clip(jacobian_determinant(field) + 3.0, 1e-9, 1e9))
  if mask is not None:
    v = v[np.asarray(mask)[2:-2, 2:-2, 2:-2] == 1]
  return float(np.std(v)) if v.size else float("nan")


def tre(fixed_points: np.ndarray, moving_points: np.ndarray, field: np.ndarray,
        moving_spacing) -> np.ndarray:
  """``[N]`` errors in mm: ``|(p + u(p) - q) * moving_spacing|`` with ``u`` interpolated by
  cubic splines, zero outside (``map_coordinates(order=3, mode="constant")``).

  Args:
    fixed_points: ``[N, 3]`` fixed keypoints in voxels (array axis order).
    moving_points: ``[N, 3]`` the corresponding moving keypoints in voxels.
    field: ``[X, Y, Z, 3]`` submission field (voxels).
    moving_spacing: mm per voxel of the moving image along its array axes.
  """
  p, q = np.asarray(fixed_points, np.float64), np.asarray(moving_points, np.float64)
  u = np.stack([ndi.map_coordinates(np.asarray(field[..., a], np.float64), p.T, order=3,
                                    mode="constant", cval=0.0) for a in range(3)], -1)
  return np.linalg.norm((p + u - q) * np.asarray(moving_spacing, np.float64), axis=1)


def _nanmean(values) -> float:
  v = np.asarray(list(values), np.float64)
  return float(np.mean(v[~np.isnan(v)])) if np.any(~np.isnan(v)) else float("nan")


def case_scores(field: np.ndarray, *, fixed_labels: np.ndarray | None = None,
                moving_labels: np.ndarray | None = None, labels: Sequence[int] | None = None,
                fixed_points: np.ndarray | None = None, moving_points: np.ndarray | None = None,
                moving_spacing=None, mask: np.ndarray | None = None) -> dict[str, float]:
  """The official per-case figures of one submission field (``nan`` where the data lack
  them): ``l2r_dice``, ``l2r_hd95`` (voxels), ``l2r_sdlogj``, ``l2r_tre`` (mm).

  Args:
    field: ``[X, Y, Z, 3]`` submission field (voxels, see :func:`submission_field`).
    fixed_labels: ``[X, Y, Z]`` integer labels on the fixed grid.
    moving_labels: the moving labels on the moving image's own grid.
    labels: ids to score (the task's list); default: every non-zero id of either map.
    fixed_points: ``[N, 3]`` fixed keypoints in voxels of the fixed image.
    moving_points: ``[N, 3]`` the corresponding keypoints in voxels of the moving image.
    moving_spacing: mm per voxel of the moving image (for TRE).
    mask: ``[X, Y, Z]`` fixed mask for SDlogJ (the tasks with ``masked_evaluation``).
  """
  row = {"l2r_dice": float("nan"), "l2r_hd95": float("nan"),
         "l2r_sdlogj": sdlogj(field, mask), "l2r_tre": float("nan")}
  if fixed_labels is not None and moving_labels is not None:
    f, m = np.asarray(fixed_labels), np.asarray(moving_labels)
    ids = list(labels) if labels else sorted(int(k) for k in set(np.unique(f)) | set(np.unique(m))
                                             if k != 0)
    scored = [(fk, wk) for _, fk, wk in _scored(f, m, warp_labels(m, field), ids)]
    row["l2r_dice"] = _nanmean(np.nan if fk is None else _dice(fk, wk) for fk, wk in scored)
    row["l2r_hd95"] = _nanmean(np.nan if fk is None else _robust_hausdorff(fk, wk, (1, 1, 1))
                               for fk, wk in scored)
  if fixed_points is not None and moving_points is not None and len(fixed_points):
    row["l2r_tre"] = float(np.mean(tre(fixed_points, moving_points, field, moving_spacing)))
  return row


def summary_stats(values: Sequence[float], metric: str) -> dict:
  """``{"mean", "std", "p30", "n"}`` of one metric's case values as the official summary
  gives them (``p30``: its "30" column, the :data:`METRICS` quantile). ``nan`` cases (the
  data lack the metric) are dropped; ``inf`` (a lost label's HD95) is kept, as there."""
  v = np.asarray(values, np.float64)
  v = v[~np.isnan(v)]
  if not v.size:
    return {"mean": None, "std": None, "p30": None, "n": 0}
  with np.errstate(invalid="ignore"):
    return {"mean": float(np.mean(v)), "std": float(np.std(v)),
            "p30": float(np.quantile(v, METRICS[metric][2])), "n": int(v.size)}
