"""Model grid, resampling (against nibabel/scipy) and the round trip back to the fixed grid."""

import nibabel as nib
import nibabel.processing
import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage as ndi

from jaxreg.ops import grid as G
from jaxreg.io import resample as P
from jaxreg.types import Grid, InputError, Volume


def _affine(rotvec, spacing, origin):
  a = np.eye(4)
  a[:3, :3] = scipy.linalg.expm(np.cross(np.eye(3), rotvec)) @ np.diag(spacing)
  a[:3, 3] = origin
  return a


FIXED_AFFINE = _affine([0.05, -0.1, 0.2], [-1.7, 1.3, 3.0], [60.0, -40.0, -70.0])
FIXED_SHAPE = (40, 44, 24)


def world_function(p):
  """A smooth function of world position (mm), the 'anatomy' both images show."""
  x, y, z = p[..., 0], p[..., 1], p[..., 2]
  return 500 * np.sin(x / 17.0) * np.cos(y / 23.0) + 300 * np.sin(z / 29.0 + 0.3)


def volume_of(shape, affine):
  pts = nib.affines.apply_affine(affine, np.indices(shape).transpose(1, 2, 3, 0))
  return Volume(world_function(pts).astype(np.float32), affine)


def test_model_grid_is_ras_isotropic_divisible_and_covers_fixed():
  grid = P.model_grid(Grid(FIXED_SHAPE, FIXED_AFFINE), spacing=2.0, divisor=16)
  assert all(s % 16 == 0 for s in grid.shape)
  np.testing.assert_allclose(grid.affine[:3, :3], 2.0 * np.eye(3))
  lo, hi = Grid(FIXED_SHAPE, FIXED_AFFINE).world_bounds()
  glo, ghi = grid.world_bounds()
  assert np.all(glo <= lo) and np.all(ghi >= hi)
  assert np.all(ghi - glo < (hi - lo) + 2 * 16 * 2.0)  # no more padding than one stride per side
  np.testing.assert_allclose((glo + ghi) / 2, (lo + hi) / 2, atol=1e-9)


def test_model_grid_max_shape_crops_about_centre():
  grid = P.model_grid(Grid(FIXED_SHAPE, FIXED_AFFINE), spacing=1.0, divisor=8,
                      max_shape=(32, 32, 32))
  assert grid.shape == (32, 32, 32)
  lo, hi = Grid(FIXED_SHAPE, FIXED_AFFINE).world_bounds()
  np.testing.assert_allclose(np.mean(grid.world_bounds(), 0), (lo + hi) / 2, atol=1e-9)


def test_model_grid_exact_shape_pads_or_crops_about_centre():
  fixed = Grid(FIXED_SHAPE, FIXED_AFFINE)
  lo, hi = fixed.world_bounds()
  for shape in [(16, 32, 96), (64, 64, 64)]:
    grid = P.model_grid(fixed, spacing=2.0, divisor=16, shape=shape)
    assert grid.shape == shape
    np.testing.assert_allclose(np.mean(grid.world_bounds(), 0), (lo + hi) / 2, atol=1e-9)
  with pytest.raises(ValueError, match="multiples of divisor=16"):
    P.model_grid(fixed, shape=(16, 16, 20))


def test_resample_matches_nibabel_resample_from_to():
  vol = volume_of(FIXED_SHAPE, FIXED_AFFINE)
  target = P.model_grid(vol, spacing=2.0, divisor=8)
  ours = P.resample(vol, target, antialias=False, cval=-1000.0)
  ref = nibabel.processing.resample_from_to(
      nib.Nifti1Image(vol.array, vol.affine), (target.shape, target.affine), order=1,
      mode="constant", cval=-1000.0).get_fdata()
  # Compare where the sample lies at least one voxel inside the source (scipy's
  # legacy 'constant' mode differs from per-corner padding in the outer voxel).
  coords = nib.affines.apply_affine(np.linalg.inv(vol.affine) @ target.affine,
                                    np.indices(target.shape).transpose(1, 2, 3, 0))
  inner = np.all((coords >= 1) & (coords <= np.array(FIXED_SHAPE) - 2), axis=-1)
  assert inner.mean() > 0.3
  np.testing.assert_allclose(ours[inner], ref[inner], atol=0.05)
  assert np.all(ours[~np.all((coords > -1) & (coords < np.array(FIXED_SHAPE)), -1)] == -1000)


