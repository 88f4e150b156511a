"""Voxel/world maps against nibabel, and unit conversion round trips."""

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
import scipy.linalg

from jaxreg.ops import grid as G


def _oblique_affine():
  """An oblique, anisotropic, LAS-like voxel-to-world affine."""
  rot = scipy.linalg.expm(np.array([[0, -0.3, 0.2], [0.3, 0, -0.1], [-0.2, 0.1, 0]]))
  a = np.eye(4)
  a[:3, :3] = rot @ np.diag([-0.7, 0.8, 2.5])
  a[:3, 3] = [120.0, -95.5, -300.25]
  return a


def test_identity_grid_matches_numpy_indices():
  got = np.asarray(G.identity_grid((3, 4, 5)))
  np.testing.assert_array_equal(got, np.indices((3, 4, 5)).transpose(1, 2, 3, 0))


def test_voxel_world_maps_match_nibabel():
  a = _oblique_affine()
  pts = np.random.default_rng(0).uniform(-5, 40, size=(100, 3))
  world = np.asarray(G.voxel_to_world(pts.astype(np.float32), a))
  np.testing.assert_allclose(world, nib.affines.apply_affine(a, pts), atol=1e-3)
  back = np.asarray(G.world_to_voxel(jnp.asarray(world), a))
  np.testing.assert_allclose(back, pts, atol=1e-3)


def test_displacement_mm_is_difference_of_world_points_and_round_trips():
  a = _oblique_affine()
  rng = np.random.default_rng(1)
  disp = rng.normal(scale=3.0, size=(6, 7, 5, 3))
  pts = np.indices((6, 7, 5)).transpose(1, 2, 3, 0)
  want = nib.affines.apply_affine(a, pts + disp) - nib.affines.apply_affine(a, pts)
  with jax.enable_x64(True):
    mm = G.disp_voxel_to_mm(jnp.asarray(disp), a)
    np.testing.assert_allclose(np.asarray(mm), want, atol=1e-9)
    np.testing.assert_allclose(np.asarray(G.disp_mm_to_voxel(mm, a)), disp, atol=1e-9)
  mm32 = G.disp_voxel_to_mm(disp.astype(np.float32), a)
  np.testing.assert_allclose(np.asarray(G.disp_mm_to_voxel(mm32, a)), disp, atol=1e-5)


def test_linear_map_matches_a_numpy_matrix_product():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, 5, 6, 3)).astype(np.float32)
  lin, off = rng.normal(size=(3, 3)), rng.normal(size=3)
  np.testing.assert_allclose(np.asarray(G.linear_map(x, lin, off)), x @ lin.T + off,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(G.linear_map(x, lin)), x @ lin.T, rtol=1e-5, atol=1e-5)


def test_spacing_is_column_norms():
  np.testing.assert_allclose(G.spacing(_oblique_affine()), [0.7, 0.8, 2.5], rtol=1e-12)


def test_affine_displacement_matches_direct_map():
  m = np.eye(4)
  m[:3, :3] = [[1.1, 0.2, 0], [0, 0.9, 0.1], [0.05, 0, 1.0]]
  m[:3, 3] = [1, -2, 0.5]
  pts = np.indices((4, 5, 6)).transpose(1, 2, 3, 0)
  np.testing.assert_allclose(np.asarray(G.affine_displacement(m, (4, 5, 6))),
                             nib.affines.apply_affine(m, pts) - pts, atol=1e-5)


@pytest.mark.parametrize("affine,match", [
    (np.eye(3), r"affine must have shape \(4, 4\), got \(3, 3\)"),
    (np.where(np.eye(4) == 1, np.nan, 0.0), "non-finite"),
    (np.diag([1.0, 1.0, 0.0, 1.0]), "singular"),
    (np.vstack([np.eye(4)[:3], [0, 0, 1, 1]]), "last row"),
])
def test_bad_affines_raise(affine, match):
  with pytest.raises(ValueError, match=match):
    G.voxel_to_world(np.zeros((2, 3), np.float32), affine)


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match="trailing axis of size 3"):
    G.disp_voxel_to_mm(np.zeros((4, 4, 4, 2)), np.eye(4))
  with pytest.raises(ValueError, match="shape must be 3 positive ints"):
    G.identity_grid((4, 4))
