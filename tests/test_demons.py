"""The demons baseline: its field in jaxreg's convention (world RAS+ mm, fixed -> moving).

A phantom defined in world coordinates (a soft-edged body with three organs,
in HU) is sampled on two different grids: the fixed one oblique LAS with
anisotropic spacing, the moving one RAS with another spacing and shape. The
moving image is the phantom deformed by a known smooth world displacement
``u``: ``moving(q) = phantom(q - u(q))``, so fixed ``p`` corresponds to moving
``p + d(p)`` with ``d(p) = u(p + d(p))``.

The independent path: the images are written with nibabel and read back with
SimpleITK's own NIfTI reader, and the moving one is resampled by SimpleITK
through a ``sitk.DisplacementFieldTransform`` of the demons filter's field.
"""

import nibabel as nib
import numpy as np
import pytest
import scipy.spatial.transform as sst

from jaxreg.eval import demons
from jaxreg import metrics
from jaxreg.io import resample as preprocess
from jaxreg.types import Volume, Grid


FIXED_SHAPE = (40, 36, 32)
MOVING_SHAPE = (46, 44, 46)
BUMP_MM = np.array([6.0, -5.0, 4.0])  # RAS, peak of the smooth deformation (~3 voxels)
BUMP_CENTRE = np.array([4.0, -3.0, 2.0])
BUMP_WIDTH = 20.0
ORGANS = [  # (centre mm, radius mm, HU): label 2, 3, 4; the body is label 1 (0 HU)
    (np.array([-14.0, 6.0, 8.0]), 13.0, -750.0),
    (np.array([15.0, -8.0, -6.0]), 9.0, 500.0),
    (np.array([4.0, 14.0, -12.0]), 10.0, 180.0),
]
BODY_RADII = np.array([36.0, 32.0, 34.0])


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _phantom(points):
  """HU and labels of the phantom at world points ``[..., 3]`` (mm)."""
  r_body = np.linalg.norm(points / BODY_RADII, axis=-1)
  hu = -1000.0 + 1000.0 * _sigmoid((1.0 - r_body) * 30.0 / 1.5)
  labels = np.where(r_body < 1.0, 1, 0)
  for n, (c, r, value) in enumerate(ORGANS):
    dist = np.linalg.norm(points - c, axis=-1)
    hu = hu + value * _sigmoid((r - dist) / 1.5)
    labels = np.where(dist < r, n + 2, labels)
  return hu, labels.astype(np.int32)


def _bump(points):
  w = np.exp(-np.sum((points - BUMP_CENTRE) ** 2, -1) / (2 * BUMP_WIDTH ** 2))
  return w[..., None] * BUMP_MM


def _world(affine, shape):
  vox = np.moveaxis(np.indices(shape), 0, -1).astype(np.float64)
  return vox @ affine[:3, :3].T + affine[:3, 3]


def _affines():
  rot = sst.Rotation.from_euler("xyz", [7, -6, 9], degrees=True).as_matrix()
  fixed = np.eye(4)
  fixed[:3, :3] = rot @ np.diag([-2.5, 2.8, 3.2])  # LAS, oblique, anisotropic
  fixed[:3, 3] = fixed[:3, :3] @ -(np.array(FIXED_SHAPE) / 2 - 0.5)
  moving = np.diag([2.3, 2.3, 2.3, 1.0])
  moving[:3, 3] = -(np.array(MOVING_SHAPE) / 2 - 0.5) * 2.3
  return fixed, moving


def _pair():
  """Fixed and moving images and labels, and the true field ``d`` (world mm) on the fixed grid."""
  fixed_affine, moving_affine = _affines()
  p = _world(fixed_affine, FIXED_SHAPE)
  q = _world(moving_affine, MOVING_SHAPE)
  fixed_hu, fixed_labels = _phantom(p)
  moving_hu, moving_labels = _phantom(q - _bump(q))
  d = np.zeros_like(p)
  for _ in range(30):  # d = u(p + d): a contraction, |grad u| < 0.3
    d = _bump(p + d)
  return (Volume(fixed_hu.astype(np.float32), fixed_affine),
          Volume(moving_hu.astype(np.float32), moving_affine),
          Volume(fixed_labels, fixed_affine), Volume(moving_labels, moving_affine), d)


def _read_with_sitk(volume, path):
  """``volume`` written by nibabel and read back by SimpleITK's NIfTI reader."""
  import SimpleITK as sitk
  nib.save(nib.Nifti1Image(np.asarray(volume.array, np.float32), volume.affine), str(path))
  return sitk.ReadImage(str(path), sitk.sitkFloat32)


