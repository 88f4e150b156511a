"""The depth-folded 3-D convolution equals lax.conv_general_dilated, values and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from jaxreg.nn import conv as C
from jaxreg.nn import model as M

DN = ("NDHWC", "DHWIO", "NDHWC")


def _native(x, k, strides, padding):
  return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=DN)


@pytest.mark.parametrize("combine,cout", [("sum", 5), ("concat", 5), ("outputs", 5), (None, 3)])
@pytest.mark.parametrize("shape,kernel,strides,padding", [
    ((2, 8, 10, 6, 3), (3, 3, 3), (1, 1, 1), "SAME"),
    ((1, 8, 8, 8, 4), (3, 3, 3), (2, 2, 2), "SAME"),
    ((1, 9, 7, 11, 2), (3, 3, 3), (2, 2, 2), "SAME"),
    ((1, 8, 8, 8, 2), (5, 3, 1), (1, 2, 1), "VALID"),
    ((1, 7, 8, 6, 3), (3, 3, 3), (2, 1, 1), [(2, 0), (1, 1), (0, 2)]),
])
def test_folded_equals_native_values_and_gradients(combine, cout, shape, kernel, strides,
                                                   padding):
  # combine=None with 3 outputs: the automatic choice ("outputs" where the depth stride is 1).
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  k = jnp.asarray(rng.normal(size=kernel + (shape[-1], cout)), jnp.float32)
  folded = functools.partial(C.conv3d_folded, dimension_numbers=DN, combine=combine)
  want = _native(x, k, strides, padding)
  got = folded(x, k, strides, padding)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
  w = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
  g_want = jax.grad(lambda x, k: jnp.sum(_native(x, k, strides, padding) * w), (0, 1))(x, k)
  g_got = jax.grad(lambda x, k: jnp.sum(folded(x, k, strides, padding) * w), (0, 1))(x, k)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("conv", [None, lax.conv_general_dilated])
def test_upsampled_conv_equals_conv_of_the_upsampled_array(conv):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 4, 5, 3, 3)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 3, 3, 4)), jnp.float32)
  # Reference: numpy's nearest x2 upsampling, then XLA's own 3-D convolution.
  up = lambda x: jnp.asarray(np.asarray(x).repeat(2, 1).repeat(2, 2).repeat(2, 3))
  want = _native(up(x), k, (1, 1, 1), "SAME")
  got = C.conv3d_upsampled(x, k, conv)
  assert got.shape == (2, 8, 10, 6, 4)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
  w = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
  rep = lambda x: jnp.repeat(jnp.repeat(jnp.repeat(x, 2, 1), 2, 2), 2, 3)
  g_want = jax.grad(lambda x, k: jnp.sum(_native(rep(x), k, (1, 1, 1), "SAME") * w), (0, 1))(x, k)
  g_got = jax.grad(lambda x, k: jnp.sum(C.conv3d_upsampled(x, k, conv) * w), (0, 1))(x, k)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-3)
  with pytest.raises(ValueError, match="3, 3, 3, C, O"):
    C.conv3d_upsampled(x, k[:2])


def test_unsupported_cases_fall_back_to_native():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(1, 8, 8, 8, 2)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 3, 2, 3)), jnp.float32)
  want = lax.conv_general_dilated(x, k, (1, 1, 1), "SAME", rhs_dilation=(2, 2, 2),
                                  dimension_numbers=DN)
  got = C.conv3d_folded(x, k, (1, 1, 1), "SAME", rhs_dilation=(2, 2, 2), dimension_numbers=DN)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_model_with_folded_convs_equals_native_model():
  rng = np.random.default_rng(2)
  f, m = (jnp.asarray(rng.random((1, 16, 16, 16)), jnp.float32) for _ in range(2))
  outs, nets = [], []
  for impl in ("native", "folded"):
    nets.append(M.RegistrationNet(widths=(8, 16, 16), num_subfields=2, head_init=0.1, conv=impl,
                                  convs_per_level=2, rngs=nnx.Rngs(0)))
    outs.append(nets[-1](f, m))
  for a, b in zip(*outs):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  assert max(float(jnp.abs(o).max()) for o in outs[0]) > 1e-3
  assert nets[1].unet.fuse_upsample and not nets[0].unet.fuse_upsample


def test_conv_fn_choices():
  assert C.conv_fn("native") is lax.conv_general_dilated
  assert C.conv_fn("folded") is C.conv3d_folded
  assert C.conv_fn("auto") is (C.conv3d_folded if jax.default_backend() == "cpu"
                               else lax.conv_general_dilated)
  with pytest.raises(ValueError, match="conv impl must be one of"):
    C.conv_fn("im2col")
