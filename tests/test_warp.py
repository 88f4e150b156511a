"""warp / sample against scipy.ndimage.map_coordinates and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxreg.ops import warp as W
from jaxreg.ops import trilinear as T

SHAPE = (16, 20, 12)


def _random_case(seed, amplitude=4.0, channels=None):
  rng = np.random.default_rng(seed)
  img_shape = SHAPE + ((channels,) if channels else ())
  img = rng.normal(size=img_shape).astype(np.float32)
  disp = (amplitude * rng.uniform(-1, 1, size=SHAPE + (3,))).astype(np.float32)
  return img, disp


def _scipy_warp(img, disp, order, mode, cval=0.0):
  coords = np.indices(SHAPE, dtype=np.float64) + np.moveaxis(disp, -1, 0)
  return ndi.map_coordinates(img.astype(np.float64), coords, order=order, mode=mode, cval=cval)


@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("padding,mode,cval", [
    ("constant", "grid-constant", 0.0),
    ("constant", "grid-constant", -3.5),
    ("border", "nearest", 0.0),
])
def test_warp_matches_scipy(order, padding, mode, cval):
  img, disp = _random_case(0)
  # Amplitude 4 voxels: many samples fall outside the volume.
  coords = np.indices(SHAPE) + np.moveaxis(disp, -1, 0)
  outside = np.any((coords < 0) | (coords > np.array(SHAPE)[:, None, None, None] - 1), axis=0)
  assert outside.mean() > 0.1
  got = W.warp(img, disp, order=order, padding=padding, cval=cval)
  want = _scipy_warp(img, disp, order, mode, cval)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5)


def test_channels_equal_per_channel_warps():
  img, disp = _random_case(1, channels=3)
  got = W.warp(img, disp)
  assert got.shape == img.shape
  for c in range(3):
    want = _scipy_warp(img[..., c], disp, 1, "grid-constant")
    np.testing.assert_allclose(np.asarray(got[..., c]), want, atol=2e-5)


def test_labels_nearest_keep_dtype():
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 7, size=SHAPE).astype(np.int32)
  disp = rng.uniform(-3, 3, size=SHAPE + (3,)).astype(np.float32)
  got = W.warp(labels, disp, order=0)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), _scipy_warp(labels, disp, 0, "grid-constant"))


def test_integer_shift_equals_array_shift():
  img, _ = _random_case(3)
  shift = np.array([2, -1, 3])
  disp = np.broadcast_to(shift, SHAPE + (3,)).astype(np.float32)
  got = np.asarray(W.warp(img, disp))
  want = np.zeros_like(img)
  # out[x] = img[x + shift] where inside, else 0.
  want[:-2, 1:, :-3] = img[2:, :-1, 3:]
  np.testing.assert_array_equal(got, want)


def test_nan_cval_marks_only_samples_with_a_corner_outside():
  img, disp = _random_case(10)
  got = np.asarray(W.warp(img, disp, cval=np.nan))
  coords = np.indices(SHAPE) + np.moveaxis(disp, -1, 0)
  all_in = np.all((coords >= 0) & (coords <= np.array(SHAPE)[:, None, None, None] - 1), axis=0)
  np.testing.assert_array_equal(np.isnan(got), ~all_in)
  np.testing.assert_allclose(got[all_in], _scipy_warp(img, disp, 1, "grid-constant")[all_in],
                             atol=2e-5)


def test_sample_at_points_matches_scipy():
  img, _ = _random_case(4)
  rng = np.random.default_rng(4)
  pts = rng.uniform(-2, 22, size=(50, 3))
  got = W.sample(img, pts.astype(np.float32))
  want = ndi.map_coordinates(img.astype(np.float64), pts.T, order=1, mode="grid-constant")
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def _central_difference(f, x, index, eps):
  xp = x.copy(); xp[index] += eps
  xm = x.copy(); xm[index] -= eps
  return (f(xp) - f(xm)) / (2 * eps)


@pytest.mark.parametrize("padding,cval", [("constant", 0.0), ("constant", 2.5), ("border", 0.0)])
@pytest.mark.parametrize("channels,sequential", [(None, False), (2, False), (2, True)])
def test_gradients_match_finite_differences(padding, cval, channels, sequential, monkeypatch):
  if sequential:  # the channel-at-a-time form large images take (trilinear._SEQUENTIAL_VALUES)
    monkeypatch.setattr(T, "_SEQUENTIAL_VALUES", 0)
  rng = np.random.default_rng(5)
  shape = (8, 9, 7)
  img = rng.normal(size=shape + ((channels,) if channels else ()))
  # Amplitude 2.5 on an 8-voxel grid: many samples, and their gradients, fall outside.
  disp = rng.uniform(-2.5, 2.5, size=shape + (3,))
  # Keep samples away from cell edges, where trilinear interpolation has kinks.
  frac = (np.indices(shape).transpose(1, 2, 3, 0) + disp) % 1.0
  disp = np.where((frac < 0.05) | (frac > 0.95), disp + 0.2, disp)
  weights = rng.normal(size=img.shape)

  with jax.enable_x64(True):
    def loss(image, d):
      return jnp.sum(W.warp(image, d, padding=padding, cval=cval) * weights)

    g_img, g_disp = jax.grad(loss, argnums=(0, 1))(jnp.asarray(img), jnp.asarray(disp))
    f_img = lambda x: float(loss(jnp.asarray(x), jnp.asarray(disp)))
    f_disp = lambda d: float(loss(jnp.asarray(img), jnp.asarray(d)))
    for _ in range(10):
      i = tuple(int(rng.integers(0, n)) for n in img.shape)
      np.testing.assert_allclose(g_img[i], _central_difference(f_img, img, i, 1e-3),
                                 rtol=1e-6, atol=1e-8)
      j = i[:3] + (int(rng.integers(0, 3)),)
      np.testing.assert_allclose(g_disp[j], _central_difference(f_disp, disp, j, 1e-5),
                                 rtol=1e-5, atol=1e-8)
    # Forward mode agrees with finite differences along a random direction.
    direction = rng.normal(size=disp.shape)
    _, jvp = jax.jvp(lambda d: loss(jnp.asarray(img), d), (jnp.asarray(disp),),
                     (jnp.asarray(direction),))
    eps = 1e-6
    fd = (f_disp(disp + eps * direction) - f_disp(disp - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(float(jvp), fd, rtol=1e-4)


def test_channel_at_a_time_equals_all_at_once_and_keeps_less(monkeypatch):
  """Large multi-channel images are sampled one channel at a time with the work
  recomputed in the backward pass: same values and gradients, less compiled memory."""
  img, disp = _random_case(3, channels=3)
  w = np.random.default_rng(4).normal(size=img.shape).astype(np.float32)

  def run(threshold, image, d):
    monkeypatch.setattr(T, "_SEQUENTIAL_VALUES", threshold)
    # the pure-JAX form (the kernel has its own rule)
    loss = lambda a, b: jnp.sum(W.warp(a, b, implementation="xla") ** 2 * w)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(image, d)

  fast, seq = run(2 ** 62, img, disp), run(0, img, disp)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), fast, seq)

  def temporaries(threshold, n=48, channels=14):  # a soft Dice's one-hot labels
    monkeypatch.setattr(T, "_SEQUENTIAL_VALUES", threshold)
    grad = jax.jit(jax.grad(lambda a, b: jnp.sum(W.warp(a, b, implementation="xla") ** 2),
                            argnums=1))
    return grad.lower(jax.ShapeDtypeStruct((n, n, n, channels), jnp.float32),
                      jax.ShapeDtypeStruct((n, n, n, 3), jnp.float32)
                      ).compile().memory_analysis().temp_size_in_bytes

  assert temporaries(0) < 0.8 * temporaries(2 ** 62)


def test_gradient_is_zero_far_outside():
  img = np.random.default_rng(9).normal(size=(8, 8, 8)).astype(np.float32)
  disp = np.full((8, 8, 8, 3), 20.0, np.float32)
  for padding in ("constant", "border"):
    g = jax.grad(lambda d: W.warp(img, d, padding=padding).sum())(disp)
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_batch_equals_loop_and_jit_equals_eager():
  img, disp = _random_case(6)
  img2, disp2 = _random_case(7)
  imgs, disps = np.stack([img, img2]), np.stack([disp, disp2])
  batched = jax.jit(W.warp_batch)(imgs, disps)
  for b in range(2):
    np.testing.assert_allclose(np.asarray(batched[b]), np.asarray(W.warp(imgs[b], disps[b])),
                               atol=1e-6)


@pytest.mark.parametrize("image_shape,disp_shape,match", [
    ((16, 16), (16, 16, 3), "image must be"),
    ((16, 16, 16), (16, 16, 16, 2), r"disp must be \[X, Y, Z, 3\]"),
    ((16, 16, 16), (16, 16, 8, 3), r"disp grid \(16, 16, 8\) differs from image grid \(16, 16, 16\)"),
])
def test_bad_shapes_raise_at_trace_time(image_shape, disp_shape, match):
  with pytest.raises(ValueError, match=match):
    jax.jit(W.warp)(jnp.zeros(image_shape), jnp.zeros(disp_shape))


def test_bad_options_raise():
  img, disp = _random_case(8)
  with pytest.raises(ValueError, match="order"):
    W.warp(img, disp, order=3)
  with pytest.raises(ValueError, match="padding"):
    W.warp(img, disp, padding="reflect")
  with pytest.raises(ValueError, match="batch sizes differ"):
    W.warp_batch(np.stack([img, img]), disp[None])
