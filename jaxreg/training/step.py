"""The training objective and the jitted, sharded train and eval steps.

A batch is a dict of arrays: ``fixed`` and ``moving`` ``[B, X, Y, Z]``
intensities in [0, 1] on one grid and, when labels are used, ``fixed_labels``
and ``moving_labels`` ``[B, X, Y, Z]`` int32 *class indices* (0 = background,
``1..C`` = ``config.data.label_ids`` in order).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from jaxreg.nn import model as _model
from jaxreg.nn.inputs import label_channels, num_classes
from jaxreg.ops import fields as _fields
from jaxreg.ops import losses as _losses
from jaxreg.ops import sharding as _mesh
from jaxreg.ops import warp as _warp
from jaxreg.training import sharding as _sharding
from jaxreg.training.state import TrainState, merge
from jaxreg.types import InputError

__all__ = ["make_loss_fn", "make_train_step", "make_eval_step", "jit_train_step",
           "jit_eval_step", "resolve_objective", "conditioned", "batch_reg_weight",
           "draw_reg_weight", "remat_loss"]


def resolve_objective(config: ml_collections.ConfigDict, similarity: Callable | None = None,
                      regulariser: Callable | None = None) -> tuple[Callable, Callable]:
  """``(sim(fixed, warped), reg(disp))``: the given callables, else ``config.loss`` names.

  Names resolve through :func:`jaxreg.ops.losses.get_similarity` /
  :func:`jaxreg.ops.losses.get_regulariser` (built in or user-registered), bound
  to ``config.loss.similarity_kwargs`` / ``config.loss.reg_kwargs``;
  ``config.loss.window`` is the box of the built-in ``lncc``. Each returned
  function takes single samples (``[X, Y, Z]`` images, ``[X, Y, Z, 3]``
  voxel fields) and returns a scalar to minimise.
  """
  lw = config.loss
  if similarity is None:
    kwargs = dict(lw.get("similarity_kwargs", None) or {})
    if lw.similarity == "lncc":
      kwargs.setdefault("window", lw.get("window", 9))
    similarity = functools.partial(_losses.get_similarity(lw.similarity), **kwargs)
  if regulariser is None:
    kwargs = dict(lw.get("reg_kwargs", None) or {})
    regulariser = functools.partial(_losses.get_regulariser(lw.reg), **kwargs)
  for kind, fn in (("similarity", similarity), ("regulariser", regulariser)):
    if not callable(fn):
      raise InputError(f"the {kind} must be callable, got {type(fn).__name__}")
  return similarity, regulariser


def _check_scalar(fn: Callable, kind: str, *args) -> None:
  """Trace ``fn`` once on abstract single-sample inputs: it must return a scalar."""
  try:
    out = jax.eval_shape(fn, *args)
  except Exception as e:  # a user's function that does not trace: name it, keep the cause
    raise InputError(f"the {kind} {getattr(fn, '__name__', fn)!r} failed on a single sample "
                     f"{tuple(args[0].shape)}: {type(e).__name__}: {e}") from e
  if getattr(out, "shape", None) != ():
    raise InputError(f"the {kind} must return a scalar, returned "
                     f"{getattr(out, 'shape', type(out).__name__)}")


def conditioned(config: ml_collections.ConfigDict) -> bool:
  """Whether the network takes the regularisation weight lambda as an input."""
  return bool(config.model.get("condition_on_reg", False))


def batch_reg_weight(config: ml_collections.ConfigDict, batch) -> jax.Array | None:
  """lambda ``[B]`` of a batch for a conditioned network, else None.

  ``batch["reg_weight"]`` when present (the train step draws it), otherwise
  ``config.loss.reg_weight`` for every example (evaluation at one trade-off).
  """
  if not conditioned(config):
    return None
  if "reg_weight" in batch:
    return batch["reg_weight"]
  return jnp.full(batch["fixed"].shape[:1], config.loss.reg_weight, jnp.float32)


def draw_reg_weight(config: ml_collections.ConfigDict, key: jax.Array, batch_size: int
                    ) -> jax.Array:
  """lambda ``[batch_size]``, log-uniform over ``config.model.reg_range``."""
  lo, hi = (float(v) for v in config.model.reg_range)
  return jnp.exp(jax.random.uniform(key, (batch_size,), jnp.float32, jnp.log(lo), jnp.log(hi)))


def _forward(graphdef, template, config, params, batch, implementation=None):
  net = merge(graphdef, template, params)
  extra = None
  if config.model.get("label_inputs", False):
    extra = label_channels(config, batch["fixed_labels"], batch["moving_labels"])
  return _model.predict_displacement(net, batch["fixed"], batch["moving"],
                                     method=config.decomposition, steps=config.svf_steps,
                                     extra=extra, reg_weight=batch_reg_weight(config, batch),
                                     remat=remat_loss(config), implementation=implementation)


def remat_loss(config: ml_collections.ConfigDict) -> bool:
  """Whether the objective outside the UNet (composition, warps, similarity, soft Dice) is
  recomputed in the backward pass (``config.train.remat_loss``) instead of kept."""
  return bool(config.train.get("remat_loss", False))


def make_loss_fn(graphdef: nnx.GraphDef, template: nnx.State,
                 config: ml_collections.ConfigDict, *, similarity: Callable | None = None,
                 regulariser: Callable | None = None,
                 implementation: str | None = None) -> Callable:
  """``loss(params, batch) -> (scalar, metrics)`` for ``config.loss``.

  ``similarity(fixed, warped) -> scalar`` and ``regulariser(disp) -> scalar``
  (single samples, voxels; see :func:`resolve_objective`) replace the
  functions that ``config.loss.similarity`` / ``config.loss.reg`` name. The
  loss is ``sim_weight * similarity(fixed, warped)``
  ``+ reg_weight * mean_k reg(u_k) + total_reg_weight * reg(phi)``
  ``+ dice_weight * (1 - soft Dice of warped one-hot labels)``
  ``+ folding_weight * folding(phi)``, each averaged over the batch.

  A network conditioned on lambda (``config.model.condition_on_reg``) is
  trained with the batch's lambda ``[B]`` (:func:`batch_reg_weight`) in place
  of ``reg_weight``, per example, and ``total_reg_weight`` scaled alike
  (``lambda * total_reg_weight / reg_weight``): the loss uses the same lambda
  the network is given.

  ``implementation``: the warp's in the composition and the warps (``None``, ``"xla"``,
  ``"ffi"``; see :mod:`jaxreg.ops.warp`).
  """
  sim_fn, reg_fn = resolve_objective(config, similarity, regulariser)
  shape = tuple(config.data.shape) if config.data.get("shape") else (16, 16, 16)
  image = jax.ShapeDtypeStruct(shape, jnp.float32)
  _check_scalar(sim_fn, "similarity", image, image)
  _check_scalar(reg_fn, "regulariser", jax.ShapeDtypeStruct(shape + (3,), jnp.float32))
  lw = config.loss
  classes = num_classes(config)

  keep = jax.checkpoint if remat_loss(config) else (lambda f: f)

  @keep
  def similarity_term(fixed, moving, disp):
    warped = _warp.warp_batch(moving, disp, implementation=implementation)
    return jnp.mean(jax.vmap(sim_fn)(fixed, warped))

  @keep
  def dice_term(fixed_labels, moving_labels, disp):
    fixed_p = jax.nn.one_hot(fixed_labels, classes)
    warped_p = _warp.warp_batch(jax.nn.one_hot(moving_labels, classes), disp,
                                implementation=implementation)
    return jnp.mean(jax.vmap(_losses.soft_dice)(fixed_p, warped_p))

  def loss_fn(params, batch):
    disp, subfields = _forward(graphdef, template, config, params, batch, implementation)
    sim = similarity_term(batch["fixed"], batch["moving"], disp)
    reg_sub_b = sum(jax.vmap(reg_fn)(u) for u in subfields) / len(subfields)  # [B]
    reg_total_b = jax.vmap(reg_fn)(disp)
    lam = batch_reg_weight(config, batch)
    if lam is None:
      w_sub, w_total = lw.reg_weight, lw.total_reg_weight
    else:  # the lambda the network was given, per example
      w_sub = lam
      w_total = lam * (lw.total_reg_weight / lw.reg_weight if lw.reg_weight else 1.0)
    reg_sub, reg_total = jnp.mean(reg_sub_b), jnp.mean(reg_total_b)
    total = (lw.sim_weight * sim + jnp.mean(w_sub * reg_sub_b)
             + jnp.mean(w_total * reg_total_b))
    metrics = {"similarity_loss": sim, "reg_subfields": reg_sub, "reg_total": reg_total}
    if classes and lw.dice_weight > 0 and "moving_labels" in batch:
      dice = dice_term(batch["fixed_labels"], batch["moving_labels"], disp)
      total = total + lw.dice_weight * (1.0 - dice)
      metrics["soft_dice"] = dice
    if lw.folding_weight > 0:
      fold = jnp.mean(jax.vmap(_losses.folding)(disp))
      total = total + lw.folding_weight * fold
      metrics["folding_loss"] = fold
    return total, metrics

  return loss_fn


def make_train_step(graphdef: nnx.GraphDef, template: nnx.State,
                    config: ml_collections.ConfigDict,
                    tx: optax.GradientTransformation, *, similarity: Callable | None = None,
                    regulariser: Callable | None = None,
                    implementation: str | None = None) -> Callable:
  """``step(state, batch) -> (state, metrics)``: one optimiser step on the objective.

  ``similarity`` / ``regulariser`` / ``implementation``: as in :func:`make_loss_fn`.
  """
  loss_fn = make_loss_fn(graphdef, template, config, similarity=similarity,
                         regulariser=regulariser, implementation=implementation)

  def step(state: TrainState, batch):
    if conditioned(config):  # a fresh lambda per example, from the state's key and step
      key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
      batch = dict(batch, reg_weight=draw_reg_weight(config, key, batch["fixed"].shape[0]))
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(params))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def make_eval_step(graphdef: nnx.GraphDef, template: nnx.State,
                   config: ml_collections.ConfigDict, *, similarity: Callable | None = None,
                   regulariser: Callable | None = None,
                   implementation: str | None = None) -> Callable:
  """``eval(params, batch) -> metrics``: the loss terms, and hard Dice per class.

  ``dice`` is ``[B, C]`` (classes 1..C) for the network's field and
  ``dice_identity`` the same before registration; ``present`` marks classes
  that occur in either map (Dice is undefined otherwise); ``folding_fraction``
  is the fraction of voxels with ``det J <= 0``. ``similarity`` / ``regulariser`` /
  ``implementation``: as in :func:`make_loss_fn`.
  """
  loss_fn = make_loss_fn(graphdef, template, config, similarity=similarity,
                         regulariser=regulariser, implementation=implementation)
  classes = num_classes(config)

  def hard_dice(a, b):
    pa, pb = jax.nn.one_hot(a, classes)[..., 1:], jax.nn.one_hot(b, classes)[..., 1:]
    inter = jnp.sum(pa * pb, axis=(1, 2, 3))
    denom = jnp.sum(pa, axis=(1, 2, 3)) + jnp.sum(pb, axis=(1, 2, 3))
    return 2 * inter / jnp.maximum(denom, 1), denom > 0

  def evaluate(params, batch):
    loss, metrics = loss_fn(params, batch)
    metrics = dict(metrics, loss=loss)
    disp, _ = _forward(graphdef, template, config, params, batch, implementation)
    metrics["folding_fraction"] = jnp.mean(
        jax.vmap(_fields.jacobian_determinant)(disp) <= 0)
    if classes and "moving_labels" in batch:
      warped = _warp.warp_batch(batch["moving_labels"], disp, order=0,
                                implementation=implementation)
      metrics["dice"], metrics["present"] = hard_dice(batch["fixed_labels"], warped)
      metrics["dice_identity"], _ = hard_dice(batch["fixed_labels"], batch["moving_labels"])
    return metrics

  return evaluate


def jit_train_step(step: Callable, mesh, state: TrainState) -> Callable:
  """``jax.jit`` with the state replicated and donated, the batch split over ``data`` and
  its first spatial axis over ``space``; traced with the mesh in context, so the
  network's levels and the field stay split along X (:func:`jaxreg.ops.sharding.spatial`)."""
  rep = _sharding.replicated(mesh)
  state_sharding = jax.tree.map(lambda _: rep, state)
  return jax.jit(_mesh.on_mesh(step, mesh),
                 in_shardings=(state_sharding, _sharding.batch_sharding(mesh)),
                 out_shardings=(state_sharding, rep), donate_argnums=0)


def jit_eval_step(evaluate: Callable, mesh, params) -> Callable:
  """``jax.jit`` of an eval step: params replicated, batch split as in :func:`jit_train_step`."""
  rep = _sharding.replicated(mesh)
  return jax.jit(_mesh.on_mesh(evaluate, mesh),
                 in_shardings=(jax.tree.map(lambda _: rep, params),
                               _sharding.batch_sharding(mesh)), out_shardings=rep)
