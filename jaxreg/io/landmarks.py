"""Point lists in world millimetres: CSV files and 3D Slicer markups (``.mrk.json``).

A CSV has a header with columns ``x``, ``y``, ``z`` (any case; other columns are kept as they
are) in the RAS or LPS frame, which the caller states (a CSV does not say). A Slicer markups
file says its frame per markup (``coordinateSystem``, LPS when absent, as Slicer writes
since 4.11); every control point's ``position`` is read, and written back in the same frame
with everything else in the file unchanged. Inside jaxreg points are RAS+ mm.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import os

import numpy as np

from jaxreg.io.atomic import atomic_path
from jaxreg.types import InputError

__all__ = ["Landmarks", "read_landmarks", "write_landmarks", "SPACES"]

SPACES = ("RAS", "LPS")
_FLIP = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS


@dataclasses.dataclass(frozen=True)
class Landmarks:
  """Points read from a file, and what is needed to write them back in its form.

  Attributes:
    ras: ``[N, 3]`` float64 world points, RAS+ mm.
    kind: ``"csv"`` or ``"mrk.json"``.
    source: the parsed file (CSV rows with their header, or the markups JSON) and, for CSV,
      the frame and the coordinate columns.
  """
  ras: np.ndarray
  kind: str
  source: dict


def _is_markups(path: str) -> bool:
  return path.lower().endswith(".mrk.json") or path.lower().endswith(".json")


def read_landmarks(path, space: str | None = None) -> Landmarks:
  """Points of a CSV (``space``: ``"RAS"`` or ``"LPS"``, required) or a ``.mrk.json``.

  Raises:
    InputError: unreadable file, no ``x, y, z`` columns, non-numeric or non-finite values,
      no points, or a CSV without ``space`` (each message names the file).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise InputError(f"{path}: no such points file")
  if _is_markups(path):
    return _read_markups(path)
  if space is None or space.upper() not in SPACES:
    raise InputError(f"{path}: say whether the CSV's x, y, z are RAS or LPS (--space)")
  try:
    with open(path, newline="", encoding="utf-8") as f:
      rows = list(csv.DictReader(f))
      header = list(rows[0].keys()) if rows else []
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise InputError(f"{path}: cannot read the CSV ({e})") from e
  lower = {h.strip().lower(): h for h in header if h is not None}
  if not rows or not all(c in lower for c in "xyz"):
    raise InputError(f"{path}: expected a header with columns x, y, z and at least one row, "
                     f"got columns {header}")
  cols = [lower[c] for c in "xyz"]
  try:
    xyz = np.array([[float(r[c]) for c in cols] for r in rows], np.float64)
  except (TypeError, ValueError) as e:
    raise InputError(f"{path}: x, y, z must be numbers ({e})") from e
  if not np.all(np.isfinite(xyz)):
    raise InputError(f"{path}: x, y, z must be finite numbers")
  ras = xyz * _FLIP if space.upper() == "LPS" else xyz
  return Landmarks(ras, "csv", {"rows": rows, "header": header, "columns": cols,
                                "space": space.upper()})


def _read_markups(path: str) -> Landmarks:
  try:
    with open(path, encoding="utf-8") as f:
      doc = json.load(f)
    points = []
    for markup in doc["markups"]:
      flip = _FLIP if markup.get("coordinateSystem", "LPS").upper() == "LPS" else 1.0
      for cp in markup.get("controlPoints", []):
        points.append(np.asarray(cp["position"], np.float64) * flip)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise InputError(f"{path}: not a 3D Slicer markups file ({type(e).__name__}: {e})") from e
  ras = np.array(points, np.float64).reshape(-1, 3)
  if not len(ras) or not np.all(np.isfinite(ras)):
    raise InputError(f"{path}: no control points with finite positions")
  return Landmarks(ras, "mrk.json", {"doc": doc})


def write_landmarks(path, landmarks: Landmarks, ras: np.ndarray) -> None:
  """``landmarks``' file again with the points moved to ``ras`` (``[N, 3]`` RAS mm), in its
  own frame and form, atomically.

  Raises:
    InputError: an output name whose form differs from the input's, or a bad folder.
  """
  path = os.fspath(path)
  ras = np.asarray(ras, np.float64)
  if ras.shape != landmarks.ras.shape:
    raise ValueError(f"ras must be {landmarks.ras.shape}, got {ras.shape}")
  if (landmarks.kind == "mrk.json") != _is_markups(path):
    raise InputError(f"{path}: write the points in their input's form ({landmarks.kind})")
  with atomic_path(path, suffix=".json" if landmarks.kind == "mrk.json" else ".csv") as tmp:
    if landmarks.kind == "mrk.json":
      doc, k = copy.deepcopy(landmarks.source["doc"]), 0
      for markup in doc["markups"]:
        flip = _FLIP if markup.get("coordinateSystem", "LPS").upper() == "LPS" else 1.0
        for cp in markup.get("controlPoints", []):
          cp["position"] = (ras[k] * flip).tolist()
          k += 1
      with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=4)
      return
    src = landmarks.source
    xyz = ras * _FLIP if src["space"] == "LPS" else ras
    with open(tmp, "w", newline="", encoding="utf-8") as f:
      writer = csv.DictWriter(f, fieldnames=src["header"])
      writer.writeheader()
      for row, p in zip(src["rows"], xyz):
        writer.writerow({**row, **{c: repr(float(v)) for c, v in zip(src["columns"], p)}})
