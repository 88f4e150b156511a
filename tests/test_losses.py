"""Losses against scipy/numpy references, closed forms and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from jax.test_util import check_grads

from jaxreg import grid as G
from jaxreg import losses as L
from jaxreg import metrics
from jaxreg import warp as W

SHAPE = (14, 16, 12)


def _images(seed=0):
  rng = np.random.default_rng(seed)
  a = ndi.gaussian_filter(rng.normal(size=SHAPE), 1.5)
  b = 0.7 * a + 0.3 * ndi.gaussian_filter(rng.normal(size=SHAPE), 1.5) + 0.1
  return a.astype(np.float32), b.astype(np.float32)


@pytest.mark.parametrize("window", [1, 3, 9])
def test_box_sum_matches_uniform_filter(window):
  x = np.random.default_rng(1).normal(size=SHAPE)
  want = ndi.uniform_filter(x, window, mode="constant") * window ** 3
  np.testing.assert_allclose(np.asarray(L.box_sum(jnp.asarray(x, jnp.float32), window)), want,
                             atol=1e-4)


def _lncc_reference(f, w, window, eps):
  f, w = f.astype(np.float64), w.astype(np.float64)
  box = lambda x: ndi.uniform_filter(x, window, mode="constant") * window ** 3
  n = box(np.ones_like(f))  # in-volume voxels of each window
  sf, sw = box(f), box(w)
  cross = box(f * w) - sf * sw / n
  vf = np.maximum(box(f * f) - sf * sf / n, 0)
  vw = np.maximum(box(w * w) - sw * sw / n, 0)
  return np.mean(cross ** 2 / (vf * vw + eps))


def test_local_ncc_matches_scipy_reference():
  a, b = _images()
  for window in (5, 9):
    np.testing.assert_allclose(float(L.local_ncc(a, b, window=window)),
                               _lncc_reference(a, b, window, 1e-5), rtol=1e-4)
  # identical images correlate perfectly; noise does not
  assert float(L.local_ncc(a, a)) > 0.99
  noise = np.random.default_rng(3).normal(size=SHAPE).astype(np.float32)
  assert float(L.local_ncc(a, noise)) < 0.2


def test_local_ncc_of_constant_image_is_finite_with_finite_gradient():
  const = jnp.full(SHAPE, 0.5)
  a, _ = _images()
  assert float(L.local_ncc(const, const)) == pytest.approx(0.0, abs=1e-6)
  g = jax.grad(lambda w: L.local_ncc(const, w))(jnp.asarray(a))
  assert np.all(np.isfinite(np.asarray(g)))


def test_similarity_gradients_match_finite_differences():
  a, b = _images(4)
  with jax.enable_x64(True):
    a64, b64 = jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64)
    check_grads(lambda w: L.local_ncc(a64, w, window=5), (b64,), order=1, modes=["rev"],
                atol=1e-6, rtol=1e-4)
    check_grads(lambda w: L.global_ncc(a64, w), (b64,), order=1, modes=["rev"])
    check_grads(lambda w: L.mse(a64, w), (b64,), order=1, modes=["rev"])


def test_global_ncc_and_mse_match_numpy():
  a, b = _images(5)
  np.testing.assert_allclose(float(L.global_ncc(a, b)), np.corrcoef(a.ravel(), b.ravel())[0, 1],
                             rtol=1e-5)
  np.testing.assert_allclose(float(L.mse(a, b)), np.mean((a.astype(float) - b) ** 2), rtol=1e-5)


def test_diffusion_closed_form_and_reference():
  m = np.eye(4)
  m[:3, :3] += [[0.1, -0.2, 0.0], [0.05, 0.0, 0.3], [0.0, 0.1, -0.1]]
  u = G.affine_displacement(m, SHAPE)
  a = m[:3, :3] - np.eye(3)
  # float32 differences of coordinates up to ~16 voxels carry ~1e-6 voxel of rounding.
  np.testing.assert_allclose(float(L.diffusion(u)), np.sum(a ** 2) / 3, rtol=1e-4)
  v = np.random.default_rng(6).normal(size=SHAPE + (3,))
  want = np.mean([np.mean(np.sum(np.diff(v, axis=j) ** 2, -1)) for j in range(3)])
  np.testing.assert_allclose(float(L.diffusion(jnp.asarray(v, jnp.float32))), want, rtol=1e-5)


def test_bending_energy_of_quadratic_and_affine_fields():
  x, y, z = np.indices(SHAPE).astype(np.float64)
  a, b, c = 0.03, -0.02, 0.05
  u = np.stack([a * x ** 2, b * x * y, c * z ** 2], -1)
  want = (2 * a) ** 2 + 2 * b ** 2 + (2 * c) ** 2
  with jax.enable_x64(True):
    np.testing.assert_allclose(float(L.bending_energy(jnp.asarray(u))), want, rtol=1e-9)
  m = np.eye(4)
  m[:3, :3] += 0.1
  assert float(L.bending_energy(G.affine_displacement(m, SHAPE))) < 1e-8


def test_soft_dice_equals_hard_dice_for_one_hot_labels():
  rng = np.random.default_rng(7)
  fa = rng.integers(0, 4, size=SHAPE)
  fb = np.where(rng.random(SHAPE) < 0.3, rng.integers(0, 4, size=SHAPE), fa)
  one_hot = lambda x: jax.nn.one_hot(x, 5)  # class 4 absent: left out
  want = np.mean(list(metrics.dice(fa, fb, [1, 2, 3]).values()))
  np.testing.assert_allclose(float(L.soft_dice(one_hot(fa), one_hot(fb))), want, rtol=1e-5)
  assert float(L.soft_dice(one_hot(fa), one_hot(fa))) == pytest.approx(1.0)


def test_soft_dice_of_warped_one_hot_is_differentiable_in_the_field():
  labels = np.zeros(SHAPE, np.int32)
  labels[4:10, 5:11, 3:9] = 1
  probs = jax.nn.one_hot(labels, 2)
  shift = jnp.zeros(SHAPE + (3,)).at[..., 0].set(1.5)
  f = lambda d: L.soft_dice(probs, W.warp(probs, d))
  g = jax.grad(f)(shift)
  assert float(f(shift)) < 1.0 and float(jnp.abs(g).sum()) > 0


def test_folding_penalty():
  mirror = np.eye(4)
  mirror[0, 0] = -1.0  # det J = -1 everywhere
  np.testing.assert_allclose(float(L.folding(G.affine_displacement(mirror, SHAPE))), 1.0,
                             rtol=1e-6)
  shrink = np.eye(4) * 0.9
  shrink[3, 3] = 1
  assert float(L.folding(G.affine_displacement(shrink, SHAPE))) == 0.0
  assert float(L.folding(G.affine_displacement(shrink, SHAPE), margin=0.7)) == 0.0  # det 0.729
  # det J from float32 central differences of coordinates up to ~16 voxels: ~1e-6 rounding.
  np.testing.assert_allclose(float(L.folding(G.affine_displacement(shrink, SHAPE), margin=1.0)),
                             1 - 0.9 ** 3, rtol=1e-4)


def test_bad_inputs_raise():
  a, b = _images()
  with pytest.raises(ValueError, match="same shape"):
    L.local_ncc(a, b[:-1])
  with pytest.raises(ValueError, match="single"):
    L.local_ncc(a[None], b[None])
  with pytest.raises(ValueError, match="odd"):
    L.box_sum(jnp.asarray(a), 4)
  with pytest.raises(ValueError, match="3 voxels"):
    L.bending_energy(jnp.zeros((2, 5, 5, 3)))
