"""Field decomposition operators: sequential warps, closed forms, batch and jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxreg.ops import decompose as D
from jaxreg.ops import fields as F
from jaxreg.ops import warp as W

SHAPE = (16, 16, 16)


def _smooth_field(seed, amplitude, shape=SHAPE):
  rng = np.random.default_rng(seed)
  u = np.stack([ndi.gaussian_filter(rng.normal(size=shape), 2.5) for _ in range(3)], -1)
  return (amplitude * u / np.abs(u).max()).astype(np.float32)


def _integer_field(seed):
  rng = np.random.default_rng(seed)
  grid = np.indices(SHAPE).transpose(1, 2, 3, 0)
  return (np.stack([rng.integers(0, n, size=SHAPE) for n in SHAPE], -1) - grid).astype(np.float32)


def test_compose_all_equals_sequential_warps_exactly():
  # Fields after the first are integer-valued and stay inside the grid, so the
  # sequential warps interpolate only once, like the composed warp: both sides
  # must agree to rounding, and the order (coarse first) is pinned.
  rng = np.random.default_rng(0)
  img = rng.normal(size=SHAPE).astype(np.float32)
  fields = [rng.uniform(-2, 2, size=SHAPE + (3,)).astype(np.float32),
            _integer_field(1), _integer_field(2)]
  sequential = img
  for u in fields:
    sequential = W.warp(sequential, u)
  once = W.warp(img, D.compose_all(fields))
  np.testing.assert_allclose(np.asarray(once), np.asarray(sequential), atol=1e-5)
  reversed_once = W.warp(img, D.compose_all(fields[::-1]))
  assert np.abs(np.asarray(reversed_once) - np.asarray(sequential)).max() > 0.1


def test_compose_all_matches_scipy_chain_for_smooth_fields():
  fields = [_smooth_field(s, 2.0) for s in (3, 4, 5)]
  # Independent reference: x -> x + u_K(x) -> ... -> + u_1, evaluated with scipy.
  pts = np.indices(SHAPE).astype(np.float64)
  for u in reversed(fields):
    pts = pts + np.stack([ndi.map_coordinates(u[..., i], pts, order=1, mode="nearest")
                          for i in range(3)])
  want = np.moveaxis(pts, 0, -1) - np.indices(SHAPE).transpose(1, 2, 3, 0)
  np.testing.assert_allclose(np.asarray(D.compose_all(fields)), want, atol=1e-4)


def test_coarse_sub_fields_are_resized_with_magnitude():
  coarse = np.broadcast_to(np.float32([1.0, -0.5, 2.0]), (8, 8, 8, 3))
  fine = np.broadcast_to(np.float32([0.25, 0.5, -1.0]), SHAPE + (3,))
  want = np.float32([1.0, -0.5, 2.0]) * 15 / 7 + np.float32([0.25, 0.5, -1.0])
  for fn in (D.compose_all, D.sum_all, D.compose_all_svf):
    got = np.asarray(fn([coarse, fine]))
    assert got.shape == SHAPE + (3,)
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), atol=1e-5)


def test_explicit_target_shape():
  u = _smooth_field(6, 1.0, shape=(8, 8, 8))
  got = D.compose_all([u, u], shape=(16, 12, 8))
  assert got.shape == (16, 12, 8, 3)
  up = F.resize(u, (16, 12, 8))
  np.testing.assert_allclose(np.asarray(got), np.asarray(F.compose(up, up)), atol=1e-6)


def test_sum_all_is_sum():
  fields = [_smooth_field(s, 2.0) for s in (7, 8, 9)]
  np.testing.assert_allclose(np.asarray(D.sum_all(fields)), sum(fields), atol=1e-6)


def test_svf_composes_integrated_sub_fields():
  vels = [_smooth_field(s, 2.0) for s in (10, 11)]
  want = F.compose(F.integrate(vels[0], 5), F.integrate(vels[1], 5))
  np.testing.assert_allclose(np.asarray(D.compose_all_svf(vels, steps=5)), np.asarray(want),
                             atol=1e-5)
  # diffeomorphic: no folding for a velocity large enough to fold as a plain field
  big = [_smooth_field(12, 6.0)]
  assert float(F.jacobian_determinant(D.compose_all_svf(big)).min()) > 0
  assert float(F.jacobian_determinant(D.compose_all(big)).min()) < 0


@pytest.mark.parametrize("method", D.METHODS)
def test_combine_batch_equals_loop_under_jit(method):
  b0 = [_smooth_field(13, 1.5, (8, 8, 8)), _smooth_field(14, 1.5)]
  b1 = [_smooth_field(15, 1.5, (8, 8, 8)), _smooth_field(16, 1.5)]
  batched = [np.stack([x, y]) for x, y in zip(b0, b1)]
  got = jax.jit(lambda fs: D.combine_batch(fs, method))(batched)
  for b, fs in enumerate((b0, b1)):
    np.testing.assert_allclose(np.asarray(got[b]), np.asarray(D.combine(fs, method)), atol=1e-5)


def test_bad_inputs_raise():
  u = jnp.zeros(SHAPE + (3,))
  with pytest.raises(ValueError, match="fields is empty"):
    D.compose_all([])
  with pytest.raises(ValueError, match="single array"):
    D.compose_all(u)
  with pytest.raises(ValueError, match=r"fields\[1\] must be a \[X, Y, Z, 3\]"):
    D.sum_all([u, jnp.zeros(SHAPE)])
  with pytest.raises(ValueError, match="method must be one of"):
    D.combine([u], "average")
  with pytest.raises(ValueError, match="batch sizes differ"):
    D.combine_batch([u[None], jnp.zeros((2,) + SHAPE + (3,))])
