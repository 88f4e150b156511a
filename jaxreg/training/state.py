"""The train state: a plain pytree of arrays (params, optimiser state, step, RNG key)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from jaxreg.nn import model as _model

__all__ = ["TrainState", "build_model", "make_optimizer", "init_state", "merge", "first_difference"]


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs, as arrays.

  Attributes:
    step: int32 scalar, optimisation steps taken.
    params: the network's parameters as a pure nested dict of arrays.
    opt_state: optax state for ``params``.
    rng: uint32 key data (``jax.random.key_data``), folded with the step.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


build_model = _model.from_config  # moved to jaxreg.nn.model (inference needs it, not training)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with linear warm-up and cosine decay, after global-norm clipping (``config.optim``)."""
  o = config.optim
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.lr, warmup_steps=o.warmup_steps,
      decay_steps=max(config.train.steps, o.warmup_steps + 1),
      end_value=o.lr * o.end_lr_fraction)
  return optax.chain(optax.clip_by_global_norm(o.clip_norm), optax.adam(schedule))


def init_state(config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, nnx.State, TrainState]:
  """A fresh state from ``config.seed``.

  Returns:
    ``(graphdef, abstract_params, state)``: the static network structure, the
    NNX ``State`` template that :func:`merge` fills, and the train state.
  """
  net = build_model(config, seed=config.seed)
  graphdef, params = nnx.split(net)
  pure = nnx.to_pure_dict(params)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=pure,
                     opt_state=make_optimizer(config).init(pure),
                     rng=jax.random.key_data(jax.random.key(config.seed)))
  return graphdef, params, state


def merge(graphdef: nnx.GraphDef, template: nnx.State, params) -> _model.RegistrationNet:
  """The network with ``params`` (a pure dict) in place: use inside a jitted function."""
  state = jax.tree.map(lambda x: x, template)  # a copy: replace_by_pure_dict mutates
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def first_difference(params, other) -> tuple[str, object, object] | None:
  """The first parameter (by name) whose shape differs between two parameter trees, as
  ``(name, shape in params, shape in other)`` (``"absent"`` where one lacks it), or None
  when they describe the same network."""
  shapes = lambda tree: {jax.tree_util.keystr(k).strip("[]"): tuple(np.shape(v))
                         for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  mine, theirs = shapes(params), shapes(other)
  if mine == theirs:
    return None
  k = (sorted(set(mine) ^ set(theirs)) or sorted(k for k in mine if mine[k] != theirs[k]))[0]
  return k, mine.get(k, "absent"), theirs.get(k, "absent")
