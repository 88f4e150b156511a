"""Put a fixed/moving pair on one model grid, and map results back to the fixed image.

The **model grid** is derived from the fixed image: axis-aligned with the world
(RAS+, canonical orientation), isotropic (``spacing`` mm, default 2), centred
on the fixed image's field of view and padded (or cropped, with ``max_shape``)
to a shape divisible by the UNet's stride. Both images are resampled onto it
in one interpolation each (orientation, spacing and field of view at once);
the moving image may differ from the fixed one in all of those. Outside its
field of view an image reads as air.

A field predicted on the model grid (voxels of that grid) is brought back to
the **original fixed grid** with :func:`field_to_world` (world mm, RAS+) and
applied to the original moving image with :func:`resample_moving`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage as ndi

from jaxreg.ops import grid as _grid
from jaxreg.ops import warp as _warp
from jaxreg.types import Grid, InputError, Volume

__all__ = [
    "PreparedPair",
    "bucket_shape",
    "bucket_size",
    "longest_first",
    "model_grid",
    "check_overlap",
    "resample",
    "antialiased",
    "window",
    "prepare_pair",
    "field_to_world",
    "map_field",
    "field_at_points",
    "resample_moving",
    "spacing_along",
    "data_on",
]


def _round_up(n: int, multiple: int) -> int:
  return int(math.ceil(n / multiple) * multiple)


def model_grid(fixed: Grid | Volume, *, spacing: float = 2.0, divisor: int = 16,
               max_shape: tuple[int, int, int] | None = None,
               shape: tuple[int, int, int] | None = None, bucket: bool = False) -> Grid:
  """The RAS-aligned isotropic grid covering the fixed image's field of view.

  Args:
    fixed: the fixed image (or its grid).
    spacing: voxel size of the model grid in mm.
    divisor: every axis of the shape is a multiple of this (the UNet's total stride).
    max_shape: optional upper bound per axis (multiples of ``divisor``); a
      larger field of view is cropped symmetrically about its centre.
    shape: optional exact shape (multiples of ``divisor``): the field of view
      is padded or cropped symmetrically about its centre (to batch pairs).
    bucket: round each axis up to a shape bucket (:func:`bucket_size` of ``divisor``)
      rather than to the next multiple of ``divisor``: pairs of other sizes then share
      compiled programs.

  Returns:
    :class:`Grid` with affine ``diag(spacing) + origin`` (RAS+).
  """
  if isinstance(fixed, Volume):
    fixed = Grid.of(fixed)
  if not spacing > 0:
    raise ValueError(f"spacing must be positive, got {spacing}")
  if divisor < 1:
    raise ValueError(f"divisor must be >= 1, got {divisor}")
  exact = shape
  lo, hi = fixed.world_bounds()
  rounded = functools.partial(bucket_size if bucket else _round_up, multiple=divisor)
  shape = [rounded(int(math.ceil((h - l) / spacing - 1e-6)) + 1) for l, h in zip(lo, hi)]
  if max_shape is not None:
    if len(max_shape) != 3 or any(m % divisor for m in max_shape):
      raise ValueError(f"max_shape must be 3 multiples of divisor={divisor}, got {max_shape}")
    shape = [min(s, m) for s, m in zip(shape, max_shape)]
  if exact is not None:
    if len(exact) != 3 or any(int(m) % divisor or int(m) < 1 for m in exact):
      raise ValueError(f"shape must be 3 positive multiples of divisor={divisor}, got {exact}")
    shape = [int(m) for m in exact]
  centre = (lo + hi) / 2
  affine = np.diag([spacing, spacing, spacing, 1.0])
  affine[:3, 3] = centre - (np.array(shape) - 1) / 2 * spacing
  return Grid(tuple(shape), affine)


def longest_first(grid: Grid) -> Grid:
  """The same voxels with the grid's axes reordered so that its shape does not increase
  (stable for equal sizes): the voxel ``(i, j, k)`` of the result is the voxel of ``grid``
  whose indices are permuted back; world positions are unchanged.

  For computations that treat the three axes alike (a warp sampled by world coordinates,
  an isotropic regulariser, a cubic window), so pairs of permuted sizes share one
  compiled program.
  """
  order = np.argsort([-n for n in grid.shape], kind="stable")
  affine = np.array(grid.affine, np.float64)
  affine[:, :3] = affine[:, :3][:, order]
  return Grid(tuple(int(grid.shape[a]) for a in order), affine)


def _voxel_map(source_affine: np.ndarray, target: Grid) -> np.ndarray:
  """4x4 map from target voxel indices to source voxel indices."""
  return np.linalg.inv(source_affine) @ target.affine


BUCKET = 16
_SMALL = 64  # up to this many voxels an axis, buckets double (16, 32, 64)


def bucket_size(n: int, multiple: int = BUCKET) -> int:
  """``n`` rounded up to a shape bucket: ``multiple`` times a power of two up to 64 voxels
  (16, 32, 64 for 16), then the next multiple of ``multiple``.

  Small axes get few buckets (padding them costs little and each new shape costs a
  compilation); large ones stay close to their size (padding costs in proportion).
  """
  n, multiple = int(n), int(multiple)
  size = multiple
  while size < n and size < _SMALL:
    size *= 2
  return size if size >= n else _round_up(n, multiple)


def bucket_shape(shape, multiple: int = BUCKET) -> tuple[int, int, int]:
  """``shape`` rounded up to shape buckets per axis (:func:`bucket_size`).

  Resampling runs on arrays padded to such buckets (and crops the result), so
  pairs of similar size reuse one compiled function instead of compiling a
  new one for every shape.
  """
  return tuple(bucket_size(n, multiple) for n in shape)


def _pad_to(array, shape, padding: str, cval: float) -> np.ndarray:
  """Pad at the high end of each axis to ``shape``: with ``cval`` (``"constant"``), or the
  edge (``"border"``); sampling the result equals sampling the original under that rule."""
  array = np.asarray(array)
  pad = [(0, t - n) for n, t in zip(array.shape[:3], shape)] + [(0, 0)] * (array.ndim - 3)
  if not any(p[1] for p in pad):
    return array
  if padding == "constant":
    return np.pad(array, pad, mode="constant", constant_values=np.asarray(cval, array.dtype))
  return np.pad(array, pad, mode="edge")


@functools.partial(jax.jit, static_argnames=("shape", "order", "padding", "cval"))
def _sample_affine(array, matrix, disp, lin, *, shape, order, padding, cval):
  """Samples of ``array`` at ``matrix @ x (+ lin @ disp(x))`` for the voxels ``x`` of ``shape``."""
  coords = _grid.linear_map(_grid.identity_grid(shape), matrix[:3, :3], matrix[:3, 3])
  if disp is not None:
    coords = coords + _grid.linear_map(disp, lin)
  return _warp.sample(array, coords, order=order, padding=padding, cval=cval)


def _sample_bucketed(array, matrix, target_shape, *, order: int, padding: str, cval: float,
                     disp=None, lin=None) -> np.ndarray:
  """:func:`_sample_affine` on bucket-padded arrays, cropped to ``target_shape``."""
  out_shape = bucket_shape(target_shape)
  shift = 0.0
  if padding == "constant" and order == 1 and cval != 0 and np.isfinite(cval):
    # Sample (array - cval) with zeros outside, then add cval back: a sample with no corner
    # inside is exactly cval (interpolating padded cval values would round, e.g. -999.99994).
    shift = float(cval)
    array = np.asarray(array, np.float32) - np.float32(shift)
    cval = 0.0
  array = _pad_to(array, bucket_shape(np.shape(array)[:3]), padding, cval)
  if disp is not None:
    disp = _pad_to(np.asarray(disp, np.float32), out_shape, "border", 0.0)
    lin = np.asarray(lin, np.float32)
  # numpy arguments: jit transfers them (jnp.asarray outside a trace compiles a small
  # program per shape and dtype, each a few ms of a process)
  out = _sample_affine(array, np.asarray(matrix, np.float32), disp, lin,
                       shape=out_shape, order=order, padding=padding, cval=float(cval))
  crop = tuple(slice(0, n) for n in target_shape)
  out = np.asarray(out)[crop]
  return out + np.float32(shift) if shift else out


ENGINES = ("jax", "numpy")


def _integer_map(matrix: np.ndarray, tol: float = 1e-5):
  """``(axes, signs, offsets)`` when ``matrix`` (target voxel -> source voxel) only permutes
  and flips axes and shifts them by whole voxels (e.g. an image onto a model grid of its own
  spacing and orientation), else None."""
  lin, t = matrix[:3, :3], matrix[:3, 3]
  rounded = np.round(lin)
  if np.abs(lin - rounded).max() > tol or np.abs(t - np.round(t)).max() > tol:
    return None
  if not np.array_equal(np.abs(rounded).sum(0), np.ones(3)) or \
     not np.array_equal(np.abs(rounded).sum(1), np.ones(3)):
    return None
  axes = np.abs(rounded).argmax(0)  # target axis i reads source axis axes[i]
  return axes, rounded[axes, np.arange(3)].astype(int), np.round(t[axes]).astype(int)


def _take_integer(array: np.ndarray, mapping, target_shape, cval) -> np.ndarray:
  """Samples at whole-voxel positions: indexing, ``cval`` outside (exact for any order)."""
  axes, signs, offsets = mapping
  index, inside = [], np.ones(target_shape, bool)
  for i, n in enumerate(target_shape):
    src = signs[i] * np.arange(n) + offsets[i]
    ok = (src >= 0) & (src < array.shape[axes[i]])
    shape = [1, 1, 1]
    shape[i] = n
    index.append(np.clip(src, 0, array.shape[axes[i]] - 1).reshape(shape))
    inside &= ok.reshape(shape)
  out = np.transpose(array, axes)[tuple(index)]
  return np.where(inside, out, np.asarray(cval, out.dtype)) if not inside.all() else out


def _sample_numpy(array, matrix, target_shape, *, order: int, cval: float) -> np.ndarray:
  """:func:`_sample_bucketed`'s samples (``padding="constant"``) by numpy and scipy: the
  same rule (trilinear with ``cval`` at each corner outside, or nearest rounding half up),
  in float64 coordinates, in this process only: no JAX (what the training data workers
  run). Whole-voxel maps are indexed; axis-aligned ones use scipy's separable path."""
  array = np.asarray(array)
  if order == 1:
    array = array.astype(np.float32)
  matrix = np.asarray(matrix, np.float64)
  shape = tuple(int(n) for n in target_shape)
  mapping = _integer_map(matrix)
  if mapping is not None:
    return _take_integer(array, mapping, shape, cval)
  shift = 0.0
  if order == 1 and cval != 0 and np.isfinite(cval):  # as _sample_bucketed: exactly cval outside
    shift, cval = float(cval), 0.0
    array = array - np.float32(shift)
  lin = matrix[:3, :3]
  if np.count_nonzero(lin - np.diag(np.diag(lin))) == 0:
    lin = np.diag(lin)  # scipy's separable zoom-and-shift: about 1.3x (linear), 3x (nearest)
  out = ndi.affine_transform(array, lin, offset=matrix[:3, 3], output_shape=shape, order=order,
                             mode="grid-constant", cval=cval, prefilter=False)
  return out + np.float32(shift) if shift else out


def antialiased(array: np.ndarray, source_spacing, target_spacing,
                mask: np.ndarray | None = None) -> np.ndarray:
  """Gaussian pre-filter of ``array`` (spacing ``source_spacing`` mm per axis) before
  sampling it at ``target_spacing`` mm: sigma = 0.5 * (ratio - 1) source voxels along each
  axis that is downsampled (ratio > 1); ``array`` itself where none is.

  ``mask``: ``array.shape`` bool, the voxels with data: the filter then averages only
  those (normalised convolution, ``G(a m) / G(m)`` inside the mask, ``array`` outside),
  so values outside a user's mask never reach a voxel inside it.
  """
  ratio = np.asarray(target_spacing) / np.asarray(source_spacing)
  sigma = np.where(ratio > 1, 0.5 * (ratio - 1), 0.0)
  if not np.any(sigma > 0.1):
    return array
  if mask is None:
    return ndi.gaussian_filter(array.astype(np.float32), sigma, mode="nearest")
  mask = np.asarray(mask, bool)
  weights = mask.astype(np.float32)
  total = ndi.gaussian_filter(weights, sigma, mode="nearest")
  summed = ndi.gaussian_filter(np.where(mask, array, 0).astype(np.float32), sigma, mode="nearest")
  return np.where(mask, summed / np.maximum(total, 1e-12), array).astype(np.float32)


def spacing_along(volume: Volume | Grid, axes_of: Volume | Grid) -> np.ndarray:
  """``[3]`` mm: the extent of ``volume``'s voxels along each array axis of ``axes_of``
  (``sqrt(sum_k (e . d_k)^2 s_k^2)`` for the unit axis ``e`` and ``volume``'s unit axes
  ``d_k`` and spacings ``s_k``) -- its resolution seen along another image's axes: a
  5 mm slice thickness along the axis of another scan that runs cranio-caudally."""
  lin = np.asarray(volume.affine, np.float64)[:3, :3]
  spacing = np.linalg.norm(lin, axis=0)
  dirs = lin / spacing
  other = np.asarray(axes_of.affine, np.float64)[:3, :3]
  axes = other / np.linalg.norm(other, axis=0)
  return np.sqrt(((axes.T @ dirs) ** 2) @ (spacing ** 2))


def resample(volume: Volume, target: Grid, *, order: int = 1, cval: float = 0.0,
             antialias: bool = True, smooth_to=None, mask: np.ndarray | None = None,
             engine: str = "jax") -> np.ndarray:
  """Resample a volume onto another grid through world coordinates.

  Args:
    volume: source image and affine.
    target: grid to sample on.
    order: 1 trilinear (images), 0 nearest neighbour (labels; dtype kept).
    cval: value outside the source's field of view (per-corner, see
      :mod:`jaxreg.ops.warp`).
    antialias: Gaussian pre-filter along axes that are downsampled (order 1 only).
    smooth_to: ``[3]`` mm per axis of ``volume``: the resolution to pre-filter it to
      (:func:`antialiased`) instead of ``target``'s spacing, e.g. a coarser image's
      (:func:`spacing_along`) so that both are compared at the same resolution.
    mask: ``volume.shape`` bool: the pre-filter averages only these voxels (see
      :func:`antialiased`); the samples are not masked.
    engine: ``"jax"`` (a compiled XLA program: fast for large volumes, many calls) or
      ``"numpy"`` (scipy in the calling thread, no JAX: what data worker processes use);
      the same samples to float32 rounding.

  Returns:
    ``target.shape`` numpy array.

  Raises:
    ValueError: an unknown ``engine``.
  """
  if engine not in ENGINES:
    raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
  array = volume.array
  if order == 1 and antialias:
    to = Grid(target.shape, target.affine).spacing if smooth_to is None else smooth_to
    array = antialiased(array, volume.spacing, to, mask)
  if engine == "numpy":
    return _sample_numpy(array, _voxel_map(volume.affine, target), target.shape, order=order,
                         cval=cval)
  return _sample_bucketed(array, _voxel_map(volume.affine, target), target.shape, order=order,
                          padding="constant", cval=cval)


def data_on(volume: Volume | Grid, target: Grid, mask: np.ndarray | None = None) -> np.ndarray:
  """``target.shape`` float32: 1 where a voxel of ``target`` has data in ``volume`` -- every
  trilinear corner of its sample inside ``volume``'s voxel box (and inside ``mask``, bool on
  ``volume``'s grid) -- else 0: a sample there is never blended with the outside."""
  inside = np.ones(volume.shape, np.float32) if mask is None else np.asarray(mask, np.float32)
  sampled = resample(Volume(inside, volume.affine), target, antialias=False)
  return (sampled > 0.999).astype(np.float32)


def window(hu, lo: float = -1000.0, hi: float = 1000.0):
  """Clip Hounsfield units to ``[lo, hi]`` and scale linearly to ``[0, 1]``."""
  if not hi > lo:
    raise ValueError(f"window needs hi > lo, got ({lo}, {hi})")
  return (np.clip(hu, lo, hi) - lo) / (hi - lo)


@dataclasses.dataclass(frozen=True)
class PreparedPair:
  """A fixed/moving pair on the model grid, and the grids to map results back.

  Attributes:
    fixed: ``grid.shape`` float32 intensities in ``[0, 1]``.
    moving: ``grid.shape`` float32 intensities in ``[0, 1]``.
    fixed_labels: ``grid.shape`` int32 label map, or None.
    moving_labels: ``grid.shape`` int32 label map, or None.
    grid: the model grid.
    fixed_grid: the original fixed image's grid (where outputs are written).
  """
  fixed: np.ndarray
  moving: np.ndarray
  fixed_labels: np.ndarray | None
  moving_labels: np.ndarray | None
  grid: Grid
  fixed_grid: Grid


def check_overlap(fixed: Grid, moving: Grid, names: tuple[str, str] = ("fixed", "moving")
                  ) -> None:
  """Raise :class:`InputError` unless the world bounding boxes of two grids intersect.

  Args:
    fixed: one grid.
    moving: the other grid.
    names: ``(fixed, moving)`` names for the message (e.g. file names).
  """
  flo, fhi = fixed.world_bounds()
  mlo, mhi = moving.world_bounds()
  if not (np.all(mlo <= fhi) and np.all(flo <= mhi)):
    raise InputError(f"{names[1]}: no overlap with {names[0]} in world coordinates "
                     "(check the affines / that both are the same patient and frame)")


def prepare_pair(fixed: Volume, moving: Volume, fixed_labels: Volume | None = None,
                 moving_labels: Volume | None = None, *, spacing: float = 2.0,
                 divisor: int = 16, max_shape=None, shape=None,
                 hu_window: tuple[float, float] = (-1000.0, 1000.0),
                 names: tuple[str, str] = ("fixed", "moving"),
                 fixed_mask: np.ndarray | None = None,
                 moving_mask: np.ndarray | None = None, bucket: bool = False,
                 engine: str = "jax") -> PreparedPair:
  """Resample a CT pair (and labels) onto the fixed image's model grid.

  Args:
    fixed: CT volume in HU with its own affine (any orientation, spacing, shape and
      field of view).
    moving: CT volume in HU with its own affine (any orientation, spacing, shape and
      field of view).
    fixed_labels: optional label map on the fixed image's grid.
    moving_labels: optional label map on the moving image's grid.
    spacing: model grid, see :func:`model_grid`.
    divisor: model grid, see :func:`model_grid`.
    max_shape: model grid, see :func:`model_grid`.
    shape: model grid, see :func:`model_grid`.
    bucket: model grid, see :func:`model_grid`.
    hu_window: HU clipping range, scaled to ``[0, 1]``; outside its field of
      view an image is ``hu_window[0]`` (air), i.e. 0.
    names: how to name the two images in error messages (e.g. file names).
    fixed_mask: ``fixed.shape`` bool, its voxels with data: the antialiasing filter
      averages only these (None: all).
    moving_mask: the same for ``moving``.
    engine: how to resample, see :func:`resample` (``"numpy"``: no JAX).

  Returns:
    :class:`PreparedPair`.

  Raises:
    InputError: the moving image does not overlap the fixed one.
  """
  grid = model_grid(fixed, spacing=spacing, divisor=divisor, max_shape=max_shape, shape=shape,
                    bucket=bucket)
  check_overlap(grid, Grid.of(moving), names)
  lo, hi = hu_window
  images = [window(resample(v, grid, cval=lo, mask=m, engine=engine), lo, hi).astype(np.float32)
            for v, m in ((fixed, fixed_mask), (moving, moving_mask))]
  labels = [None if v is None else resample(v, grid, order=0, engine=engine).astype(np.int32)
            for v in (fixed_labels, moving_labels)]
  return PreparedPair(images[0], images[1], labels[0], labels[1], grid, Grid.of(fixed))


@functools.partial(jax.jit, static_argnames=("shape",))
def _sample_field(disp, to_source, out_lin, out_affine, *, shape):
  """``out_lin @ disp(to_source @ x) + out_affine @ [x, 1]`` at the voxels ``x`` of ``shape``
  (``disp`` trilinear, its edge repeated outside), one fused pass in float32."""
  x = _grid.identity_grid(shape)
  coords = _grid.linear_map(x, to_source[:3, :3], to_source[:3, 3])
  u = _warp.sample(disp, coords, order=1, padding="border")
  return _grid.linear_map(u, out_lin) + _grid.linear_map(x, out_affine[:3, :3], out_affine[:3, 3])


def map_field(disp: np.ndarray, grid: Grid, target: Grid, out_lin: np.ndarray,
              out_affine: np.ndarray | None = None) -> np.ndarray:
  """``[*target.shape, 3]`` float32: ``out_lin @ u(y(x)) + out_affine @ [x, 1]`` at target voxels x.

  ``u`` is ``disp`` (``[*grid.shape, 3]``, any units) read trilinearly at the
  point ``y(x)`` of ``grid`` that target voxel ``x`` covers (edge repeated), on
  bucket-padded shapes (one compilation for pairs of similar size). The
  building block of :func:`field_to_world` and of moving fields between grids.
  """
  if tuple(np.shape(disp)) != tuple(grid.shape) + (3,):
    raise ValueError(f"disp must be {tuple(grid.shape) + (3,)}, got {np.shape(disp)}")
  out_affine = np.zeros((4, 4)) if out_affine is None else np.asarray(out_affine)
  padded = _pad_to(np.asarray(disp, np.float32), bucket_shape(grid.shape), "border", 0.0)
  f32 = lambda a: np.asarray(a, np.float32)
  out = _sample_field(padded, f32(_voxel_map(grid.affine, target)), f32(out_lin),
                      f32(out_affine), shape=bucket_shape(target.shape))
  return np.asarray(out)[tuple(slice(0, n) for n in target.shape)]


def field_to_world(disp_model: jax.Array, grid: Grid, target: Grid, *,
                   then: np.ndarray | None = None) -> np.ndarray:
  """Express a model-grid displacement on another grid, in world millimetres.

  Args:
    disp_model: ``[*grid.shape, 3]`` displacement in voxels of the model grid
      (pull-back: fixed point ``x`` reads the moving image at ``x + u(x)``).
    grid: the model grid.
    target: the grid to express it on (normally the original fixed grid).
    then: optional ``[4, 4]`` world map ``M`` (mm) applied after the field: the
      result is then the displacement of ``p -> M (p + d(p))`` (e.g. the affine
      stage's map after the deformable field).

  Returns:
    ``[*target.shape, 3]`` float32 displacement vectors in world mm (RAS+):
    the fixed point ``p`` corresponds to the moving point ``p + d(p)`` (or
    ``M (p + d(p))``). Outside the model grid the edge displacement is repeated.
  """
  if tuple(np.shape(disp_model)) != tuple(grid.shape) + (3,):
    raise ValueError(f"disp_model must be {tuple(grid.shape) + (3,)}, got {np.shape(disp_model)}")
  if then is None:
    return map_field(disp_model, grid, target, grid.affine[:3, :3])
  # M (A_t x + t + A_g u) - (A_t x + t) = M_lin A_g u + (M_lin - I) A_t [x, 1] + M_t
  then = np.asarray(then, np.float64)
  less = then[:3, :3] - np.eye(3)
  out_affine = np.zeros((4, 4))
  out_affine[:3] = less @ target.affine[:3]
  out_affine[:3, 3] += then[:3, 3]
  return map_field(disp_model, grid, target, then[:3, :3] @ grid.affine[:3, :3], out_affine)


def field_at_points(disp_model: jax.Array, grid: Grid, points_mm) -> np.ndarray:
  """A model-grid displacement (voxels) read at world points: ``[..., 3]`` mm -> ``[..., 3]`` mm.

  Trilinear, with the edge displacement repeated outside the model grid (as
  :func:`field_to_world`, which is this at the voxel centres of a grid).
  """
  if tuple(np.shape(disp_model)) != tuple(grid.shape) + (3,):
    raise ValueError(f"disp_model must be {tuple(grid.shape) + (3,)}, got {np.shape(disp_model)}")
  coords = _grid.world_to_voxel(jnp.asarray(points_mm, jnp.float32), grid.affine)
  u = _warp.sample(jnp.asarray(disp_model), coords, order=1, padding="border")
  return np.asarray(_grid.disp_voxel_to_mm(u, grid.affine), dtype=np.float32)


def resample_moving(moving: Volume, disp_mm: np.ndarray, target: Grid, *, order: int = 1,
                    cval: float = 0.0) -> np.ndarray:
  """Warp the original moving image onto ``target`` with a world-space field.

  ``out(x) = moving(A_m^-1 (p + d(p)))`` with ``p = A_t x``: one interpolation
  from the moving image's own grid, whatever its orientation and spacing.

  Args:
    moving: moving image (or labels, with ``order=0``) and its affine.
    disp_mm: ``[*target.shape, 3]`` displacement in world mm (RAS+), e.g. from
      :func:`field_to_world`.
    target: output grid (normally the original fixed grid).
    order: 1 trilinear, 0 nearest neighbour.
    cval: value outside the moving image.

  Returns:
    ``target.shape`` numpy array.
  """
  if tuple(np.shape(disp_mm)) != tuple(target.shape) + (3,):
    raise ValueError(f"disp_mm must be {tuple(target.shape) + (3,)}, got {np.shape(disp_mm)}")
  inv = np.linalg.inv(moving.affine)
  # moving voxel of target voxel x: inv (A_t x + d(x)) = (inv A_t) x + inv[:3, :3] d(x)
  return _sample_bucketed(moving.array, inv @ target.affine, target.shape, order=order,
                          padding="constant", cval=cval, disp=disp_mm, lin=inv[:3, :3])
