"""Register a CT pair: affine stage, network, fine-resolution refinement; results on the fixed grid.

:func:`register` is a composition of named stages, each importable and
testable alone:

1. :func:`affine_stage` -- a global affine (or rigid) map ``M`` (fixed world
   ``p`` -> moving world ``M p``, RAS+ mm; :mod:`jaxreg.pipeline.affine`);
2. :func:`to_model_grid` -- both images on the network's model grid (the
   moving one through ``M``: :func:`aligned`);
3. :func:`network_stage` -- the network's composed field on the model grid
   (voxels of that grid);
4. :func:`refine_stage` -- multi-resolution instance optimisation up to the
   fixed image's resolution (:mod:`jaxreg.pipeline.refine`);
5. :func:`to_fixed_grid` -- the affine and deformable parts composed into
   **one** world displacement (mm) on the fixed image's original grid,
   ``p -> M (p + d(p))``;
6. :func:`warp_outputs` -- the moving image and labels interpolated once
   through it.

Everything it returns overlays the fixed image in 3D Slicer / ITK-SNAP.
Scoring against labels is its own step (:func:`jaxreg.metrics.score`, what
:func:`jaxreg.pipeline.outputs.label_scores` writes), as in evaluation.
:func:`register_many` registers the pairs of a manifest in one process and
writes one output folder per pair.

The inverse map (``inverse=True``) is ``q -> y + d^-1(y)`` with ``y = M^-1 q``
and ``d^-1`` from :func:`jaxreg.ops.fields.invert` on the last stage's grid.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from nibabel.affines import apply_affine

from jaxreg import metrics as _metrics
from jaxreg.data.manifests import load_pair  # noqa: F401 -- part of this module's API
from jaxreg.io import configjson as _configjson
from jaxreg.io import resample as _preprocess
from jaxreg.nn import inputs as _inputs
from jaxreg.nn import model as _model
from jaxreg.ops import losses as _losses
from jaxreg.ops import optim as _optim
from jaxreg.ops import sharding as _mesh
from jaxreg.ops import warp as _warp
from jaxreg.pipeline import affine as _affine
from jaxreg.pipeline import refine as _refine
from jaxreg.pipeline import stages as _stages
from jaxreg.pipeline.compilation import CompileCounter
from jaxreg.pipeline.refine import RefineOptions
from jaxreg.types import Grid, InputError, Volume, one_line

__all__ = ["Registration", "RefineOptions", "register", "register_many",
           "affine_stage", "aligned", "to_model_grid", "network_stage", "refine_stage",
           "to_fixed_grid", "warp_outputs", "inverse_stage", "instance_optimise",
           "check_images", "check_mask", "load_pair", "load_masks", "default_reg_weight",
           "REFINE_START_REG_WEIGHT",
           "AFFINE_MODELS"]

AFFINE_MODELS = ("affine", "rigid", "none")
BODY_HU = -500.0  # the body, for metrics.json's folding_fraction_body: fixed voxels above it


@dataclasses.dataclass(frozen=True)
class Registration:
  """The result of :func:`register`, on the fixed image's original grid.

  Attributes:
    displacement_mm: ``[*fixed.shape, 3]`` world (RAS+) mm: fixed point ``p``
      corresponds to moving point ``p + d(p)``.
    displacement_voxel: the same in voxels of the fixed grid (array axis order).
    warped: the moving image resampled onto the fixed grid.
    warped_labels: the moving labels resampled (nearest neighbour), or None.
    affine: the fixed image's affine (of every output).
    model_displacement: ``[*grid.shape, 3]`` the deformable field of the last
      stage (network or refinement) on its grid, voxels of that grid.
    metrics: runtime per stage, XLA compilations, memory, field quality.
    affine_matrix: ``[4, 4]`` the affine stage's world map (RAS+ mm, fixed ``p`` ->
      moving ``M p``); the identity with ``affine="none"``.
    inverse_mm: ``[*fixed.shape, 3]`` (with ``inverse=True``, else None): the
      inverse map's displacement, world mm, on the fixed grid's domain: moving
      point ``q`` corresponds to fixed point ``q + inverse_mm(q)``.
    grid: the grid of ``model_displacement``.
  """
  displacement_mm: np.ndarray
  displacement_voxel: np.ndarray
  warped: np.ndarray
  warped_labels: np.ndarray | None
  affine: np.ndarray
  model_displacement: np.ndarray
  metrics: dict
  affine_matrix: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(4))
  inverse_mm: np.ndarray | None = None
  grid: Grid | None = None


# --------------------------------------------------------------------------- stages

def check_images(fixed: Volume, moving: Volume, names: tuple[str, str] = ("fixed", "moving")
                 ) -> None:
  """Refuse a constant image or a pair that does not overlap in world space (InputError)."""
  for volume, name in ((fixed, names[0]), (moving, names[1])):
    lo, hi = float(np.min(volume.array)), float(np.max(volume.array))
    if not hi > lo:
      raise InputError(f"{name}: the image is constant ({lo:g} everywhere): nothing to register")
  _preprocess.check_overlap(Grid.of(fixed), Grid.of(moving), names)


def check_mask(mask: Volume | np.ndarray | None, image: Volume, name: str
               ) -> np.ndarray | None:
  """A mask as a bool array on ``image``'s grid (None stays None).

  Raises:
    InputError: a mask of another shape or (for a :class:`Volume`) another affine than
      its image, or one with no voxel set (``name``: the mask's file, for the message).
  """
  if mask is None:
    return None
  if isinstance(mask, Volume):
    if mask.shape == image.shape and not np.allclose(mask.affine, image.affine, atol=1e-3):
      raise InputError(f"{name}: the mask's affine differs from its image's (max difference "
                       f"{np.abs(mask.affine - image.affine).max():.3g} mm): it must lie on "
                       "the image's grid")
    mask = mask.array
  mask = np.asarray(mask)
  if mask.shape != image.shape:
    raise InputError(f"{name}: mask grid {mask.shape} differs from its image's grid "
                     f"{image.shape}: it must lie on the image's grid")
  if not mask.any():
    raise InputError(f"{name}: the mask is empty (no voxel set): nothing to compare")
  return mask.astype(bool)


def affine_stage(fixed: Volume, moving: Volume, *, model: str = "affine",
                 hu_window: tuple[float, float] = (-1000.0, 1000.0),
                 fixed_mask: np.ndarray | None = None, moving_mask: np.ndarray | None = None,
                 implementation: str | None = None) -> np.ndarray:
  """``[4, 4]`` world map (RAS+ mm) fixed ``p`` -> moving ``M p``; the identity for ``"none"``.
  ``fixed_mask``/``moving_mask``: where each image may be compared (on its grid; None: its
  whole field of view). ``implementation``: the warp's (``None``, ``"xla"``, ``"ffi"``; see
  :mod:`jaxreg.ops.warp`)."""
  if model not in AFFINE_MODELS:
    raise ValueError(f"affine must be one of {AFFINE_MODELS}, got {model!r}")
  if model == "none":
    return np.eye(4)
  return _affine.align(fixed, moving, model=model, hu_window=hu_window, fixed_mask=fixed_mask,
                       moving_mask=moving_mask, implementation=implementation).matrix


def aligned(volume: Volume | None, matrix: np.ndarray) -> Volume | None:
  """The moving image (or labels) as seen after the affine stage: its voxel ``v`` sits at
  world ``M^-1 A_m v``, so fixed ``p`` and aligned-moving ``p`` show the same anatomy."""
  return None if volume is None else Volume(volume.array, np.linalg.inv(matrix) @ volume.affine)


def to_model_grid(fixed: Volume, moving: Volume, config, *, fixed_labels: Volume | None = None,
                  moving_labels: Volume | None = None, fixed_mask: np.ndarray | None = None,
                  moving_mask: np.ndarray | None = None,
                  names: tuple[str, str] = ("fixed", "moving")) -> _preprocess.PreparedPair:
  """Both images (and labels, if the model takes them) on the model grid of ``config``.

  Where only one of the two scans has data (outside the other's field of view, or
  outside a mask: ``fixed_mask`` on the fixed grid, ``moving_mask`` on the moving one),
  both are shown as air (0), so the network sees the same cut in both and does not
  squeeze anatomy into a region the other scan never covered.
  """
  needs = config.model.get("label_inputs", False)
  shape = None if config.data.shape is None else tuple(config.data.shape)
  pair = _preprocess.prepare_pair(
      fixed, moving, fixed_labels if needs else None, moving_labels if needs else None,
      spacing=config.data.spacing, divisor=_model.unet_stride(config.model.widths),
      max_shape=shape, bucket=True,
      hu_window=tuple(config.data.hu_window), names=names, fixed_mask=fixed_mask,
      moving_mask=moving_mask)
  both = (_preprocess.data_on(fixed, pair.grid, fixed_mask)
          * _preprocess.data_on(moving, pair.grid, moving_mask))
  if both.all():
    return pair
  return dataclasses.replace(pair, fixed=pair.fixed * both, moving=pair.moving * both)


def _predict(leaves, fixed, moving, extra, reg_weight, *, graphdef, treedef, model, method,
             steps, implementation=None):
  """The network's field; ``leaves`` of its state (``treedef``), ``model``: a hash of the
  config that defines ``graphdef`` and ``treedef`` (the exported stage's key)."""
  from flax import nnx
  net = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
  return _model.predict_displacement(net, fixed[None], moving[None], method=method,
                                     steps=steps, extra=extra, reg_weight=reg_weight,
                                     implementation=implementation)[0][0]


_predict_stage = _stages.Stage(
    _predict, static_argnames=("graphdef", "treedef", "model", "method", "steps", "implementation"),
    unkeyed=("graphdef", "treedef"))


def check_reg_weight(config, reg_weight: float | None) -> float | None:
  """lambda for the network: ``reg_weight``, or the config's for a conditioned model.

  Raises:
    InputError: ``reg_weight`` for a model trained without lambda conditioning, or a
      lambda outside the range the model was trained on (refused: the network has
      never seen it, and extrapolating a trade-off is not a trade-off you chose).
  """
  if not config.model.get("condition_on_reg", False):
    if reg_weight is not None:
      raise InputError("--reg-weight needs a model trained with lambda conditioning "
                       "(config.model.condition_on_reg); this one was trained at one fixed "
                       f"weight ({config.loss.reg_weight})")
    return None
  lo, hi = (float(v) for v in config.model.reg_range)
  lam = float(config.loss.reg_weight if reg_weight is None else reg_weight)
  if not lo <= lam <= hi:
    raise InputError(f"--reg-weight {lam:g} lies outside the range this model was trained on "
                     f"[{lo:g}, {hi:g}]")
  return lam


# lambda of a conditioned network when the refinement follows and no lambda is given: the
# smooth end of the trade-off is the better start for the refinement (the shipped model on
# the sweep pairs, benchmarks/network_lambda.py: mean TRE after refinement 0.73 mm at the
# config's 0.5, 0.61 at 3, 0.55 at 20, 0.55 at 50 and 100). Clamped into the model's range.
REFINE_START_REG_WEIGHT = 20.0


def default_reg_weight(config, refine: RefineOptions | None) -> float | None:
  """lambda for :func:`register` when none is given: the config's ``loss.reg_weight``
  for the network alone, :data:`REFINE_START_REG_WEIGHT` (clamped into
  ``config.model.reg_range``) when a refinement follows; None for a model without
  lambda conditioning."""
  if not config.model.get("condition_on_reg", False):
    return None
  if refine is None:
    return float(config.loss.reg_weight)
  lo, hi = (float(v) for v in config.model.reg_range)
  return min(max(REFINE_START_REG_WEIGHT, lo), hi)


def network_stage(net, config, pair: _preprocess.PreparedPair,
                  reg_weight: float | None = None, mesh=None,
                  implementation: str | None = None) -> np.ndarray:
  """``[*pair.grid.shape, 3]`` the network's composed field, voxels of the model grid.

  ``reg_weight``: lambda of a conditioned network (see :func:`check_reg_weight`).
  ``mesh``: a ``("data", "space")`` mesh (:func:`jaxreg.ops.sharding.inference_mesh`) to split
  the volumes along X over, or None for one device. ``implementation``: the warp's
  (``None``, ``"xla"``, ``"ffi"``; see :mod:`jaxreg.ops.warp`) in the composition of the sub-fields.
  """
  from flax import nnx
  lam = check_reg_weight(config, reg_weight)
  extra = None
  if config.model.get("label_inputs", False):
    lut = _inputs.class_lut(config.data.label_ids)
    classes = [jnp.asarray(_inputs.to_classes(x, lut))[None]
               for x in (pair.fixed_labels, pair.moving_labels)]
    extra = _inputs.label_channels(config, *classes)
  graphdef, state = nnx.split(net)
  leaves, treedef = jax.tree.flatten(state)
  model = hashlib.sha256(_configjson.to_json(config).encode()).hexdigest()
  with _mesh.context(mesh):
    fixed, moving = (_mesh.put_volume(x, mesh) for x in (pair.fixed, pair.moving))
    return np.asarray(_predict_stage(leaves, fixed, moving, extra,
                               None if lam is None else np.full((1,), lam, np.float32),
                               graphdef=graphdef, treedef=treedef, model=model,
                               method=config.decomposition, steps=config.svf_steps,
                               implementation=implementation))


def _optimise(disp, fixed, moving, steps, lr, reg_weight, window, implementation=None):
  tx = optax.adam(lr)

  def loss(u):
    warped = _warp.warp(moving, u, implementation=implementation)
    return -_losses.local_ncc(fixed, warped, window=window) + reg_weight * _losses.diffusion(u)

  return _optim.minimise(loss, disp, tx, steps)


_optimise_stage = _stages.Stage(_optimise, static_argnames=("steps", "window", "implementation"))


def instance_optimise(disp: jax.Array, fixed: jax.Array, moving: jax.Array, *, steps: int = 50,
                      lr: float = 0.05, reg_weight: float = 1.0, window: int = 9,
                      implementation: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Dense Adam on ``-LNCC + reg_weight * diffusion`` on the model grid (the older, coarse
  instance optimisation; :func:`refine_stage` is the fine-resolution one).

  Args:
    disp: ``[X, Y, Z, 3]`` starting displacement in voxels (e.g. the network's).
    fixed: ``[X, Y, Z]`` image on that grid (intensities in [0, 1]).
    moving: ``[X, Y, Z]`` image on that grid (intensities in [0, 1]).
    steps: Adam steps (one jitted ``lax.scan``).
    lr: Adam learning rate, voxels per step.
    reg_weight: weight of the diffusion regulariser.
    window: LNCC window.
    implementation: the warp's (``None``, ``"xla"``, ``"ffi"``; see :mod:`jaxreg.ops.warp`).

  Returns:
    ``(refined displacement, loss per step [steps])``.
  """
  if steps < 1:
    return disp, jnp.zeros((0,))
  return _optimise_stage(np.asarray(disp, np.float32), np.asarray(fixed, np.float32),
                         np.asarray(moving, np.float32),
                         steps=steps, lr=float(lr), reg_weight=float(reg_weight), window=window,
                         implementation=implementation)


def refine_stage(fixed: Volume, moving_aligned: Volume, disp: np.ndarray,
                 grid: Grid, options: RefineOptions, *,
                 hu_window: tuple[float, float] = (-1000.0, 1000.0), mesh=None,
                 fixed_mask: np.ndarray | None = None, moving_mask: np.ndarray | None = None,
                 implementation: str | None = None) -> _refine.RefineResult:
  """The field refined coarse to fine up to the fixed resolution (:func:`jaxreg.pipeline.refine.refine`),
  split along X over ``mesh`` when given, compared only where both images have data (and
  their masks)."""
  return _refine.refine(fixed, moving_aligned, disp, grid, options, hu_window=hu_window,
                        mesh=mesh, fixed_mask=fixed_mask, moving_mask=moving_mask,
                        implementation=implementation)


def _fixed_world(fixed_grid: Grid) -> np.ndarray:
  return apply_affine(fixed_grid.affine, np.moveaxis(np.indices(fixed_grid.shape), 0, -1))


def to_fixed_grid(disp: np.ndarray, grid: Grid, fixed_grid: Grid,
                  matrix: np.ndarray) -> np.ndarray:
  """``[*fixed_grid.shape, 3]`` world mm: the total map ``p -> M (p + d(p))`` as a displacement.

  Args:
    disp: ``[*grid.shape, 3]`` deformable field in voxels of ``grid``.
    grid: its grid.
    fixed_grid: the fixed image's original grid.
    matrix: ``[4, 4]`` the affine stage's world map.
  """
  return _preprocess.field_to_world(disp, grid, fixed_grid, then=matrix)


def warp_outputs(moving: Volume, moving_labels: Volume | None, disp_mm: np.ndarray,
                 fixed_grid: Grid) -> tuple[np.ndarray, np.ndarray | None]:
  """The original moving image (trilinear, -1024 HU outside) and labels (nearest) on the
  fixed grid through the world displacement ``disp_mm`` (one interpolation each)."""
  warped = _preprocess.resample_moving(moving, disp_mm, fixed_grid, cval=-1024.0)
  labels = None
  if moving_labels is not None:
    labels = _preprocess.resample_moving(moving_labels, disp_mm, fixed_grid, order=0)
  return warped, labels


def inverse_stage(disp: np.ndarray, grid: Grid, fixed_grid: Grid,
                  matrix: np.ndarray) -> tuple[np.ndarray, float]:
  """The inverse map's world displacement (mm) on the fixed grid's domain, and the fixed-point
  residual of :func:`jaxreg.ops.fields.invert` (voxels of ``grid``)."""
  from jaxreg.ops import fields
  inv, residual, _ = fields.invert(disp, return_info=True)
  world = _fixed_world(fixed_grid)
  y = apply_affine(np.linalg.inv(matrix), world).astype(np.float32)  # q -> M^-1 q -> y + d^-1(y)
  inverse_mm = (y + _preprocess.field_at_points(np.asarray(inv), grid, y) - world)
  return inverse_mm.astype(np.float32), float(residual)


# --------------------------------------------------------------------------- the pipeline

def _peak_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def register(fixed: Volume, moving: Volume, *, net=None, config=None,
             fixed_labels: Volume | None = None, moving_labels: Volume | None = None,
             fixed_mask: Volume | np.ndarray | None = None,
             moving_mask: Volume | np.ndarray | None = None,
             affine: str = "affine", refine: RefineOptions | None = RefineOptions(),
             io_steps: int = 0, io_lr: float = 0.05, io_reg_weight: float = 1.0,
             reg_weight: float | None = None, inverse: bool = False, mesh=None,
             names: tuple[str, str] = ("fixed", "moving"),
             implementation: str | None = None) -> Registration:
  """Register ``moving`` to ``fixed`` (see the module docstring).

  Args:
    fixed: CT volume in HU with its affine (any shape, spacing, orientation).
    moving: CT volume in HU with its affine (any shape, spacing, orientation; it must
      overlap ``fixed`` in world space).
    net: a network (default: the shipped demo model).
    config: the training config of ``net`` (with the default ``net``, the demo model's).
    fixed_labels: the fixed label map, needed only by a model that takes labels as input.
    moving_labels: the moving label map: warped with the image (and a model input if
      the model takes labels).
    fixed_mask: where the fixed image may be compared (bool, on its grid: a
      :class:`~jaxreg.types.Volume` or an array; None: its whole field of view).
    moving_mask: the same for the moving image. Every stage compares the images only
      where both have data (inside each field of view and mask, followed through the
      field at each step); the field elsewhere is the regulariser's continuation.
    affine: global pre-alignment, ``"affine"`` (12 parameters), ``"rigid"`` or ``"none"``.
    refine: :class:`~jaxreg.pipeline.refine.RefineOptions` of the fine-resolution
      refinement, or None for the network's field alone.
    io_steps: steps of the older dense instance optimisation on the model grid before
      refinement (:func:`instance_optimise`; 0 steps: off).
    io_lr: its learning rate (``lr`` of :func:`instance_optimise`).
    io_reg_weight: its regulariser weight (``reg_weight`` of :func:`instance_optimise`).
    reg_weight: lambda, the smoothness trade-off of a network trained with lambda
      conditioning (within its ``config.model.reg_range``; default:
      :func:`default_reg_weight`, 20 when the refinement follows, else the config's
      ``loss.reg_weight``). Refused for other networks. The refinement has its own
      weight (``refine.reg_weight``).
    inverse: also compute the inverse map (``Registration.inverse_mm``).
    mesh: run the network and the refinement spatially sharded: a
      :class:`jax.sharding.Mesh` with a ``space`` axis, or ``"space=S"`` (the first S
      local devices; :func:`jaxreg.ops.sharding.inference_mesh`). None: one device.
    names: file names for error messages.
    implementation: the warp's in the affine, network and refinement stages
      (``None``, ``"xla"``, ``"ffi"``; see :mod:`jaxreg.ops.warp`); ``None`` runs the
      C++ kernel on CPU where :func:`jaxreg.load_kernel` has loaded it (the CLI does),
      else XLA.

  Returns:
    :class:`Registration`; its ``metrics`` hold seconds per stage, the XLA
    programs compiled here (``programs_compiled``) and loaded from the persistent
    cache (``programs_loaded``; both: ``xla_compilations``, ``xla_cache_hits``), peak
    memory, folding fraction and SDlogJ.

  Raises:
    InputError: constant images, no overlap (the images must share a world
      frame), a mask off its image's grid or empty, a model that needs labels
      without them, bad refinement options,
      a diverging refinement or a non-finite field.
    ValueError: unknown ``affine``.
  """
  from jaxreg.io import weights  # lazy: the shipped model is only loaded when needed

  if affine not in AFFINE_MODELS:
    raise ValueError(f"affine must be 'affine', 'rigid' or 'none', got {affine!r}")
  if io_steps < 0:
    raise InputError(f"io_steps must be >= 0, got {io_steps}")
  if refine is not None:
    refine = refine.checked(fixed.spacing)
  if net is None:
    net, config = weights.demo_model()
  reg_weight = check_reg_weight(config, default_reg_weight(config, refine)
                                if reg_weight is None else reg_weight)
  if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
    mesh = _mesh.inference_mesh(mesh)
  if config.model.get("label_inputs", False) and (fixed_labels is None or moving_labels is None):
    raise InputError(f"{names[1]}: this model takes organ masks as input; give both "
                     "--fixed-labels and --moving-labels")
  hu_window = tuple(config.data.hu_window)
  seconds = {}
  t_start = time.time()

  def timed(name, fn, *args, **kwargs):
    t0 = time.time()
    out = fn(*args, **kwargs)
    seconds[name] = round(time.time() - t0, 3)
    return out

  with CompileCounter() as compiles:
    check_images(fixed, moving, names)
    fixed_mask = check_mask(fixed_mask, fixed, f"{names[0]} (its mask)")
    moving_mask = check_mask(moving_mask, moving, f"{names[1]} (its mask)")
    masks = dict(fixed_mask=fixed_mask, moving_mask=moving_mask)
    fixed_grid = Grid.of(fixed)
    matrix = timed("affine", affine_stage, fixed, moving, model=affine, hu_window=hu_window,
                   implementation=implementation, **masks)
    moving_a = aligned(moving, matrix)
    pair = timed("model_grid", to_model_grid, fixed, moving_a, config, fixed_labels=fixed_labels,
                 moving_labels=aligned(moving_labels, matrix), names=names, **masks)
    _mesh.check_space(pair.grid.shape, _mesh.space_size(mesh), "the model grid")
    disp = timed("network", network_stage, net, config, pair, reg_weight, mesh, implementation)
    grid, io_losses, refine_losses = pair.grid, [], []
    if io_steps > 0:
      disp, values = timed("io", instance_optimise, disp, pair.fixed, pair.moving, steps=io_steps,
                           lr=io_lr, reg_weight=io_reg_weight,
                           window=config.loss.get("window", 9), implementation=implementation)
      disp, io_losses = np.asarray(disp), np.asarray(values).tolist()
    if refine is not None:
      result = timed("refine", refine_stage, fixed, moving_a, disp, grid, refine,
                     hu_window=hu_window, mesh=mesh, implementation=implementation, **masks)
      disp, grid = result.disp, result.grid
      refine_losses = [[float(v[0]), float(v[-1])] for v in result.losses]
    if not np.all(np.isfinite(disp)):
      raise InputError(f"{names[1]}: registration produced a non-finite field (constant or "
                       "empty images?); nothing written")
    d_mm = timed("to_fixed_grid", to_fixed_grid, disp, grid, fixed_grid, matrix)
    warped, warped_labels = timed("warp", warp_outputs, moving, moving_labels, d_mm, fixed_grid)
    inverse_mm = residual = None
    if inverse:
      inverse_mm, residual = timed("inverse", inverse_stage, disp, grid, fixed_grid, matrix)
  registration_seconds = time.time() - t_start
  d_vox = (d_mm @ np.linalg.inv(fixed_grid.affine[:3, :3]).T).astype(np.float32)
  metrics = {
      "seconds": registration_seconds,
      "stage_seconds": seconds,
      **compiles.as_dict(),
      "peak_memory_mib": _peak_mib(),
      "model_grid": {"shape": list(pair.grid.shape), "spacing_mm": float(config.data.spacing)},
      "affine": affine,
      "affine_matrix_ras": matrix.tolist(),
      "network_reg_weight": reg_weight,
      "mesh_space": _mesh.space_size(mesh),
      "io_steps": int(io_steps),
      "io_loss_first_last": [io_losses[0], io_losses[-1]] if io_losses else None,
      "refine": None if refine is None else {
          "levels_mm": list(refine.levels_mm), "steps": list(refine.steps),
          "similarity": refine.similarity, "regulariser": refine.regulariser,
          "reg_weight": refine.reg_weight, "lr": refine.lr,
          "loss_first_last": refine_losses},
      **_metrics.field_quality(d_vox, body=np.asarray(fixed.array) > BODY_HU),
      "max_displacement_mm": float(np.sqrt(np.max(np.sum(d_mm * d_mm, axis=-1)))),
  }
  if inverse:
    metrics["inverse_residual_voxels"] = residual
  return Registration(d_mm, d_vox, warped, warped_labels, np.asarray(fixed.affine), disp, metrics,
                      matrix, inverse_mm, grid)


# --------------------------------------------------------------------------- many pairs

def _pair_name(index: int, spec) -> str:
  stem = lambda p: os.path.basename(p).split(".nii")[0]
  return f"{index:03d}_{stem(spec.moving)}_to_{stem(spec.fixed)}"


def register_many(specs: Sequence, out: str, *, write: Callable | None = None,
                  progress: bool | None = None, log: Callable[[str], None] = print,
                  series: str | None = None, **kwargs) -> list[dict]:
  """Register many pairs in one process (compiled code is reused), one folder per pair.

  Each pair's outputs go to ``out/NNN_<moving>_to_<fixed>/`` (written atomically by
  ``write(result, folder, spec)``, default :func:`jaxreg.pipeline.outputs.write_registration`).
  A pair whose folder already exists is complete (folders appear only when
  finished) and is skipped. A pair that fails (a bad file, a diverging
  refinement) is recorded and the batch goes on. ``out/summary.csv`` lists
  every pair: name, status (``done``, ``skipped``, ``failed``), seconds,
  mean Dice before/after when both label maps are given, and the error.

  Args:
    specs: :class:`jaxreg.data.PairSpec` (fixed, moving, fixed_labels, moving_labels).
    out: the batch's output folder (created if missing).
    write: how to write one result (default: the CLI's outputs).
    progress: show a progress bar with ETA (default: when stderr is a terminal).
    log: one line per pair.
    series: a DICOM series UID, for image folders holding several (:func:`load_pair`).
    **kwargs: passed to :func:`register` (net, config, affine, refine, ...).

  Returns:
    the summary rows.
  """
  from jaxreg import io as _io
  from jaxreg.pipeline import outputs as _outputs
  write = write or _outputs.write_registration
  out = _io.check_output_dir(out)
  os.makedirs(out, exist_ok=True)
  rows = []
  from jaxreg.io.progress import progress_bar
  show = sys.stderr.isatty() if progress is None else progress
  bar, task = progress_bar("register", len(specs), enabled=show, transient=True)
  with bar:
    for i, spec in enumerate(specs):
      name = _pair_name(i, spec)
      folder = os.path.join(out, name)
      row = {"pair": name, "fixed": spec.fixed, "moving": spec.moving, "status": "done",
             "seconds": "", "mean_dice_before": "", "mean_dice": "", "error": ""}
      t0 = time.time()
      if os.path.isdir(folder):
        row["status"] = "skipped"
      else:
        try:
          _register_one(spec, folder, write, kwargs, series)
          row.update(_read_scores(folder))
        except InputError as e:  # a bad file, no overlap, a diverging refinement, ...
          row.update(status="failed", error=str(e).splitlines()[0])
        except Exception as e:  # noqa: BLE001 -- one broken pair must not stop the batch
          row.update(status="failed", error=one_line(e))
        row["seconds"] = round(time.time() - t0, 2)
      rows.append(row)
      log(f"{name}: {row['status']}" + (f" ({row['error']})" if row["error"] else ""))
      _write_summary(out, rows)
      bar.advance(task)
  return rows


def load_masks(spec, fixed: Volume, moving: Volume
               ) -> tuple[np.ndarray | None, np.ndarray | None]:
  """``(fixed_mask, moving_mask)`` bool arrays of a :class:`jaxreg.data.PairSpec`'s
  ``fixed_mask``/``moving_mask`` files (absent: None), each checked to lie on its image's
  grid and to hold a voxel (:func:`check_mask`).

  Raises:
    InputError: an unreadable file, a mask on another grid or an empty one (the message
      names the file).
  """
  from jaxreg import io as _io
  out = []
  for path, image, image_path in ((spec.fixed_mask, fixed, spec.fixed),
                                  (spec.moving_mask, moving, spec.moving)):
    if not path:
      out.append(None)
      continue
    volume = _io.load_labels(path, like=image, like_path=image_path, allow_empty=True)
    out.append(check_mask(volume, image, path))
  return out[0], out[1]


def _register_one(spec, folder: str, write: Callable, kwargs: dict,
                  series: str | None = None) -> None:
  fixed, moving, fl, ml = load_pair(spec, series)
  fm, mm = load_masks(spec, fixed, moving)
  result = register(fixed, moving, fixed_labels=fl, moving_labels=ml, fixed_mask=fm,
                    moving_mask=mm, names=(spec.fixed, spec.moving), **kwargs)
  write(result, folder, fixed=fixed, moving=moving, fixed_labels=fl, moving_labels=ml,
        title=f"{os.path.basename(spec.moving)} -> {os.path.basename(spec.fixed)}")


def _read_scores(folder: str) -> dict:
  import json
  path = os.path.join(folder, "metrics.json")
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    m = json.load(f)
  return {k: round(m[k], 4) for k in ("mean_dice_before", "mean_dice") if k in m}


def _write_summary(out: str, rows: list[dict]) -> None:
  from jaxreg import io as _io
  with _io.atomic_path(os.path.join(out, "summary.csv")) as tmp:
    with open(tmp, "w", newline="", encoding="utf-8") as f:
      writer = csv.DictWriter(f, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
