"""The registration network: output structure, initialisation, bounds, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreg import model as M

SHAPE = (16, 16, 16)


def _images(batch=2, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.random((batch,) + SHAPE), jnp.float32),
          jnp.asarray(rng.random((batch,) + SHAPE), jnp.float32))


def test_level_heads_are_coarse_to_fine_and_start_near_identity():
  net = M.RegistrationNet(widths=(8, 16, 16), num_subfields=3, rngs=nnx.Rngs(0))
  f, m = _images()
  subs = net(f, m)
  assert [s.shape for s in subs] == [(2, 4, 4, 4, 3), (2, 8, 8, 8, 3), (2, 16, 16, 16, 3)]
  disp, _ = M.predict_displacement(net, f, m)
  assert disp.shape == (2,) + SHAPE + (3,)
  assert 0 < float(jnp.abs(disp).max()) < 1e-2  # small init: near the identity, not zero


def test_full_heads_and_extra_channels():
  net = M.RegistrationNet(in_channels=4, widths=(8, 16), num_subfields=2, heads="full",
                          rngs=nnx.Rngs(1))
  f, m = _images(1)
  subs = net(f, m, extra=jnp.zeros((1,) + SHAPE + (2,)))
  assert [s.shape for s in subs] == [(1,) + SHAPE + (3,)] * 2


def test_max_disp_bounds_each_subfield():
  net = M.RegistrationNet(widths=(8, 16), num_subfields=2, max_disp=0.5, head_init=10.0,
                          rngs=nnx.Rngs(2))
  subs = net(*_images(1))
  assert max(float(jnp.abs(s).max()) for s in subs) <= 0.5
  assert max(float(jnp.abs(s).max()) for s in subs) > 0.4  # the bound is active


def test_pure_split_merge_round_trip_under_jit():
  net = M.RegistrationNet(widths=(8, 16), num_subfields=2, rngs=nnx.Rngs(3))
  graphdef, params = nnx.split(net)
  f, m = _images(1)

  @jax.jit
  def apply(params, f, m):
    return M.predict_displacement(nnx.merge(graphdef, params), f, m)[0]

  np.testing.assert_allclose(np.asarray(apply(params, f, m)),
                             np.asarray(M.predict_displacement(net, f, m)[0]), atol=1e-7)


def test_bad_configurations_and_shapes_raise():
  with pytest.raises(ValueError, match="heads must be one of"):
    M.RegistrationNet(heads="pyramid", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_subfields <= levels"):
    M.RegistrationNet(widths=(8, 16), num_subfields=3, rngs=nnx.Rngs(0))
  net = M.RegistrationNet(widths=(8, 16, 16), num_subfields=1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"divisible by 4"):
    net(jnp.zeros((1, 18, 16, 16)), jnp.zeros((1, 18, 16, 16)))
