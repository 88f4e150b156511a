"""Map points (landmarks, keypoints) through a displacement field, in world millimetres.

A displacement ``disp`` on the fixed grid (voxels, array axis order) pulls the
moving image back: fixed voxel ``v`` corresponds to moving voxel ``v + disp(v)``
(the same grid's index space; see :mod:`jaxreg.ops.warp`). So it maps points
**from fixed to moving** space, which is what target registration error needs:
fixed landmarks go through the field and are compared with the moving landmarks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg.ops import grid as _grid
from jaxreg.ops import warp as _warp

__all__ = ["transform_points", "voxel_points_to_world"]


def transform_points(points_mm: jax.Array, disp: jax.Array, affine: jax.Array, *,
                     implementation: str | None = None) -> jax.Array:
  """Map world points from fixed to moving space with a voxel displacement field.

  ``p' = A (v + disp(v))`` with ``v = A^-1 p`` and ``disp(v)`` trilinearly
  interpolated (points outside the grid take the nearest border value). Pure
  JAX: jit-able, differentiable in ``points_mm`` and ``disp``.

  Args:
    points_mm: ``[N, 3]`` world coordinates (mm, the affine's frame: RAS+ for NIfTI).
    disp: ``[X, Y, Z, 3]`` displacement in voxels of the grid ``affine`` describes.
    affine: ``[4, 4]`` voxel-to-world affine of that (fixed) grid.
    implementation: the warp's (``None``, ``"xla"``, ``"ffi"``; see :mod:`jaxreg.ops.warp`).

  Returns:
    ``[N, 3]`` world coordinates (mm) of the corresponding moving points.

  Raises:
    ValueError: bad shapes or a non-finite / singular affine.

  Examples:
    >>> import numpy as np
    >>> disp = np.zeros((4, 4, 4, 3), np.float32); disp[..., 0] = 1.0  # +1 voxel along i
    >>> affine = np.diag([2.0, 2.0, 2.0, 1.0])                          # 2 mm voxels
    >>> np.asarray(transform_points(np.array([[2.0, 2.0, 2.0]]), disp, affine))
    array([[4., 2., 2.]], dtype=float32)
  """
  if np.ndim(points_mm) != 2 or np.shape(points_mm)[1] != 3:
    raise ValueError(f"points_mm must be [N, 3] world mm, got shape {np.shape(points_mm)}")
  if np.ndim(disp) != 4 or np.shape(disp)[-1] != 3:
    raise ValueError(f"disp must be [X, Y, Z, 3] voxels, got shape {np.shape(disp)}")
  _grid.check_affine(affine)
  disp = jnp.asarray(disp)
  v = _grid.world_to_voxel(jnp.asarray(points_mm, disp.dtype), affine)
  moved = v + _warp.sample(disp, v, padding="border", implementation=implementation)
  return _grid.voxel_to_world(moved, affine)


def voxel_points_to_world(points_vox, affine) -> np.ndarray:
  """``[N, 3]`` voxel indices (e.g. Learn2Reg keypoint CSVs) -> ``[N, 3]`` world mm (numpy)."""
  affine = np.asarray(affine, np.float64)
  return np.asarray(points_vox, np.float64) @ affine[:3, :3].T + affine[:3, 3]
