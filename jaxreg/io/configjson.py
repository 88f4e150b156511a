"""Configs as JSON: what a run writes next to its checkpoints and a model folder holds.

``config.json`` is the resolved ``ml_collections`` config; reading it back turns
lists into tuples, as the config files write them. Used by training (resume),
model folders (:mod:`jaxreg.io.weights`) and inference alike.
"""

from __future__ import annotations

import json
import os

import ml_collections

from jaxreg.io.atomic import atomic_path
from jaxreg.types import InputError

__all__ = ["to_json", "write_config", "config_from_dict", "read_config_json"]


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def write_config(config: ml_collections.ConfigDict, path: str) -> None:
  """Write the resolved config as JSON, atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(to_json(config) + "\n")


def config_from_dict(d: dict) -> ml_collections.ConfigDict:
  """A config from its JSON form (lists become tuples, as the config files write them)."""
  def tuples(x):
    if isinstance(x, dict):
      return {k: tuples(v) for k, v in x.items()}
    return tuple(x) if isinstance(x, list) else x
  return ml_collections.ConfigDict(tuples(d))


def read_config_json(path: str) -> ml_collections.ConfigDict:
  """Read a config written by :func:`write_config` (e.g. ``workdir/config.json``)."""
  if not os.path.isfile(path):
    raise InputError(f"{path}: no such config file")
  try:
    with open(path, encoding="utf-8") as f:
      return config_from_dict(json.load(f))
  except (OSError, json.JSONDecodeError) as e:
    raise InputError(f"{path}: not a readable config ({e})") from e
