"""jaxreg.ops.optim: the fixed-step loop and the early-stopping loop against plain optax loops in
Python, and the stopping rule against a numpy re-implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxreg.ops import optim


def _loss(x):  # a bowl with a slow direction: Adam's loss flattens long before the end
  return jnp.sum(jnp.array([1.0, 0.01]) * (x - jnp.array([2.0, -1.0])) ** 2)


def _python_loop(tx, x, steps):
  opt, values, params = tx.init(x), [], [x]
  for _ in range(steps):
    v, g = jax.value_and_grad(_loss)(x)
    u, opt = tx.update(g, opt, x)
    x = optax.apply_updates(x, u)
    values.append(float(v))
    params.append(x)
  return np.array(values), params


def _stop_at(values, tol, patience):
  """The number of steps the rule runs: stop once `patience` steps pass with no value below
  the best improvement minus tol."""
  best, since = np.inf, 0
  for i, v in enumerate(values):
    if v < best - tol:
      best, since = v, 0
    else:
      since += 1
    if since >= patience:
      return i + 1
  return len(values)


def test_minimise_matches_a_python_optax_loop():
  tx = optax.adam(0.1)
  x, values = jax.jit(lambda x: optim.minimise(_loss, x, tx, 50))(jnp.zeros(2))
  ref_values, ref_params = _python_loop(tx, jnp.zeros(2), 50)
  np.testing.assert_allclose(values, ref_values, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(x, ref_params[-1], rtol=1e-5, atol=1e-6)


def test_minimise_until_stops_where_the_rule_says_and_follows_the_same_path():
  tx = optax.adam(optax.cosine_decay_schedule(0.1, 300, alpha=0.02))
  ref_values, ref_params = _python_loop(tx, jnp.zeros(2), 300)
  for tol, patience in ((1e-3, 5), (1e-5, 20)):
    x, values, count = jax.jit(lambda x: optim.minimise_until(
        _loss, x, tx, 300, tol=tol, patience=patience))(jnp.zeros(2))
    n = _stop_at(ref_values, tol, patience)
    assert int(count) == n and 1 < n < 300
    np.testing.assert_allclose(values[:n], ref_values[:n], rtol=1e-5, atol=1e-6)
    assert np.all(np.isnan(np.asarray(values[n:])))
    np.testing.assert_allclose(x, ref_params[n], rtol=1e-5, atol=1e-6)


def test_minimise_until_with_minus_infinite_tol_runs_every_step_like_minimise():
  tx = optax.adam(0.1)
  x, values, count = optim.minimise_until(_loss, jnp.zeros(2), tx, 40, tol=-np.inf)
  y, ref = optim.minimise(_loss, jnp.zeros(2), tx, 40)
  assert int(count) == 40
  np.testing.assert_allclose(values, ref, rtol=1e-6)
  np.testing.assert_allclose(x, y, rtol=1e-6)
