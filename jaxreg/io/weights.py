"""Trained networks as files: a folder with ``config.json`` and ``params.msgpack``.

This is the inference format (what ``jaxreg register`` loads and what the
package ships as its demo model); training checkpoints are Orbax's, in a run's
``workdir/checkpoints``. :func:`jaxreg.training.export_checkpoint` turns the latter into the
former.
"""

from __future__ import annotations

import importlib.resources
import json
import os

import jax
import ml_collections
import numpy as np
from flax import nnx, serialization

from jaxreg.io.atomic import atomic_dir
from jaxreg.types import InputError

__all__ = ["save_weights", "load_weights", "demo_model", "DEMO_MODEL"]

DEMO_MODEL = str(importlib.resources.files("jaxreg") / "demo_model")


def save_weights(path: str, config: ml_collections.ConfigDict, params,
                 info: dict | None = None) -> None:
  """Write ``config.json``, ``params.msgpack`` (and ``info.json``) into folder ``path``, atomically.

  Args:
    path: output folder (replaced if it exists).
    config: the training config (it defines the network).
    params: the network parameters as a pure dict of arrays.
    info: optional provenance (how it was trained, scores), stored as JSON.
  """
  params = jax.device_get(params)
  if not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params)):
    raise ValueError(f"{path}: refusing to save non-finite parameters")
  with atomic_dir(path) as tmp:
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
      json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=list)
    with open(os.path.join(tmp, "params.msgpack"), "wb") as f:
      f.write(serialization.msgpack_serialize(params))
    if info is not None:
      with open(os.path.join(tmp, "info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, sort_keys=True)


def load_weights(path: str):
  """Load a network saved by :func:`save_weights`.

  Returns:
    ``(net, config)``: a :class:`jaxreg.nn.model.RegistrationNet` with the saved
    parameters, and its config.

  Raises:
    InputError: missing files, or parameters that do not fit the config's
      network (e.g. a checkpoint of another model).
  """
  from jaxreg.io import configjson
  from jaxreg.nn import model

  cfg_path, par_path = os.path.join(path, "config.json"), os.path.join(path, "params.msgpack")
  for p in (cfg_path, par_path):
    if not os.path.isfile(p):
      raise InputError(f"{path}: not a jaxreg model folder ({os.path.basename(p)} is missing)")
  try:
    config = configjson.read_config_json(cfg_path)
    with open(par_path, "rb") as f:
      loaded = serialization.msgpack_restore(f.read())
  except Exception as e:
    raise InputError(f"{path}: cannot read the model files ({type(e).__name__}: {e})") from e
  try:  # abstract: no initializer runs, the loaded values replace every leaf
    net = nnx.eval_shape(lambda: model.from_config(config))
  except Exception as e:
    raise InputError(f"{path}: config.json does not describe a network ({e})") from e
  graphdef, template = nnx.split(net)
  want = nnx.to_pure_dict(template)
  got_shapes = jax.tree.map(lambda x: tuple(np.shape(x)), loaded)
  want_shapes = jax.tree.map(lambda x: tuple(x.shape), want)
  if got_shapes != want_shapes:
    raise InputError(f"{path}: params.msgpack does not fit the network in config.json "
                     "(a checkpoint of another model?)")
  nnx.replace_by_pure_dict(template, jax.tree.map(np.asarray, loaded))
  return nnx.merge(graphdef, template), config


def demo_model():
  """The network shipped with jaxreg (6 mm grid, 64³), trained by ``configs/demo_6mm.py`` for 2700
  steps (see its ``info.json``); conditioned on the regularisation weight (``reg_weight``)."""
  return load_weights(DEMO_MODEL)
