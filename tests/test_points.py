"""transform_points against the closed-form map of an affine field, in world mm."""

import jax
import numpy as np
import pytest
import scipy.spatial.transform as sst

from jaxreg.ops import grid as G
from jaxreg.ops import points as P

SHAPE = (16, 18, 14)


def _oblique_affine():
  rot = sst.Rotation.from_euler("xyz", [12, -7, 20], degrees=True).as_matrix()
  a = np.eye(4)
  a[:3, :3] = rot @ np.diag([-1.5, 2.0, 2.5])  # LAS-like, anisotropic, oblique
  a[:3, 3] = [40.0, -30.0, 12.0]
  return a


def test_affine_field_maps_points_like_its_world_matrix():
  affine = _oblique_affine()
  # voxel map x -> M x + t; in world mm p -> A M A^-1 p + A t (closed form)
  m = np.eye(4)
  m[:3, :3] = sst.Rotation.from_euler("z", 6, degrees=True).as_matrix() * 1.05
  m[:3, 3] = [0.7, -1.2, 0.4]
  disp = np.asarray(G.affine_displacement(m, SHAPE))
  rng = np.random.default_rng(0)
  vox = rng.uniform(1, np.array(SHAPE) - 2, size=(50, 3))
  pts = vox @ affine[:3, :3].T + affine[:3, 3]
  world = affine @ m @ np.linalg.inv(affine)
  want = pts @ world[:3, :3].T + world[:3, 3]
  got = jax.jit(P.transform_points)(pts, disp, affine)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-3)


def test_points_outside_take_the_border_displacement():
  disp = np.zeros(SHAPE + (3,), np.float32)
  disp[-1, ..., 0] = 2.0  # only the last i-slice moves
  affine = np.diag([2.0, 2.0, 2.0, 1.0])
  far = np.array([[2.0 * (SHAPE[0] + 5), 4.0, 4.0]])  # beyond the last slice along i
  np.testing.assert_allclose(np.asarray(P.transform_points(far, disp, affine)),
                             far + [[4.0, 0.0, 0.0]], atol=1e-5)


def test_gradient_wrt_points_is_the_field_jacobian():
  affine = _oblique_affine()
  m = np.eye(4)
  m[:3, :3] += [[0.05, 0.02, 0], [0, -0.03, 0.01], [0.02, 0, 0.04]]
  disp = np.asarray(G.affine_displacement(m, SHAPE))
  p = affine[:3, :3] @ np.array([7.3, 8.1, 6.6]) + affine[:3, 3]
  jac = jax.jacfwd(lambda q: P.transform_points(q[None], disp, affine)[0])(p)
  world = affine @ m @ np.linalg.inv(affine)
  np.testing.assert_allclose(np.asarray(jac), world[:3, :3], atol=1e-3)


def test_voxel_points_to_world_matches_the_affine():
  affine = _oblique_affine()
  vox = np.array([[0, 0, 0], [1, 2, 3]])
  want = [(affine @ np.r_[v, 1])[:3] for v in vox]
  np.testing.assert_allclose(P.voxel_points_to_world(vox, affine), want)


@pytest.mark.parametrize("points, disp, affine, match", [
    (np.zeros((4, 2)), np.zeros(SHAPE + (3,)), np.eye(4), "points_mm"),
    (np.zeros((4, 3)), np.zeros(SHAPE + (2,)), np.eye(4), "disp"),
    (np.zeros((4, 3)), np.zeros(SHAPE + (3,)), np.zeros((4, 4)), "affine"),
])
def test_bad_shapes_name_the_argument(points, disp, affine, match):
  with pytest.raises(ValueError, match=match):
    P.transform_points(points, disp, affine)
