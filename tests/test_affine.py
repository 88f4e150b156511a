"""jaxreg.pipeline.affine: parameters against scipy rotations, recovery of a known affine on the demo CT,
and the ITK text file applied by SimpleITK."""

import numpy as np
import pytest
import scipy.spatial.transform as sst
import SimpleITK as sitk

from jaxreg.pipeline import affine as AF
from jaxreg import data
from jaxreg import io
from jaxreg.ops import losses
from jaxreg.io import resample as preprocess
from jaxreg.types import Volume, Grid


def _true_matrix(centre, angles=(10, -8, 15), scales=(1.08, 0.93, 1.05), shift=(25, -20, 15)):
  lin = sst.Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(scales)
  m = np.eye(4)
  m[:3, :3] = lin
  m[:3, 3] = centre + np.asarray(shift, float) - lin @ centre
  return m


def test_matrix_from_params_against_scipy():
  c = np.array([10.0, -5.0, 3.0])
  rot = np.deg2rad([5.0, -12.0, 20.0])
  params = np.r_[[1.0, 2.0, 3.0], rot, np.log([1.1, 0.9, 1.0]), [0.05, 0.0, -0.02]]
  m = np.asarray(AF.matrix_from_params(params, c))
  r = sst.Rotation.from_euler("xyz", rot).as_matrix()  # extrinsic x, y, z = Rz Ry Rx
  shear = np.array([[1, 0.05, 0.0], [0, 1, -0.02], [0, 0, 1]])
  lin = r @ np.diag([1.1, 0.9, 1.0]) @ shear
  np.testing.assert_allclose(m[:3, :3], lin, atol=1e-6)
  np.testing.assert_allclose(m @ np.r_[c, 1], np.r_[c + [1, 2, 3], 1], atol=1e-5)  # c -> c + t
  np.testing.assert_array_equal(m[3], [0, 0, 0, 1])


def test_matrix_in_numpy_equals_matrix_from_params():
  params = np.r_[[1.0, -2.0, 3.0], np.deg2rad([5.0, -12.0, 20.0]), [0.1, -0.1, 0.0],
                 [0.05, 0.0, -0.02]]
  c = np.array([10.0, -5.0, 3.0])
  np.testing.assert_allclose(AF._matrix(np, params, c), AF.matrix_from_params(params, c),
                             atol=1e-4)


def test_a_small_level_is_sampled_whole_and_a_large_one_randomly():
  rng = np.random.default_rng(3)
  image = rng.random((12, 10, 9)).astype(np.float32)
  inside = np.zeros(image.shape, np.float32)
  inside[2:10, 1:9, 1:8] = 1.0
  world = rng.normal(size=image.shape + (3,)).astype(np.float32)
  values, weights, points = AF._samples(image, inside, world, 32768, seed=0)
  n = int(inside.sum())  # 448 voxels with data: each once, padded with zero weights
  size = AF.SMALL_SAMPLES
  assert values.shape == weights.shape == (size,) and points.shape == (size, 3)
  assert weights.sum() == n and set(np.unique(weights)) == {0.0, 1.0}
  np.testing.assert_array_equal(np.sort(values[weights > 0]), np.sort(image[inside > 0]))
  # so the weighted NCC over the samples is the NCC over every voxel with data
  other = rng.random(size).astype(np.float32)
  full = np.zeros(image.size, np.float32)
  full[np.flatnonzero(inside)] = other[:n]
  np.testing.assert_allclose(
      AF._weighted_ncc(values, other, weights),
      losses.global_ncc(image[inside > 0], full[np.flatnonzero(inside)]), rtol=1e-5)
  # more voxels than asked for: that many, without repeats, all with data
  values, weights, _ = AF._samples(image, inside, world, 100, seed=0)
  assert values.shape == (100,) and weights.min() == 1.0
  assert len(np.unique(values)) == 100


def test_weighted_ncc_with_unit_weights_is_global_ncc():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(6, 7, 8)), rng.normal(size=(6, 7, 8))
  np.testing.assert_allclose(AF._weighted_ncc(a, a + b, np.ones_like(a)),
                             losses.global_ncc(a, a + b), rtol=1e-5)


