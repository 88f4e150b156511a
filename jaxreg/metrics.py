"""Evaluation metrics in numpy/scipy, the Learn2Reg way.

Label overlap (:func:`dice`), surface distance in mm (:func:`hd95`), landmark
error in mm (:func:`tre`), and field quality (:func:`sdlogj`,
:func:`folding_fraction`). Fields are ``[X, Y, Z, 3]`` in voxels; spacings are
mm per voxel along the array axes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import scipy.ndimage as ndi

__all__ = ["dice", "hd95", "tre", "sdlogj", "folding_fraction", "jacobian_determinant",
           "common_labels", "finite_mean", "field_quality", "score"]


def common_labels(a: np.ndarray, b: np.ndarray) -> list[int]:
  """The non-zero labels present in both label maps, sorted (what is scored by default)."""
  return sorted(int(k) for k in (set(np.unique(a)) & set(np.unique(b))) - {0})


def finite_mean(per_label: dict) -> float:
  """Mean of a per-label metric over the labels where it is finite (NaN if none is)."""
  values = [v for v in per_label.values() if np.isfinite(v)]
  return float(np.mean(values)) if values else float("nan")


def dice(a: np.ndarray, b: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
  """Dice overlap ``2 |A ∩ B| / (|A| + |B|)`` of each label between two label maps.

  Args:
    a: integer label map.
    b: integer label map of the same shape as ``a``.
    labels: label ids to score.

  Returns:
    ``{label: dice}``; a label absent from both maps scores ``nan``.

  Examples:
    >>> import numpy as np
    >>> dice(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), [1, 2])
    {1: 0.6666666666666666, 2: 0.6666666666666666}
  """
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape:
    raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
  if np.issubdtype(a.dtype, np.floating) or np.issubdtype(b.dtype, np.floating):
    raise ValueError(f"label maps must be integer, got {a.dtype} and {b.dtype}")
  n = int(max(a.max(initial=0), b.max(initial=0), max(labels, default=0))) + 1
  both = np.bincount(a[a == b].ravel(), minlength=n)
  count_a = np.bincount(a.ravel(), minlength=n)
  count_b = np.bincount(b.ravel(), minlength=n)
  out = {}
  for k in labels:
    denom = count_a[k] + count_b[k]
    out[int(k)] = float(2 * both[k] / denom) if denom else float("nan")
  return out


def _surface(mask: np.ndarray) -> np.ndarray:
  """Voxels of ``mask`` with a 6-neighbour outside it (the volume border counts as outside)."""
  return mask & ~ndi.binary_erosion(mask, structure=ndi.generate_binary_structure(mask.ndim, 1),
                                    border_value=0)


def _surfaces(m: np.ndarray) -> np.ndarray:
  """Voxels of ``m`` with a 6-neighbour of another value or outside the volume: the
  :func:`_surface` of every label at once."""
  out = np.zeros(m.shape, bool)
  for axis in range(m.ndim):
    lo = (slice(None),) * axis + (slice(0, -1),)
    hi = (slice(None),) * axis + (slice(1, None),)
    differ = m[lo] != m[hi]
    out[lo] |= differ
    out[hi] |= differ
    out[(slice(None),) * axis + (0,)] = True
    out[(slice(None),) * axis + (-1,)] = True
  return out


def _edt_length(offsets: np.ndarray, spacing: np.ndarray) -> np.ndarray:
  """Lengths in mm of integer voxel offsets ``[..., ndim]``, rounded as
  ``scipy.ndimage.distance_transform_edt(sampling=spacing)`` rounds its distances (scale
  each axis, square, add the axes in order, square root)."""
  d = offsets.astype(np.float64) * spacing
  d *= d
  total = d[..., 0]
  for axis in range(1, d.shape[-1]):
    total = total + d[..., axis]
  return np.sqrt(total)


# Brute force (all pairs) for the points the offset search leaves, up to this many pairs
# per label; a k-d tree beyond.
_MAX_PAIRS = 1 << 14


def _nearest_exhaustive(p: np.ndarray, q: np.ndarray, spacing: np.ndarray) -> np.ndarray:
  """Distance in mm (:func:`_edt_length`) from each voxel of ``p`` ``[N, ndim]`` to the
  nearest voxel of ``q`` ``[M, ndim]``."""
  if len(p) * len(q) <= _MAX_PAIRS:
    return _edt_length(q[None] - p[:, None], spacing).min(axis=1)
  from scipy.spatial import cKDTree
  _, i = cKDTree(q * spacing).query(p * spacing, workers=1)
  return _edt_length(q[i] - p, spacing)


# The offset search of :func:`_nearest_in_group` tries the offsets up to this many of the
# smallest voxel size long, and stops early once, over a window of this many offsets,
# fewer than this fraction of the points tried land on their surface.
_SEARCH_RADIUS = 5.0
_SEARCH_WINDOW = 8
_SEARCH_MIN_HITS = 0.003


def _search_offsets(spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The integer voxel offsets of the offset search, by increasing length, and the lengths."""
  if not np.all(np.isfinite(spacing) & (spacing > 0)):
    return np.zeros((0, len(spacing)), np.int64), np.zeros(0)
  radius = _SEARCH_RADIUS * float(spacing.min())
  reach = [np.arange(-int(radius // s) - 1, int(radius // s) + 2) for s in spacing]
  grid = np.stack(np.meshgrid(*reach, indexing="ij"), -1).reshape(-1, len(spacing))
  length = _edt_length(grid, spacing)
  order = np.argsort(length, kind="stable")
  order = order[length[order] <= radius]
  return grid[order], length[order]


def _nearest_in_group(p: np.ndarray, p_group: np.ndarray, q: np.ndarray, q_group: np.ndarray,
                      q_start: np.ndarray, shape: tuple, spacing: np.ndarray,
                      offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """Distance in mm from each voxel of ``p`` ``[N, ndim]`` (sorted by group ``p_group``) to
  the nearest voxel of ``q`` of the same group (``q`` sorted by group, group ``g`` at
  ``q[q_start[g]:q_start[g + 1]]``, not empty for the groups of ``p``).

  Tries the ``offsets`` (by increasing length) on a padded volume of the groups of ``q``:
  a point's first hit is a nearest voxel. The points left when hits get rare or the
  offsets run out go to :func:`_nearest_exhaustive`, one group at a time.
  """
  out = np.empty(len(p))
  left = np.arange(len(p))
  if len(offsets):
    pad = np.abs(offsets).max(axis=0)
    padded = [int(n + 2 * r) for n, r in zip(shape, pad)]
    strides = np.array([int(np.prod(padded[i + 1:])) for i in range(len(padded))], np.int64)
    volume = np.zeros(int(np.prod(padded)), q_group.dtype)
    volume[(q + pad) @ strides] = q_group
    steps = offsets @ strides
    flat, group = (p + pad) @ strides, p_group
    hits = tries = 0
    for j, step in enumerate(steps):
      hit = volume[flat + step] == group
      n_hit = int(np.count_nonzero(hit))
      hits, tries = hits + n_hit, tries + len(left)
      if n_hit:
        out[left[hit]] = lengths[j]
        miss = ~hit
        left, flat, group = left[miss], flat[miss], group[miss]
        if not len(left):
          break
      if (j + 1) % _SEARCH_WINDOW == 0:
        if hits < _SEARCH_MIN_HITS * tries:
          break
        hits = tries = 0
  if len(left):
    for part in np.split(left, np.flatnonzero(np.diff(p_group[left])) + 1):
      g = int(p_group[part[0]])
      out[part] = _nearest_exhaustive(p[part], q[q_start[g]:q_start[g + 1]], spacing)
  return out


def hd95(a: np.ndarray, b: np.ndarray, labels: Sequence[int], spacing=(1.0, 1.0, 1.0)
         ) -> dict[int, float]:
  """95th percentile symmetric Hausdorff distance between label surfaces, in mm.

  The distances from every surface voxel of A to the nearest surface voxel of
  B, and from B to A, pooled; their 95th percentile (the Learn2Reg challenge scores
  otherwise: :func:`jaxreg.eval.learn2reg.hd95`, the larger one-way percentile over
  area-weighted surface elements, in voxels). A
  surface voxel is a label voxel with a 6-neighbour outside the label or
  outside the volume. Distances honour anisotropic ``spacing``.

  Each distance is the value of the exact Euclidean distance transform
  (``scipy.ndimage.distance_transform_edt(~surface_b, sampling=spacing)`` at a
  surface voxel of A), computed without one: the nearest surface voxels are
  found by a search, and the length of the offset ``o`` to the voxel found is
  rounded as the transform rounds it (``sqrt(sum((o * spacing) ** 2))``, axes
  added in order). The result equals the transform's up to the choice among
  voxels at exactly the same distance (where rounding can differ in the last
  bit), ~1e-15 relative. Cost scales with the surfaces and their distances,
  not the volume: ~0.07 s for 89 labels on 144x144x133 maps, where a
  transform per label's bounding box took ~1 s.

  * Surfaces of all labels at once, one pass over each map: a voxel that
    differs from a 6-neighbour or lies on the volume border. For a voxel of
    label ``k`` (``m == k``), a neighbour is outside the label exactly when it
    differs (``==`` is transitive), so these are the voxels of eroding each
    label's mask. A label that this does not cover (``m == k`` for two
    distinct values of a map, such as a float label and int64 values beyond
    2**53, or a value that another label pairs with a different value of the
    other map) is computed from its own masks (:func:`_surface`) instead.
  * Nearest voxels: integer offsets in order of increasing (rounded) length,
    looked up in a volume of the labels of B's surface voxels; the first
    offset landing on B's surface of the same label gives the nearest. The
    offsets reach ``_SEARCH_RADIUS`` smallest voxel sizes; the points left
    (beyond, or when hits get rare) are compared with every surface voxel of
    their label, or query a ``scipy.spatial.cKDTree`` of them (in mm) for the
    nearest.

  Args:
    a: integer label map.
    b: integer label map on the same grid as ``a``.
    labels: label ids to score.
    spacing: voxel size in mm along each array axis.

  Returns:
    ``{label: hd95_mm}``; ``nan`` when the label is missing from either map.

  Examples:
    >>> import numpy as np
    >>> a = np.zeros((5, 5, 5), int); a[1:4, 1:4, 1:4] = 1
    >>> b = np.zeros((5, 5, 5), int); b[1:4, 1:4, 2:5] = 1
    >>> hd95(a, b, [1, 2], spacing=(1.0, 1.0, 2.0))
    {1: 2.0, 2: nan}
  """
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape:
    raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
  spacing = np.array([float(s) for s in spacing], np.float64)
  if len(spacing) != a.ndim:
    raise ValueError(f"spacing {tuple(spacing)} does not match label maps of shape {a.shape}")
  labels = list(labels)
  if a.size == 0:
    return {int(k): float("nan") for k in labels}
  # The surface voxels of each map and their values; the distinct values (all the map's).
  # In memory order (a Fortran-ordered map transposed, no copy); coordinates turned back below.
  flipped = [m.flags.f_contiguous and not m.flags.c_contiguous for m in (a, b)]
  maps = [m.T if f else np.ascontiguousarray(m) for m, f in zip((a, b), flipped)]
  flats = [np.flatnonzero(_surfaces(m)) for m in maps]
  values = [m.reshape(-1)[f] for m, f in zip(maps, flats)]
  distinct = [np.unique(v) for v in values]
  # Group g >= 1 of the scored labels present in both maps: the values of a and b it matches.
  group_of = [np.zeros(len(d), np.int64) for d in distinct]
  plan, pairs = [], {}  # per label: its group, 0 if missing, None for its own masks
  for k in labels:
    match = [np.flatnonzero(d == k) for d in distinct]
    if not len(match[0]) or not len(match[1]):
      plan.append(0)
      continue
    pair = (int(match[0][0]), int(match[1][0]))
    if len(match[0]) > 1 or len(match[1]) > 1 or (
        pair not in pairs and (group_of[0][pair[0]] or group_of[1][pair[1]])):
      plan.append(None)
      continue
    if pair not in pairs:
      pairs[pair] = len(pairs) + 1
      group_of[0][pair[0]] = group_of[1][pair[1]] = pairs[pair]
    plan.append(pairs[pair])
  n = len(pairs)
  dtype = np.uint8 if n < 2 ** 8 else np.uint16 if n < 2 ** 16 else np.int32
  points, point_groups, starts = [], [], []
  for m, flip, f, v, d, g in zip(maps, flipped, flats, values, distinct, group_of):
    g = g.astype(dtype)[np.searchsorted(d, v)]
    keep = np.flatnonzero(g)
    order = keep[np.argsort(g[keep], kind="stable")]  # by group, then raster order
    coords = np.unravel_index(f[order], m.shape)
    points.append(np.stack(coords[::-1] if flip else coords, -1))
    point_groups.append(g[order])
    starts.append(np.searchsorted(g[order], np.arange(n + 2)))
  offsets, lengths = _search_offsets(spacing)
  to_b = _nearest_in_group(points[0], point_groups[0], points[1], point_groups[1], starts[1],
                           a.shape, spacing, offsets, lengths)
  to_a = _nearest_in_group(points[1], point_groups[1], points[0], point_groups[0], starts[0],
                           a.shape, spacing, offsets, lengths)
  out = {}
  for k, g in zip(labels, plan):
    if g is None:
      p, q = (np.argwhere(_surface(m == k)) for m in (a, b))
      d = np.concatenate([_nearest_exhaustive(p, q, spacing), _nearest_exhaustive(q, p, spacing)])
    elif g:
      d = np.concatenate([to_b[starts[0][g]:starts[0][g + 1]],
                          to_a[starts[1][g]:starts[1][g + 1]]])
    else:
      out[int(k)] = float("nan")
      continue
    out[int(k)] = float(np.percentile(d, 95))
  return out


def tre(fixed_points: np.ndarray, moving_points: np.ndarray, disp: np.ndarray,
        spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
  """Target registration error of landmarks, in mm.

  Each fixed landmark ``p`` is carried to ``p + u(p)`` (``u`` trilinearly
  interpolated, edge values outside) and compared with its moving landmark.

  Args:
    fixed_points: ``[N, 3]`` fixed landmarks, voxel coordinates (array axis order).
    moving_points: ``[N, 3]`` the corresponding moving landmarks, voxel coordinates
      (array axis order).
    disp: ``[X, Y, Z, 3]`` displacement in voxels (pull-back: fixed -> moving).
    spacing: voxel size in mm along each array axis.

  Returns:
    ``[N]`` errors in mm.
  """
  fp, mp = np.asarray(fixed_points, float), np.asarray(moving_points, float)
  if fp.shape != mp.shape or fp.ndim != 2 or fp.shape[1] != 3:
    raise ValueError(f"points must both be [N, 3], got {fp.shape} and {mp.shape}")
  disp = np.asarray(disp, float)
  u = np.stack([ndi.map_coordinates(disp[..., i], fp.T, order=1, mode="nearest")
                for i in range(3)], -1)
  return np.linalg.norm((fp + u - mp) * np.asarray(spacing, float), axis=-1)


def sdlogj(disp: np.ndarray, *, clip: float = 1e-9, crop: int = 2) -> float:
  """Standard deviation of the log Jacobian determinant (the textbook SDlogJ; the Learn2Reg
  challenge adds 3 to the determinant before the log: :func:`jaxreg.eval.learn2reg.sdlogj`).

  Determinants are clipped to ``[clip, 1e9]`` before the log (folds count as
  large negative logs, not NaN), and ``crop`` voxels are dropped at every face
  (one-sided border differences are less accurate), as in Learn2Reg's code.

  Args:
    disp: ``[X, Y, Z, 3]`` displacement in voxels.
  """
  return _sdlogj_of(jacobian_determinant(disp), clip=clip, crop=crop)


def _sdlogj_of(det: np.ndarray, *, clip: float = 1e-9, crop: int = 2) -> float:
  """:func:`sdlogj` from the Jacobian determinants ``[X, Y, Z]``."""
  if crop:
    det = det[(slice(crop, -crop),) * 3]
  return float(np.std(np.log(np.clip(np.asarray(det, np.float64), clip, 1e9))))


def folding_fraction(disp: np.ndarray) -> float:
  """Fraction of voxels whose Jacobian determinant is ``<= 0``."""
  return float(np.mean(jacobian_determinant(disp) <= 0))


@functools.lru_cache(maxsize=1)
def _jitted_determinant():
  import jax

  from jaxreg.ops import fields
  return jax.jit(fields.jacobian_determinant)


def jacobian_determinant(disp: np.ndarray) -> np.ndarray:
  """``det(I + grad u)`` ``[X, Y, Z]`` of a numpy ``[X, Y, Z, 3]`` voxel field: central
  differences inside, one-sided at the border (as ``numpy.gradient``), float32.

  :func:`jaxreg.ops.fields.jacobian_determinant` (the differentiable operator), jitted
  on the field padded to a shape bucket (multiples of 16, so fields of similar size
  share one compiled function); the padding extrapolates linearly (odd reflection), so
  the central differences at the original border equal the one-sided ones. ~10x faster
  than ``numpy.gradient`` on a 144x144x133 field.

  Raises:
    ValueError: not ``[X, Y, Z, 3]`` with at least 2 voxels per axis.
  """
  from jaxreg.io import resample as preprocess
  disp = np.asarray(disp, np.float32)
  if disp.ndim != 4 or disp.shape[-1] != 3 or min(disp.shape[:3]) < 2:
    raise ValueError(f"disp must be [X, Y, Z, 3] with >= 2 voxels per axis, got {disp.shape}")
  shape = disp.shape[:3]
  pad = [(0, b - n) for n, b in zip(shape, preprocess.bucket_shape(shape))] + [(0, 0)]
  padded = np.pad(disp, pad, mode="reflect", reflect_type="odd") if any(p[1] for p in pad) else disp
  return np.asarray(_jitted_determinant()(padded))[tuple(slice(0, n) for n in shape)]


def field_quality(disp: np.ndarray, body: np.ndarray | None = None) -> dict[str, float]:
  """``{"folding_fraction", "sdlogj"}`` of a ``[X, Y, Z, 3]`` voxel field from one Jacobian
  (:func:`jacobian_determinant`): the values of :func:`folding_fraction` and :func:`sdlogj`
  over the whole grid; with ``body`` (``[X, Y, Z]`` bool, e.g. the fixed image above
  -500 HU) also ``"folding_fraction_body"``, the fraction of those voxels with det J <= 0."""
  det = jacobian_determinant(disp)
  out = {"folding_fraction": float(np.mean(det <= 0)),
         "sdlogj": _sdlogj_of(det, crop=2 if min(det.shape) > 4 else 0)}
  if body is not None:
    body = np.asarray(body, bool)
    out["folding_fraction_body"] = float(np.mean(det[body] <= 0)) if body.any() else 0.0
  return out


def score(fixed_labels: np.ndarray, warped_labels: np.ndarray, *, spacing=(1.0, 1.0, 1.0),
          label_ids: Sequence[int] | None = None, before: np.ndarray | None = None) -> dict:
  """Dice and HD95 (mm) per label between the fixed labels and the warped moving labels.

  Args:
    fixed_labels: ``[X, Y, Z]`` fixed label map.
    warped_labels: ``[X, Y, Z]`` moving label map warped onto the fixed grid.
    spacing: the fixed grid's voxel size in mm per array axis (for HD95).
    label_ids: labels to score (default: every non-zero label in both maps).
    before: the moving labels on the fixed grid before registration, for ``dice_before``.

  Returns:
    ``{"dice", "hd95_mm"}`` (and ``"dice_before"``) per label (``{label: value}``) and
    their means (``mean_dice``, ...) over the labels where they are finite.
  """
  ids = list(label_ids) if label_ids else common_labels(fixed_labels, warped_labels
                                                        if before is None else before)
  out = {"dice": dice(fixed_labels, warped_labels, ids),
         "hd95_mm": hd95(fixed_labels, warped_labels, ids, spacing)}
  if before is not None:
    out["dice_before"] = dice(fixed_labels, before, ids)
  for k in list(out):
    out[f"mean_{k}"] = finite_mean(out[k])
  return out
