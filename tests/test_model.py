"""The registration network: output structure, initialisation, bounds, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreg.nn import model as M

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


def test_reg_code_is_log_scaled_over_the_range():
  np.testing.assert_allclose(M.reg_code(jnp.array([0.1, 1.0, 100.0, np.sqrt(10.0) / 10]),
                                        (0.1, 100.0)),
                             [-1.0, -1.0 / 3, 1.0, -2.0 / 3], atol=1e-6)


def test_film_conditioning_starts_as_the_identity_and_learns_a_dependence_on_lambda():
  f, m = _images()
  plain = M.RegistrationNet(widths=(8, 8, 8), num_subfields=2, head_init=0.1, rngs=nnx.Rngs(0))
  film = M.RegistrationNet(widths=(8, 8, 8), num_subfields=2, head_init=0.1,
                           reg_condition="film", rngs=nnx.Rngs(0))
  state = nnx.state(film)  # the same UNet and heads as `plain`
  nnx.replace_by_pure_dict(state, dict(nnx.to_pure_dict(state), **nnx.to_pure_dict(nnx.state(plain))))
  nnx.update(film, state)
  base = M.predict_displacement(plain, f, m)[0]
  for lam in (0.1, 3.0, 100.0):  # zero-initialised FiLM: no modulation yet
    np.testing.assert_allclose(M.predict_displacement(film, f, m, reg_weight=lam)[0], base,
                               rtol=1e-6, atol=1e-7)
  film.film.outer.kernel[...] = 0.5 * jax.random.normal(jax.random.key(1),
                                                        film.film.outer.kernel.shape)
  low, high = (M.predict_displacement(film, f, m, reg_weight=jnp.array([lam, lam]))[0]
               for lam in (0.1, 100.0))
  assert float(jnp.max(jnp.abs(low - high))) > 1e-3
  mixed = M.predict_displacement(film, f, m, reg_weight=jnp.array([0.1, 100.0]))[0]
  np.testing.assert_allclose(mixed[0], low[0], rtol=1e-5, atol=1e-6)  # lambda per example
  np.testing.assert_allclose(mixed[1], high[1], rtol=1e-5, atol=1e-6)


def test_channel_conditioning_feeds_lambda_as_a_constant_input_channel():
  f, m = _images()
  net = M.RegistrationNet(widths=(8, 8, 8), num_subfields=2, head_init=0.1,
                          reg_condition="channel", rngs=nnx.Rngs(0))
  assert net.unet.encoder[0][0].in_features == 3
  t = M.reg_code(jnp.array([2.0, 2.0]), net.reg_range)
  x = jnp.concatenate([f[..., None], m[..., None],
                       jnp.broadcast_to(t[:, None, None, None, None], f.shape + (1,))], -1)
  feats = net.unet(x)
  expected = net.head_convs[-1](feats[-1])  # the finest head, fed by hand
  np.testing.assert_allclose(net(f, m, reg_weight=2.0)[-1], expected, rtol=1e-5, atol=1e-6)


def test_conditioning_errors():
  f, m = _images()
  with pytest.raises(ValueError, match="reg_condition must be"):
    M.RegistrationNet(widths=(8, 8), num_subfields=1, reg_condition="hyper", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="0 < lo < hi"):
    M.RegistrationNet(widths=(8, 8), num_subfields=1, reg_condition="film", reg_range=(1, 1),
                      rngs=nnx.Rngs(0))
  cond = M.RegistrationNet(widths=(8, 8), num_subfields=1, reg_condition="film",
                           rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="pass reg_weight"):
    cond(f, m)
  with pytest.raises(ValueError, match="without reg_condition"):
    M.RegistrationNet(widths=(8, 8), num_subfields=1, rngs=nnx.Rngs(0))(f, m, reg_weight=1.0)


def test_remat_gives_the_same_output_and_gradients():
  f, m = _images()
  nets = [M.RegistrationNet(widths=(8, 8, 8), num_subfields=2, head_init=0.1, remat=r,
                            rngs=nnx.Rngs(0)) for r in (False, True)]

  def loss(net):
    disp, _ = M.predict_displacement(net, f, m)
    return jnp.sum(disp ** 2)
  values = [nnx.value_and_grad(loss)(n) for n in nets]
  np.testing.assert_allclose(values[1][0], values[0][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(values[0][1]), jax.tree.leaves(values[1][1])):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(a))))
