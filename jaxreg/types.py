"""Leaf types every part of jaxreg may import: :class:`InputError`, :class:`Volume`, :class:`Grid`.

This module imports nothing else from jaxreg (the bottom of the layering in
``pyproject.toml``'s import-linter contracts).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

__all__ = ["InputError", "Volume", "Grid", "spacing_of", "one_line"]


class InputError(ValueError):
  """Bad user input (a file, a grid, a value): the message names it and the problem."""


def one_line(error: BaseException) -> str:
  """``"TypeName: first line of its message"``: an exception as one line of a warning or a
  summary table (a pair skipped, a batch row that failed)."""
  text = str(error).strip()
  return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def spacing_of(affine) -> np.ndarray:
  """Voxel size in mm along each array axis: the column norms of ``affine[:3, :3]``."""
  return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


class Volume(NamedTuple):
  """A 3-D image and its voxel-to-world affine.

  Attributes:
    array: ``[X, Y, Z]`` numpy array.
    affine: ``[4, 4]`` float64 voxel-to-world matrix (RAS+ mm).
  """
  array: np.ndarray
  affine: np.ndarray

  @property
  def shape(self) -> tuple[int, int, int]:
    return tuple(self.array.shape[:3])

  @property
  def spacing(self) -> np.ndarray:
    """Voxel size in mm along each array axis."""
    return spacing_of(self.affine)


@dataclasses.dataclass(frozen=True)
class Grid:
  """A voxel grid: ``shape`` ``(X, Y, Z)`` and its ``[4, 4]`` voxel-to-world ``affine`` (mm)."""
  shape: tuple[int, int, int]
  affine: np.ndarray

  @classmethod
  def of(cls, volume: Volume) -> "Grid":
    return cls(tuple(int(s) for s in volume.shape), np.asarray(volume.affine, np.float64))

  @property
  def spacing(self) -> np.ndarray:
    return spacing_of(self.affine)

  def world_bounds(self) -> tuple[np.ndarray, np.ndarray]:
    """Min and max world coordinate (mm) of the grid's voxel centres, per world axis."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in self.shape], indexing="ij"))
    world = corners.reshape(3, -1).T @ self.affine[:3, :3].T + self.affine[:3, 3]
    return world.min(0), world.max(0)
