"""compose / integrate / resize / jacobian_determinant against closed forms and scipy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage as ndi

from jaxreg.ops import fields as F
from jaxreg.ops import grid as G
from jaxreg.ops import warp as W

SHAPE = (16, 18, 14)


def _smooth_field(seed, amplitude, shape=SHAPE, sigma=3.0):
  rng = np.random.default_rng(seed)
  u = np.stack([ndi.gaussian_filter(rng.normal(size=shape), sigma) for _ in range(3)], -1)
  return (amplitude * u / np.abs(u).max()).astype(np.float32)


def _about_centre(linear, shape):
  """4x4 voxel map x -> c + L (x - c), c the grid centre."""
  c = (np.array(shape) - 1) / 2
  m = np.eye(4)
  m[:3, :3] = linear
  m[:3, 3] = c - linear @ c
  return m


def test_compose_matches_scipy_reference():
  u, v = _smooth_field(0, 3.0), _smooth_field(1, 3.0)
  coords = np.indices(SHAPE) + np.moveaxis(v, -1, 0)
  want = v + np.stack(
      [ndi.map_coordinates(u[..., i].astype(np.float64), coords, order=1, mode="nearest")
       for i in range(3)], -1)
  np.testing.assert_allclose(np.asarray(F.compose(u, v)), want, atol=2e-5)


def test_compose_equals_warping_twice_exactly_for_integer_inner_field():
  # With an integer-valued v that stays inside the grid, sampling at x + v(x)
  # needs no interpolation, so both sides must agree to rounding: this pins
  # the order "v first, then u" of compose(u, v).
  rng = np.random.default_rng(2)
  img = rng.normal(size=SHAPE).astype(np.float32)
  u = rng.uniform(-2, 2, size=SHAPE + (3,)).astype(np.float32)
  grid = np.indices(SHAPE).transpose(1, 2, 3, 0)
  target = np.stack([rng.integers(0, n, size=SHAPE) for n in SHAPE], -1)
  v = (target - grid).astype(np.float32)
  once = W.warp(img, F.compose(u, v))
  twice = W.warp(W.warp(img, u), v)
  np.testing.assert_allclose(np.asarray(once), np.asarray(twice), atol=1e-5)
  swapped = W.warp(img, F.compose(v, u))
  assert np.abs(np.asarray(swapped) - np.asarray(twice)).max() > 0.1


def test_compose_equals_warping_twice_for_smooth_fields():
  img = ndi.gaussian_filter(np.random.default_rng(3).normal(size=SHAPE), 2).astype(np.float32)
  u, v = _smooth_field(4, 2.0), _smooth_field(5, 2.0)
  once = np.asarray(W.warp(img, F.compose(u, v), padding="border"))
  twice = np.asarray(W.warp(W.warp(img, u, padding="border"), v, padding="border"))
  inner = (slice(3, -3),) * 3
  err = np.abs(once - twice)[inner].max() / np.abs(img).max()
  assert err < 0.03, err


def test_compose_of_affine_fields_is_matrix_product():
  # Contractions about the centre keep every sampled point inside the grid,
  # where trilinear interpolation of a linear field is exact.
  rot = scipy.linalg.expm(np.array([[0, -0.1, 0.05], [0.1, 0, -0.02], [-0.05, 0.02, 0]]))
  a = _about_centre(0.9 * rot, SHAPE)
  b = _about_centre(np.diag([0.85, 0.95, 0.9]), SHAPE)
  got = F.compose(G.affine_displacement(a, SHAPE), G.affine_displacement(b, SHAPE))
  want = G.affine_displacement(a @ b, SHAPE)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)


def test_integrate_constant_velocity_is_translation():
  vel = np.broadcast_to(np.float32([1.5, -2.0, 0.25]), SHAPE + (3,))
  np.testing.assert_allclose(np.asarray(F.integrate(vel, steps=7)), vel, atol=1e-5)


def test_integrate_linear_velocity_matches_matrix_power_and_expm():
  # The symmetric part of lin is negative definite, so every intermediate map
  # sends the ball inscribed in the grid into itself: there, composing linear
  # fields is exact and the result must be the matrix power below.
  lin = np.array([[-0.1, 0.08, 0.0], [-0.08, -0.05, 0.03], [0.02, -0.03, -0.12]])
  assert np.linalg.eigvalsh(lin + lin.T).max() < 0
  c = (np.array(SHAPE) - 1) / 2
  x = np.indices(SHAPE).transpose(1, 2, 3, 0) - c
  ball = np.linalg.norm(x, axis=-1) <= c.min()
  steps = 6
  got = np.asarray(F.integrate((x @ lin.T).astype(np.float32), steps=steps))[ball]
  step_map = np.linalg.matrix_power(np.eye(3) + lin / 2**steps, 2**steps)
  want = np.asarray(G.affine_displacement(_about_centre(step_map, SHAPE), SHAPE))[ball]
  np.testing.assert_allclose(got, want, atol=1e-4)
  exact = np.asarray(G.affine_displacement(_about_centre(scipy.linalg.expm(lin), SHAPE), SHAPE))
  np.testing.assert_allclose(got, exact[ball], atol=2e-2)


def test_integrate_then_inverse_velocity_is_identity():
  vel = _smooth_field(6, 2.0)
  fwd, bwd = F.integrate(vel), F.integrate(-vel)
  residual = np.asarray(F.compose(bwd, fwd))
  inner = (slice(2, -2),) * 3
  assert np.abs(residual[inner]).max() < 0.05, np.abs(residual[inner]).max()
  # and the fields themselves are not small, so the test is not vacuous
  assert np.abs(np.asarray(fwd)).max() > 1.5


def test_integrate_memory_is_checkpointed_scan():
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda v: F.integrate(v).sum()))(_smooth_field(0, 1.0)))
  assert "scan" in jaxpr and ("remat" in jaxpr or "checkpoint" in jaxpr)


@pytest.mark.parametrize("new_shape", [(31, 35, 27), (8, 9, 7), (20, 18, 10)])
def test_resize_align_corners_matches_scipy_zoom(new_shape):
  u = _smooth_field(7, 3.0)
  got = np.asarray(F.resize(u, new_shape))
  factors = [(n - 1) / (o - 1) for n, o in zip(new_shape, SHAPE)]
  for i in range(3):
    want = ndi.zoom(u[..., i].astype(np.float64), [n / o for n, o in zip(new_shape, SHAPE)],
                    order=1, grid_mode=False, mode="nearest") * factors[i]
    assert want.shape == new_shape
    np.testing.assert_allclose(got[..., i], want, atol=1e-4)


def test_resize_half_pixel_matches_scipy_zoom():
  u = _smooth_field(8, 3.0)
  new_shape = (32, 36, 28)
  got = np.asarray(F.resize(u, new_shape, align_corners=False))
  for i in range(3):
    want = ndi.zoom(u[..., i].astype(np.float64), 2.0, order=1, grid_mode=True,
                    mode="nearest") * 2.0
    np.testing.assert_allclose(got[..., i], want, atol=1e-4)


def test_resize_keeps_affine_field_affine():
  m = _about_centre(np.array([[1.05, 0.1, 0], [-0.05, 0.95, 0.02], [0, 0.03, 1.1]]), SHAPE)
  new_shape = (31, 12, 40)
  s = np.diag([(o - 1) / (n - 1) for n, o in zip(new_shape, SHAPE)] + [1.0])
  want = G.affine_displacement(np.linalg.inv(s) @ m @ s, new_shape)
  got = F.resize(G.affine_displacement(m, SHAPE), new_shape)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)


def test_jacobian_determinant_of_affine_field_is_matrix_determinant():
  lin = np.array([[1.2, 0.1, 0.0], [0.05, 0.9, -0.2], [0.0, 0.1, 1.1]])
  det = np.asarray(F.jacobian_determinant(G.affine_displacement(_about_centre(lin, SHAPE), SHAPE)))
  np.testing.assert_allclose(det, np.linalg.det(lin), rtol=1e-5)


def test_jacobian_determinant_matches_numpy_gradient():
  u = _smooth_field(9, 4.0).astype(np.float64)
  jac = np.stack([np.stack(np.gradient(u[..., i]), -1) for i in range(3)], -2) + np.eye(3)
  want = np.linalg.det(jac)
  got = np.asarray(F.jacobian_determinant(u.astype(np.float32)))
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert want.min() < 0.5  # a field strong enough to test the off-diagonal terms


def test_batch_forms_equal_loops():
  us = np.stack([_smooth_field(10, 2.0), _smooth_field(11, 2.0)])
  vs = np.stack([_smooth_field(12, 2.0), _smooth_field(13, 2.0)])
  comp = jax.jit(F.compose_batch)(us, vs)
  integ = F.integrate_batch(us, steps=4)
  det = F.jacobian_determinant_batch(us)
  for b in range(2):
    np.testing.assert_allclose(np.asarray(comp[b]), np.asarray(F.compose(us[b], vs[b])), atol=1e-6)
    np.testing.assert_allclose(np.asarray(integ[b]), np.asarray(F.integrate(us[b], 4)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(det[b]), np.asarray(F.jacobian_determinant(us[b])),
                               atol=1e-6)


def test_bad_inputs_raise():
  u = jnp.zeros(SHAPE + (3,))
  with pytest.raises(ValueError, match=r"u and v must share a grid"):
    F.compose(u, jnp.zeros((8, 8, 8, 3)))
  with pytest.raises(ValueError, match=r"velocity must be a \[X, Y, Z, 3\]"):
    F.integrate(jnp.zeros(SHAPE))
  with pytest.raises(ValueError, match="steps"):
    F.integrate(u, steps=-1)
  with pytest.raises(ValueError, match="shape must be 3 positive ints"):
    F.resize(u, (8, 8))
  with pytest.raises(ValueError, match=r"disp must be a \[X, Y, Z, 3\]"):
    jax.jit(F.jacobian_determinant)(jnp.zeros((4, 4, 4, 2)))


def test_invert_gives_a_field_that_composes_to_zero():
  u = _smooth_field(5, 2.0)
  v, err, k = F.invert(u, tol=1e-4, return_info=True)
  assert float(err) < 1e-4 and 0 < int(k) < 100
  # both orders: u after v and v after u are the identity (independent check of the residual)
  np.testing.assert_allclose(np.asarray(F.compose(u, v)), 0, atol=1e-4)
  inner = (slice(3, -3),) * 3
  back = np.abs(np.asarray(F.compose(v, u))[inner])  # up to v's interpolation error
  assert back.max() < 5e-2 and back.mean() < 1.5e-2  # a wrong inverse is off by voxels


def test_invert_of_an_affine_field_is_the_inverse_matrix_field():
  linear = scipy.linalg.expm(np.array([[0.02, 0.05, 0], [-0.05, 0.01, 0.03], [0, -0.03, -0.02]]))
  m = _about_centre(linear, SHAPE)
  v = jax.jit(F.invert)(G.affine_displacement(m, SHAPE))
  want = np.asarray(G.affine_displacement(np.linalg.inv(m), SHAPE))
  inner = (slice(3, -3),) * 3  # where x + v(x) stays inside the grid
  np.testing.assert_allclose(np.asarray(v)[inner], want[inner], atol=1e-3)


def test_invert_reports_non_convergence_on_a_fold():
  u = np.zeros(SHAPE + (3,), np.float32)
  # along i: x + 3 sin(2 pi x / 8) folds (slope 1 + 2.4 cos < 0 in places)
  u[..., 0] = 3 * np.sin(2 * np.pi * np.arange(SHAPE[0]) / 8)[:, None, None]
  _, err, k = F.invert(u, iterations=20, return_info=True)
  assert int(k) == 20 and float(err) > 1e-3