def test_resample_labels_nearest_keeps_values():
  labels = Volume((volume_of(FIXED_SHAPE, FIXED_AFFINE).array > 100).astype(np.int32) * 7,
                     FIXED_AFFINE)
  out = P.resample(labels, P.model_grid(labels, spacing=2.0, divisor=8), order=0)
  assert out.dtype == np.int32 and set(np.unique(out)) == {0, 7}


def test_window_clips_and_scales():
  np.testing.assert_allclose(P.window(np.array([-2000, -1000, 0, 500, 3000])),
                             [0, 0, 0.5, 0.75, 1])


def test_prepare_pair_with_different_grids_orientation_and_fov():
  fixed = volume_of(FIXED_SHAPE, FIXED_AFFINE)
  # Moving: other orientation (LPS-like flip), spacing, shape and a shifted field of view.
  moving = volume_of((30, 36, 50), _affine([0.0, 0.15, -0.05], [1.9, -1.6, 1.5],
                                           [-10.0, 30.0, -60.0]))
  labels = Volume((fixed.array > 0).astype(np.int32), fixed.affine)
  pair = P.prepare_pair(fixed, moving, fixed_labels=labels, spacing=2.5, divisor=8)
  assert pair.fixed.shape == pair.moving.shape == pair.grid.shape
  assert pair.fixed.dtype == np.float32 and 0 <= pair.fixed.min() and pair.fixed.max() <= 1
  assert pair.fixed_labels.shape == pair.grid.shape and pair.moving_labels is None
  # Where both images see the anatomy, they agree (same world function, no motion).
  grid_pts = nib.affines.apply_affine(pair.grid.affine,
                                      np.indices(pair.grid.shape).transpose(1, 2, 3, 0))
  inside = []
  for vol in (fixed, moving):
    c = nib.affines.apply_affine(np.linalg.inv(vol.affine), grid_pts)
    inside.append(np.all((c >= 1) & (c <= np.array(vol.shape) - 2), -1))
  both = inside[0] & inside[1]
  assert both.mean() > 0.1
  np.testing.assert_allclose(pair.fixed[both], pair.moving[both], atol=0.03)
  c = nib.affines.apply_affine(np.linalg.inv(moving.affine), grid_pts)
  beyond = np.any((c < -1) | (c > np.array(moving.shape)), -1)  # no corner inside
  assert beyond.mean() > 0.05 and np.all(pair.moving[beyond] == 0)  # air
  expected = P.window(world_function(grid_pts))
  np.testing.assert_allclose(pair.moving[inside[1]], expected[inside[1]], atol=0.03)


def test_round_trip_of_a_known_world_transform_to_the_fixed_grid():
  # A known world transform T: fixed point p corresponds to moving point T(p).
  t = _affine([0.03, -0.02, 0.06], [1.04, 0.97, 1.02], [3.0, -4.0, 2.5])
  grid = P.model_grid(Grid(FIXED_SHAPE, FIXED_AFFINE), spacing=2.0, divisor=16)
  # The exact model-grid field of T, in model voxels: u(m) = A_g^-1 T A_g m - m.
  u_model = G.affine_displacement(np.linalg.inv(grid.affine) @ t @ grid.affine, grid.shape)
  d_mm = P.field_to_world(u_model, grid, Grid(FIXED_SHAPE, FIXED_AFFINE))
  p = nib.affines.apply_affine(FIXED_AFFINE, np.indices(FIXED_SHAPE).transpose(1, 2, 3, 0))
  np.testing.assert_allclose(d_mm, nib.affines.apply_affine(t, p) - p, atol=2e-3)
  # and in fixed voxels, as written for Learn2Reg
  d_vox = np.asarray(G.disp_mm_to_voxel(d_mm, FIXED_AFFINE))
  want_vox = G.affine_displacement(np.linalg.inv(FIXED_AFFINE) @ t @ FIXED_AFFINE, FIXED_SHAPE)
  np.testing.assert_allclose(d_vox, np.asarray(want_vox), atol=2e-3)

  # Applying it to a moving image on its own grid reads the anatomy at T(p).
  moving = volume_of((50, 50, 40), _affine([0.1, 0.0, 0.0], [1.5, 1.5, 2.0], [-40, -70, -80]))
  warped = P.resample_moving(moving, d_mm, Grid(FIXED_SHAPE, FIXED_AFFINE), cval=np.nan)
  want = world_function(nib.affines.apply_affine(t, p))
  ok = np.isfinite(warped)
  assert ok.mean() > 0.5
  np.testing.assert_allclose(warped[ok], want[ok], atol=25.0)  # interpolation of a 800-HU wave


