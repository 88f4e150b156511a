"""Orbax checkpoints of the train state, the loader position and the resolved config."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as _policies

__all__ = ["Checkpoints", "NonFiniteError", "restore_latest"]


class NonFiniteError(RuntimeError):
  """Training produced NaN/Inf; nothing non-finite was written."""


def _all_finite(tree) -> bool:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


class Checkpoints:
  """``workdir/checkpoints``: keeps the latest ``keep_last`` and the best ``keep_best``
  steps by validation loss (lower is better).

  Each step holds ``state`` (the :class:`~jaxreg.training.state.TrainState`),
  ``loader`` (the data loader's position) and ``config`` (the resolved config).
  Saving is Orbax's: written to a temporary folder and renamed when complete,
  from every process in a multi-process run.
  """

  def __init__(self, workdir: str, *, keep_last: int = 2, keep_best: int = 1):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    policy = _policies.AnyPreservationPolicy([
        _policies.LatestN(keep_last),
        # BestN keeps the top of an ascending sort; reverse=True makes that the lowest loss.
        _policies.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=keep_best,
                        keep_checkpoints_without_metrics=False),
    ])
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(preservation_policy=policy,
                                                             create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, loader: dict, config: dict,
           metrics: dict[str, float] | None = None) -> None:
    """Save ``state`` at ``step``; raises :class:`NonFiniteError` instead of writing NaN/Inf."""
    if not _all_finite(state):
      raise NonFiniteError(f"step {step}: the train state has NaN/Inf values; not saved")
    if metrics is not None and not np.all(np.isfinite(list(metrics.values()))):
      raise NonFiniteError(f"step {step}: validation metrics are not finite: {metrics}")
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), loader=ocp.args.JsonSave(loader),
        config=ocp.args.JsonSave(config)), metrics=metrics, force=True)

  def restore(self, step: int, like) -> tuple[object, dict]:
    """Restore ``(state, loader position)`` at ``step`` into the structure and shardings of ``like``."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), loader=ocp.args.JsonRestore()))
    return out["state"], out["loader"]

  def check_compatible(self, params, what: str = "this config") -> None:
    """Raise ``InputError`` when the latest checkpoint holds another network than ``params``.

    The saved step's config rebuilds its parameter shapes (nothing is read but
    the config), so a run resumed with a changed model is refused before
    anything is restored, overwritten or moved aside.
    """
    from flax import nnx

    from jaxreg.io.configjson import config_from_dict
    from jaxreg.training import state as _state
    from jaxreg.types import InputError
    step = self.latest_step()
    if step is None:
      return
    try:
      saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
      saved_params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
          lambda: _state.build_model(config_from_dict(saved["config"])))))
    except Exception:  # an unreadable step: restore_latest_good handles it
      return
    diff = _state.first_difference(params, saved_params)
    if diff is not None:
      k, here, saved_shape = diff
      raise InputError(
          f"{os.path.dirname(self.directory)}: its checkpoint (step {step}) holds another "
          f"network than {what} ({k}: saved {saved_shape}, here {here}); resume with the "
          "config it was trained with, or train in a new --workdir")

  def restore_latest_good(self, like, log=print) -> tuple[int, object, dict | None]:
    """Restore the newest step that reads back; move unreadable newer ones aside.

    A checkpoint Orbax never finished is invisible already (it is written under
    a temporary name); this handles a finished one that was damaged later
    (truncated or deleted files). Each unreadable step is moved to
    ``workdir/corrupt_checkpoints/`` with a warning, and the previous step is tried.

    Returns:
      ``(step, state, loader position)``, or ``(0, like, None)`` when no step is readable.
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, loader = self.restore(step, like)
        return step, state, loader
      except Exception as e:  # Orbax/tensorstore raise many types for damaged files
        aside = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
        os.makedirs(aside, exist_ok=True)
        target = os.path.join(aside, f"{step}.{int(time.time())}")
        os.replace(os.path.join(self.directory, str(step)), target)
        log(f"warning: checkpoint step {step} is unreadable ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160] if str(e) else ''}); moved to {target}, "
            "falling back to the previous one")
        self.manager.reload()
    return 0, like, None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def restore_latest(workdir: str):
  """The latest checkpoint of a training run, on the default device.

  Returns:
    ``(step, state, loader_position, config)`` with the config read from
    ``workdir/config.json``.

  Raises:
    jaxreg.types.InputError: not a training workdir, or no checkpoint in it.
  """
  from jaxreg.io.configjson import read_config_json
  from jaxreg.training import state as _state
  from jaxreg.types import InputError

  config = read_config_json(os.path.join(workdir, "config.json"))
  ckpts = Checkpoints(workdir)
  try:
    step = ckpts.latest_step()
    if step is None:
      raise InputError(f"{workdir}: has no checkpoint")
    _, _, like = _state.init_state(config)
    state, loader = ckpts.restore(step, like)
  finally:
    ckpts.close()
  return step, state, loader, config


def export_checkpoint(workdir: str, path: str, info: dict | None = None) -> int:
  """Write the latest checkpoint of a training run as a model folder
  (:func:`jaxreg.io.weights.save_weights`: what ``jaxreg register --checkpoint`` reads);
  a run started with ``--init`` records those weights in its ``info.json`` (``init``).

  Returns:
    the step exported.
  """
  from jaxreg.io import weights
  step, state, _, config = restore_latest(workdir)
  info = dict(info or {}, step=int(step))
  origin = os.path.join(workdir, "init.json")  # a fine-tuned run: the weights it started from
  if os.path.isfile(origin):
    with open(origin, encoding="utf-8") as f:
      info["init"] = json.load(f)
  weights.save_weights(path, config, state.params, info=info)
  return int(step)
