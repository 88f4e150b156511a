"""Losses against scipy/numpy references, closed forms and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from jax.test_util import check_grads

from jaxreg.ops import grid as G
from jaxreg.ops import losses as L
from jaxreg import metrics
from jaxreg.ops import warp as W

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


def test_diffusion_gradient_is_the_finite_difference_of_the_numpy_formula():
  """The closed-form derivative (a custom JVP) against central differences of a float64 numpy
  diffusion, and the value computed under differentiation against that numpy value."""
  rng = np.random.default_rng(7)
  v = rng.normal(size=(6, 5, 4, 3))
  ref = lambda x: np.mean([np.mean(np.sum(np.diff(x, axis=j) ** 2, -1)) for j in range(3)])
  u = jnp.asarray(v, jnp.float32)
  value, grad = jax.value_and_grad(L.diffusion)(u)
  np.testing.assert_allclose(float(value), ref(v), rtol=1e-5)
  for idx in [(0, 0, 0, 0), (5, 4, 3, 2), (2, 3, 1, 1), (3, 0, 2, 0), (1, 4, 0, 2)]:
    e = np.zeros_like(v)
    e[idx] = 1e-4
    want = (ref(v + e) - ref(v - e)) / 2e-4
    np.testing.assert_allclose(float(grad[idx]), want, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(np.asarray(L.diffusion_gradient(u)), np.asarray(grad), atol=1e-8)
  tangent = rng.normal(size=v.shape)
  _, jvp = jax.jvp(L.diffusion, (u,), (jnp.asarray(tangent, jnp.float32),))
  np.testing.assert_allclose(float(jvp), np.sum(np.asarray(grad, np.float64) * tangent),
                             rtol=1e-5)


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


def _mind_ssc_reference(img, radius, dilation, eps=1e-6):
  """MIND-SSC in float64 numpy: pairs from the distance rule, scipy in-volume box means."""
  img = np.asarray(img, np.float64)
  d = dilation
  offsets = [s * d * np.eye(3, dtype=int)[ax] for ax in range(3) for s in (1, -1)]
  pairs = [(offsets[i], offsets[j]) for i in range(6) for j in range(i + 1, 6)
           if np.isclose(np.linalg.norm(offsets[i] - offsets[j]), np.sqrt(2) * d)]
  assert len(pairs) == 12
  padded = np.pad(img, d, mode="edge")
  shift = lambda o: padded[tuple(slice(d + oi, d + oi + n) for oi, n in zip(o, img.shape))]
  w = 2 * radius + 1
  count = ndi.uniform_filter(np.ones_like(img), w, mode="constant")
  dist = np.stack([ndi.uniform_filter((shift(a) - shift(b)) ** 2, w, mode="constant") / count
                   for a, b in pairs], -1)
  dist -= dist.min(-1, keepdims=True)
  var = dist.mean(-1, keepdims=True)
  var = np.clip(var, 1e-3 * var.mean(), 1e3 * var.mean()) + eps
  return np.exp(-dist / var)


@pytest.mark.parametrize("radius,dilation", [(1, 1), (1, 2), (2, 1)])
def test_mind_ssc_matches_numpy_reference(radius, dilation):
  img = np.random.default_rng(8).normal(size=(12, 10, 9)).astype(np.float32)
  got = jax.jit(lambda x: L.mind_ssc(x, radius=radius, dilation=dilation))(img)
  assert got.shape == (12, 10, 9, 12) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), _mind_ssc_reference(img, radius, dilation),
                             rtol=1e-4, atol=1e-5)


def test_mind_ssc_is_invariant_to_intensity_shift_and_scale():
  # eps = 1e-6 is only negligible against the patch variances V (squared intensities):
  # scale the smooth test image to ~100 units (V ~ 1e2..1e3), as CT in HU is.
  a, _ = _images(9)
  img = 100.0 * a.astype(np.float64) / a.std()
  base = np.asarray(L.mind_ssc(img.astype(np.float32)))
  mapped = np.asarray(L.mind_ssc((3.7 * img - 250.0).astype(np.float32)))
  np.testing.assert_allclose(mapped, base, atol=1e-4)


def test_mind_ssc_values_lie_in_unit_interval_with_a_one_per_voxel():
  img = 50.0 * np.random.default_rng(10).normal(size=SHAPE).astype(np.float32)
  desc = np.asarray(L.mind_ssc(img))
  assert np.all(desc > 0) and np.all(desc <= 1)
  np.testing.assert_array_equal(desc.max(-1), 1.0)  # the channel with the minimal D
  assert desc.min() < 0.5  # not degenerate: structure shows up
  # A constant image is degenerate (D = 0): every channel is 1, nothing is NaN.
  np.testing.assert_array_equal(np.asarray(L.mind_ssc(jnp.full(SHAPE, 7.0))), 1.0)


def test_mind_ssd_zero_positive_masked_and_differentiable():
  a, _ = _images(11)
  a = 100.0 * a / a.std()
  fixed = L.mind_ssc(a)
  assert float(L.mind_ssd(fixed, fixed)) == 0.0
  moved = np.roll(a, 2, axis=0)
  assert float(L.mind_ssd(fixed, L.mind_ssc(moved))) > 1e-3
  loss = jax.jit(jax.value_and_grad(lambda img: L.mind_ssd(fixed, L.mind_ssc(img))))
  value, g = loss(jnp.asarray(moved))
  assert float(value) > 0 and np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).sum()) > 0
  mask = np.random.default_rng(12).random(SHAPE).astype(np.float32)
  mask[9:] = 0  # weights in [0, 1), zero on part of the volume
  f64, w64 = np.asarray(fixed, np.float64), np.asarray(L.mind_ssc(moved), np.float64)
  sq = (f64 - w64) ** 2
  want = np.sum(mask[..., None] * sq) / (12 * mask.sum() + 1e-6)
  np.testing.assert_allclose(float(L.mind_ssd(fixed, L.mind_ssc(moved), mask=mask)), want,
                             rtol=1e-5)
  np.testing.assert_allclose(float(L.mind_ssd(fixed, L.mind_ssc(moved))), sq.mean(), rtol=1e-5)


def test_mind_ssd_gradient_matches_finite_differences():
  # The channel minimum and the clamp of V are kinks: a step of 1e-4 (0.1 % of the image)
  # already crosses some, so difference with a smaller step (float64 keeps it accurate).
  a, _ = _images(13)
  with jax.enable_x64(True):
    img = jnp.asarray(a[:8, :7, :6], jnp.float64)
    fixed = L.mind_ssc(jnp.roll(img, 1, axis=1), radius=1, dilation=1)
    check_grads(lambda w: L.mind_ssd(fixed, L.mind_ssc(w, radius=1, dilation=1)), (img,),
                order=1, modes=["rev"], atol=1e-6, rtol=1e-4, eps=1e-6)


def test_mind_bad_inputs_raise():
  a, _ = _images()
  with pytest.raises(ValueError, match=r"single \[X, Y, Z\] volume, got shape \(1, 14, 16, 12\)"):
    L.mind_ssc(a[None])
  with pytest.raises(ValueError, match="radius"):
    L.mind_ssc(a, radius=-1)
  with pytest.raises(ValueError, match="dilation"):
    L.mind_ssc(a, dilation=0)
  desc = L.mind_ssc(a)
  with pytest.raises(ValueError,
                     match=r"same shape, got \(14, 16, 12, 12\) and \(13, 16, 12, 12\)"):
    L.mind_ssd(desc, desc[:-1])
  with pytest.raises(ValueError, match=r"\[X, Y, Z, C\], got shape \(14, 16, 12\)"):
    L.mind_ssd(desc[..., 0], desc[..., 0])
  with pytest.raises(ValueError, match=r"mask must be \[X, Y, Z\] = \(14, 16, 12\)"):
    L.mind_ssd(desc, desc, mask=np.ones((14, 16)))


def test_bending_energy_matches_a_numpy_roll_reference_on_a_random_field():
  rng = np.random.default_rng(5)
  u = rng.normal(size=(7, 6, 5, 3))
  inner = (slice(1, -1),) * 3
  total = 0.0
  for j in range(3):
    plus, minus = np.roll(u, -1, axis=j), np.roll(u, 1, axis=j)
    total = total + ((plus - 2 * u + minus)[inner] ** 2).sum(-1)
    for k in range(j + 1, 3):
      mixed = (np.roll(plus, -1, k) - np.roll(plus, 1, k) - np.roll(minus, -1, k)
               + np.roll(minus, 1, k)) / 4.0
      total = total + 2.0 * (mixed[inner] ** 2).sum(-1)
  np.testing.assert_allclose(float(L.bending_energy(jnp.asarray(u, jnp.float32))),
                             total.mean(), rtol=1e-5)



def test_registry_resolves_builtins_and_user_functions(scratch_registry):
  u = jnp.asarray(np.random.default_rng(0).normal(size=(6, 5, 4, 3)), jnp.float32)
  f, w = (jnp.asarray(np.random.default_rng(s).random((6, 5, 4)), jnp.float32) for s in (1, 2))
  assert L.get_regulariser("diffusion") is L.diffusion
  np.testing.assert_allclose(L.get_similarity("lncc")(f, w, window=3),
                             -L.local_ncc(f, w, window=3), rtol=1e-6)
  np.testing.assert_allclose(L.get_similarity("ncc")(f, w), -np.corrcoef(
      np.ravel(f), np.ravel(w))[0, 1], rtol=1e-5)

  def magnitude(disp, *, power=2):
    return jnp.mean(jnp.abs(disp) ** power)

  L.register_regulariser("magnitude", magnitude)
  L.register_regulariser("magnitude", magnitude)  # the same function again: fine
  assert "magnitude" in L.regulariser_names()
  np.testing.assert_allclose(L.get_regulariser("magnitude")(u, power=1), np.mean(np.abs(u)),
                             rtol=1e-6)
  L.register_similarity("l1", lambda a, b: jnp.mean(jnp.abs(a - b)))
  np.testing.assert_allclose(L.get_similarity("l1")(f, w), np.mean(np.abs(f - w)), rtol=1e-6)


def test_registry_refuses_bad_entries_with_one_line_errors(scratch_registry):
  from jaxreg.types import InputError
  with pytest.raises(InputError, match="'smooth' must be callable"):
    L.register_regulariser("smooth", 3.0)
  with pytest.raises(InputError, match="built in"):
    L.register_regulariser("diffusion", lambda u: 0.0)
  with pytest.raises(InputError, match="identifier"):
    L.register_similarity("my loss", lambda a, b: 0.0)
  L.register_regulariser("smooth", lambda u: jnp.mean(u ** 2))
  with pytest.raises(InputError, match="already registered"):
    L.register_regulariser("smooth", lambda u: jnp.mean(u ** 4))
  L.register_regulariser("smooth", L.diffusion, overwrite=True)
  with pytest.raises(InputError) as e:
    L.get_regulariser("nope")
  message = str(e.value)
  assert "\n" not in message and "'nope'" in message
  assert all(name in message for name in ("diffusion", "bending", "smooth"))


def test_masked_local_ncc_map_counts_only_the_masked_voxels_of_each_box():
  """Against a numpy loop: at every voxel, the squared correlation of the two images over the
  masked voxels of its in-volume box (sums, as local_ncc); and a mask of ones is no mask."""
  a, b = (x[:9, :8, :7] for x in _images(7))
  rng = np.random.default_rng(8)
  mask = (rng.uniform(size=a.shape) > 0.3).astype(np.float32)
  mask[:, :, 5:] = 0.0  # a cut field of view: the last slices have no data
  window, eps = 3, 1e-5
  got = np.asarray(L.local_ncc_map(a, b, window=window, eps=eps, mask=mask))
  want = np.zeros(a.shape)
  r = window // 2
  for i, j, k in np.ndindex(*a.shape):
    box = tuple(slice(max(c - r, 0), c + r + 1) for c in (i, j, k))
    m = mask[box].astype(bool)
    f, w = a[box][m].astype(np.float64), b[box][m].astype(np.float64)
    if f.size == 0:
      continue
    cross = np.sum((f - f.mean()) * (w - w.mean()))
    want[i, j, k] = cross ** 2 / (np.sum((f - f.mean()) ** 2) * np.sum((w - w.mean()) ** 2) + eps)
  np.testing.assert_allclose(got, want, atol=2e-4)
  # values where the mask is 0 do not matter
  changed = np.where(mask > 0, b, 99.0).astype(np.float32)
  np.testing.assert_allclose(np.asarray(L.local_ncc_map(a, changed, window=window, mask=mask)),
                             got, atol=1e-5)
  ones = np.ones(a.shape, np.float32)
  np.testing.assert_allclose(np.asarray(L.local_ncc_map(a, b, window=window, mask=ones)),
                             np.asarray(L.local_ncc_map(a, b, window=window)), atol=1e-5)