def test_field_to_world_then_a_world_map_is_the_numpy_composition():
  """then=M: the displacement of p -> M (p + d(p)) for a random smooth model field, against
  scipy's trilinear read of the field (edge repeated) and a float64 numpy composition."""
  rng = np.random.default_rng(4)
  target = Grid(FIXED_SHAPE, FIXED_AFFINE)
  grid = P.model_grid(target, spacing=2.0, divisor=16)
  u = ndi.gaussian_filter(rng.normal(size=grid.shape + (3,)), (2, 2, 2, 0)) * 20
  m = _affine([0.05, 0.1, -0.04], [1.02, 0.98, 1.01], [6.0, -3.0, 9.0])
  got = P.field_to_world(u.astype(np.float32), grid, target, then=m)
  p = nib.affines.apply_affine(FIXED_AFFINE, np.indices(FIXED_SHAPE).transpose(1, 2, 3, 0))
  y = nib.affines.apply_affine(np.linalg.inv(grid.affine), p)
  u_at = np.stack([ndi.map_coordinates(u[..., k], np.moveaxis(y, -1, 0), order=1,
                                       mode="nearest") for k in range(3)], -1)
  want = nib.affines.apply_affine(m, p + u_at @ grid.affine[:3, :3].T) - p
  np.testing.assert_allclose(got, want, atol=2e-3)
  plain = P.field_to_world(u.astype(np.float32), grid, target)
  np.testing.assert_allclose(plain, u_at @ grid.affine[:3, :3].T, atol=1e-3)


def test_no_overlap_and_bad_fields_raise():
  fixed = volume_of(FIXED_SHAPE, FIXED_AFFINE)
  far = Volume(fixed.array, _affine([0, 0, 0], [1, 1, 1], [5000.0, 0.0, 0.0]))
  with pytest.raises(InputError, match="moving.nii.gz: no overlap with fixed.nii.gz"):
    P.prepare_pair(fixed, far, names=("fixed.nii.gz", "moving.nii.gz"))
  grid = P.model_grid(fixed)
  with pytest.raises(ValueError, match="disp_model must be"):
    P.field_to_world(np.zeros((4, 4, 4, 3)), grid, Grid.of(fixed))
  with pytest.raises(ValueError, match="max_shape"):
    P.model_grid(fixed, max_shape=(30, 32, 32))


def test_data_on_marks_target_voxels_whose_trilinear_corners_all_have_data():
  """Against numpy: a target voxel has data iff its point in the source's voxels lies in
  [0, n - 1] per axis (every corner inside) and, with a mask, every corner is in the mask."""
  src = Volume(np.zeros((10, 9, 8), np.float32), np.diag([2.0, 2.0, 3.0, 1.0]))
  target_affine = np.diag([1.5, 1.5, 1.5, 1.0])
  target_affine[:3, 3] = [-2.2, -1.1, -2.9]
  target = Grid((18, 16, 20), target_affine)
  pts = np.moveaxis(np.indices(target.shape), 0, -1) @ target_affine[:3, :3].T + target_affine[:3, 3]
  v = pts / np.array([2.0, 2.0, 3.0])  # source voxels
  want = np.all((v >= -1e-6) & (v <= np.array(src.shape) - 1 + 1e-6), axis=-1)
  np.testing.assert_array_equal(P.data_on(src, target), want)
  mask = np.ones(src.shape, bool)
  mask[:, :, 5:] = False
  top = np.ceil(v[..., 2] - 1e-6)  # the highest z index among the corners
  corners_in = want & (top <= 4)
  np.testing.assert_array_equal(P.data_on(src, target, mask), corners_in)


