"""benchmarks/acquired.py: each family's ground truth is exact and reproducible, checked
against references computed here with numpy/scipy from the demo CT and the affines."""
import functools
import itertools
import os
import sys

import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxreg import data

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import acquired

ORGANS = (1, 2, 3, 5, 6, 10, 11, 12, 13, 14, 51, 52)
CASES = (("crop", 0), ("cutfov", 1), ("thick", 0), ("partial", 1))  # odd: with breathing


@functools.cache
def _case(family, index):
  return acquired.make_case(family, index, keypoints=40)


def _source():
  d = data.demo()
  return (np.asarray(d.ct.array, np.float64), np.asarray(d.labels.array),
          np.asarray(d.ct.affine, np.float64))


def _world(vox, affine):
  return vox @ affine[:3, :3].T + affine[:3, 3]


def _voxels(world, affine):
  inv = np.linalg.inv(affine)
  return world @ inv[:3, :3].T + inv[:3, 3]


def _true_source_voxels(a, vox):
  """CT voxel coordinates of the true points of fixed voxels ``vox`` ``[N, 3]``."""
  _, _, src_affine = _source()
  return _voxels(_world(vox, a.case.fixed.affine) + a.true_mm[tuple(vox.T)], src_affine)


def _pick(mask, count, seed=0):
  inside = np.argwhere(mask)
  return inside[np.random.default_rng(seed).choice(len(inside), min(count, len(inside)),
                                                   replace=False)]


@pytest.mark.parametrize("family,index", CASES)
def test_fixed_is_the_ct_at_the_true_points(family, index):
  a = _case(family, index)
  ct, labels, _ = _source()
  assert a.case.name == f"{family}_{index}"
  assert a.true_mm.shape == a.case.fixed.shape + (3,) and a.true_mm.dtype == np.float32
  assert a.shared.shape == a.edge.shape == a.case.fixed_labels.shape == a.case.fixed.shape
  vox = _pick(a.shared & (a.case.fixed.array > -500), 3000)
  s = _true_source_voxels(a, vox).T
  noise = a.case.fixed.array[tuple(vox.T)] - ndi.map_coordinates(ct, s, order=1)
  assert abs(noise.mean()) < 1.0 and 9.5 < noise.std() < 10.5 and np.abs(noise).max() < 60
  wrong = a.case.fixed_labels.array[tuple(vox.T)] != ndi.map_coordinates(labels, s, order=0)
  assert wrong.mean() < 0.005


@pytest.mark.parametrize("family,index", CASES)
def test_moving_is_the_ct_as_acquired(family, index):
  a = _case(family, index)
  ct, labels, src_affine = _source()
  moving = a.case.moving
  assert a.case.moving_labels.shape == moving.shape
  assert np.allclose(a.case.moving_labels.affine, moving.affine)
  vox = _pick(np.ones(moving.shape, bool), 2000)
  s = _voxels(_world(vox, moving.affine), src_affine)
  if family == "thick":  # the CT's linear interpolant averaged over the slice thickness
    assert 0.7 <= moving.spacing[0] == moving.spacing[1] <= 1.0 and 3 <= moving.spacing[2] <= 5
    t = (np.arange(400) + 0.5) / 400 - 0.5  # midpoints across the slice
    thickness = moving.spacing[2] / 2.5  # in CT voxels (the demo's axis 2 is S)
    ref = np.mean([ndi.map_coordinates(ct, (s + [0, 0, thickness * ti]).T, order=1)
                   for ti in t], 0)
  else:  # the CT's own voxels
    np.testing.assert_allclose(s, np.rint(s), atol=1e-6)
    ref = ct[tuple(np.rint(s).astype(int).T)]
  np.testing.assert_allclose(moving.array[tuple(vox.T)], ref, atol=0.1)
  wrong = a.case.moving_labels.array[tuple(vox.T)] != ndi.map_coordinates(labels, s.T, order=0)
  assert wrong.mean() < 0.005


@pytest.mark.parametrize("family,index", CASES)
def test_shared_edge_and_keypoints(family, index):
  a = _case(family, index)
  fixed, moving = a.case.fixed, a.case.moving
  vox = np.moveaxis(np.indices(fixed.shape), 0, -1).reshape(-1, 3).astype(np.float64)
  m = _voxels(_world(vox, fixed.affine) + a.true_mm.reshape(-1, 3), moving.affine)
  n = np.array(moving.shape) - 1
  inside = np.all((m >= 0) & (m <= n), axis=1)
  clear = np.all((np.abs(m) > 1e-3) & (np.abs(m - n) > 1e-3), axis=1)  # off the box's faces
  np.testing.assert_array_equal(a.shared.ravel()[clear], inside[clear])
  assert 0.3 < a.shared.mean() < 1.0

  ball = np.array([o for o in itertools.product(range(-3, 4), repeat=3)
                   if 0 < np.linalg.norm(o) <= acquired.EDGE_VOXELS])
  padded = np.pad(a.shared, 3)  # outside the grid: not shared
  for mask, near_outside in ((a.edge, True), (a.interior, False)):
    v = _pick(mask, 300, seed=1) + 3
    assert np.all(a.shared[tuple((v - 3).T)])
    hits = ~padded[tuple((v[:, None] + ball).transpose(2, 0, 1))]
    np.testing.assert_array_equal(hits.any(axis=1), near_outside)
  np.testing.assert_array_equal(a.interior, a.shared & ~a.edge)

  fp, mp = a.case.fixed_points, a.case.moving_points
  assert fp.shape == mp.shape == (40, 3)
  kv = np.rint(_voxels(fp, fixed.affine)).astype(int)
  assert np.all(np.isin(a.case.fixed_labels.array[tuple(kv.T)], ORGANS))
  assert np.all(a.shared[tuple(kv.T)])
  np.testing.assert_allclose(mp, fp + a.true_mm[tuple(kv.T)], atol=1e-3)