def test_field_of_view_is_the_trilinear_sample_of_ones_with_zero_padding():
  # reference: scipy's order-1 map_coordinates of an all-ones volume padded with zeros, at
  # world points of an oblique, anisotropic grid, some inside, some across the edges
  import jax.numpy as jnp
  import scipy.ndimage as ndi
  rng = np.random.default_rng(3)
  shape = (7, 9, 6)
  affine = np.array([[0.0, 2.0, 0.3, -5.0], [1.5, 0.0, 0.0, 4.0], [0.0, 0.2, 3.0, 1.0],
                     [0, 0, 0, 1]])
  vox = rng.uniform(-2.5, np.array(shape) + 1.5, size=(500, 3))
  world = vox @ affine[:3, :3].T + affine[:3, 3]
  padded = np.pad(np.ones(shape), 3)  # zeros around, so order 1 near the edge is exact
  ref = ndi.map_coordinates(padded, (vox + 3).T, order=1, mode="constant", cval=0.0)
  inv = np.linalg.inv(affine)
  np.testing.assert_allclose(AF.field_of_view(world, shape, inv), ref, atol=1e-9)
  got = AF.field_of_view(jnp.asarray(world, jnp.float32), jnp.asarray(shape, jnp.float32),
                         jnp.asarray(inv, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5)
  assert 0 < (ref == 1).mean() < 1 and (ref == 0).any() and ((ref > 0) & (ref < 1)).any()


@pytest.fixture(scope="module")
def ct_and_moved():
  ct = data.demo().ct
  true = _true_matrix(AF.centre_of_mass(ct))
  grid = Grid.of(ct)
  # moving(q) = ct(M^-1 q): fixed p corresponds to moving M p
  moved = preprocess.resample_moving(ct, AF.displacement_mm(np.linalg.inv(true), grid), grid,
                                     cval=-1024.0)
  return ct, Volume(moved, ct.affine), true


def _mean_error_mm(ct, m, true):
  body = np.argwhere(ct.array > -500) @ ct.affine[:3, :3].T + ct.affine[:3, 3]
  return np.linalg.norm(body @ (m - true)[:3, :3].T + (m - true)[:3, 3], axis=1).mean()


def test_recovers_a_known_affine_on_the_demo_ct_within_1_mm(ct_and_moved):
  ct, moving, true = ct_and_moved
  assert _mean_error_mm(ct, np.eye(4), true) > 20  # the pair starts far apart
  result = AF.align(ct, moving)
  assert _mean_error_mm(ct, result.matrix, true) < 1.0
  assert all(l[-1] < l[0] for l in result.losses) and result.seconds > 0
  # tol=None runs every step of both levels; the default stopped no worse than 0.1 mm from it
  full = AF.align(ct, moving, tol=None)
  assert [len(l) for l in full.losses] == [200, 100]
  assert all(1 <= len(l) <= n for l, n in zip(result.losses, (200, 100)))
  assert _mean_error_mm(ct, full.matrix, true) < 1.0
  assert abs(_mean_error_mm(ct, result.matrix, true) - _mean_error_mm(ct, full.matrix, true)) < 0.1


def test_rigid_keeps_an_orthonormal_matrix_and_recovers_a_rigid_map():
  ct = data.demo().ct
  true = _true_matrix(AF.centre_of_mass(ct), angles=(0, 6, -9), scales=(1, 1, 1),
                      shift=(-12, 8, 20))
  grid = Grid.of(ct)
  moved = Volume(preprocess.resample_moving(ct, AF.displacement_mm(np.linalg.inv(true), grid),
                                            grid, cval=-1024.0), ct.affine)
  result = AF.align(ct, moved, model="rigid")
  lin = result.matrix[:3, :3]
  np.testing.assert_allclose(lin @ lin.T, np.eye(3), atol=1e-5)
  assert np.all(result.params[6:] == 0)
  assert _mean_error_mm(ct, result.matrix, true) < 1.0


def test_itk_text_applied_by_simpleitk_matches_jaxreg(tmp_path, ct_and_moved):
  ct, moving, true = ct_and_moved
  small = preprocess.model_grid(ct, spacing=5.0, divisor=1)  # a coarse RAS fixed grid
  fixed = Volume(preprocess.resample(ct, small, cval=-1024.0), small.affine)
  flip = np.diag([-1.0, 1.0, 1.0, 1.0])
  flip[0, 3] = moving.shape[0] - 1
  moving = Volume(moving.array[::-1].copy(), moving.affine @ flip)  # another orientation
  io.save(tmp_path / "fixed.nii.gz", fixed.array, fixed.affine)
  io.save(tmp_path / "moving.nii.gz", moving.array, moving.affine)
  AF.save_itk(str(tmp_path / "affine.txt"), true)
  tx = sitk.ReadTransform(str(tmp_path / "affine.txt"))
  p = np.array([12.0, -30.0, 55.0])  # RAS
  q = np.array(tx.TransformPoint((-p[0], -p[1], p[2])))  # LPS in and out
  np.testing.assert_allclose(q * [-1, -1, 1], (true @ np.r_[p, 1])[:3], atol=1e-6)
  theirs = sitk.GetArrayFromImage(sitk.Resample(
      sitk.ReadImage(str(tmp_path / "moving.nii.gz")),
      sitk.ReadImage(str(tmp_path / "fixed.nii.gz")),
      tx, sitk.sitkLinear, -1024.0)).transpose(2, 1, 0)
  ours = preprocess.resample_moving(moving, AF.displacement_mm(true, small), small, cval=-1024.0)
  # equal wherever the mapped point is a voxel inside the moving grid (ITK and jaxreg treat
  # the last half voxel at its edge differently)
  world = np.moveaxis(np.indices(small.shape), 0, -1) @ small.affine[:3, :3].T + small.affine[:3, 3]
  inv = np.linalg.inv(moving.affine) @ true
  vox = world @ inv[:3, :3].T + inv[:3, 3]
  inside = np.all((vox >= 1) & (vox <= np.array(moving.shape) - 2), axis=-1)
  assert inside.mean() > 0.5
  np.testing.assert_allclose(theirs[inside], ours[inside], atol=0.1)


@pytest.mark.parametrize("kwargs, match", [
    ({"model": "similarity"}, "model"), ({"similarity": "mi"}, "similarity"),
    ({"levels": (8.0, 4.0), "steps": (10,)}, "equal lengths"), ({"init": "moments"}, "init"),
    ({"patience": 0}, "patience"), ({"tol": -1.0}, "tol"),
])
def test_bad_options_raise(kwargs, match):
  ct = data.demo().ct
  with pytest.raises(ValueError, match=match):
    AF.align(ct, ct, **kwargs)


def _cut(volume, axis, lo, hi):
  """The voxels ``lo:hi`` along ``axis`` with their world positions (origin moved)."""
  box = [slice(None)] * 3
  box[axis] = slice(lo, hi)
  affine = volume.affine.copy()
  affine[:3, 3] = volume.affine[:3, :3] @ np.eye(3)[axis] * lo + volume.affine[:3, 3]
  return Volume(volume.array[tuple(box)], affine)


def test_partial_overlap_and_a_crop_align_where_their_centres_of_mass_mislead(ct_and_moved):
  """Moving = the fixed CT's upper 60% (and a crop of a known affine's image): their body
  centres of mass lie tens of mm from the fixed one's, yet the first level also starts from
  the identity and keeps the better run, and only voxels where both have data count."""
  ct, moving, true = ct_and_moved
  lo = int(0.4 * ct.shape[2])
  upper = _cut(ct, 2, lo, ct.shape[2])
  shift = np.linalg.norm(AF.centre_of_mass(upper) - AF.centre_of_mass(ct))
  assert shift > 30  # the centre-of-mass start is far from the answer (the identity)
  overlap = _cut(ct, 2, lo, ct.shape[2])  # scored where both have data
  assert _mean_error_mm(overlap, AF.align(ct, upper).matrix, np.eye(4)) < 1.0
  with pytest.raises(ValueError, match="init must be one of"):
    AF.align(ct, upper, init="centre")
  # a crop of the moved image: the same affine, from the fixed voxels the crop covers
  crop = _cut(_cut(moving, 2, 30, 110), 0, 20, 120)
  assert _mean_error_mm(ct, AF.align(ct, crop).matrix, true) < 1.0


def test_masks_restrict_the_comparison_to_where_the_user_says():
  """A moving scan whose upper half is replaced by noise: with a moving mask over its lower
  half the identity is found; the noise cannot pull the map (a mask of the region with
  data is the same as having no other data there)."""
  ct = data.demo().ct
  rng = np.random.default_rng(0)
  noisy = ct.array.copy()
  half = ct.shape[2] // 2
  noisy[:, :, half:] = rng.uniform(-1000, 1000, noisy[:, :, half:].shape)
  mask = np.zeros(ct.shape, bool)
  mask[:, :, :half - 2] = True
  result = AF.align(ct, Volume(noisy, ct.affine), moving_mask=mask, init="identity")
  assert _mean_error_mm(ct, result.matrix, np.eye(4)) < 0.5
  fixed_mask = np.zeros(ct.shape, bool)
  fixed_mask[:, :, :half - 2] = True
  result = AF.align(Volume(noisy, ct.affine), ct, fixed_mask=fixed_mask, init="identity")
  assert _mean_error_mm(ct, result.matrix, np.eye(4)) < 0.5
