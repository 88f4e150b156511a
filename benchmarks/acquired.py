"""Seeded pairs of "scans as they are acquired" (issue #38): crops, cut fields of view, thick
slices and partial overlap of the demo CT, with exact ground truth and where it holds.

Run: ``python benchmarks/acquired.py`` builds two cases of every family and prints, per
case, the fixed and moving shapes and spacings (mm), the largest true displacement (mm),
the shared fraction of the fixed grid and the mean Dice before registration inside it.

Every case starts from the embedded demo CT (:func:`jaxreg.data.demo`: a real
chest/abdomen CT, 144 x 144 x 133 voxels of 2.5 mm, TotalSegmentator labels) and a true
displacement ``d`` on its grid (voxels, pull-back: CT voxel ``x`` <-> ``x + d(x)``): a
local field (:func:`jaxreg.data.random_smooth_field`, max 8-12 mm, control spacing
30-40 mm) and, in the odd-numbered cases, breathing motion of 15-20 mm placed by the lung
labels as in :mod:`benchmarks.families`' ``breathing`` family, composed as there
(``d = compose(local, breathing)``). The **deformed** CT is the CT pulled back through
``d`` (trilinear, -1024 HU outside) plus Gaussian noise of 10 HU; its labels are pulled
back with nearest neighbour.

The **fixed** image is a box of the deformed CT's voxels; the **moving** image is the
real CT (undeformed, no noise) as a scanner would have acquired it. Both carry world
affines (RAS+ mm; a box's origin is moved to its first voxel) in the CT's world frame, so
the true world displacement at a fixed voxel is the CT's ``A[:3, :3] d`` there. The
cranio-caudal (CC) axis is the array axis closest to world S (axis 2 of the demo CT).

1. ``crop``: a fixed box of 48-64 voxels (2.5 mm) per axis around a random voxel of
   the deformed labels of the lungs (10-14), the liver (5) or the spine (every vertebra),
   cycling through :data:`REGIONS` by case index; the moving image is a box of the CT of
   48-64 voxels per axis around the same voxel shifted by up to 2 voxels (5 mm) per axis
   (boxes are clipped into the grid), so the two fields of view differ a little.
2. ``cutfov``: fixed = the whole deformed CT; moving = the CT with its CC field of view
   cut by 10-40 mm at its low end, its high end or both (each end's cut drawn).
3. ``thick``: fixed = the whole deformed CT (2.5 mm); moving = the CT resampled to a
   thick-slice scan: 0.7-1.0 mm in plane, 3-5 mm slices (contiguous: spacing =
   thickness), in plane the bounding box of the voxels above -500 HU. Each slice is the
   average over its thickness of the CT's linear interpolant (exact box profile), in
   plane linear interpolation: the in-plane detail is the 2.5 mm source's, not new.
   Labels are taken nearest-neighbour at the slice centres.
4. ``partial``: the fixed image keeps 75-90% of the deformed CT's CC extent at one end;
   the moving CT starts inside it and runs to the other end, overlapping 60-80% of the
   fixed extent (fixed and moving cut at opposite ends).

Ground truth (:class:`AcquiredCase`), on the fixed grid: ``true_mm`` (world mm);
``shared``, the voxels whose true point ``x + d(x)`` lies inside the moving scan's voxel
box (``[0, n - 1]`` per axis of its own voxel coordinates), where the data define the
field; ``edge``, the shared voxels within :data:`EDGE_VOXELS` fixed voxels (Euclidean) of
a voxel outside the shared region, the fixed grid's outside counted as outside; and
``interior`` = shared and not edge. Keypoints (as :mod:`benchmarks.families`): up to
``keypoints`` random voxels inside the 12 organs of the fixed labels *and* the shared
region, and their true moving points, in world mm.

Seeds: case ``index`` of family number ``k`` (its position in :data:`FAMILIES`) draws
everything from ``numpy.random.default_rng(SEED + 1000 * k + index)``; :data:`SEED` 3e9
keeps these apart from training (0), evaluation (1e9) and :mod:`benchmarks.families`
(2e9) pairs.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np
import scipy.ndimage as ndi

from jaxreg import data as _data
from jaxreg import metrics as _metrics
from jaxreg.data import synthetic as _synthetic
from jaxreg.eval.evaluation import Case
from jaxreg.io import resample as _resample
from jaxreg.ops import grid as _grid
from jaxreg.ops import points as _points
from jaxreg.types import Grid, Volume

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import families

__all__ = ["EDGE_VOXELS", "FAMILIES", "REGIONS", "SEED", "AcquiredCase", "dice_shared",
           "make_case", "make_cases"]

FAMILIES = ("crop", "cutfov", "thick", "partial")
REGIONS = ("lungs", "liver", "spine")  # crop family: case i is centred in REGIONS[i % 3]
SEED = 3_000_000_000
EDGE_VOXELS = 3.0
_CROP = (48, 64)  # crop family: box side in voxels, both ends included
_SHIFT_MM = 5.0  # crop family: largest shift of the moving box's centre per axis
_ENDS = np.array([[1, 0], [0, 1], [1, 1]])  # cutfov: cut the low end, the high end, both
_BODY_HU = -500.0  # thick family: the in-plane box holds every voxel above this


@dataclasses.dataclass(frozen=True)
class AcquiredCase:
  """One acquired pair and its ground truth on the fixed grid ``(X, Y, Z)``.

  Attributes:
    case: the pair: fixed (deformed CT, float32 HU) and moving (the CT as acquired,
      float32 HU) with their affines, label maps (int32) on each one's grid, and
      ``[N, 3]`` fixed and moving keypoints in world mm (RAS+).
    true_mm: ``[X, Y, Z, 3]`` float32 true displacement in world mm (RAS+): fixed point
      ``p`` corresponds to moving point ``p + d(p)``.
    shared: ``[X, Y, Z]`` bool, voxels whose true point lies inside the moving scan's
      voxel box.
    edge: ``[X, Y, Z]`` bool, shared voxels within :data:`EDGE_VOXELS` voxels of the
      shared region's boundary.
  """
  case: Case
  true_mm: np.ndarray
  shared: np.ndarray
  edge: np.ndarray

  @property
  def interior(self) -> np.ndarray:
    """``[X, Y, Z]`` bool: shared and not edge."""
    return self.shared & ~self.edge


def _rng(family: str, index: int, seed: int) -> np.random.Generator:
  if family not in FAMILIES:
    raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
  if not 0 <= index < families.SEED_STRIDE:
    raise ValueError(f"index must be in [0, {families.SEED_STRIDE}), got {index}")
  return np.random.default_rng(seed + families.SEED_STRIDE * FAMILIES.index(family) + index)


def _region_ids(region: str) -> tuple[int, ...]:
  """Label ids of a :data:`REGIONS` entry (the spine: every ``vertebrae_*`` label)."""
  if region == "lungs":
    return families._LUNGS
  if region == "liver":
    return (5,)
  return tuple(k for k, name in _data.demo().names.items() if name.startswith("vertebrae_"))


def _displacement(rng: np.random.Generator, breathing: bool) -> np.ndarray:
  """``[X, Y, Z, 3]`` float32 true displacement on the CT's grid, voxels (first draws)."""
  ct, labels, affine, _ = families._source()
  local = families._local(rng, ct.shape, affine, (8.0, 12.0), (30.0, 40.0))
  if not breathing:
    return local
  apex, base = _synthetic._lung_levels(ct.shape, affine, labels, families._LUNGS)
  breath = _data.breathing_field(ct.shape, affine, amplitude_mm=rng.uniform(15.0, 20.0),
                                 diaphragm_mm=base, apex_mm=apex)
  return np.asarray(families._compose(local, breath))