def _box(volume, src_affine):
  """``[2, 3]`` first and last CT voxel of a box of the CT's voxels."""
  corners = np.array([[0, 0, 0], np.array(volume.shape) - 1], float)
  return np.rint(_voxels(_world(corners, volume.affine), src_affine)).astype(int)


def _cc_range(volume, src_affine):
  """First and last CT voxel index along axis 2 (S) of a box of the CT."""
  return _box(volume, src_affine)[:, 2]


def test_family_geometry():
  ct, _, src_affine = _source()
  n = ct.shape[2]
  crop = _case("crop", 0)
  assert all(48 <= s <= 64 for s in crop.case.fixed.shape + crop.case.moving.shape)
  assert np.isin(crop.case.fixed_labels.array, (10, 11, 12, 13, 14)).any()  # lungs first
  (flo, fhi), (mlo, mhi) = (_box(v, src_affine) for v in (crop.case.fixed, crop.case.moving))
  free = (flo > 0) & (mlo > 0) & (fhi < np.array(ct.shape) - 1) & (mhi < np.array(ct.shape) - 1)
  centres = [lo + (hi - lo + 1) // 2 for lo, hi in ((flo, fhi), (mlo, mhi))]
  assert np.all(np.abs(centres[0] - centres[1])[free] <= 2)  # <= 5 mm where not clipped

  cut = _case("cutfov", 1)
  assert cut.case.fixed.shape == ct.shape and cut.case.moving.shape[:2] == ct.shape[:2]
  lo, hi = _cc_range(cut.case.moving, src_affine)
  cuts = np.array([lo, n - 1 - hi]) * 2.5
  assert cuts.any() and all(c == 0 or 10 - 1.25 <= c <= 40 + 1.25 for c in cuts)

  thick = _case("thick", 0)  # family 2, case 0: the stated local field from the stated seed
  assert thick.case.fixed.shape == ct.shape
  rng = np.random.default_rng(acquired.SEED + 2 * 1000 + 0)
  local = data.random_smooth_field(rng, ct.shape, src_affine, max_mm=rng.uniform(8, 12),
                                   control_spacing_mm=rng.uniform(30, 40))
  np.testing.assert_allclose(thick.true_mm, local @ src_affine[:3, :3].T, atol=1e-4)
  assert 8.0 - 1e-3 <= np.linalg.norm(thick.true_mm, axis=-1).max() <= 12.0 + 1e-3

  part = _case("partial", 1)
  (flo, fhi), (mlo, mhi) = (_cc_range(v, src_affine) for v in (part.case.fixed, part.case.moving))
  assert 0.75 * n - 1 <= fhi - flo + 1 <= 0.9 * n + 1
  overlap = (min(fhi, mhi) - max(flo, mlo) + 1) / (fhi - flo + 1)
  assert 0.6 - 0.01 <= overlap <= 0.8 + 0.01
  assert (flo == 0) != (mlo == 0) and (fhi == n - 1) != (mhi == n - 1)
  assert (flo == 0) == (mhi == n - 1)  # cut at opposite ends


def test_seeds_and_errors():
  a, b = acquired.make_case("crop", 2, keypoints=5), acquired.make_case("crop", 2, keypoints=5)
  for x, y in ((a.case.fixed.array, b.case.fixed.array), (a.case.moving.array,
               b.case.moving.array), (a.true_mm, b.true_mm), (a.edge, b.edge),
               (a.case.moving_points, b.case.moving_points)):
    np.testing.assert_array_equal(x, y)
  spine = [k for k, name in data.demo().names.items() if name.startswith("vertebrae_")]
  assert np.isin(a.case.fixed_labels.array, spine).any()  # case 2: the spine
  c = acquired.make_case("crop", 2, keypoints=5, seed=acquired.SEED + 1)
  assert not np.array_equal(a.case.fixed_labels.array[:8, :8, :8],
                            c.case.fixed_labels.array[:8, :8, :8])
  with pytest.raises(ValueError, match="crop, cutfov"):
    acquired.make_case("local", 0)
  with pytest.raises(ValueError, match="index"):
    acquired.make_case("crop", 1000)


def test_one_grid_twin_holds_the_ct_voxels_inside_the_thick_scans_box():
  ct, labels, affine = _source()
  thick = _case("thick", 0)
  twin = acquired.on_one_grid(thick)
  assert twin.case.name == "thick-one-grid_0"
  m, t = thick.case.moving, twin.case.moving
  np.testing.assert_allclose(t.spacing, 2.5, rtol=1e-6)
  lo = np.rint(_voxels(t.affine[:3, 3], affine)).astype(int)  # its first voxel, on the CT grid
  box = tuple(slice(a, a + n) for a, n in zip(lo, t.shape))
  np.testing.assert_array_equal(t.array, ct[box].astype(np.float32))
  np.testing.assert_array_equal(twin.case.moving_labels.array, labels[box])
  # inside the thick scan's world box, and less than one CT voxel from each of its faces
  corners = lambda v: _world(np.array(list(itertools.product(*[(0, n - 1) for n in v.shape])),
                                      float), v.affine)
  (a_lo, a_hi), (b_lo, b_hi) = ((c.min(0), c.max(0)) for c in (corners(m), corners(t)))
  assert np.all(b_lo >= a_lo - 1e-4) and np.all(b_hi <= a_hi + 1e-4)
  assert np.all(b_lo - a_lo < 2.5) and np.all(a_hi - b_hi < 2.5)
  assert twin.case.fixed is thick.case.fixed and twin.shared is thick.shared
