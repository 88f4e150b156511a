"""Pair manifests: Learn2Reg folders and CSV files as lists of :class:`PairSpec`
(file paths; nothing is read until used), and keypoint files."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os

import numpy as np

from jaxreg.types import InputError


@dataclasses.dataclass(frozen=True)
class PairSpec:
  """File paths of one registration pair; optional entries may be None."""
  fixed: str
  moving: str
  fixed_labels: str | None = None
  moving_labels: str | None = None
  fixed_keypoints: str | None = None
  moving_keypoints: str | None = None
  fixed_mask: str | None = None
  moving_mask: str | None = None

  def check_exist(self, manifest: str, check: bool = True) -> "PairSpec":
    """``self``; with ``check``, InputError when a file it names does not exist."""
    for name, path in dataclasses.asdict(self).items():
      if check and path is not None and not os.path.isfile(path):
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


def read_learn2reg(folder: str, split: str = "train", *, check: bool = True) -> list[PairSpec]:
  """Pairs of a Learn2Reg-style dataset folder.

  Layout: ``NAME_dataset.json`` beside ``imagesTr/``, optional ``labelsTr/`` and
  ``masksTr/`` (same file names as the images) and ``keypointsTr/`` (``<image stem>.csv``).
  ``split="train"`` reads ``training_paired_images``; if that is empty (unpaired
  tasks such as AbdomenCTCT), every ordered pair of distinct ``training`` images
  not used by ``registration_val``. ``split="val"`` reads ``registration_val``.
  Labels come from a ``training`` entry's ``label`` field, else ``labelsTr/``; masks
  (where an image may be compared, e.g. NLST's lung masks) from its ``mask`` field, else
  ``masksTr/``.

  Args:
    folder: the dataset folder (or its JSON file).
    split: ``"train"`` or ``"val"``.
    check: every file named must exist (else a training run skips the pairs it cannot
      read, with a warning each).

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

  labels_of, masks_of = {}, {}
  for entry in meta.get("training", []) or []:
    if isinstance(entry, dict) and "image" in entry and entry.get("label"):
      labels_of[_resolve(root, entry["image"])] = _resolve(root, entry["label"])
    if isinstance(entry, dict) and "image" in entry and entry.get("mask"):
      masks_of[_resolve(root, entry["image"])] = _resolve(root, entry["mask"])

  def labels_for(image: str) -> str | None:
    if image in labels_of:
      return labels_of[image]
    guess = os.path.join(root, "labelsTr", os.path.basename(image))
    return guess if os.path.isfile(guess) else None

  def mask_for(image: str) -> str | None:
    if image in masks_of:
      return masks_of[image]
    guess = os.path.join(root, "masksTr", os.path.basename(image))
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
  return [PairSpec(f, m, labels_for(f), labels_for(m), keypoints_for(f), keypoints_for(m),
                   mask_for(f), mask_for(m)).check_exist(path, check) for f, m in pairs]


def read_pairs_csv(path: str, *, check: bool = True) -> list[PairSpec]:
  """Pairs from a CSV with header ``fixed,moving`` and optional columns
  ``fixed_labels, moving_labels, fixed_keypoints, moving_keypoints, fixed_mask,
  moving_mask`` (keypoints: Learn2Reg-style CSVs of voxel coordinates, see
  :func:`read_keypoints`; masks: binary maps on their image's grid, where it may be
  compared).

  Relative paths are relative to the CSV's folder; empty cells mean "none". With
  ``check``, every file named must exist (else a training run skips the pairs it cannot
  read, with a warning each).

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
                   .check_exist(f"{path}: line {line}", check))
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


def load_pair(spec: PairSpec, series: str | None = None, *, labels: bool = True):
  """``(fixed, moving, fixed_labels, moving_labels)`` Volumes of a :class:`PairSpec`;
  each label map is checked to lie on its image's grid (labels absent, or ``labels``
  False: None). Any format :func:`jaxreg.io.load` reads; ``series``: a DICOM series UID,
  for an image folder that holds several.

  Raises:
    InputError: an unreadable file, or labels on another grid (the message names the file).
  """
  from jaxreg import io as _io
  fixed, moving = _io.load(spec.fixed, series=series), _io.load(spec.moving, series=series)
  fl = (_io.load_labels(spec.fixed_labels, like=fixed, like_path=spec.fixed)
        if labels and spec.fixed_labels else None)
  ml = (_io.load_labels(spec.moving_labels, like=moving, like_path=spec.moving)
        if labels and spec.moving_labels else None)
  return fixed, moving, fl, ml
