"""Affine (12 parameters) and rigid (6) registration in pure JAX, in world millimetres.

The transform maps **fixed world points to moving world points** (RAS+ mm), like
every displacement in jaxreg (fixed ``p`` <-> moving ``M p``)::

    M p = c + t + R(rx, ry, rz) S(sx, sy, sz) H(hxy, hxz, hyz) (p - c)

about the centre ``c`` (the fixed image's centre of mass): translation ``t``
(mm), rotation ``R = Rz Ry Rx`` (radians), scaling ``S = diag(exp(s))`` and
shear ``H`` (unit upper triangular). A rigid transform keeps ``t`` and ``R``.
The optimiser works on parameters divided by :data:`PARAM_SCALES` (10 mm,
0.1 rad, 0.1, 0.1) so one Adam learning rate suits them all.

:func:`align`: both images are windowed and resampled onto RAS grids at each
level of a coarse-to-fine pyramid (default 8 mm then 4 mm), the first level
starts both from the identity and from the difference of the centres of mass of
the body (HU above -500) and keeps the better (``init="auto"``), and at each
level a jitted ``lax.scan`` runs Adam on the similarity (``"ncc"``: negative
global NCC, or ``"mse"``), taken over the fixed voxels with data (inside its
field of view and a mask, not blended with the air beyond its edge) that map
where the moving image has data (a soft mask), so a partial overlap or a crop
is not penalised. As elastix does, the similarity is computed on a
random sample of fixed voxels (at most 32768 by default, the same ones at every step
of a level; a smaller image uses each of its voxels once), so a step costs at most that
whatever the image size.
The learning rate decays on a cosine within each level.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.ndimage as ndi
from nibabel.affines import apply_affine

from jaxreg import io as _io
from jaxreg.io import resample as _preprocess
from jaxreg.ops import grid as _grid
from jaxreg.ops import optim as _optim
from jaxreg.ops import warp as _warp
from jaxreg.pipeline import stages as _stages
from jaxreg.types import Grid, InputError, Volume

__all__ = ["AffineResult", "PARAM_SCALES", "matrix_from_params", "align", "displacement_mm",
           "itk_text", "save_itk", "centre_of_mass", "field_of_view"]

# translation (mm), rotation (rad), log-scale, shear
PARAM_SCALES = np.array([10.0] * 3 + [0.1] * 3 + [0.1] * 3 + [0.1] * 3, np.float32)
MODELS = {"affine": 12, "rigid": 6}
INITS = ("auto", "com", "identity")
TOL = 3e-6  # default early-stopping tolerance on the loss (see register)
SMALL_SAMPLES = 8192  # a level with at most this many fixed voxels with data uses all of them


@dataclasses.dataclass(frozen=True)
class AffineResult:
  """The result of :func:`align`.

  Attributes:
    matrix: ``[4, 4]`` world map (RAS+ mm), fixed point ``p`` -> moving point ``M p``.
    params: ``[12]`` parameters in natural units (t mm, rotation rad, log-scale, shear).
    centre: ``[3]`` the centre ``c`` (mm).
    losses: the loss at every step taken, one array per pyramid level (shorter than
      the level's steps where it stopped early).
    seconds: wall time.
  """
  matrix: np.ndarray
  params: np.ndarray
  centre: np.ndarray
  losses: tuple[np.ndarray, ...]
  seconds: float


def _rotation(xp, rx, ry, rz):
  cx, sx = xp.cos(rx), xp.sin(rx)
  cy, sy = xp.cos(ry), xp.sin(ry)
  cz, sz = xp.cos(rz), xp.sin(rz)
  one, zero = xp.ones_like(rx), xp.zeros_like(rx)
  x = xp.array([[one, zero, zero], [zero, cx, -sx], [zero, sx, cx]])
  y = xp.array([[cy, zero, sy], [zero, one, zero], [-sy, zero, cy]])
  z = xp.array([[cz, -sz, zero], [sz, cz, zero], [zero, zero, one]])
  return z @ y @ x


def _matrix(xp, params, centre):
  """:func:`matrix_from_params` in the array module ``xp`` (jax.numpy or numpy)."""
  t, r, s, h = params[:3], params[3:6], params[6:9], params[9:]
  one, zero = xp.ones_like(h[0]), xp.zeros_like(h[0])
  shear = xp.array([[one, h[0], h[1]], [zero, one, h[2]], [zero, zero, one]])
  lin = _rotation(xp, *r) @ xp.diag(xp.exp(s)) @ shear
  top = xp.concatenate([lin, (centre + t - lin @ centre)[:, None]], axis=1)
  return xp.concatenate([top, xp.asarray([[0.0, 0.0, 0.0, 1.0]], top.dtype)], axis=0)


def matrix_from_params(params: jax.Array, centre: jax.Array) -> jax.Array:
  """``[4, 4]`` world matrix from ``[12]`` natural parameters (see the module docstring).

  Args:
    params: ``(tx, ty, tz [mm], rx, ry, rz [rad], sx, sy, sz [log], hxy, hxz, hyz)``.
    centre: ``[3]`` centre of rotation/scaling (mm).

  Examples:
    >>> import numpy as np
    >>> m = matrix_from_params(np.r_[[1.0, 2.0, 3.0], np.zeros(9)], np.zeros(3))
    >>> np.asarray(m)[:3, 3].tolist()
    [1.0, 2.0, 3.0]
  """
  params = jnp.asarray(params, jnp.float32)
  centre = jnp.asarray(centre, jnp.float32)
  if params.shape != (12,) or centre.shape != (3,):
    raise ValueError(f"params must be [12] and centre [3], got {params.shape}, {centre.shape}")
  return _matrix(jnp, params, centre)


def centre_of_mass(volume: Volume, threshold_hu: float = -500.0,
                   mask: np.ndarray | None = None) -> np.ndarray:
  """World centre (mm) of the voxels above ``threshold_hu`` (the body; inside ``mask`` if
  given), else of the grid."""
  inside = np.asarray(volume.array) > threshold_hu
  mask = inside if mask is None else inside & np.asarray(mask, bool)
  idx = np.argwhere(mask).mean(0) if mask.any() else (np.array(volume.shape) - 1) / 2
  return apply_affine(volume.affine, idx)


def _apply(matrix, xyz):
  """``matrix [4, 4]`` applied to points given as three coordinate arrays, elementwise
  (:func:`jaxreg.ops.grid.linear_map`'s form, without stacking: keeping the coordinates as three
  arrays through the loss makes this stage ~1.5x faster than stacking them, measured)."""
  return [xyz[0] * matrix[k, 0] + xyz[1] * matrix[k, 1] + xyz[2] * matrix[k, 2] + matrix[k, 3]
          for k in range(3)]


def field_of_view(world, volume_shape, world_to_voxel):
  """Soft mask of a volume's field of view at world points (mm) ``[..., 3]`` or three arrays.

  The trilinear sample of an all-ones volume with zero padding, ``prod_k clip(v_k + 1, 0, 1)
  clip(n_k - v_k, 0, 1)`` with ``v = world_to_voxel (world)`` the points in the volume's own
  voxels (array axis order): 1 inside, ramping to 0 over one voxel past its edge. Computed in
  closed form (numpy or jax arrays), with no resampled mask to gather from.
  """
  xyz = world if isinstance(world, (list, tuple)) else [world[..., k] for k in range(3)]
  v = _apply(world_to_voxel, xyz)
  xp = jnp if isinstance(v[0], jax.Array) else np
  w = [xp.clip(v[k] + 1.0, 0.0, 1.0) * xp.clip(volume_shape[k] - v[k], 0.0, 1.0)
       for k in range(3)]
  return w[0] * w[1] * w[2]


def _level(volume: Volume, spacing: float, hu_window, mask: np.ndarray | None = None,
           other: Volume | None = None, longest_first: bool = False):
  """The image windowed to [0, 1] on its RAS grid at ``spacing`` (shape rounded up to a
  shape bucket, :func:`jaxreg.io.resample.bucket_size`, the margin zeros), where it has data on that grid (1 where every trilinear corner lies
  inside its voxel box and ``mask``, else 0: the level voxels at its edge, blended with
  the air outside, do not count), and the grid. Filtered for ``spacing``, or for
  ``other``'s resolution along each axis where that is coarser (a thick-slice scan).
  ``longest_first``: the grid's axes ordered by size (the moving level, which is only
  sampled at world points: permuted sizes then share the stage's program)."""
  grid = _preprocess.model_grid(volume, spacing=spacing, divisor=16, bucket=True)
  if longest_first:
    grid = _preprocess.longest_first(grid)
  lo, hi = hu_window
  to = np.full(3, float(spacing))
  if other is not None:
    to = np.maximum(to, _preprocess.spacing_along(other, volume))
  image = _preprocess.window(
      _preprocess.resample(volume, grid, cval=lo, smooth_to=to, mask=mask), lo, hi)
  valid = _preprocess.data_on(volume, grid, mask) > 0
  # and one level voxel in from its edge: a positive (trilinear) weight then never blends
  # in a level voxel without data
  valid = ndi.binary_erosion(valid, np.ones((3, 3, 3), bool), border_value=0)
  return image.astype(np.float32), valid.astype(np.float32), grid


def _grid_world(grid) -> np.ndarray:
  return apply_affine(grid.affine, np.moveaxis(np.indices(grid.shape), 0, -1)).astype(np.float32)


def _samples(image, inside, world, count: int, seed: int):
  """The fixed level's voxels inside its field of view on which the loss is computed (the
  same ones at every step, as elastix's random sampler with a fixed seed): values, weights,
  world mm. ``count`` random ones without replacement where there are more; otherwise every
  one once, padded with zero-weight entries to :data:`SMALL_SAMPLES` or ``count``, so a
  small image costs less and the stage's programs come in two sizes."""
  flat = np.flatnonzero(inside.reshape(-1) > 0.5)
  if flat.size == 0:
    flat = np.arange(inside.size)
  if flat.size > count:
    # sorted: the gathers then run in memory order (4x faster than random order)
    pick = np.sort(np.random.default_rng(seed).choice(flat, size=count, replace=False))
    weight = inside.reshape(-1)[pick]
  else:
    size = SMALL_SAMPLES if flat.size <= SMALL_SAMPLES else count
    pick = np.concatenate([flat, np.full(size - flat.size, flat[0])])
    weight = np.where(np.arange(size) < flat.size, inside.reshape(-1)[pick], 0.0)
  return image.reshape(-1)[pick], weight.astype(np.float32), world.reshape(-1, 3)[pick]


def _weighted_ncc(a, b, w, eps=1e-8):
  """Normalised cross-correlation with voxel weights ``w`` (``global_ncc`` when ``w = 1``)."""
  total = jnp.sum(w) + eps
  da = a - jnp.sum(w * a) / total
  db = b - jnp.sum(w * b) / total
  return jnp.sum(w * da * db) / jnp.sqrt(jnp.sum(w * da * da) * jnp.sum(w * db * db) + eps)


def _optimise(theta, mask, centre, fixed, fixed_inside, fixed_world, moving, moving_inv,
              tol, patience, steps, lr, similarity, implementation=None):
  """Adam on the similarity; ``moving``: ``[X, Y, Z, 2]`` the level image and where it has
  data (sampled together: a soft mask, 1 inside, ramping to 0 over one level voxel)."""
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.02))
  scales = jnp.asarray(PARAM_SCALES)

  def loss(th):
    m = _matrix(jnp, th * mask * scales, centre)
    q = _apply(m, fixed_world)
    coords = jnp.stack(_apply(moving_inv, q), -1)
    sampled = _warp.sample(moving, coords, padding="constant", cval=0.0,
                           implementation=implementation)
    # compare only where the moving image has data (a soft mask: differentiable at its edge)
    warped, inside = sampled[..., 0], fixed_inside * sampled[..., 1]
    if similarity == "ncc":
      return -_weighted_ncc(fixed, warped, inside)
    return jnp.sum(inside * (fixed - warped) ** 2) / (jnp.sum(inside) + 1e-6)

  # parameters outside ``mask`` get exactly zero gradients (the loss reads th * mask)
  return _optim.minimise_until(loss, theta, tx, steps, tol=tol, patience=patience)


