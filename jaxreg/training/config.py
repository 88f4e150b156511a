"""Loading configs (``path/to/config.py[:variant]`` or a shipped name, ``demo[:variant]``),
overriding fields, writing them out."""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.resources
import importlib.util
import os
import sys

import ml_collections

from jaxreg.nn import model as _model
from jaxreg.types import InputError

__all__ = ["load_config", "shipped_configs", "override", "check_config"]


def shipped_configs() -> tuple[str, ...]:
  """Names of the configs shipped in :mod:`jaxreg.configs` (``demo``, ``default``, ...)."""
  folder = importlib.resources.files("jaxreg.configs")
  return tuple(sorted(f.name[:-3] for f in folder.iterdir()
                      if f.name.endswith(".py") and not f.name.startswith("_")))


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Load ``get_config()`` from a config; ``"config:arg"`` passes ``arg`` to it.

  The config is a Python file (``path/to/config.py``), or, where no such file exists, the
  name of one shipped in :mod:`jaxreg.configs` (``demo``, ``default``, ``test``,
  ``demo_6mm``, ``learn2reg_abdomen``), so ``--config demo`` works from an installed
  package too. A file's parent folder's parent is put on ``sys.path`` while loading,
  so a config may import its siblings as ``from myconfigs import base``; the shipped
  ones import each other as ``from jaxreg.configs import demo``.

  Raises:
    InputError: neither a file nor a shipped name, a ``.json`` file (a model folder's or a
      run's resolved config, not a config to train from), no ``get_config``, or an error
      while running it.
  """
  path, _, arg = spec.partition(":")
  if os.path.isfile(path) and path.endswith(".json"):
    raise InputError(f"{path}: a JSON file (a model folder's or a run's resolved config.json) "
                     "is not a training config: give a Python config file or a shipped name "
                     f"({', '.join(shipped_configs())})")
  if os.path.isfile(path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    module_name = f"jaxreg_config_{abs(hash(os.path.abspath(path)))}"
  elif path in shipped_configs():
    root, module_name = None, f"jaxreg.configs.{path}"
  else:
    stem = os.path.splitext(os.path.basename(path))[0]
    hint = (f"; outside a checkout of jaxreg use the shipped one: --config {stem}"
            if stem in shipped_configs() and stem != path else "")
    raise InputError(f"{path}: no such config file, nor a shipped config (shipped: "
                     f"{', '.join(shipped_configs())}){hint}")
  if root is not None:
    sys.path.insert(0, root)
  try:
    if root is None:
      module = importlib.import_module(module_name)
    else:
      # The loader named: a file of any name (``demo`` too) is read as Python.
      loader = importlib.machinery.SourceFileLoader(module_name, path)
      module = importlib.util.module_from_spec(importlib.util.spec_from_loader(module_name, loader))
      loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise InputError(f"{path}: defines no get_config()")
    config = module.get_config(arg) if arg else module.get_config()
  except InputError:
    raise
  except Exception as e:
    raise InputError(f"{path}: cannot load config ({type(e).__name__}: {e})") from e
  finally:
    if root is not None:
      sys.path.remove(root)
  return config


def _parse(value: str):
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value  # a bare string


def override(config: ml_collections.ConfigDict, assignments: list[str]) -> ml_collections.ConfigDict:
  """Apply ``field.sub=value`` assignments (values parsed as Python literals).

  Sections named ``*_kwargs`` (``loss.similarity_kwargs``, ``loss.reg_kwargs``)
  are keyword arguments of a function and accept new fields.

  Raises:
    InputError: unknown field, or a value of the wrong type.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  for item in assignments:
    key, eq, value = item.partition("=")
    if not eq:
      raise InputError(f"config override {item!r}: expected field=value")
    parts = key.split(".")
    node = config
    for p in parts[:-1]:
      if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
        raise InputError(f"config override {item!r}: no config section {p!r}")
      node = node[p]
    open_section = len(parts) > 1 and parts[-2].endswith("_kwargs")  # keyword arguments: any name
    if parts[-1] not in node and open_section:
      node[parts[-1]] = _parse(value)
      continue
    if parts[-1] not in node:
      raise InputError(f"config override {item!r}: no field {key!r} "
                       f"(fields here: {sorted(node.keys())})")
    old, new = node[parts[-1]], _parse(value)
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
      new = type(old)(new)
    elif old is not None and new is not None and not isinstance(new, type(old)) and not (
        isinstance(old, float) and isinstance(new, int)):
      raise InputError(f"config override {item!r}: {key} is a {type(old).__name__}, "
                       f"got {new!r}")
    with node.ignore_type():
      node[parts[-1]] = float(new) if isinstance(old, float) and isinstance(new, int) else new
  return config


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raise :class:`InputError` for values that cannot work, before anything is built."""
  t, d, m = config.train, config.data, config.model
  problems = []
  if t.steps < 1:
    problems.append(f"train.steps must be >= 1, got {t.steps}")
  if t.batch_size < 1:
    problems.append(f"train.batch_size must be >= 1, got {t.batch_size}")
  for k in ("log_every", "eval_every", "checkpoint_every"):
    if t[k] < 1:
      problems.append(f"train.{k} must be >= 1, got {t[k]}")
  if m.get("label_inputs", False) and not d.label_ids:
    problems.append("model.label_inputs needs data.label_ids")
  if t.get("devices", 0) < 0:
    problems.append(f"train.devices must be >= 0 (0 = all), got {t.devices}")
  if d.get("workers", 0) < 0:
    problems.append(f"data.workers must be >= 0 (0: in the training process), got {d.workers}")
  if not 0 <= d.get("max_bad_fraction", 0.1) < 1:
    problems.append(f"data.max_bad_fraction must be in [0, 1), got {d.max_bad_fraction}")
  a = d.get("augment", None) or {}
  if not 0 <= a.get("swap", 0.0) <= 1 or a.get("gamma", 0.0) < 0 or a.get("noise", 0.0) < 0:
    problems.append(f"data.augment needs swap in [0, 1], gamma >= 0 and noise >= 0, got "
                    f"{dict(a)}")
  if d.spacing <= 0:
    problems.append(f"data.spacing must be positive, got {d.spacing}")
  stride = _model.unet_stride(m.widths)
  if d.shape is not None and any(int(s) % stride for s in d.shape):
    problems.append(f"data.shape {tuple(d.shape)} must be divisible by the UNet stride {stride}")
  if config.optim.lr <= 0:
    problems.append(f"optim.lr must be positive, got {config.optim.lr}")
  if d.source not in ("demo", "learn2reg", "csv"):
    problems.append(f"data.source must be demo, learn2reg or csv, got {d.source!r}")
  elif d.source != "demo" and not d.get("path"):
    problems.append(f"data.path is required for data.source={d.source!r} "
                    "(--config.data.path=...)")
  from jaxreg.nn import conv as _conv
  from jaxreg.ops import decompose as _decompose
  from jaxreg.ops import losses as _losses
  choices = {"model.heads": (m.heads, _model.HEADS),
             "model.conv": (m.get("conv", "auto"), _conv.CONV_IMPLS),
             "decomposition": (config.decomposition, _decompose.METHODS),
             "loss.similarity": (config.loss.similarity, _losses.similarity_names()),
             "loss.reg": (config.loss.reg, _losses.regulariser_names())}
  for name, (value, allowed) in choices.items():
    if value not in allowed:
      hint = (" (a name of your own: register it in a module and pass train.py --import MODULE)"
              if name.startswith("loss.") else "")
      problems.append(f"{name} must be one of {', '.join(allowed)}; got {value!r}{hint}")
  if t.get("compute_dtype", "float32") not in _model.COMPUTE_DTYPES:
    problems.append(f"train.compute_dtype must be one of {', '.join(_model.COMPUTE_DTYPES)}; "
                    f"got {t.compute_dtype!r}")
  if m.get("condition_on_reg", False):
    lo, hi = m.reg_range
    if not 0 < lo < hi:
      problems.append(f"model.reg_range must be (lo, hi) with 0 < lo < hi, got {tuple(m.reg_range)}")
    elif not lo <= config.loss.reg_weight <= hi:
      problems.append(f"loss.reg_weight {config.loss.reg_weight} (lambda of validation) must lie "
                      f"in model.reg_range {tuple(m.reg_range)}")
    if m.get("reg_conditioning", "film") not in _model.REG_CONDITIONS:
      problems.append(f"model.reg_conditioning must be one of "
                      f"{', '.join(_model.REG_CONDITIONS)}; got {m.reg_conditioning!r}")
  try:
    from jaxreg.ops import sharding as _mesh
    axes = _mesh.mesh_config(config.get("mesh"))
    if axes["space"] < 1 or axes["data"] < 0:
      problems.append(f"mesh.space must be >= 1 and mesh.data >= 0, got {axes}")
    elif d.shape is not None:
      _mesh.check_space(d.shape, axes["space"], "data.shape")
  except InputError as e:
    problems.append(str(e))
  if not problems:
    try:  # the network itself (widths, number of sub-fields vs levels, ...), without allocating
      from flax import nnx

      from jaxreg.training import state as _state
      nnx.eval_shape(lambda: _state.build_model(config))
    except (ValueError, TypeError) as e:
      problems.append(f"model: {e}")
  if problems:
    raise InputError("bad config: " + "; ".join(problems))
