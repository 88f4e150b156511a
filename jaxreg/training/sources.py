"""Training and validation examples for a config: picklable ``index -> dict of numpy
arrays`` (:mod:`jaxreg.data.examples`: numpy and scipy only, so data worker processes run
them), and the pipeline's settings.

Each example holds ``fixed`` and ``moving`` (``config.data.shape``, float32 in
[0, 1]) and, when ``config.data.label_ids`` is set, ``fixed_labels`` and
``moving_labels`` as int32 class indices (0 background, k for the k-th id).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections

from jaxreg import data as _data
from jaxreg.data import examples as _examples
from jaxreg.nn import model as _model
from jaxreg.nn.inputs import class_lut, to_classes
from jaxreg.types import InputError

__all__ = ["class_lut", "to_classes", "Sources", "make_sources", "demo_pair_for", "augment_of"]


@dataclasses.dataclass(frozen=True)
class Sources:
  """A config's examples.

  Attributes:
    train: ``index -> example`` of the training pairs.
    num_train: their number, or None for the endless synthetic ones.
    val: ``index -> example`` of the validation pairs.
    num_val: their number.
    name: what to call the data in messages (the manifest's path, or "the demo CT").
  """
  train: Callable[[int], dict]
  num_train: int | None
  val: Callable[[int], dict]
  num_val: int
  name: str


def _grid_kwargs(config: ml_collections.ConfigDict) -> dict:
  """The model grid's arguments (spacing, divisor, shape) every example is made on."""
  d = config.data
  return dict(spacing=d.spacing, divisor=_model.unet_stride(config.model.widths),
              shape=None if d.shape is None else tuple(d.shape))


def _lut(config: ml_collections.ConfigDict):
  return class_lut(config.data.label_ids) if config.data.label_ids else None


def _pair_kwargs(config: ml_collections.ConfigDict) -> dict:
  d = config.data
  return dict(**_grid_kwargs(config), max_disp_mm=d.max_disp_mm, control_spacing_mm=d.control_spacing_mm,
              breathing_mm=d.breathing_mm, contrast=d.contrast, noise_std=d.noise_hu,
              fine_disp_mm=d.get("fine_disp_mm", 0.0),
              fine_spacing_mm=d.get("fine_spacing_mm", 20.0),
              rigid_deg=d.get("rigid_deg", 0.0), rigid_mm=d.get("rigid_mm", 0.0),
              crop=d.get("crop", 0.0))


def demo_pair_for(config: ml_collections.ConfigDict, index: int,
                  split: str = "eval") -> _data.SyntheticPair:
  """The synthetic demo pair ``index`` that ``config`` trains or validates on (HU)."""
  return _data.demo_pair(index, split=split, **_pair_kwargs(config))


def augment_of(config: ml_collections.ConfigDict) -> _examples.Augment:
  """``config.data.augment`` (absent: none)."""
  a = config.data.get("augment", None)
  return _examples.Augment() if a is None else _examples.Augment(
      swap=float(a.get("swap", 0.0)), gamma=float(a.get("gamma", 0.0)),
      noise=float(a.get("noise", 0.0)))


def _demo_sources(config) -> Sources:
  d = config.data
  kwargs = dict(hu_window=tuple(d.hu_window), lut=_lut(config), **_pair_kwargs(config))
  return Sources(_examples.SyntheticPairs("train", **kwargs), None,
                 _examples.SyntheticPairs("eval", **kwargs), d.val_pairs, "the demo CT")


def _check_labels(specs, config, name: str) -> None:
  """InputError when ``data.label_ids`` asks for labels that some pairs lack (the Dice
  term would be dropped without a word)."""
  if not config.data.label_ids:
    return
  missing = [s for s in specs if not (s.fixed_labels and s.moving_labels)]
  if missing:
    raise InputError(
        f"{name}: {len(missing)} of {len(specs)} pairs have no fixed_labels/moving_labels "
        f"(first: {missing[0].fixed}) but data.label_ids={tuple(config.data.label_ids)} "
        "asks for labels; give every pair its label maps, or train on image similarity "
        "alone with --config.data.label_ids='()'")


def _file_sources(config) -> Sources:
  d = config.data
  if d.source == "learn2reg":
    train_specs = _data.read_learn2reg(d.path, "train", check=False)
    val_specs = _data.read_learn2reg(d.path, "val", check=False)[: d.val_pairs]
  else:
    specs = _data.read_pairs_csv(d.path, check=False)
    if len(specs) <= d.val_pairs:
      raise InputError(f"{d.path}: {len(specs)} pairs leave none for training after holding "
                       f"out the last data.val_pairs={d.val_pairs} rows for validation; lower "
                       "it with --config.data.val_pairs=N")
    train_specs, val_specs = specs[: len(specs) - d.val_pairs], specs[len(specs) - d.val_pairs:]
  _check_labels(train_specs + val_specs, config, d.path)
  kwargs = dict(hu_window=tuple(d.hu_window), lut=_lut(config), **_grid_kwargs(config))
  return Sources(_examples.FilePairs(train_specs, **kwargs), len(train_specs),
                 _examples.FilePairs(val_specs, **kwargs), len(val_specs), d.path)


def make_sources(config: ml_collections.ConfigDict) -> Sources:
  """The config's training and validation examples.

  Raises:
    InputError: an unreadable manifest, too few pairs, or labels asked for but missing.
  """
  if config.data.source == "demo":
    return _demo_sources(config)
  return _file_sources(config)
