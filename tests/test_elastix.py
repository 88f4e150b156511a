"""The elastix baseline: its field in jaxreg's convention (world RAS+ mm, fixed -> moving).

A phantom defined in world coordinates is sampled on two different grids
(oblique LAS and RAS, other spacings and shapes); the moving one is the phantom
shifted by a known world translation t, so fixed p corresponds to moving p + t.
"""

import numpy as np
import scipy.spatial.transform as sst

from jaxreg import data
from jaxreg.eval import elastix
from jaxreg.io import resample as preprocess
from jaxreg.types import Volume

T = np.array([4.0, -3.0, 5.0])  # mm, RAS


def _phantom(points):
  centres = np.array([[10.0, 5.0, 0.0], [-12.0, -6.0, 8.0], [3.0, 12.0, -10.0]])
  widths = [9.0, 7.0, 8.0]
  out = np.zeros(points.shape[:-1])
  for c, w, a in zip(centres, widths, (1000.0, 600.0, 800.0)):
    out += a * np.exp(-np.sum((points - c) ** 2, -1) / (2 * w * w))
  return out - 1000.0


def _volume(affine, shape, shift=np.zeros(3)):
  vox = np.moveaxis(np.indices(shape), 0, -1).astype(np.float64)
  world = vox @ affine[:3, :3].T + affine[:3, 3]
  return Volume(_phantom(world - shift).astype(np.float32), affine)


def _grids():
  rot = sst.Rotation.from_euler("xyz", [8, -5, 10], degrees=True).as_matrix()
  fixed_affine = np.eye(4)
  fixed_affine[:3, :3] = rot @ np.diag([-2.5, 2.5, 3.0])
  fixed_affine[:3, 3] = fixed_affine[:3, :3] @ -(np.array([20, 20, 16]) / 2 - 0.5)
  moving_affine = np.diag([2.0, 2.0, 2.0, 1.0])
  moving_affine[:3, 3] = -np.array([27, 25, 23]) / 2 * 2.0
  return (_volume(fixed_affine, (20, 20, 16)), _volume(moving_affine, (28, 26, 24), T))


# itk-elastix is in the dev extra: these tests run (and fail) rather than skip without it.


def test_translation_field_is_t_everywhere_in_world_ras_mm(tmp_path, monkeypatch):
  import itk
  monkeypatch.chdir(tmp_path)  # and elastix/transformix leave no files behind
  fixed, moving = _grids()
  base = itk.ParameterObject.New().GetDefaultParameterMap("translation", 2)
  params = {k: list(base[k]) for k in base.keys()}
  params.update({"RandomSeed": ["0"], "MaximumNumberOfIterations": ["300"]})
  disp, seconds = elastix.run(fixed, moving, params=params)
  assert disp.shape == fixed.shape + (3,) and seconds > 0
  np.testing.assert_allclose(disp.reshape(-1, 3).mean(0), T, atol=0.3)
  assert np.ptp(disp.reshape(-1, 3), axis=0).max() < 1e-3  # a translation: constant field
  assert list(tmp_path.iterdir()) == []


def test_bspline_map_aligns_the_demo_ct_when_applied_by_jaxreg():
  ct = data.demo().ct
  grid = preprocess.model_grid(ct, spacing=8.0, divisor=1)
  fixed = Volume(preprocess.resample(ct, grid, cval=-1024.0), grid.affine)
  shifted = grid.affine.copy()
  shifted[:3, 3] += T  # the same image one world translation away
  moving = Volume(fixed.array, shifted)
  disp, _ = elastix.run(fixed, moving, params=elastix.parameter_map(iterations=80))
  before = preprocess.resample_moving(moving, np.zeros_like(disp), grid, cval=-1024.0)
  after = preprocess.resample_moving(moving, disp, grid, cval=-1024.0)
  inner = (slice(6, -6),) * 3
  err = lambda a: np.abs(a - fixed.array)[inner].mean()
  assert err(after) < 0.6 * err(before)
  along_t = (disp[inner].reshape(-1, 3) @ T) / (T @ T)
  assert np.median(along_t) > 0.5


def test_parameter_map_states_the_documented_settings():
  p = elastix.parameter_map()
  assert p["Transform"] == ["BSplineTransform"]
  assert p["FinalGridSpacingInPhysicalUnits"] == ["15.000000"]
  assert p["MaximumNumberOfIterations"] == ["250"]
  assert p["NumberOfResolutions"] == ["3"]
  assert p["Metric"] == ["AdvancedMattesMutualInformation", "TransformBendingEnergyPenalty"]