_optimise_stage = _stages.Stage(_optimise, static_argnames=("steps", "similarity",
                                                              "implementation"))


def align(fixed: Volume, moving: Volume, *, model: str = "affine", similarity: str = "ncc",
             levels: Sequence[float] = (8.0, 4.0), steps: Sequence[int] = (200, 100),
             lr: float = 0.05, init: str = "auto",
             hu_window: tuple[float, float] = (-1000.0, 1000.0), samples: int = 32768,
             seed: int = 0, tol: float | None = TOL, patience: int = 20,
             fixed_mask: np.ndarray | None = None, moving_mask: np.ndarray | None = None,
             implementation: str | None = None) -> AffineResult:
  """Affine or rigid registration of ``moving`` to ``fixed`` (CT in HU, any grids).

  Args:
    fixed: image with its affine.
    moving: image with its affine; the two need not overlap at first
      (the centre-of-mass initialisation brings them together).
    model: ``"affine"`` (12 parameters) or ``"rigid"`` (6).
    similarity: ``"ncc"`` (global normalised cross-correlation) or ``"mse"``.
    levels: pyramid voxel sizes (mm), coarse to fine.
    steps: Adam steps per level.
    lr: Adam learning rate on the scaled parameters.
    init: ``"com"`` (translation = difference of body centres of mass), ``"identity"``,
      or ``"auto"``: the first level runs from both and the one with the lower loss goes
      on (the centres of mass of two scans that cover different ranges, a cut field of
      view or a partial overlap, are not the same anatomy).
    hu_window: HU range scaled to [0, 1] before comparing.
    samples: fixed voxels (random, inside its field of view, the same at every
      step of a level) on which the similarity is computed, at most; a level with fewer
      such voxels uses each once (a small image costs less); 0: every voxel.
    seed: of that sampling.
    tol: a level stops once its loss (1 - NCC, or the MSE of [0, 1] images) has not
      dropped by more than ``tol`` for ``patience`` steps; ``tol=None`` runs every step.
    patience: steps without such a drop before a level stops (see ``tol``).
    fixed_mask: ``fixed.shape`` bool, the fixed voxels to compare (None: all).
    moving_mask: ``moving.shape`` bool, where the moving image may be compared (None:
      its whole field of view). Only fixed voxels inside both images' data (and masks)
      count, so a partial overlap or a crop is not penalised.
    implementation: the warp's (``None``, ``"xla"``, ``"ffi"``; see :mod:`jaxreg.ops.warp`).

  Returns:
    :class:`AffineResult`.

  Raises:
    ValueError: unknown ``model``, ``similarity`` or ``init``; ``levels`` and
      ``steps`` of different lengths or non-positive values.
  """
  if model not in MODELS:
    raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
  if similarity not in ("ncc", "mse"):
    raise ValueError(f"similarity must be 'ncc' or 'mse', got {similarity!r}")
  if init not in INITS:
    raise ValueError(f"init must be one of {INITS}, got {init!r}")
  if samples < 0:
    raise ValueError(f"samples must be >= 0, got {samples}")
  if patience < 1 or (tol is not None and not tol >= 0):
    raise ValueError(f"patience must be >= 1 and tol >= 0 (or None), got {patience}, {tol}")
  if len(levels) != len(steps) or not levels or min(levels) <= 0 or min(steps) < 1:
    raise ValueError(f"levels (mm) and steps need equal lengths and positive values, got "
                     f"{tuple(levels)} and {tuple(steps)}")
  t0 = time.time()
  centre = centre_of_mass(fixed, mask=fixed_mask).astype(np.float32)
  starts = []
  if init in ("identity", "auto"):
    starts.append(np.zeros(12, np.float32))
  com = np.zeros(12, np.float32)
  com[:3] = (centre_of_mass(moving, mask=moving_mask) - centre) / PARAM_SCALES[:3]
  if init == "com" or (init == "auto" and np.linalg.norm(com[:3] * PARAM_SCALES[:3]) > 1.0):
    starts.append(com)
  mask = (np.arange(12) < MODELS[model]).astype(np.float32)
  losses = []
  for level, (spacing, n) in enumerate(zip(levels, steps)):
    f, f_inside, fgrid = _level(fixed, float(spacing), hu_window, fixed_mask, moving)
    m, m_inside, mgrid = _level(moving, float(spacing), hu_window, moving_mask, fixed,
                                longest_first=True)
    world = _grid_world(fgrid)
    if samples:
      f, f_inside, world = _samples(f, f_inside, world, int(samples), seed + level)
    runs = []
    for start in starts:  # several only at the first level: the best one goes on
      # numpy arguments: the jitted stage transfers them (jnp.asarray here would compile
      # a small program per shape in every process)
      theta, values, count = _optimise_stage(
          np.asarray(start, np.float32), mask, centre, f, f_inside,
          [np.ascontiguousarray(world[..., k], np.float32) for k in range(3)],
          np.stack([m, m_inside], -1),
          np.linalg.inv(mgrid.affine).astype(np.float32),
          np.float32(-np.inf if tol is None else tol), np.int32(patience), steps=int(n),
          lr=float(lr), similarity=similarity, implementation=implementation)
      values = np.asarray(values)[:int(count)]
      runs.append((float(values[-1]), np.asarray(theta), values))
    _, theta, values = min(runs, key=lambda r: r[0] if np.isfinite(r[0]) else np.inf)
    starts = [theta]
    losses.append(values)
  params = np.asarray(theta, np.float64) * mask * PARAM_SCALES
  matrix = _matrix(np, params, np.asarray(centre, np.float64))  # numpy: no small programs
  if not np.all(np.isfinite(matrix)):
    raise InputError("affine registration diverged (non-finite matrix); check the images")
  return AffineResult(matrix, params, centre, tuple(losses), time.time() - t0)


