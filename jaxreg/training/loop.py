"""``train_and_evaluate(config, workdir)``: the training run as a readable story.

1. Check the config, build the mesh over all devices, write the resolved config.
2. Build the data (a Grain pipeline: a seeded order, examples prepared in worker processes,
   unreadable pairs skipped; this process reads its shard).
3. Initialise the state, or resume it and the loader from the latest checkpoint.
4. Step: one jitted, sharded, donated train step per batch; stop on NaN/Inf.
5. Every ``log_every`` steps log metrics (JSONL + TensorBoard); every
   ``eval_every`` validate (loss, Dice vs identity); every ``checkpoint_every``
   and at the end, validate and save.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from jaxreg import io as _io
from jaxreg.data import pipeline as _pipeline
from jaxreg.io import configjson as _configjson
from jaxreg.io import progress as _progress
from jaxreg.ops import sharding as _mesh
from jaxreg.training import checkpoint as _checkpoint
from jaxreg.training import config as _config
from jaxreg.training import sharding as _sharding
from jaxreg.training import sources as _sources
from jaxreg.training import state as _state
from jaxreg.training import step as _step
from jaxreg.types import InputError

__all__ = ["train_and_evaluate", "evaluate"]


class _Writer:
  """Metrics to ``workdir/metrics.jsonl`` and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, resume_step: int, enabled: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if not enabled:
      return
    if os.path.exists(self.path):  # drop records a resumed run will write again
      with open(self.path) as f:
        kept = [line for line in f if json.loads(line).get("step", 0) <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(kept)
    from tensorboardX import (
      SummaryWriter,  # imported lazily: optional for library users
    )
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, kind: str, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, "kind": kind, **metrics}) + "\n")
    for k, v in metrics.items():
      self.tb.add_scalar(f"{kind}/{k}", v, step)
    self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def _validate(eval_step, params, val_source, num_val, mesh,
              skip: _pipeline.SkipBad | None = None) -> dict[str, float]:
  """Mean loss terms and mean Dice (network and identity) over the validation pairs;
  ``val_skipped``: the pairs that could not be read (``skip`` warns once about each).

  Raises:
    InputError: no validation pair could be read.
  """
  rep = _sharding.replicated(mesh)
  skip = skip or _pipeline.SkipBad(num_val, None, "the validation pairs")
  sums: dict[str, float] = {}
  dice, identity = [], []
  read = 0
  for i in range(num_val):
    example = _pipeline.prepare(val_source, i)
    if not skip(example):
      continue
    read += 1
    batch = {k: jax.make_array_from_process_local_data(rep, v[None]) for k, v in example.items()}
    m = jax.device_get(eval_step(params, batch))
    for k, v in m.items():
      if k not in ("dice", "dice_identity", "present"):
        sums[k] = sums.get(k, 0.0) + float(v)
    if "dice" in m:
      present = np.asarray(m["present"][0])
      dice.append(float(np.mean(np.asarray(m["dice"][0])[present])))
      identity.append(float(np.mean(np.asarray(m["dice_identity"][0])[present])))
  if not read:
    first = next(iter(skip.skipped.values()))
    raise InputError(f"{skip.manifest}: none of the {num_val} validation pairs could be read "
                     f"(first: {first.name}: {first.reason})")
  out = {f"val_{k}": v / read for k, v in sums.items()}
  out["val_skipped"] = float(num_val - read)
  if dice:
    out["val_dice"], out["val_dice_identity"] = float(np.mean(dice)), float(np.mean(identity))
  return out


def evaluate(config: ml_collections.ConfigDict, params) -> dict[str, float]:
  """Validation metrics of ``params`` on ``config``'s validation pairs (one device).

  Returns:
    ``val_loss`` and its terms, ``val_folding_fraction``, and when labels are
    used ``val_dice`` / ``val_dice_identity`` (mean over pairs of the mean over
    the classes present), plus ``seconds_per_pair``.
  """
  graphdef, template, _ = _state.init_state(config)
  mesh = _sharding.make_mesh(jax.devices()[:1])
  rep = _sharding.replicated(mesh)
  params = jax.device_put(params, rep)
  sources = _sources.make_sources(config)
  val_source, num_val = sources.val, sources.num_val
  eval_step = jax.jit(_step.make_eval_step(graphdef, template, config))
  _validate(eval_step, params, val_source, 1, mesh)  # compile outside the timing
  t0 = time.time()
  out = _validate(eval_step, params, val_source, num_val, mesh)
  out["seconds_per_pair"] = (time.time() - t0) / num_val
  return out


