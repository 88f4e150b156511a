"""Training and validation examples for a config: ``index -> dict of numpy arrays``.

Each example holds ``fixed`` and ``moving`` (``config.data.shape``, float32 in
[0, 1]) and, when ``config.data.label_ids`` is set, ``fixed_labels`` and
``moving_labels`` as int32 class indices (0 background, k for the k-th id).
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections
import numpy as np

from jaxreg import data as _data
from jaxreg import io as _io
from jaxreg.io import resample as _preprocess
from jaxreg.nn import model as _model
from jaxreg.nn.inputs import class_lut, to_classes
from jaxreg.types import InputError

__all__ = ["class_lut", "to_classes", "make_sources", "demo_pair_for"]


def _example(fixed, moving, fixed_labels, moving_labels, lut) -> dict[str, np.ndarray]:
  out = {"fixed": np.asarray(fixed, np.float32), "moving": np.asarray(moving, np.float32)}
  if lut is not None and fixed_labels is not None and moving_labels is not None:
    out["fixed_labels"] = to_classes(fixed_labels, lut)
    out["moving_labels"] = to_classes(moving_labels, lut)
  return out


def demo_pair_for(config: ml_collections.ConfigDict, index: int,
                  split: str = "eval") -> _data.SyntheticPair:
  """The synthetic demo pair ``index`` that ``config`` trains or validates on (HU)."""
  d = config.data
  return _data.demo_pair(index, split=split, spacing=d.spacing,
                         divisor=_model.unet_stride(config.model.widths),
                         shape=None if d.shape is None else tuple(d.shape),
                         max_disp_mm=d.max_disp_mm, control_spacing_mm=d.control_spacing_mm,
                         breathing_mm=d.breathing_mm, contrast=d.contrast,
                         noise_std=d.noise_hu, fine_disp_mm=d.get("fine_disp_mm", 0.0),
                         fine_spacing_mm=d.get("fine_spacing_mm", 20.0),
                         rigid_deg=d.get("rigid_deg", 0.0), rigid_mm=d.get("rigid_mm", 0.0),
                         crop=d.get("crop", 0.0))


def _demo_sources(config):
  d = config.data
  lut = class_lut(d.label_ids) if d.label_ids else None
  lo, hi = d.hu_window

  def make(split):
    def source(index: int):
      pair = demo_pair_for(config, index, split)
      return _example(_preprocess.window(pair.fixed, lo, hi), _preprocess.window(pair.moving, lo, hi),
                      pair.fixed_labels, pair.moving_labels, lut)
    return source

  return make("train"), None, make("eval"), d.val_pairs


def _file_sources(config):
  d = config.data
  lut = class_lut(d.label_ids) if d.label_ids else None
  if d.source == "learn2reg":
    train_specs = _data.read_learn2reg(d.path, "train")
    val_specs = _data.read_learn2reg(d.path, "val")[: d.val_pairs]
  else:
    specs = _data.read_pairs_csv(d.path)
    if len(specs) <= d.val_pairs:
      raise InputError(f"{d.path}: {len(specs)} pairs leave none for training after "
                           f"holding out data.val_pairs={d.val_pairs}")
    train_specs, val_specs = specs[: len(specs) - d.val_pairs], specs[len(specs) - d.val_pairs:]

  def load(spec: _data.PairSpec):
    fixed, moving = _io.load(spec.fixed), _io.load(spec.moving)
    fl = _io.load_labels(spec.fixed_labels, like=fixed, like_path=spec.fixed) \
        if spec.fixed_labels else None
    ml = _io.load_labels(spec.moving_labels, like=moving, like_path=spec.moving) \
        if spec.moving_labels else None
    pair = _preprocess.prepare_pair(
        fixed, moving, fl, ml, spacing=d.spacing,
        divisor=_model.unet_stride(config.model.widths),
        shape=None if d.shape is None else tuple(d.shape), hu_window=tuple(d.hu_window),
        names=(spec.fixed, spec.moving))
    return _example(pair.fixed, pair.moving, pair.fixed_labels, pair.moving_labels, lut)

  return (lambda i: load(train_specs[i])), len(train_specs), \
         (lambda i: load(val_specs[i])), len(val_specs)


def make_sources(config: ml_collections.ConfigDict
                 ) -> tuple[Callable[[int], dict], int | None, Callable[[int], dict], int]:
  """``(train_source, num_train or None if infinite, val_source, num_val)``."""
  if config.data.source == "demo":
    return _demo_sources(config)
  return _file_sources(config)