def test_to_sitk_geometry_matches_simpleitks_nifti_reader(tmp_path):
  import SimpleITK as sitk
  fixed, _, _, _, _ = _pair()
  ours = demons.to_sitk(fixed)
  theirs = _read_with_sitk(fixed, tmp_path / "fixed.nii")
  assert ours.GetSize() == theirs.GetSize() == FIXED_SHAPE
  np.testing.assert_allclose(ours.GetSpacing(), theirs.GetSpacing(), atol=1e-5)
  np.testing.assert_allclose(ours.GetOrigin(), theirs.GetOrigin(), atol=1e-4)
  np.testing.assert_allclose(ours.GetDirection(), theirs.GetDirection(), atol=1e-5)
  np.testing.assert_array_equal(sitk.GetArrayViewFromImage(ours),
                                sitk.GetArrayViewFromImage(theirs))


def test_returned_field_applied_by_jaxreg_matches_sitk_resampling_with_the_filters_field(
    tmp_path, monkeypatch):
  import SimpleITK as sitk
  fixed, moving, _, _, _ = _pair()
  captured = []
  original = demons.displacement_field

  def spy(*args, **kwargs):
    field = original(*args, **kwargs)
    captured.append(sitk.Image(field))  # a copy: the transform below takes its image
    return field

  monkeypatch.setattr(demons, "displacement_field", spy)
  disp, seconds = demons.run(fixed, moving, shrink=(2, 1), iterations=(20, 20))
  assert disp.shape == FIXED_SHAPE + (3,) and disp.dtype == np.float32 and seconds > 0
  (field,) = captured

  reference = _read_with_sitk(fixed, tmp_path / "fixed.nii")
  assert field.GetSize() == reference.GetSize()
  np.testing.assert_allclose(field.GetOrigin(), reference.GetOrigin(), atol=1e-4)
  np.testing.assert_allclose(field.GetDirection(), reference.GetDirection(), atol=1e-5)
  transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
  theirs = sitk.Resample(_read_with_sitk(moving, tmp_path / "moving.nii"), reference, transform,
                         sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
  theirs = sitk.GetArrayFromImage(theirs).transpose(2, 1, 0)
  ours = preprocess.resample_moving(moving, disp, Grid.of(fixed), cval=-1000.0)

  inner = (slice(4, -4),) * 3
  assert np.linalg.norm(disp[inner], axis=-1).max() > 3.0  # a real deformation, not ~0
  scale = np.ptp(moving.array)
  assert np.abs(ours - theirs)[inner].max() < 1e-3 * scale
  # and the field is not a no-op: without it the two differ by far more
  unwarped = preprocess.resample_moving(moving, np.zeros_like(disp), Grid.of(fixed),
                                        cval=-1000.0)
  assert np.abs(unwarped - theirs)[inner].max() > 0.1 * scale


def test_recovers_a_known_smooth_deformation_and_improves_dice():
  fixed, moving, fixed_labels, moving_labels, truth = _pair()
  disp, _ = demons.run(fixed, moving)
  inside = fixed_labels.array > 0
  err_zero = np.linalg.norm(truth, axis=-1)[inside].mean()
  err = np.linalg.norm(disp - truth, axis=-1)[inside].mean()
  assert err_zero > 2.0  # mm: the deformation is a few voxels
  assert err < 0.4 * err_zero, (err, err_zero)

  grid = Grid.of(fixed)
  labels = metrics.common_labels(fixed_labels.array, moving_labels.array)
  assert labels == [1, 2, 3, 4]

  def mean_dice(d):
    warped = preprocess.resample_moving(moving_labels, d, grid, order=0).astype(np.int32)
    return metrics.finite_mean(metrics.dice(fixed_labels.array, warped, labels))

  before, after = mean_dice(np.zeros_like(disp)), mean_dice(disp)
  assert after > before + 0.1, (before, after)


@pytest.mark.parametrize("options, names", [
    (dict(shrink=(4, 2), iterations=(50, 50, 50)), ["(4, 2)", "(50, 50, 50)"]),
    (dict(shrink=(2, 0), iterations=(5, 5)), ["shrink", "(2, 0)"]),
    (dict(shrink=(2, 1.5), iterations=(5, 5)), ["shrink", "1.5"]),
    (dict(shrink=(), iterations=()), ["shrink", "()"]),
    (dict(iterations=(10, -1, 10)), ["iterations", "-1"]),
    (dict(smoothing_sigma=0.0), ["smoothing_sigma", "0.0"]),
    (dict(smoothing_sigma=float("nan")), ["smoothing_sigma", "nan"]),
    (dict(hu_window=(500.0, -500.0)), ["hu_window", "500.0"]),
    (dict(hu_window=(-1000.0,)), ["hu_window", "-1000.0"]),
])
def test_bad_options_raise_value_error_naming_them(options, names):
  fixed, moving, _, _, _ = _pair()
  with pytest.raises(ValueError) as info:
    demons.run(fixed, moving, **options)
  for name in names:
    assert name in str(info.value)


def test_available_and_missing_message():
  assert demons.available()
  assert "SimpleITK" in demons.MISSING and "pip install" in demons.MISSING
