"""benchmarks/families.py: one case per family has exact ground truth and is reproducible."""
import importlib.util
import os

import numpy as np
import pytest

from jaxreg.ops import grid
from jaxreg.ops import points
from jaxreg.ops import warp

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "families.py")
_spec = importlib.util.spec_from_file_location("families", _PATH)
families = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(families)


@pytest.mark.parametrize("family", families.FAMILIES)
def test_ground_truth_is_exact(family):
  case = families.make_case(family, 0, keypoints=50)
  disp = families.true_displacement(family, 0)
  assert case.name == f"{family}_0"
  assert case.fixed.shape == case.moving.shape == disp.shape[:3]
  assert np.all(np.isfinite(case.fixed.array))
  np.testing.assert_array_equal(
      np.asarray(warp.warp(case.moving_labels.array, disp, order=0)), case.fixed_labels.array)
  assert case.fixed_points.shape == case.moving_points.shape == (50, 3)
  vox = np.rint(grid.world_to_voxel(case.fixed_points, case.fixed.affine)).astype(int)
  assert np.all(np.isin(case.fixed_labels.array[tuple(vox.T)], families.ORGANS))
  disp_mm = np.asarray(grid.disp_voxel_to_mm(disp[tuple(vox.T)], case.fixed.affine))
  np.testing.assert_allclose(case.moving_points, case.fixed_points + disp_mm, atol=1e-3)
  np.testing.assert_allclose(
      points.transform_points(case.fixed_points, disp, case.fixed.affine), case.moving_points,
      atol=1e-3)


def test_rigid_displacement_is_the_world_map():
  affine = np.array([[-2.0, 0, 0, 10], [0, 3.0, 0, -5], [0, 0, 2.5, 7], [0, 0, 0, 1]])
  rot = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
  c, t = np.array([1.0, 2.0, 3.0]), np.array([4.0, -5.0, 6.0])
  disp = families.rigid_displacement((4, 5, 6), affine, rot, c, t)
  vox = np.array([[1, 2, 3], [3, 0, 5]])
  p = points.voxel_points_to_world(vox, affine)
  moved = points.voxel_points_to_world(vox + disp[tuple(vox.T)], affine)
  np.testing.assert_allclose(moved, (p - c) @ rot.T + c + t, atol=1e-4)


def test_seeds_and_errors():
  a = families.make_case("local", 1, keypoints=5)
  b = families.make_case("local", 1, keypoints=5)
  np.testing.assert_array_equal(a.fixed.array, b.fixed.array)
  np.testing.assert_array_equal(a.moving_points, b.moving_points)
  assert not np.array_equal(a.fixed.array, families.make_case("local", 0, keypoints=5).fixed.array)
  with pytest.raises(ValueError, match="local, breathing"):
    families.make_case("rotation", 0)
  with pytest.raises(ValueError, match="index"):
    families.true_displacement("local", 1000)


def test_register_finds_a_large_breathing_residual_after_the_affine_stage():
  """Breathing motion of 15-20 mm is not affine: the network + refinement must find what is
  left after the affine stage (TRE against the exact keypoints)."""
  from jaxreg.eval import evaluation
  from jaxreg.pipeline import register
  case = families.make_case("breathing", 3, keypoints=100)
  disp = families.true_displacement("breathing", 3)
  assert np.abs(np.asarray(grid.disp_voxel_to_mm(disp, case.fixed.affine))).max() > 15.0
  before = evaluation.case_metrics(case, np.zeros(case.fixed.shape + (3,), np.float32), families.ORGANS)
  result = register.register(case.fixed, case.moving)
  after = evaluation.case_metrics(case, result.displacement_mm, families.ORGANS)
  assert before["tre"] > 6.0 and after["tre"] < 2.5, (before["tre"], after["tre"])
  assert after["dice"] > before["dice"] + 0.15 and after["folding"] < 1e-3
