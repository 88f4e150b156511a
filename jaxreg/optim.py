"""Minimise a loss with an optax optimiser for a fixed number of steps, in one ``lax.scan``.

The loop behind every per-pair optimisation in jaxreg (the affine stage, the
dense instance optimisation, each refinement level): traced once, so the
steps run without Python dispatch, and usable inside ``jit``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

__all__ = ["minimise"]


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
    p, opt = carry
    value, grad = jax.value_and_grad(loss)(p)
    updates, opt = tx.update(grad, opt, p)
    return (optax.apply_updates(p, updates), opt), value

  (params, _), values = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
  return params, values