@pytest.mark.parametrize("multiple", [8, 16])
def test_shape_buckets_double_up_to_64_then_step_by_the_multiple(multiple):
  doubling = [multiple * 2 ** k for k in range(4) if multiple * 2 ** k <= 64]
  candidates = doubling + list(range(64 + multiple, 2000, multiple))
  for n in range(1, 400):
    assert P.bucket_size(n, multiple) == min(c for c in candidates if c >= n), n
  assert P.bucket_shape((50, 63, 49)) == (64, 64, 64)
  assert P.bucket_shape((144, 144, 133)) == (144, 144, 144)


def test_a_bucketed_model_grid_covers_the_image_with_a_bucket_shape():
  fixed = Grid((50, 63, 20), np.diag([2.5, 2.5, 2.5, 1.0]))
  plain = P.model_grid(fixed, spacing=5.0, divisor=16)
  bucketed = P.model_grid(fixed, spacing=5.0, divisor=16, bucket=True)
  assert plain.shape == (32, 32, 16) and bucketed.shape == (32, 32, 16)
  big = Grid((150, 40, 90), np.diag([2.5, 2.5, 2.5, 1.0]))
  assert P.model_grid(big, spacing=2.5, divisor=16).shape == (160, 48, 96)
  assert P.model_grid(big, spacing=2.5, divisor=16, bucket=True).shape == (160, 64, 96)
  # the same centre: the bucket only widens the margin
  centre = lambda g: g.affine[:3, :3] @ ((np.array(g.shape) - 1) / 2) + g.affine[:3, 3]
  np.testing.assert_allclose(centre(P.model_grid(big, spacing=2.5, divisor=16,
                                                          bucket=True)), centre(big))


@pytest.mark.parametrize("target_affine", [
    [[1.3137, 0.0213, 0, -12.1719], [0.0119, 1.2281, 0.1093, 1.0771],  # oblique, no x.5 ties
     [0, 0.0217, 1.9123, 9.3337], [0, 0, 0, 1]],
    [[0, -2, 0, 10], [2, 0, 0, -4], [0, 0, 3, 6], [0, 0, 0, 1]],         # whole voxels, axes swapped
    [[2, 0, 0, 1.3], [0, 2, 0, -4], [0, 0, -3, 60], [0, 0, 0, 1]],       # axis-aligned, flipped
])
def test_numpy_engine_samples_as_the_jax_engine(target_affine):
  """The data workers' scipy path (whole-voxel indexing, scipy's separable and general affine
  paths) against the compiled JAX sampler: images with cval outside, labels nearest."""
  rng = np.random.default_rng(0)
  source = np.diag([2.0, 2.0, 3.0, 1.0])
  image = Volume((rng.normal(size=(40, 37, 33)) * 100).astype(np.float32), source)
  labels = Volume(rng.integers(0, 5, (40, 37, 33)).astype(np.int32), source)
  grid = Grid((30, 34, 28), np.array(target_affine, np.float64))
  for volume, kwargs in ((image, dict(cval=-1000.0)), (labels, dict(order=0))):
    a = P.resample(volume, grid, **kwargs)
    b = P.resample(volume, grid, engine="numpy", **kwargs)
    assert a.dtype == b.dtype and a.shape == b.shape == grid.shape
    np.testing.assert_allclose(a, b, atol=2e-3)
    assert np.any(b == kwargs.get("cval", 0))  # part of the grid lies outside the source
  with pytest.raises(ValueError, match="engine"):
    P.resample(image, grid, engine="scipy")
