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
  return mask & ~ndi.binary_erosion(mask, structure=ndi.generate_binary_structure(3, 1),
                                    border_value=0)


def _label_boxes(m: np.ndarray, labels: Sequence[int]) -> dict:
  """Bounding box (a tuple of slices) of each label in ``m``, ``None`` where it is absent.

  One ``scipy.ndimage.find_objects`` pass for the positive integer labels of an
  integer map; other labels (0, negative, non-integer values or maps) from
  their own mask.
  """
  boxes = {}
  positive = [int(k) for k in labels if float(k) == int(k) and int(k) >= 1]
  if positive and np.issubdtype(m.dtype, np.integer):
    found = ndi.find_objects(m, max_label=max(positive))
    boxes = {k: found[k - 1] for k in positive}
  for k in labels:
    if k in boxes:
      continue
    mask = m == k
    if not mask.any():
      boxes[k] = None
      continue
    box = []
    for axis in range(m.ndim):
      hit = np.flatnonzero(mask.any(axis=tuple(j for j in range(m.ndim) if j != axis)))
      box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    boxes[k] = tuple(box)
  return boxes


def hd95(a: np.ndarray, b: np.ndarray, labels: Sequence[int], spacing=(1.0, 1.0, 1.0)
         ) -> dict[int, float]:
  """95th percentile symmetric Hausdorff distance between label surfaces, in mm.

  The distances from every surface voxel of A to the nearest surface voxel of
  B, and from B to A, pooled; their 95th percentile (Learn2Reg's HD95). A
  surface voxel is a label voxel with a 6-neighbour outside the label or
  outside the volume. Distances honour anisotropic ``spacing`` (exact
  Euclidean distance transforms, ``scipy.ndimage.distance_transform_edt(
  sampling=spacing)``).

  Each label is computed on the bounding box of the union of its two masks,
  grown by one voxel on every side and clipped to the volume (boxes of all
  labels from one ``scipy.ndimage.find_objects`` pass per map), with exactly
  the full-volume result: every voxel of both masks, hence every surface
  voxel, lies in the box; every in-volume 6-neighbour of a mask voxel lies in
  the grown box, so the erosion sees the same neighbours, and a neighbour
  missing from the box is outside the volume, which the erosion's
  ``border_value=0`` counts as outside both in the box and in the full volume
  (the margin reaches the volume border only where a mask touches it); and
  the nearest surface voxel that the distance transform finds for a voxel of
  the box is one of the same surface voxels, all inside the box, at the same
  index offsets. (The margin only keeps this argument local: a mask voxel on
  a face of the ungrown box has its outward neighbour outside both masks
  anyway.) Cost scales with the labels' sizes, not the volume's.

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
  spacing = tuple(float(s) for s in spacing)
  boxes_a, boxes_b = _label_boxes(a, labels), _label_boxes(b, labels)
  out = {}
  for k in labels:
    box_a, box_b = boxes_a[k], boxes_b[k]
    if box_a is None or box_b is None:
      out[int(k)] = float("nan")
      continue
    box = tuple(slice(max(min(sa.start, sb.start) - 1, 0), min(max(sa.stop, sb.stop) + 1, n))
                for sa, sb, n in zip(box_a, box_b, a.shape))
    surf_a, surf_b = _surface(a[box] == k), _surface(b[box] == k)
    to_b = ndi.distance_transform_edt(~surf_b, sampling=spacing)[surf_a]
    to_a = ndi.distance_transform_edt(~surf_a, sampling=spacing)[surf_b]
    out[int(k)] = float(np.percentile(np.concatenate([to_b, to_a]), 95))
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
  """Standard deviation of the log Jacobian determinant (Learn2Reg's SDlogJ).

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
