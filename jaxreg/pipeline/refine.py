"""Multi-resolution instance optimisation of a deformable field, up to the image's resolution.

After the network (whose grid is coarse, 8 mm for the shipped model) the field
is refined on one pair in a pyramid of RAS-aligned isotropic grids covering
the fixed image (:func:`level_grids`; default: twice the finest spacing, then
the finest, which is the fixed image's spacing, or 2 mm when it is finer).
At each level:

* the fixed image is resampled onto the level grid, which sits on the fixed
  voxel lattice (:func:`on_lattice`: at the fixed spacing its voxels are copied,
  not interpolated); the moving image stays on its own grid (Gaussian-filtered
  for the level's spacing) and is sampled once, at the affine stage's map of
  ``x + u(x)`` -- resampling it onto the level grid first and warping that (two
  trilinear interpolations) measured 0.2-0.4 mm worse in TRE. Both HU windowed
  to [0, 1]; the field is the deformable residual after the affine stage;
* the field so far (``base``, in voxels of the level) is kept, and an
  increment on a **control grid** (every 2nd voxel of the level, linearly
  upsampled, :func:`upsample2`; ``control=1``: a dense increment) is
  optimised with Adam in one jitted ``lax.scan``: ``u = base + upsample2(smooth3(c))``,
  where :func:`smooth3` is ``smooth`` passes of a 3³ box mean (ConvexAdam's
  smoothing parametrisation: the optimiser sees only smooth fields, so the
  similarity's gradient is spread over a neighbourhood instead of a tent per
  control point);
* the loss is ``similarity(fixed, warp(moving, u)) + reg_weight * regulariser(u)``,
  the similarity averaged over the fixed image's body (HU above -500, grown by
  two voxels) when ``mask=True``:

  - ``"lncc"``: negative squared local NCC (``window``³ boxes) -- robust to
    smooth intensity differences;
  - ``"mind"``: SSD of MIND-SSC descriptors (:func:`jaxreg.ops.losses.mind_ssc`,
    ``mind_radius``, ``mind_dilation`` in level voxels; the moving
    descriptors are computed once per level and warped) -- invariant to
    local contrast changes (e.g. a contrast phase);
  - ``"mse"``: mean squared difference of the windowed intensities (cheapest).

  Regularisers: ``"diffusion"`` or ``"bending"`` (:mod:`jaxreg.ops.losses`) of the
  total field in level voxels (so a weight means the same at every level),
  its components taken along the moving image's axes (:func:`optimise_level`).

Only where both scans have data counts (crops, cut fields of view, partial
overlap, a user's masks): a level voxel outside the fixed image's voxel box or
mask, or whose point ``x + u(x)`` falls where the moving image has no data (or
whose trilinear sample would blend with such a voxel), has weight 0 in the
similarity, re-evaluated at every step and normalised by the weights used; LNCC's
boxes count only voxels with data (:func:`jaxreg.ops.losses.local_ncc_map`'s
``mask``). The regulariser acts everywhere, so the field beyond the data is a
smooth continuation of the field inside. Each image is filtered for the level's
spacing, or for the other image's resolution along each of its axes where that is
coarser (a 5 mm slice thickness): both are compared at the same resolution. A
user's mask also bounds the filters (values outside it never reach a voxel inside).

Level grids are padded to multiples of 16 voxels, so pairs of similar size
reuse the compiled level functions; the padding lies outside the data (weight 0).

References:
  Heinrich et al., `Towards realtime multimodal fusion for image-guided
  interventions using self-similarities <https://doi.org/10.1007/978-3-642-40811-3_24>`_,
  MICCAI 2013 (MIND-SSC); Siebert, Hansen, Heinrich, `Fast 3D registration with
  accurate optimisation and little learning for Learn2Reg 2021
  <https://arxiv.org/abs/2112.03053>`_ (ConvexAdam: instance optimisation of a
  dense field with Adam).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.ndimage as ndi

from jaxreg.io import resample as _preprocess
from jaxreg.ops import grid as _grid
from jaxreg.ops import losses as _losses
from jaxreg.ops import optim as _optim
from jaxreg.ops import sharding as _mesh
from jaxreg.ops import warp as _warp
from jaxreg.pipeline import stages as _stages
from jaxreg.types import Grid, InputError, Volume

__all__ = ["SIMILARITIES", "REGULARISERS", "RefineOptions", "RefineResult", "level_grids",
           "on_lattice", "upsample2", "smooth3", "refine", "optimise_level", "level_objective",
           "body_grid", "data_weights",
           "DEFAULT_REG_WEIGHTS"]

SIMILARITIES = ("lncc", "mind", "mse")
# The regulariser weight when none is given, per similarity: their values differ in scale
# (-LNCC ~ -0.5..-1, MIND SSD ~ 0.01, MSE of [0, 1] intensities ~ 0.001-0.01). LNCC's 0.1
# goes with the default smooth=2 and three levels (benchmarks/refine_sweep.py, seeds 10 and
# 11: mean TRE 0.76/0.63 mm with 0.3 on two levels, 0.63/0.48 with 0.1 on three).
DEFAULT_REG_WEIGHTS = {"lncc": 0.1, "mind": 0.1, "mse": 0.003}
REGULARISERS = ("diffusion", "bending")  # built in; any name registered in jaxreg.ops.losses too
_DIVISOR = 16  # level grids: multiples of 16 voxels (even, for the control grid; shape buckets)
_SMALL_LEVEL = 32  # a level grid of at most this many voxels an axis is this cube


@dataclasses.dataclass(frozen=True)
class RefineOptions:
  """How :func:`refine` works (every field is a choice a user can make).

  Attributes:
    levels_mm: level spacings in mm, coarse to fine; None: four times the
      finest, twice it, then the finest (the fixed image's smallest spacing,
      or 2 mm if finer): 10, 5, 2.5 mm for a 2.5 mm CT.
    steps: Adam steps per level (one per level, or one number for all); None:
      10 on the finest level, 60 on the one above, 40 on coarser ones (one
      level: 60).
    similarity: ``"lncc"``, ``"mind"`` or ``"mse"`` (see the module docstring;
      averaged over the body mask), or any other name in the loss registry
      (:func:`jaxreg.ops.losses.register_similarity`: ``fn(fixed, warped) -> scalar`` on
      the level's ``[X, Y, Z]`` images in [0, 1], lower is better, unmasked).
    regulariser: a name in the loss registry (:func:`jaxreg.ops.losses.get_regulariser`):
      ``"diffusion"``, ``"bending"`` or one registered by the user.
    reg_weight: weight of the regulariser; None: :data:`DEFAULT_REG_WEIGHTS`
      of the similarity (required for a registered similarity).
    lr: Adam learning rate (level voxels per step), decayed on a cosine to
      10% within each level.
    window: LNCC box width (level voxels, odd).
    mind_radius: MIND-SSC patch radius (level voxels).
    mind_dilation: MIND-SSC neighbour distance (level voxels).
    mask: average the similarity over the fixed image's body only.
    control: control-grid stride in level voxels at each level (2: every 2nd
      voxel, linearly upsampled; 1: a dense field), one per level or one for all.
    smooth: passes of a 3x3x3 box mean applied to the control increment
      before upsampling (0: none; see :func:`smooth3`), one per level or one for
      all. The default 2, with LNCC ``reg_weight=0.1`` and the default levels and
      steps, was chosen by ``benchmarks/refine_sweep.py``.
  """
  levels_mm: tuple[float, ...] | None = None
  steps: tuple[int, ...] | int | None = None
  similarity: str = "lncc"
  regulariser: str = "diffusion"
  reg_weight: float | None = None
  lr: float = 0.2
  window: int = 5
  mind_radius: int = 1
  mind_dilation: int = 2
  mask: bool = True
  control: tuple[int, ...] | int = 2
  smooth: tuple[int, ...] | int = 2

  def checked(self, fixed_spacing) -> "RefineOptions":
    """These options with ``levels_mm`` and ``steps`` resolved; raises InputError if bad."""
    if self.similarity not in SIMILARITIES:
      _losses.get_similarity(self.similarity)  # InputError naming the registered ones
      if self.reg_weight is None:
        raise InputError(f"similarity {self.similarity!r} is registered by the user: give its "
                         "reg_weight (the regulariser's weight on its scale)")
    _losses.get_regulariser(self.regulariser)
    finest = max(2.0, float(np.min(fixed_spacing)))
    levels = ((4 * finest, 2 * finest, finest) if self.levels_mm is None
              else tuple(self.levels_mm))
    if (not levels or not all(np.isfinite(s) and s >= 0.5 for s in levels)
        or any(b >= a for a, b in zip(levels, levels[1:]))):
      raise InputError(f"refinement levels must be spacings >= 0.5 mm from coarse to fine "
                       f"(strictly decreasing), got {levels}")
    steps = (_default_steps(len(levels)) if self.steps is None
             else _per_level(self.steps, len(levels)))
    if len(steps) != len(levels) or min(steps) < 1:
      raise InputError(f"refinement steps must be one positive number per level "
                       f"({len(levels)} levels), got {tuple(steps)}")
    reg_weight = self.reg_weight
    if reg_weight is None:
      reg_weight = DEFAULT_REG_WEIGHTS[self.similarity]
    if not (reg_weight >= 0 and np.isfinite(reg_weight)):
      raise InputError(f"refinement reg_weight must be finite and >= 0, got {reg_weight}")
    if not (self.lr > 0 and np.isfinite(self.lr)):
      raise InputError(f"refinement lr must be positive, got {self.lr}")
    if self.window < 1 or self.window % 2 == 0:
      raise InputError(f"refinement window must be a positive odd number, got {self.window}")
    if self.mind_radius < 0 or self.mind_dilation < 1:
      raise InputError(f"MIND needs radius >= 0 and dilation >= 1, got {self.mind_radius}, "
                       f"{self.mind_dilation}")
    control = _per_level(self.control, len(levels))
    if len(control) != len(levels) or any(c not in (1, 2) for c in control):
      raise InputError(f"refinement control strides must be 1 or 2, one per level "
                       f"({len(levels)} levels), got {self.control}")
    smooth = _per_level(self.smooth, len(levels))
    if len(smooth) != len(levels) or min(smooth) < 0:
      raise InputError(f"refinement smooth must be >= 0 passes, one per level "
                       f"({len(levels)} levels), got {self.smooth}")
    return dataclasses.replace(self, levels_mm=tuple(float(s) for s in levels), steps=steps,
                               reg_weight=float(reg_weight), control=control, smooth=smooth)


def _default_steps(levels: int) -> tuple[int, ...]:
  """Adam steps per level when none are given: 40 on the coarse levels, 60 on the one
  above the finest, 10 on the finest (which mostly polishes); one level: 60."""
  return (60,) if levels == 1 else (40,) * (levels - 2) + (60, 10)


def _per_level(value, levels: int) -> tuple[int, ...]:
  """One int (or a one-element sequence) for all levels, or one per level, as ints."""
  values = (value,) if np.ndim(value) == 0 else tuple(value)
  return tuple(int(v) for v in (values * levels if len(values) == 1 else values))


@dataclasses.dataclass(frozen=True)
class RefineResult:
  """The refined field on the finest level grid.

  Attributes:
    disp: ``[*grid.shape, 3]`` displacement in voxels of ``grid`` (pull-back,
      fixed -> affinely aligned moving).
    grid: the finest level's grid.
    losses: the loss at every step, one array per level.
  """
  disp: np.ndarray
  grid: Grid
  losses: tuple[np.ndarray, ...]


def body_grid(fixed: Volume, *, threshold_hu: float = -500.0, margin_mm: float = 10.0,
              mask: np.ndarray | None = None) -> Grid:
  """The sub-grid of the fixed image over its body (voxels above ``threshold_hu``, inside
  ``mask`` if given) plus ``margin_mm``; the whole grid when nothing is above it.
  Refinement levels cover only this box (outside, the field is extended from its edge):
  fewer voxels, same result where there is anatomy."""
  body = np.asarray(fixed.array) > threshold_hu
  mask = body if mask is None else body & np.asarray(mask, bool)
  if not mask.any():
    return Grid.of(fixed)
  lo, hi = [], []
  for axis in range(3):
    present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
    lo.append(present[0])
    hi.append(present[-1])
  margin = np.ceil(margin_mm / fixed.spacing).astype(int)
  lo = np.maximum(np.array(lo) - margin, 0)
  hi = np.minimum(np.array(hi) + margin, np.array(fixed.shape) - 1)
  affine = np.array(fixed.affine, np.float64)
  affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
  return Grid(tuple(int(n) for n in hi - lo + 1), affine)


def level_grids(fixed: Volume | Grid, levels_mm: Sequence[float],
                mask: np.ndarray | None = None) -> list[Grid]:
  """One RAS-aligned isotropic grid per level over ``fixed``'s field of view (a volume's
  body box inside ``mask``, :func:`body_grid`; or a given grid), shapes rounded up to
  shape buckets of 16 (:func:`jaxreg.io.resample.bucket_size`: 16, 32, 64, then multiples
  of 16; a level of at most 32 voxels an axis is 32³, cheap at any size) with the longest
  axis first (:func:`jaxreg.io.resample.longest_first`: the level's
  computation treats its axes alike, so permuted sizes share programs), each moved onto the fixed voxel lattice where
  it can be (:func:`on_lattice`)."""
  region = body_grid(fixed, mask=mask) if isinstance(fixed, Volume) else fixed

  def level(spacing):
    grid = _preprocess.model_grid(region, spacing=spacing, divisor=_DIVISOR, bucket=True)
    if max(grid.shape) <= _SMALL_LEVEL:  # a coarse level of a small image: one shape for all
      grid = _preprocess.model_grid(region, spacing=spacing, divisor=_DIVISOR,
                                    shape=(_SMALL_LEVEL,) * 3)
    return _preprocess.longest_first(on_lattice(grid, region))
  return [level(float(s)) for s in levels_mm]


def on_lattice(grid: Grid, lattice: Grid) -> Grid:
  """``grid`` shifted by less than one voxel of ``lattice`` so that its origin is a voxel
  centre of ``lattice``, while it still covers ``lattice``'s field of view.

  A level grid centred on the fixed image's box sits half a voxel off the fixed
  voxels whenever its padding is odd; resampling the fixed image onto it then
  averages neighbouring voxels (a blur that costs sub-voxel precision at the finest
  level). On the lattice, a level at the fixed spacing samples the fixed voxels
  themselves (and a level at twice it, every other one). Only for grids whose axes
  are parallel to ``lattice``'s (axis flips and permutations included); otherwise,
  or where no shift keeps the coverage, ``grid`` is returned unchanged.
  """
  lin = np.asarray(lattice.affine[:3, :3], np.float64)
  steps = np.abs(lin).max(axis=1)  # world axis a: lattice step along it (mm)
  if not np.allclose(np.count_nonzero(np.abs(lin) > 1e-6 * steps[:, None], axis=1), 1):
    return grid
  if not np.allclose(np.abs(grid.affine[:3, :3]), np.diag(np.abs(np.diag(grid.affine[:3, :3])))):
    return grid
  lo, hi = lattice.world_bounds()
  glo, ghi = grid.world_bounds()
  origin = np.asarray(grid.affine[:3, 3], np.float64)
  phase = (origin - lattice.affine[:3, 3]) / steps
  down = (np.floor(phase + 1e-9) - phase) * steps  # <= 0, mm
  shift = np.zeros(3)
  for a in range(3):
    fits = [d for d in sorted((down[a], down[a] + steps[a]), key=abs)
            if glo[a] + d <= lo[a] + 1e-6 and ghi[a] + d >= hi[a] - 1e-6]
    if not fits:
      return grid
    shift[a] = fits[0]
  affine = np.array(grid.affine, np.float64)
  affine[:3, 3] = origin + shift
  return Grid(grid.shape, affine)


def _up_axis(x: jax.Array, axis: int) -> jax.Array:
  n = x.shape[axis]
  first = jax.lax.slice_in_dim(x, 0, 1, axis=axis)
  last = jax.lax.slice_in_dim(x, n - 1, n, axis=axis)
  prev = jnp.concatenate([first, jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
  nxt = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis), last], axis=axis)
  even, odd = 0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt
  out = jnp.stack([even, odd], axis=axis + 1)
  return out.reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 1:])


def _down_axis(g: jax.Array, axis: int) -> jax.Array:
  """The adjoint of :func:`_up_axis`: fine ``[..., 2n, ...]`` cotangents to coarse ``[..., n, ...]``."""
  n = g.shape[axis] // 2
  g = g.reshape(g.shape[:axis] + (n, 2) + g.shape[axis + 1:])
  even = jax.lax.index_in_dim(g, 0, axis + 1, keepdims=False)
  odd = jax.lax.index_in_dim(g, 1, axis + 1, keepdims=False)
  take = lambda x, a, b: jax.lax.slice_in_dim(x, a, b, axis=axis)
  # Coarse i feeds fine 2i-1 and 2i+2 with 0.25 (odd[i-1], even[i+1]); at the edges the
  # repeated edge value sends fine 0's and 2n-1's 0.25 back to coarse 0 and n-1.
  odd_before = jnp.concatenate([take(even, 0, 1), take(odd, 0, n - 1)], axis=axis)
  even_after = jnp.concatenate([take(even, 1, n), take(odd, n - 1, n)], axis=axis)
  return 0.75 * (even + odd) + 0.25 * (odd_before + even_after)


@jax.custom_vjp
def upsample2(c: jax.Array) -> jax.Array:
  """Linear upsampling by 2 of ``[A, B, C, ...]`` to ``[2A, 2B, 2C, ...]`` (values unchanged).

  Control point ``i`` sits at fine coordinate ``2 i + 0.5`` (cell-centred,
  as ``scipy.ndimage.zoom(..., order=1, grid_mode=True, mode="nearest")``):
  fine voxel ``2i`` is ``0.75 c[i] + 0.25 c[i-1]``, ``2i+1`` is
  ``0.75 c[i] + 0.25 c[i+1]``, the edge value repeated outside. Values are
  not rescaled: a control field in level voxels gives a level-voxel field.
  Its adjoint is written out (:func:`_down_axis`): XLA:CPU ran the automatic
  transpose of the interleaving ~2.5x slower (75 vs 30 ms at 144x128x144x3).
  """
  for axis in range(3):
    c = _up_axis(c, axis)
  return c


def _upsample2_fwd(c):
  return upsample2(c), None


def _upsample2_bwd(_, g):
  for axis in (2, 1, 0):
    g = _down_axis(g, axis)
  return (g,)


upsample2.defvjp(_upsample2_fwd, _upsample2_bwd)


def smooth3(c: jax.Array, passes: int) -> jax.Array:
  """``passes`` 3x3x3 box means of a ``[X, Y, Z, 3]`` field, each over the in-volume voxels
  of its box (a constant field is unchanged; units are those of ``c``).

  The smoothing parametrisation of the control increment (ConvexAdam's repeated
  average pooling; the refinement optimises ``c`` but warps with ``smooth3(c)``).
  """
  if passes == 0:
    return c
  counts = _losses.box_counts(c.shape[:3], 3, c.dtype)[..., None]
  box = jax.vmap(lambda a: _losses.box_sum(a, 3), in_axes=-1, out_axes=-1)
  for _ in range(passes):
    c = box(c) / counts
  return c


def _weighted_mean(x, weights):
  return jnp.sum(weights * x) / (jnp.sum(weights) + 1e-6)


def _eroded(weights: jax.Array, reach: int) -> jax.Array:
  """``weights`` ``[X, Y, Z]`` replaced by their minimum over the ``2 reach + 1`` cube
  around each voxel (0 beyond the volume)."""
  if not reach:
    return weights
  outside = jnp.pad(-weights, reach)  # beyond the volume: weight 0, so -0 wins the max
  return -jax.lax.reduce_window(outside, -jnp.inf, jax.lax.max, (2 * reach + 1,) * 3,
                                (1, 1, 1), "valid")


def level_objective(base, fixed, moving, weights, reg_weight, moving_map=None,
                    moving_valid=None, fixed_valid=None, moving_box=None, *,
                    similarity: str = "lncc", regulariser: str = "diffusion", window: int = 5,
                    mind_radius: int = 1, mind_dilation: int = 2, control: int = 2,
                    smooth: int = 0, implementation: str | None = None):
  """The objective one level minimises, as a pure function of the control increment.

  Arguments as :func:`optimise_level` (without ``lr`` and ``steps``).

  Returns:
    ``(loss, field)``: ``loss(c) -> scalar`` (similarity + ``reg_weight`` * regulariser of
    ``base + expand(c)``) and ``field(c) -> [X, Y, Z, 3]`` the level's field in level voxels,
    for ``c`` of shape ``[X // control, Y // control, Z // control, 3]`` (zeros: ``base``).
    ``jax.grad(loss)`` is what Adam follows; a test compares it across devices.
  """
  reg_fn = _losses.get_regulariser(regulariser)
  sim_fn = None if similarity in SIMILARITIES else _losses.get_similarity(similarity)
  if similarity == "mind":
    if moving_map is not None:
      raise ValueError("MIND-SSC needs the moving image on the level grid (moving_map=None)")
    fixed_feat = _losses.mind_ssc(fixed, radius=mind_radius, dilation=mind_dilation)
    moving_feat = _losses.mind_ssc(moving, radius=mind_radius, dilation=mind_dilation)
    # a descriptor reads its patches up to dilation + radius voxels away: it has data only
    # that far inside each image's data
    reach = mind_dilation + mind_radius
    if moving_valid is not None:
      moving_valid = _eroded(moving_valid, reach)
    if fixed_valid is not None:
      fixed_valid = _eroded(fixed_valid, reach)

  if moving_map is not None:
    # The field is optimised as v = R u, R = moving_map's 3x3 with its rows scaled to unit
    # length: level voxels along the moving image's axes, scaled per axis by ``scale``
    # (moving voxels per level voxel) only where the points are formed. So a step needs no
    # 3x3 map of the field (measured 1.5-2x the step's time at 5 mm), the regulariser and
    # Adam's steps keep their size in level voxels, and R is a rotation up to the affine
    # stage's few % of scale and shear (then the regulariser of v is that of u). u = R^-1 v
    # is returned.
    scale = jnp.linalg.norm(moving_map[:3, :3], axis=1)
    rot = moving_map[:3, :3] / scale[:, None]
    points = _grid.linear_map(_grid.identity_grid(base.shape[:3], base.dtype),
                              moving_map[:3, :3], moving_map[:3, 3])  # x, in moving voxels
    base = _grid.linear_map(base, rot)

  def sample(volume, u, order=1):
    if moving_map is None:
      return _warp.warp(volume, u, order=order, implementation=implementation)
    return _warp.sample(volume, points + scale * u, order=order, implementation=implementation)

  # Compare only where both scans have data: the fixed image at x, the moving one at
  # x + u(x), re-evaluated at every step (LNCC's box statistics with it).
  fixed_domain = None if fixed_valid is None else fixed_valid.astype(base.dtype)

  def overlap_of(valid):  # weights, not followed by the gradient
    return jax.lax.stop_gradient(valid)

  def domain_of(overlap):
    if overlap is None:
      return fixed_domain
    return overlap if fixed_domain is None else fixed_domain * overlap

  per_step = moving_valid is not None or (moving_box is not None and moving_map is not None)
  if similarity == "lncc" and not per_step:
    stats = _losses.fixed_box_stats(fixed, window, fixed_domain)

  def overlap_at(u):
    """Where x + u(x) has moving data: weights in [0, 1], or None (everywhere)."""
    if moving_valid is not None:  # a mask: gathered (forward only: no gradient is taken)
      return overlap_of(sample(moving_valid.astype(base.dtype), u))
    if moving_box is None or moving_map is None:
      return None
    p = points + scale * u  # moving voxels
    n = moving_box.astype(base.dtype)
    inside = jnp.clip(p, 0.0, 1.0) * jnp.clip(n - 1.0 - p, 0.0, 1.0)
    return overlap_of(jnp.prod(inside, axis=-1))

  def similarity_loss(u):
    domain = domain_of(overlap_at(u))
    w = weights if domain is None else weights * domain
    if similarity == "mind":
      return _losses.mind_ssd(fixed_feat, _warp.warp(moving_feat, u, implementation=implementation),
                              mask=w)
    warped = sample(moving, u)
    if similarity == "lncc":
      st = _losses.fixed_box_stats(fixed, window, domain) if per_step else stats
      lncc = _losses.local_ncc_map(fixed, warped, window=window, stats=st, mask=domain)
      return -_weighted_mean(lncc, w)
    if sim_fn is not None:
      return sim_fn(fixed, warped)
    return _weighted_mean((fixed - warped) ** 2, w)

  up = upsample2 if control == 2 else (lambda c: c)

  def expand(c):
    return up(smooth3(c, smooth))

  def loss(c):
    u = base + expand(c)
    return similarity_loss(u) + reg_weight * reg_fn(u)

  def field(c):
    out = base + expand(c)
    if moving_map is not None:
      out = _grid.linear_map(out, jnp.linalg.inv(rot))
    return out

  return loss, field



def _optimise_level(base, fixed, moving, weights, lr, reg_weight, moving_map=None,
                    moving_valid=None, fixed_valid=None, moving_box=None, *,
                    steps: int, similarity: str = "lncc", regulariser: str = "diffusion",
                    window: int = 5, mind_radius: int = 1, mind_dilation: int = 2,
                    control: int = 2, smooth: int = 0, implementation: str | None = None):
  """Adam on a control-grid increment of ``base`` at one level (see the module docstring).

  Args:
    base: ``[X, Y, Z, 3]`` field so far, voxels of this level (X, Y, Z even).
    fixed: ``[X, Y, Z]`` image on the level grid, in [0, 1].
    moving: in [0, 1], 0 outside it: with ``moving_map=None``, ``[X, Y, Z]`` on the
      level grid (affinely aligned); else ``[X', Y', Z']`` on its own grid.
    weights: ``[X, Y, Z]`` similarity weights (the body mask, or ones).
    lr: Adam learning rate, level voxels per step.
    reg_weight: regulariser weight.
    moving_map: ``[4, 4]`` map from level voxels to ``moving``'s voxels (the affine
      stage included): the moving image is then sampled once, at
      ``moving_map @ (x + u(x))``, not resampled onto the level grid first and warped
      (two trilinear interpolations, a position-dependent blur). Not with MIND (its
      descriptors are computed on the level grid).
    moving_valid: like ``moving``, 1 where the moving scan has data (its voxel box, a
      user's mask), 0 elsewhere (its bucket padding too); None: everywhere. A level voxel
      whose point ``x + base(x)`` falls where it is 0 contributes nothing to the
      similarity, and LNCC's boxes count only the voxels where both have data; the
      regulariser acts everywhere, so the field there continues the field inside.
    fixed_valid: ``[X, Y, Z]``, 1 where the level voxel has fixed data (inside the fixed
      image's voxel box and a user's mask), 0 where the level grid extends beyond it;
      None: everywhere.
    moving_box: ``[3]`` the moving scan's shape (with ``moving_map``; ``moving`` may be
      padded beyond it): where there is no ``moving_valid``, its data are its voxel box,
      weighted in closed form as ``moving_valid = data_weights(moving_box)`` would be
      (:func:`data_weights`, sampled: ``prod_a clip(p_a, 0, 1) clip(n_a - 1 - p_a, 0, 1)``
      at the point ``p`` in moving voxels), with no gather.
    steps: see :class:`RefineOptions`.
    similarity: see :class:`RefineOptions`.
    regulariser: see :class:`RefineOptions`.
    window: see :class:`RefineOptions`.
    mind_radius: see :class:`RefineOptions`.
    mind_dilation: see :class:`RefineOptions`.
    control: see :class:`RefineOptions`.
    smooth: see :class:`RefineOptions`.
    implementation: the warp's (``None``, ``"xla"``, ``"ffi"``; see :mod:`jaxreg.ops.warp`).

  Returns:
    ``(field [X, Y, Z, 3] level voxels, loss per step [steps])``.
  """
  loss, field = level_objective(base, fixed, moving, weights, reg_weight, moving_map,
                                moving_valid, fixed_valid, moving_box, similarity=similarity,
                                regulariser=regulariser, window=window,
                                mind_radius=mind_radius, mind_dilation=mind_dilation,
                                control=control, smooth=smooth, implementation=implementation)
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.1))
  params = jnp.zeros(tuple(n // control for n in base.shape[:3]) + (3,), base.dtype)
  params, values = _optim.minimise(loss, params, tx, steps)
  return field(params), values


_LEVEL_STATICS = ("steps", "similarity", "regulariser", "window", "mind_radius", "mind_dilation",
                  "control", "smooth", "implementation")
optimise_level = jax.jit(_optimise_level, static_argnames=_LEVEL_STATICS)
# The same program as a pipeline stage, kept across processes inside
# jaxreg.pipeline.stages.enabled (refine() calls this one).
_level_stage = _stages.Stage(_optimise_level, static_argnames=_LEVEL_STATICS)


def _body_weights(fixed_hu: np.ndarray, mask: bool) -> np.ndarray:
  if not mask:
    return np.ones(fixed_hu.shape, np.float32)
  body = ndi.binary_dilation(fixed_hu > -500.0, iterations=2)
  if body.sum() < 0.01 * body.size:  # no body to speak of: compare everywhere
    return np.ones(fixed_hu.shape, np.float32)
  return body.astype(np.float32)


def _level_moving(moving: Volume, mask: np.ndarray | None, target: Grid, fixed_grid: Grid,
                  similarity: str, lo: float, hi: float, mesh):
  """``(image, valid, map, box)``: the moving image a level samples; where it has data
  (:func:`data_weights` of its ``mask``: with a mask, or for MIND, else None); its map from
  level voxels (None: on the level grid); its shape (None for MIND, whose image is on the
  level grid). LNCC and MSE sample the moving image on its own grid (antialiased for the
  level's spacing, windowed to [0, 1], padded with 0 to a shape bucket, whole on every
  device); MIND needs it on the level grid."""
  # filtered for the level's spacing, or the fixed image's resolution along each axis where
  # that is coarser (a thick-slice fixed scan): both are compared at the same resolution
  to = np.maximum(target.spacing, _preprocess.spacing_along(fixed_grid, moving))
  if similarity == "mind":
    m = _preprocess.window(_preprocess.resample(moving, target, cval=lo, smooth_to=to,
                                                mask=mask), lo, hi)
    v = _preprocess.resample(Volume(data_weights(moving.shape, mask), moving.affine), target,
                             antialias=False)
    return (_mesh.put_volume(m.astype(np.float32), mesh),
            _mesh.put_volume(v.astype(np.float32), mesh), None, None)
  # Not decimated to the level's spacing: sampling the full-resolution filtered image at
  # 5 mm measured better (TRE breathing 0.32 vs 0.53 mm) for 1.5x that level's time.
  m = _preprocess.antialiased(np.asarray(moving.array, np.float32), moving.spacing, to, mask)
  m = _preprocess.window(m, lo, hi).astype(np.float32)
  pad = [(0, b - n) for n, b in zip(m.shape, _preprocess.bucket_shape(m.shape))]
  m = np.pad(m, pad)  # 0 is the window's floor, as outside the image
  v = None if mask is None else np.pad(data_weights(moving.shape, mask), pad)
  moving_map = (np.linalg.inv(np.asarray(moving.affine, np.float64)) @ target.affine
                ).astype(np.float32)
  box = np.asarray(moving.shape, np.float32)
  where = None if mesh is None else _mesh.replicated(mesh)
  put = lambda x: None if x is None else jax.device_put(x, where)
  return put(m), put(v), put(moving_map), put(box)


def data_weights(shape, mask: np.ndarray | None = None) -> np.ndarray:
  """``shape`` float32: 1 on the voxels whose 3x3x3 neighbourhood has data (inside the voxel
  box and ``mask``), else 0 -- where the similarity may look, in a form to sample.

  Sampled trilinearly at a point, it is 1 where every corner of every neighbouring cell
  has data and falls continuously to 0 where any trilinear corner lies outside (a point
  whose value would be blended with the air beyond a scan's edge or a mask's): a weight
  that excludes such points and changes continuously with the field, so the similarity
  stays a continuous function of it.
  """
  inside = np.ones(shape, bool) if mask is None else np.asarray(mask, bool)
  return ndi.binary_erosion(inside, np.ones((3, 3, 3), bool), border_value=0).astype(np.float32)


def _field_on(disp: np.ndarray, source: Grid, target: Grid
              ) -> np.ndarray:
  """A field in voxels of ``source`` resampled onto ``target``, in voxels of ``target``."""
  return _preprocess.map_field(disp, source, target,
                               np.linalg.inv(target.affine[:3, :3]) @ source.affine[:3, :3])


def refine(fixed: Volume, moving: Volume, init: np.ndarray, init_grid: Grid,
           options: RefineOptions = RefineOptions(), *,
           hu_window: tuple[float, float] = (-1000.0, 1000.0), mesh=None,
           fixed_mask: np.ndarray | None = None, moving_mask: np.ndarray | None = None,
           implementation: str | None = None) -> RefineResult:
  """Refine a deformable field on one pair, coarse to fine (see the module docstring).

  Args:
    fixed: fixed CT (HU) with its affine.
    moving: moving CT (HU) with the affine that places it after the affine
      stage (``inv(M) @ moving.affine``), so that ``init`` is the deformable
      residual.
    init: ``[*init_grid.shape, 3]`` starting field in voxels of ``init_grid``
      (e.g. the network's on the model grid; zeros for none).
    init_grid: its grid.
    options: :class:`RefineOptions`.
    hu_window: HU range scaled to [0, 1].
    mesh: a mesh with a ``space`` axis to split every level's volumes along X
      over (each level's X is a multiple of 16), or None for one device.
    fixed_mask: ``fixed.shape`` bool, where to compare (None: the whole field of view).
    moving_mask: ``moving.shape`` bool, where the moving image may be compared (None:
      its whole field of view). Only points where both images have data count in
      the similarity (see :func:`optimise_level`'s ``moving_valid``).
    implementation: the warp's (``None``, ``"xla"``, ``"ffi"``; see :mod:`jaxreg.ops.warp`).

  Returns:
    :class:`RefineResult` on the finest level grid.

  Raises:
    InputError: bad options, or a non-finite loss (the optimisation diverged).
  """
  options = options.checked(fixed.spacing)
  lo, hi = hu_window
  disp, grid, losses = np.asarray(init, np.float32), init_grid, []
  grids = level_grids(fixed, options.levels_mm, fixed_mask)
  for level, (spacing, steps, control, smooth, target) in enumerate(
      zip(options.levels_mm, options.steps, options.control, options.smooth, grids)):
    base = _field_on(disp, grid, target)
    # filtered for the level, or for the moving image's resolution along each fixed axis
    # where that is coarser (a thick-slice moving scan: no fixed detail it cannot match)
    fixed_hu = _preprocess.resample(fixed, target, cval=lo, mask=fixed_mask, smooth_to=np.maximum(
        target.spacing, _preprocess.spacing_along(moving, fixed)))
    f = _preprocess.window(fixed_hu, lo, hi).astype(np.float32)
    # the fixed data: constant through a level, so a hard edge (its outermost voxels count)
    f_valid = _preprocess.data_on(fixed, target, fixed_mask)
    weights = _body_weights(np.where(f_valid > 0, fixed_hu, lo), options.mask)
    m, m_valid, moving_map, box = _level_moving(moving, moving_mask, target, Grid.of(fixed),
                                                options.similarity, lo, hi, mesh)
    with _mesh.context(mesh):
      out, values = _level_stage(
          *(_mesh.put_volume(x, mesh) for x in (base, f)), m, _mesh.put_volume(weights, mesh),
          float(options.lr), float(options.reg_weight), moving_map, m_valid,
          _mesh.put_volume(f_valid, mesh), box,
          steps=int(steps), similarity=options.similarity,
          regulariser=options.regulariser, window=int(options.window),
          mind_radius=int(options.mind_radius), mind_dilation=int(options.mind_dilation),
          control=int(control), smooth=int(smooth), implementation=implementation)
    values = np.asarray(values)
    if not np.all(np.isfinite(values)):
      raise InputError(f"refinement diverged at level {level} ({spacing:g} mm): non-finite "
                       "loss; try a smaller lr or a larger reg_weight")
    disp, grid = np.asarray(out), target
    losses.append(values)
  return RefineResult(disp, grid, tuple(losses))