def displacement_mm(matrix: np.ndarray, grid: Grid) -> np.ndarray:
  """``[*grid.shape, 3]`` world displacement (mm) of the map: ``d(p) = M p - p``."""
  world = apply_affine(grid.affine, np.moveaxis(np.indices(grid.shape), 0, -1))
  return (apply_affine(matrix, world) - world).astype(np.float32)


def itk_text(matrix: np.ndarray) -> str:
  """The map as an ITK transform file (``AffineTransform_double_3_3``, LPS), for
  SimpleITK ``ReadTransform``, ANTs and 3D Slicer: it maps fixed physical points
  to moving ones, as resampling the moving image onto the fixed grid needs."""
  lps = np.eye(4)
  lps[:3, :3] = _grid.LPS
  m = lps @ np.asarray(matrix, np.float64) @ lps
  values = [*m[:3, :3].ravel(), *m[:3, 3]]
  return ("#Insight Transform File V1.0\n#Transform 0\n"
          "Transform: AffineTransform_double_3_3\n"
          f"Parameters: {' '.join(repr(float(v)) for v in values)}\n"
          "FixedParameters: 0 0 0\n")


def save_itk(path: str, matrix: np.ndarray) -> None:
  """Write :func:`itk_text` to ``path`` atomically."""
  with _io.atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(itk_text(matrix))