def _cc_axis(affine) -> int:
  """The array axis closest to world S (cranio-caudal)."""
  return int(np.argmax(np.abs(np.asarray(affine)[2, :3])))


def _slices(box) -> tuple[slice, ...]:
  return tuple(slice(int(a), int(b)) for a, b in zip(*box))


def _crop(array: np.ndarray, affine, box) -> Volume:
  """``array`` inside ``box = (lo, hi)`` (voxels, hi excluded), its affine's origin moved
  to voxel ``lo``."""
  out = np.array(affine, np.float64)
  out[:3, 3] += out[:3, :3] @ np.asarray(box[0], np.float64)
  return Volume(np.ascontiguousarray(array[_slices(box)]), out)


def _box_around(centre, size, shape):
  """``(lo, hi)`` of a box of ``size`` voxels centred on ``centre``, moved into ``shape``."""
  size = np.minimum(size, shape)
  lo = np.clip(np.asarray(centre) - size // 2, 0, np.asarray(shape) - size)
  return lo, lo + size


def _axis_box(shape, axis: int, lo: int, hi: int):
  """``(lo, hi)`` of the whole grid ``shape`` but ``[lo, hi)`` along ``axis``."""
  start, stop = np.zeros(3, int), np.array(shape)
  start[axis], stop[axis] = lo, hi
  return start, stop


def _crop_boxes(rng, index: int, deformed_labels: np.ndarray):
  """Fixed and moving boxes of the ``crop`` family on the CT's grid."""
  _, _, affine, _ = families._source()
  shape = deformed_labels.shape
  inside = np.argwhere(np.isin(deformed_labels, _region_ids(REGIONS[index % len(REGIONS)])))
  centre = inside[rng.integers(len(inside))]
  fixed = _box_around(centre, rng.integers(_CROP[0], _CROP[1] + 1, 3), shape)
  shift = np.rint(rng.uniform(-_SHIFT_MM, _SHIFT_MM, 3) / _grid.spacing(affine)).astype(int)
  moving = _box_around(centre + shift, rng.integers(_CROP[0], _CROP[1] + 1, 3), shape)
  return fixed, moving


def _cutfov_boxes(rng, shape, affine):
  """Fixed (whole grid) and moving (CC cut 10-40 mm at one or both ends) boxes."""
  axis = _cc_axis(affine)
  cut = np.rint(rng.uniform(10.0, 40.0, 2) / _grid.spacing(affine)[axis]).astype(int)
  low, high = cut * _ENDS[rng.integers(len(_ENDS))]
  n = shape[axis]
  return _axis_box(shape, axis, 0, n), _axis_box(shape, axis, low, n - high)


def _partial_boxes(rng, shape, affine):
  """Fixed and moving boxes cut at opposite CC ends, the moving one covering 60-80%
  of the fixed one's extent."""
  axis = _cc_axis(affine)
  n = shape[axis]
  kept = int(np.rint(rng.uniform(0.75, 0.9) * n))
  overlap = int(np.rint(rng.uniform(0.6, 0.8) * kept))
  if rng.uniform() < 0.5:
    return _axis_box(shape, axis, 0, kept), _axis_box(shape, axis, kept - overlap, n)
  return _axis_box(shape, axis, n - kept, n), _axis_box(shape, axis, 0, n - kept + overlap)


def _linear_matrix(positions: np.ndarray, n: int) -> np.ndarray:
  """``[len(positions), n]`` float32 weights of 1-D linear interpolation of ``n`` samples
  at ``positions`` (sample coordinates in ``[0, n - 1]``)."""
  return np.maximum(0.0, 1.0 - np.abs(positions[:, None] - np.arange(n))).astype(np.float32)


def _hat_integral(t: np.ndarray) -> np.ndarray:
  """The integral of the hat ``max(0, 1 - |s|)`` over ``s < t``."""
  t = np.clip(t, -1.0, 1.0)
  return np.where(t < 0, (t + 1) ** 2 / 2, 1 - (1 - t) ** 2 / 2)


def _slab_matrix(positions: np.ndarray, half: float, n: int) -> np.ndarray:
  """``[len(positions), n]`` float32 weights of the average, over ``[p - half, p + half]``
  (sample coordinates inside ``[0, n - 1]``), of the linear interpolant of ``n`` samples."""
  d = positions[:, None] - np.arange(n)
  return ((_hat_integral(d + half) - _hat_integral(d - half)) / (2 * half)).astype(np.float32)


def _thick_moving(rng, ct: np.ndarray, labels: np.ndarray, affine) -> tuple[Volume, Volume]:
  """The ``thick`` family's moving CT (float32 HU) and labels (int32), see the module
  docstring; their grid has the CT's orientation."""
  axis = _cc_axis(affine)
  size_mm = np.full(3, rng.uniform(0.7, 1.0))
  size_mm[axis] = rng.uniform(3.0, 5.0)
  step = size_mm / _grid.spacing(affine)  # moving voxel size in CT voxels
  body = np.argwhere(ct > _BODY_HU)
  lo, hi = body.min(0).astype(float), body.max(0).astype(float)
  half = step[axis] / 2  # the slabs stay inside the CT's voxel box
  lo[axis], hi[axis] = half, ct.shape[axis] - 1 - half
  positions = [np.arange(a, b + 1e-6, s) for a, b, s in zip(lo, hi, step)]  # CT voxels
  image = ct
  for i in [axis] + [i for i in range(3) if i != axis]:  # the reducing axis first
    m = (_slab_matrix(positions[i], half, ct.shape[i]) if i == axis
         else _linear_matrix(positions[i], ct.shape[i]))
    image = np.moveaxis(np.tensordot(m, image, axes=(1, i)), 0, i)
  to_ct = np.eye(4)
  to_ct[:3, :3] = np.diag(step)
  to_ct[:3, 3] = [p[0] for p in positions]
  moving_affine = np.asarray(affine, np.float64) @ to_ct
  nearest = labels[np.ix_(*(np.rint(p).astype(int) for p in positions))]
  return (Volume(np.ascontiguousarray(image, np.float32), moving_affine),
          Volume(nearest.astype(np.int32), moving_affine))


def _acquisition(family: str, rng, index: int, deformed_labels: np.ndarray):
  """``(fixed box on the CT's grid, moving CT, moving labels)`` of the family's case."""
  ct, labels, affine, _ = families._source()
  if family == "thick":
    return (np.zeros(3, int), np.array(ct.shape)), *_thick_moving(rng, ct, labels, affine)
  if family == "crop":
    fixed, moving = _crop_boxes(rng, index, deformed_labels)
  elif family == "cutfov":
    fixed, moving = _cutfov_boxes(rng, ct.shape, affine)
  else:
    fixed, moving = _partial_boxes(rng, ct.shape, affine)
  return fixed, _crop(ct, affine, moving), _crop(labels, affine, moving)


def _shared(disp: np.ndarray, fixed_affine, moving: Volume) -> np.ndarray:
  """``[X, Y, Z]`` bool: fixed voxels ``x`` whose true point ``x + disp(x)`` (``disp``
  ``[X, Y, Z, 3]`` in fixed voxels) lies in ``[0, n - 1]`` along every axis of the
  moving image's own voxel coordinates."""
  to_moving = np.linalg.inv(moving.affine) @ np.asarray(fixed_affine, np.float64)
  x = np.moveaxis(np.indices(disp.shape[:3], np.float64), 0, -1) + disp
  m = x @ to_moving[:3, :3].T + to_moving[:3, 3]
  return np.all((m >= 0) & (m <= np.array(moving.shape) - 1), axis=-1)


def _edge(shared: np.ndarray) -> np.ndarray:
  """Shared voxels within :data:`EDGE_VOXELS` voxels (Euclidean) of a voxel that is not
  shared or is outside the grid."""
  distance = ndi.distance_transform_edt(np.pad(shared, 1))[1:-1, 1:-1, 1:-1]
  return shared & (distance <= EDGE_VOXELS)


def _keypoints(rng, fixed_labels: np.ndarray, shared: np.ndarray, disp: np.ndarray, affine,
               count: int) -> tuple[np.ndarray, np.ndarray]:
  """Up to ``count`` random fixed voxels in the 12 organs and the shared region, and their
  true points ``v + disp(v)``; both ``[N, 3]`` world mm (``affine``: the fixed grid's)."""
  inside = np.argwhere(np.isin(fixed_labels, families.ORGANS) & shared)
  vox = inside[rng.choice(len(inside), size=min(count, len(inside)), replace=False)]
  moved = vox + disp[tuple(vox.T)]  # exact: the field is sampled at voxel centres
  return (_points.voxel_points_to_world(vox, affine),
          _points.voxel_points_to_world(moved, affine))


def make_case(family: str, index: int, *, seed: int = SEED, keypoints: int = 100
              ) -> AcquiredCase:
  """Case ``index`` of ``family``, named ``f"{family}_{index}"`` (see the module docstring).

  Args:
    family: one of :data:`FAMILIES`.
    index: case number in ``[0, 1000)``; odd numbers add breathing motion.
    seed: base seed; the case uses ``seed + 1000 * FAMILIES.index(family) + index``.
    keypoints: at most this many keypoint pairs (>= 1).

  Raises:
    ValueError: unknown family, ``index`` out of range or ``keypoints < 1``.
  """
  if keypoints < 1:
    raise ValueError(f"keypoints must be >= 1, got {keypoints}")
  rng = _rng(family, index, seed)
  ct, labels, affine, _ = families._source()
  disp = _displacement(rng, breathing=index % 2 == 1)
  deformed = np.asarray(families._warp_jit(ct, disp, cval=families._BACKGROUND))
  deformed_labels = np.asarray(families._warp_jit(labels, disp, order=0))
  box, moving, moving_labels = _acquisition(family, rng, index, deformed_labels)
  fixed_labels = _crop(deformed_labels, affine, box)
  noise = rng.normal(scale=families._NOISE_HU, size=fixed_labels.shape)
  fixed = Volume((deformed[_slices(box)] + noise).astype(np.float32), fixed_labels.affine)
  disp = disp[_slices(box)]
  shared = _shared(disp, fixed.affine, moving)
  points = _keypoints(rng, fixed_labels.array, shared, disp, fixed.affine, keypoints)
  case = Case(f"{family}_{index}", fixed, moving, fixed_labels, moving_labels, *points)
  true_mm = np.asarray(_grid.disp_voxel_to_mm(disp, affine), np.float32)
  return AcquiredCase(case, true_mm, shared, _edge(shared))


def make_cases(*, per_family: int = 2, seed: int = SEED, keypoints: int = 100
               ) -> list[AcquiredCase]:
  """``per_family`` cases of every family in :data:`FAMILIES`, family by family."""
  if not 0 <= per_family <= families.SEED_STRIDE:
    raise ValueError(f"per_family must be in [0, {families.SEED_STRIDE}], got {per_family}")
  return [make_case(f, i, seed=seed, keypoints=keypoints)
          for f in FAMILIES for i in range(per_family)]


def on_one_grid(acase: AcquiredCase) -> AcquiredCase:
  """The same pair with the moving scan on the CT's own 2.5 mm grid: the CT's voxels inside
  the world box of ``acase``'s moving scan (its labels too), named ``<family>-one-grid_<i>``;
  the fixed image, the truth and ``shared``/``edge`` unchanged, so both are scored on the
  same voxels -- the reference a thick-slice scan is measured against ("as well as the same
  pair on one grid")."""
  ct, labels, affine, _ = families._source()
  moving = acase.case.moving
  to_ct = np.linalg.inv(affine) @ moving.affine
  corners = np.array([[a, b, c, 1.0] for a in (0, moving.shape[0] - 1)
                      for b in (0, moving.shape[1] - 1) for c in (0, moving.shape[2] - 1)])
  ct_corners = (corners @ to_ct.T)[:, :3]
  lo = np.ceil(ct_corners.min(0) - 1e-6).astype(int)
  hi = np.floor(ct_corners.max(0) + 1e-6).astype(int) + 1
  box = (np.maximum(lo, 0), np.minimum(hi, ct.shape))
  one, one_labels = _crop(ct, affine, box), _crop(labels, affine, box)
  family, index = acase.case.name.rsplit("_", 1)
  case = dataclasses.replace(acase.case, name=f"{family}-one-grid_{index}", moving=one,
                             moving_labels=one_labels)
  return dataclasses.replace(acase, case=case)


def dice_shared(acase: AcquiredCase, disp_mm: np.ndarray) -> float:
  """Mean Dice inside ``acase.shared`` of the moving labels warped (nearest neighbour)
  through ``disp_mm`` (``[*fixed.shape, 3]`` world mm) against the fixed labels, over the
  labels present in both: in the fixed labels' shared part and in the moving labels."""
  case = acase.case
  warped = _resample.resample_moving(case.moving_labels, disp_mm, Grid.of(case.fixed), order=0)
  fixed = np.where(acase.shared, case.fixed_labels.array, 0)
  ids = _metrics.common_labels(fixed, case.moving_labels.array)
  return _metrics.finite_mean(_metrics.dice(fixed, np.where(acase.shared, warped, 0), ids))


def _describe(volume: Volume) -> str:
  return ("x".join(map(str, volume.shape)) + " @ "
          + "x".join(f"{s:.2f}" for s in volume.spacing))


def _main() -> None:
  t0 = time.perf_counter()
  cases = make_cases()
  seconds = time.perf_counter() - t0
  print(f"{'case':10s} {'fixed (voxels @ mm)':>28s} {'moving (voxels @ mm)':>28s} "
        f"{'max |d| mm':>10s} {'shared':>6s} {'Dice before':>11s}")
  for a in cases:
    zero = np.zeros(a.true_mm.shape, np.float32)
    print(f"{a.case.name:10s} {_describe(a.case.fixed):>28s} {_describe(a.case.moving):>28s} "
          f"{np.linalg.norm(a.true_mm, axis=-1).max():10.1f} {a.shared.mean():6.3f} "
          f"{dice_shared(a, zero):11.3f}")
  print(f"built {len(cases)} cases in {seconds:.1f} s ({seconds / len(cases):.1f} s each)")


if __name__ == "__main__":
  _main()
