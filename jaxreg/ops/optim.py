"""Minimise a loss with an optax optimiser for a fixed number of steps, in one ``lax.scan``
(or, with a tolerance, until the loss stops improving, in one ``lax.while_loop``).

The loop behind every per-pair optimisation in jaxreg (the affine stage, the
dense instance optimisation, each refinement level): traced once, so the
steps run without Python dispatch, and usable inside ``jit``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

__all__ = ["minimise", "minimise_until"]


def minimise(loss: Callable, params, tx: optax.GradientTransformation, steps: int):
  """``steps`` updates of ``params`` by ``tx`` on ``loss(params)``.

  Args:
    loss: ``params -> scalar``.
    params: a pytree of arrays, the start.
    tx: an optax transformation (e.g. ``optax.adam(lr)``).
    steps: number of steps (static).

  Returns:
    ``(params after the last step, loss before each step [steps])``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> x, values = minimise(lambda x: jnp.sum((x - 3.0) ** 2), jnp.zeros(2), optax.sgd(0.25), 20)
    >>> [round(float(v), 4) for v in x], values.shape
    ([3.0, 3.0], (20,))
  """
  def body(carry, _):
    value, p, opt = _step(loss, tx, *carry)
    return (p, opt), value

  (params, _), values = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
  return params, values


def minimise_until(loss: Callable, params, tx: optax.GradientTransformation, steps: int, *,
                   tol: float, patience: int = 20):
  """:func:`minimise`, stopping early once the loss has not dropped by more than ``tol``
  below its best value (the best that counted as an improvement) for ``patience`` steps.

  The optimiser (and any schedule in ``tx``) runs exactly as in :func:`minimise` up to the
  stop, so the result equals :func:`minimise`'s after ``count`` steps.

  Args:
    loss: as :func:`minimise`.
    params: as :func:`minimise`.
    tx: as :func:`minimise`.
    steps: the most steps (static).
    tol: the least drop that counts as an improvement (absolute, in the loss's units).
    patience: steps without such an improvement before stopping.

  Returns:
    ``(params, values [steps], count)``: the parameters after ``count`` steps, the loss
    before each step (NaN after ``count``), and ``count`` (int32 scalar, 1..steps).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> x, values, n = minimise_until(lambda x: jnp.sum((x - 3.0) ** 2), jnp.zeros(2),
    ...                               optax.sgd(0.25), 100, tol=1e-6, patience=3)
    >>> [round(float(v), 4) for v in x], int(n) < 100
    ([3.0, 3.0], True)
  """
  def cond(carry):
    i, _, _, _, _, since = carry
    return (i < steps) & (since < patience)

  def body(carry):
    i, p, opt, values, best, since = carry
    value, p, opt = _step(loss, tx, p, opt)
    better = value < best - tol
    return (i + 1, p, opt, values.at[i].set(value),
            jnp.where(better, value, best), jnp.where(better, 0, since + 1))

  dtype = jax.eval_shape(loss, params).dtype
  values = jnp.full((steps,), jnp.nan, dtype)
  start = (jnp.int32(0), params, tx.init(params), values, jnp.array(jnp.inf, dtype), jnp.int32(0))
  count, params, _, values, _, _ = jax.lax.while_loop(cond, body, start)
  return params, values, count


def _step(loss: Callable, tx: optax.GradientTransformation, params, opt_state):
  """One update: ``(loss before it, params after it, optimiser state after it)``."""
  value, grad = jax.value_and_grad(loss)(params)
  updates, opt_state = tx.update(grad, opt_state, params)
  return value, optax.apply_updates(params, updates), opt_state