INIT_FILE = _checkpoint.INIT_FILE


def init_params(init: str, params) -> tuple[dict, dict]:
  """The parameters of a model folder (:func:`jaxreg.io.weights.save_weights`'s; ``"shipped"``:
  the shipped model) for a run whose network has ``params``' structure, and a record of them.

  Raises:
    InputError: not a model folder, or another network (the message names the first
      parameter that differs).
  """
  import hashlib

  from flax import nnx

  from jaxreg.io import weights as _weights
  path = _weights.DEMO_MODEL if init == "shipped" else init
  net, _ = _weights.load_weights(path)
  loaded = nnx.to_pure_dict(nnx.state(net))
  diff = _state.first_difference(params, loaded)
  if diff is not None:
    k, here, there = diff
    raise InputError(f"--init {init}: its network differs from the config's ({k}: {there} "
                     f"there, {here} here); train with the config it was trained with (the "
                     "shipped model: demo_6mm)")
  with open(os.path.join(path, "params.msgpack"), "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  record = {"init": init, "path": os.path.abspath(path), "params_sha256": digest}
  return jax.tree.map(lambda x: np.asarray(x, np.float32), loaded), record


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       progress: bool = True, log: Callable[[str], None] = print,
                       stop_at: int | None = None, init: str | None = None) -> dict[str, float]:
  """Train (or resume training) a registration network; see the module docstring.

  Args:
    config: a config as in ``configs/demo.py``.
    workdir: output folder: ``config.json``, ``checkpoints/``, ``metrics.jsonl``,
      ``tensorboard/``. An existing run there is resumed from its latest
      checkpoint (its loader position too), so the result equals an
      uninterrupted run.
    progress: show a progress bar (loss, ETA).
    log: where one-line messages go.
    stop_at: stop after this step, with a checkpoint, as a preempted run would
      (the schedule still follows ``config.train.steps``); run again to resume.
    init: start a new run from these weights (a model folder, or ``"shipped"``; see
      :func:`init_params`) instead of a random initialisation; recorded in
      ``workdir/init.json`` and in an exported model's ``info.json``. A run that resumes
      from its own checkpoint keeps its weights.

  Returns:
    the final validation metrics, with ``step`` and ``train_seconds``.

  Raises:
    jaxreg.types.InputError: bad config or data.
    ValueError: a batch size the devices do not divide.
    NonFiniteError: the loss became NaN/Inf (the message names the step).
  """
  _config.check_config(config)
  tc = config.train
  n_proc, pid = jax.process_count(), jax.process_index()
  n_dev = tc.get("devices", 0)
  if n_dev and n_proc > 1:
    raise ValueError("train.devices must be 0 (all devices) in a multi-process run")
  if n_dev > jax.device_count():
    raise ValueError(f"train.devices={n_dev} but only {jax.device_count()} device(s) exist")
  axes = _mesh.mesh_config(config.get("mesh"))
  if axes["space"] > 1 and n_proc > 1 and axes["space"] > jax.local_device_count():
    raise InputError(f"mesh.space={axes['space']} is more than the {jax.local_device_count()} "
                     "devices of one process; a volume's shards must stay inside one process")
  mesh = _sharding.make_mesh(jax.devices()[:n_dev] if n_dev else None, **axes)
  _sharding.check_batch_size(tc.batch_size, mesh)
  if tc.batch_size % n_proc:
    raise ValueError(f"batch size {tc.batch_size} is not divisible by {n_proc} processes")
  graphdef, template, state = _state.init_state(config)
  resuming = os.path.isdir(os.path.join(workdir, "checkpoints"))
  if resuming:  # the same network?
    probe = _checkpoint.Checkpoints(workdir)
    try:
      probe.check_compatible(state.params)
    finally:
      probe.close()
  record = None
  if init is not None and not resuming:
    params, record = init_params(init, state.params)
    state = state.replace(params=params, opt_state=_state.make_optimizer(config).init(params))
  sources = _sources.make_sources(config)  # the manifests read and checked
  os.makedirs(workdir, exist_ok=True)  # only once every check has passed
  if record is not None and pid == 0:
    with _io.atomic_path(os.path.join(workdir, INIT_FILE), suffix=".json") as tmp:
      with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    log(f"starting from {init} ({record['path']})")
  config_dict = json.loads(_configjson.to_json(config))
  if pid == 0:
    _configjson.write_config(config, os.path.join(workdir, "config.json"))
  log(f"jaxreg train: {mesh.devices.size} device(s) in {n_proc} process(es) "
      f"(mesh data={mesh.shape['data']} x space={mesh.shape['space']}), "
      f"{jax.devices()[0].platform}; workdir {workdir}")

  state = jax.device_put(state, _sharding.replicated(mesh))
  ckpts = _checkpoint.Checkpoints(workdir, keep_last=tc.keep_last, keep_best=tc.keep_best)
  try:
    start, state, loader_state = ckpts.restore_latest_good(state, log)
  except BaseException:
    ckpts.close()
    raise
  if start:
    log(f"resumed from step {start} ({ckpts.directory})")
  origin_file = os.path.join(workdir, INIT_FILE)
  if record is None and os.path.isfile(origin_file):  # a resumed fine-tuning run
    with open(origin_file, encoding="utf-8") as f:
      record = json.load(f)
  if start >= tc.steps:
    log(f"nothing to do: the run in {workdir} is at step {start} >= train.steps={tc.steps}")

  tx = _state.make_optimizer(config)
  train_step = _step.jit_train_step(_step.make_train_step(graphdef, template, config, tx),
                                    mesh, state)
  eval_fn = _step.make_eval_step(graphdef, template, config)
  rep = _sharding.replicated(mesh)
  eval_step = jax.jit(_mesh.on_mesh(eval_fn, mesh),
                      in_shardings=(jax.tree.map(lambda _: rep, state.params), rep),
                      out_shardings=rep)
  writer = _Writer(workdir, start, enabled=pid == 0)
  bar, task = _progress.progress_bar("train", tc.steps, enabled=progress and pid == 0,
                                     completed=start, info=True)
  val: dict[str, float] = {}
  t0, seconds = time.time(), 0.0
  last = tc.steps if stop_at is None else min(tc.steps, stop_at)
  d = config.data
  loader = _pipeline.batches(
      sources.train, tc.batch_size // n_proc, num_examples=sources.num_train, seed=config.seed,
      workers=d.workers, buffer=d.prefetch, shard=(pid, n_proc),
      augment=_sources.augment_of(config), max_bad_fraction=d.get("max_bad_fraction", 0.1),
      manifest=sources.name, log=log)
  val_skip = _pipeline.SkipBad(sources.num_val, None, f"{sources.name} (validation)", log)
  if start:
    loader.set_state(loader_state)
  try:
    with bar:
      for step in range(start + 1, last + 1):
        batch = _sharding.global_batch(next(loader), mesh)
        state, metrics = train_step(state, batch)
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
          raise _checkpoint.NonFiniteError(
              f"step {step}: training loss is {loss}; stopped without saving. Lower "
              f"optim.lr (now {config.optim.lr}) or check the data.")
        bar.update(task, advance=1, info=f"loss {loss:.4f}")
        if step % tc.log_every == 0 or step == tc.steps:
          writer.write(step, "train", {**{k: float(v) for k, v in
                                          jax.device_get(metrics).items()},
                                       "skipped_pairs": float(len(loader.skipped))})
        save = step % tc.checkpoint_every == 0 or step == last
        if save or step % tc.eval_every == 0:
          val = _validate(eval_step, state.params, sources.val, sources.num_val, mesh, val_skip)
          writer.write(step, "val", val)
          log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(val.items())))
        if save:
          ckpts.save(step, state, loader, config_dict,
                     metrics={"val_loss": val["val_loss"]}, origin=record)
    seconds = time.time() - t0
  finally:
    ckpts.wait()
    ckpts.close()
    loader.close()
    writer.close()
  return {"step": int(state.step), "train_seconds": seconds, **val}
