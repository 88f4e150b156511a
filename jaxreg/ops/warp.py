"""Differentiable resampling of volumes: the pull-back warp.

``warp(image, u)(x) = image(x + u(x))`` for every voxel ``x`` of the output
grid, with ``u`` in voxels (array axis order ``[X, Y, Z, 3]``).

Two implementations give the same values and gradients to float32 rounding, chosen
by the ``implementation`` argument (as :func:`jax.nn.dot_product_attention` does):

* ``"xla"``: the pure-JAX gather (:mod:`jaxreg.ops.trilinear`); runs on every backend,
  shards over a device mesh, any float dtype.
* ``"ffi"``: a multithreaded C++ kernel on XLA:CPU (:mod:`jaxreg.ops.warp_kernel`),
  for float32 trilinear sampling and nearest-neighbour sampling of integer label maps
  on one CPU device; other calls take the XLA code. It must have been loaded in this
  process (:func:`jaxreg.load_kernel`, which compiles it once): otherwise
  :class:`~jaxreg.ops.warp_kernel.KernelError`.
* ``None`` (default): ``"ffi"`` where it applies and has been loaded, else ``"xla"``.
  Importing jaxreg or calling a warp never compiles C++: a process that never calls
  :func:`jaxreg.load_kernel` runs XLA everywhere. The register pipeline and the CLI load
  the kernel.

The choice is made while tracing, from these arguments and the backend alone, so a
``jax.jit`` of your own keeps the path it traced; pass ``implementation`` explicitly to
pin it. ``threads`` caps the kernel's threads (None: XLA's intra-op pool size).

Border rule (``padding``):

* ``"constant"``: every corner outside the volume contributes ``cval``
  (per-corner padding). Equals ``scipy.ndimage.map_coordinates(...,
  mode="grid-constant")``, ``jax.scipy.ndimage.map_coordinates(...,
  mode="constant")`` and torch ``grid_sample(padding_mode="zeros",
  align_corners=True)`` for ``cval=0``.
* ``"border"``: corner indices are clamped to the volume, i.e. the edge value
  extends outwards. Equals scipy ``mode="nearest"`` and torch
  ``padding_mode="border"``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg.ops import sharding as _mesh
from jaxreg.ops import trilinear as _tri
from jaxreg.ops import warp_kernel as _ffi

__all__ = ["sample", "warp", "warp_batch", "PADDINGS", "IMPLEMENTATIONS"]

PADDINGS = ("constant", "border")
IMPLEMENTATIONS = _ffi.IMPLEMENTATIONS


def _check_options(order: int, padding: str) -> None:
  if order not in (0, 1):
    raise ValueError(f"order must be 0 (nearest) or 1 (trilinear), got {order!r}")
  if padding not in PADDINGS:
    raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")


def _check_image(image, name: str = "image") -> None:
  if np.ndim(image) not in (3, 4):
    raise ValueError(
        f"{name} must be [X, Y, Z] or [X, Y, Z, C], got shape {np.shape(image)}")


def sample(image: jax.Array, coords: jax.Array, *, order: int = 1,
           padding: str = "constant", cval: float = 0.0,
           implementation: str | None = None, threads: int | None = None) -> jax.Array:
  """Sample a volume at arbitrary voxel coordinates.

  Args:
    image: ``[X, Y, Z]`` or ``[X, Y, Z, C]`` volume.
    coords: ``[..., 3]`` voxel coordinates into ``image`` (array axis order).
    order: 1 for trilinear (differentiable in ``image`` and ``coords``), 0 for
      nearest neighbour (rounding half up; for label maps; keeps ``image``'s
      dtype).
    padding: ``"constant"`` or ``"border"`` (see the module docstring).
    cval: value outside the volume for ``padding="constant"`` (a Python float).
    implementation: ``None``, ``"xla"`` or ``"ffi"`` (see the module docstring).
    threads: the C++ kernel's thread cap (None: the pool's size).

  Returns:
    ``[...]`` or ``[..., C]`` samples. Trilinear output is floating point.

  Raises:
    ValueError: bad rank, trailing size of ``coords``, ``order``, ``padding`` or
      ``implementation``.
    KernelError: ``implementation="ffi"`` and the kernel is not loaded.
  """
  _check_options(order, padding)
  _check_image(image)
  if np.ndim(coords) < 1 or np.shape(coords)[-1] != 3:
    raise ValueError(f"coords must be [..., 3] voxel coordinates, got shape {np.shape(coords)}")
  coords = jnp.asarray(coords)
  out = _kernel(image, coords, order, padding, cval, False, implementation, threads)
  if out is not None:
    return out
  return _tri.sample_xyz(image, [coords[..., i] for i in range(3)], order, padding, cval)


def _kernel(image, points, order, padding, cval, on_grid: bool, implementation, threads):
  """The C++ kernel's result (:mod:`jaxreg.ops.warp_kernel`), or None where it does
  not run: it takes float32 trilinear sampling, and nearest on integer/bool label
  maps, with float32 ``points [..., 3]`` (coordinates, or with ``on_grid``
  displacements on the grid ``points.shape[:3]``)."""
  image = jnp.asarray(image)
  if order == 1:
    if not _ffi.runs(implementation, image, points):
      return None
  elif jnp.issubdtype(image.dtype, jnp.floating) or not _ffi.runs(implementation, points):
    return None
  vol = image if image.ndim == 4 else image[..., None]
  if order == 0:
    out = _ffi.nearest(vol, points, padding, cval, on_grid=on_grid, threads=threads)
  elif on_grid:
    out = _ffi.warp(vol, points, padding, cval, threads=threads)
  else:
    out = _ffi.sample(vol, points, padding, cval, threads=threads)
  return out if image.ndim == 4 else out[..., 0]


def warp(image: jax.Array, disp: jax.Array, *, order: int = 1,
         padding: str = "constant", cval: float = 0.0,
         implementation: str | None = None, threads: int | None = None) -> jax.Array:
  """Pull-back warp: ``out(x) = image(x + disp(x))``.

  Args:
    image: ``[X, Y, Z]`` or ``[X, Y, Z, C]`` volume (the moving image).
    disp: ``[X, Y, Z, 3]`` displacement in **voxels** of the output (fixed)
      grid, component ``i`` along array axis ``i``. ``image`` must lie on the
      same grid.
    order: 1 trilinear, 0 nearest neighbour (label maps; dtype kept).
    padding: ``"constant"`` (``cval`` outside, per corner) or ``"border"``
      (edge value extends outwards).
    cval: value outside the volume for ``padding="constant"``.
    implementation: ``None``, ``"xla"`` or ``"ffi"`` (see the module docstring).
    threads: the C++ kernel's thread cap (None: the pool's size).

  Returns:
    Warped volume, same shape as ``image``.

  Raises:
    ValueError: wrong ranks, ``disp``'s grid differs from ``image``'s, or a bad
      ``order``, ``padding`` or ``implementation``.
    KernelError: ``implementation="ffi"`` and the kernel is not loaded.

  Examples:
    >>> import jax.numpy as jnp
    >>> img = jnp.arange(4.0)[:, None, None] * jnp.ones((4, 2, 2))
    >>> shift = jnp.zeros((4, 2, 2, 3)).at[..., 0].set(1.0)
    >>> warp(img, shift, padding="border")[:, 0, 0].tolist()
    [1.0, 2.0, 3.0, 3.0]
  """
  _check_image(image)
  if np.ndim(disp) != 4 or np.shape(disp)[-1] != 3:
    raise ValueError(f"disp must be [X, Y, Z, 3] (voxels), got shape {np.shape(disp)}")
  if tuple(np.shape(disp)[:3]) != tuple(np.shape(image)[:3]):
    raise ValueError(
        f"disp grid {tuple(np.shape(disp)[:3])} differs from image grid "
        f"{tuple(np.shape(image)[:3])}; resample one onto the other first")
  disp = jnp.asarray(disp)
  _check_options(order, padding)
  if not jnp.issubdtype(disp.dtype, jnp.floating):
    disp = disp.astype(jnp.float32)
  out = _kernel(image, disp, order, padding, cval, True, implementation, threads)
  if out is not None:
    return out
  shape = disp.shape[:3]
  axes = [jnp.arange(n, dtype=disp.dtype) for n in shape]
  grid = jnp.meshgrid(*axes, indexing="ij")
  # On a spatially sharded mesh each device computes its own slab of the output from
  # the whole moving image (a no-op otherwise; jaxreg.ops.sharding).
  xyz = [_mesh.spatial(g + disp[..., i], batched=False) for i, g in enumerate(grid)]
  return _mesh.spatial(_tri.sample_xyz(image, xyz, order, padding, cval), batched=False)


def warp_batch(image: jax.Array, disp: jax.Array, *, order: int = 1,
               padding: str = "constant", cval: float = 0.0,
               implementation: str | None = None, threads: int | None = None) -> jax.Array:
  """:func:`warp` over a leading batch axis.

  Args:
    image: ``[B, X, Y, Z]`` or ``[B, X, Y, Z, C]``.
    disp: ``[B, X, Y, Z, 3]`` displacements in voxels.
    order: as in :func:`warp`.
    padding: as in :func:`warp`.
    cval: as in :func:`warp`.
    implementation: as in :func:`warp`.
    threads: as in :func:`warp`.

  Returns:
    ``[B, ...]`` warped volumes, same shape as ``image``.
  """
  if np.ndim(image) not in (4, 5) or np.ndim(disp) != 5:
    raise ValueError(
        f"warp_batch needs image [B, X, Y, Z(, C)] and disp [B, X, Y, Z, 3], got "
        f"image {np.shape(image)} and disp {np.shape(disp)}")
  if np.shape(image)[0] != np.shape(disp)[0]:
    raise ValueError(
        f"batch sizes differ: image {np.shape(image)} vs disp {np.shape(disp)}")
  fn = functools.partial(warp, order=order, padding=padding, cval=cval,
                         implementation=implementation, threads=threads)
  return _mesh.vmap(fn, np.shape(image)[0])(image, disp)
