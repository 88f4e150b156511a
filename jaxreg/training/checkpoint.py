"""Orbax checkpoints of the train state, the data pipeline's position and the resolved config."""

from __future__ import annotations

import json
import os
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as _policies

from jaxreg.types import InputError

__all__ = ["Checkpoints", "NonFiniteError", "restore_latest"]


class NonFiniteError(RuntimeError):
  """Training produced NaN/Inf; nothing non-finite was written."""


def _all_finite(tree) -> bool:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


INIT_FILE = "init.json"  # where a run started from existing weights records them


class _Position:
  """What Grain's checkpoint handler restores a position into: it keeps the state (the
  handler hands a non-Grain iterator the file's bytes, and starts its prefetch)."""

  state: dict | None = None

  def set_state(self, state: bytes | dict) -> None:
    self.state = json.loads(state) if isinstance(state, bytes) else state

  def start_prefetch(self) -> None:
    pass

  def get_state(self) -> bytes:
    return json.dumps(self.state).encode()


def _saved(loader):
  """What Grain's handler saves: a Grain iterator (``Batches.iterator``), or a position."""
  if hasattr(loader, "iterator"):
    return loader.iterator
  if hasattr(loader, "get_state"):
    return loader
  holder = _Position()
  holder.state = loader
  return holder


class Checkpoints:
  """``workdir/checkpoints``: keeps the latest ``keep_last`` and the best ``keep_best``
  steps by validation loss (lower is better).

  Each step holds ``state`` (the :class:`~jaxreg.training.state.TrainState`),
  ``loader`` (the data pipeline's position: Grain's iterator state, one file per process)
  and ``config`` (the resolved config).
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

  def save(self, step: int, state, loader, config: dict,
           metrics: dict[str, float] | None = None, origin: dict | None = None) -> None:
    """Save ``state`` and ``loader``'s position (:class:`jaxreg.data.pipeline.Batches`, a
    Grain iterator, or a JSON-serialisable position) at ``step``; raises :class:`NonFiniteError`
    instead of writing NaN/Inf; ``origin``: what a fine-tuned run started from (the
    ``init.json`` record), saved with every step."""
    if not _all_finite(state):
      raise NonFiniteError(f"step {step}: the train state has NaN/Inf values; not saved")
    if metrics is not None and not np.all(np.isfinite(list(metrics.values()))):
      raise NonFiniteError(f"step {step}: validation metrics are not finite: {metrics}")
    items = dict(state=ocp.args.StandardSave(state),
                 loader=grain.checkpoint.CheckpointSave(_saved(loader)),
                 config=ocp.args.JsonSave(config))
    if origin is not None:  # a fine-tuned run: the weights it started from
      items["origin"] = ocp.args.JsonSave(origin)
    self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def origin(self, step: int) -> dict | None:
    """The weights a fine-tuned run started from (``train.py --init``), as saved at
    ``step``, or None for a run from a random initialisation."""
    if not os.path.isdir(os.path.join(self.directory, str(step), "origin")):
      return None
    return self.manager.restore(step, args=ocp.args.Composite(
        origin=ocp.args.JsonRestore()))["origin"]

  def restore(self, step: int, like, loader: bool = True) -> tuple[object, dict | None]:
    """``(state, loader position)`` at ``step``: the state in the structure and shardings of
    ``like``; this process's data position as ``get_state`` gave it (``set_state`` takes it
    back), or None without ``loader`` (any process count may read the state).

    Raises:
      InputError: the step was written by another number of processes (no position for
        this one).
    """
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    items = dict(state=ocp.args.StandardRestore(abstract))
    position = _Position()
    if loader:
      self._check_position(step)
      items["loader"] = grain.checkpoint.CheckpointRestore(position)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out["state"], position.state

  def _check_position(self, step: int) -> None:
    mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    found = _position_files(self.directory, step)
    if found and mine not in found:
      raise InputError(f"{os.path.dirname(self.directory)}: checkpoint step {step} holds the "
                       f"data positions of {found[0].rsplit('-of-', 1)[-1][:-5]} process(es), "
                       f"this run has {jax.process_count()}: resume with as many processes")

  def check_compatible(self, params, what: str = "this config") -> None:
    """Raise ``InputError`` when the latest checkpoint holds another network than ``params``.

    The saved step's config rebuilds its parameter shapes (nothing is read but
    the config), so a run resumed with a changed model is refused before
    anything is restored, overwritten or moved aside.
    """
    from flax import nnx

    from jaxreg.io.configjson import config_from_dict
    from jaxreg.training import state as _state
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
      except InputError:
        raise
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
    ``workdir/config.json``; the position is None for a run of several processes.

  Raises:
    jaxreg.types.InputError: not a training workdir, or no checkpoint in it.
  """
  from jaxreg.io.configjson import read_config_json
  from jaxreg.training import state as _state

  config = read_config_json(os.path.join(workdir, "config.json"))
  ckpts = Checkpoints(workdir)
  try:
    step = ckpts.latest_step()
    if step is None:
      raise InputError(f"{workdir}: has no checkpoint")
    _, _, like = _state.init_state(config)
    one = _position_files(ckpts.directory, step) == ["process_0-of-1.json"]
    state, loader = ckpts.restore(step, like, loader=jax.process_count() == 1 and one)
  finally:
    ckpts.close()
  return step, state, loader, config


def _position_files(directory: str, step: int) -> list[str]:
  """The data positions saved at ``step``: Grain's ``process_I-of-N.json``, one a process."""
  folder = os.path.join(directory, str(step), "loader")
  return sorted(f for f in (os.listdir(folder) if os.path.isdir(folder) else ())
                if f.startswith("process_") and f.endswith(".json"))


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
  origin = os.path.join(workdir, INIT_FILE)  # a fine-tuned run: the weights it started from
  if os.path.isfile(origin):
    with open(origin, encoding="utf-8") as f:
      info["init"] = json.load(f)
  weights.save_weights(path, config, state.params, info=info)
  return int(step)
