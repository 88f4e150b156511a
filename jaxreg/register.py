"""Register a CT pair with a trained network (+ instance optimisation); results on the fixed grid.

``register(fixed, moving, ...)``: an affine (or rigid) stage aligns the pair
globally (:mod:`jaxreg.affine`), both images are put on the network's model
grid (:func:`jaxreg.preprocess.prepare_pair`; the moving image through the
affine), the network predicts the composed field, a few Adam steps of instance
optimisation refine it on this pair (``-LNCC + diffusion``, starting from the
network's field), and the affine and deformable parts are composed into **one**
displacement on the **fixed image's original grid** in world millimetres: the
moving image is interpolated once, and the warped image, warped labels and the
displacement all overlay the fixed image in 3D Slicer / ITK-SNAP.

With ``affine = M`` (fixed world ``p`` -> moving world ``M p``) and the
deformable field ``d`` found between the fixed image and the affinely aligned
moving image, the total map is ``p -> M (p + d(p))``; its inverse is
``q -> y + d^-1(y)`` with ``y = M^-1 q`` and ``d^-1`` from
:func:`jaxreg.fields.invert` on the model grid.
"""

from __future__ import annotations

import dataclasses
import functools
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from nibabel.affines import apply_affine

from jaxreg import affine as _affine
from jaxreg import grid as _grid
from jaxreg import losses as _losses
from jaxreg import metrics as _metrics
from jaxreg import model as _model
from jaxreg import preprocess as _preprocess
from jaxreg import warp as _warp
from jaxreg.io import InputError, Volume

__all__ = ["Registration", "register", "instance_optimise"]


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
    model_displacement: ``[*grid.shape, 3]`` the deformable field on the model grid (voxels).
    metrics: runtime, memory, field quality, and Dice/HD95 when both label maps are given.
    affine_matrix: ``[4, 4]`` the affine stage's world map (RAS+ mm, fixed ``p`` ->
      moving ``M p``); the identity with ``affine="none"``.
    inverse_mm: ``[*fixed.shape, 3]`` (with ``inverse=True``, else None): the
      inverse map's displacement, world mm, on the fixed grid's domain: moving
      point ``q`` corresponds to fixed point ``q + inverse_mm(q)``.
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


@functools.partial(jax.jit, static_argnames=("steps", "window"))
def _optimise(disp, fixed, moving, steps, lr, reg_weight, window):
  tx = optax.adam(lr)

  def loss(u):
    warped = _warp.warp(moving, u)
    return -_losses.local_ncc(fixed, warped, window=window) + reg_weight * _losses.diffusion(u)

  def body(carry, _):
    u, opt = carry
    value, grad = jax.value_and_grad(loss)(u)
    updates, opt = tx.update(grad, opt, u)
    return (optax.apply_updates(u, updates), opt), value

  (disp, _), values = jax.lax.scan(body, (disp, tx.init(disp)), None, length=steps)
  return disp, values


def instance_optimise(disp: jax.Array, fixed: jax.Array, moving: jax.Array, *, steps: int = 50,
                      lr: float = 0.05, reg_weight: float = 1.0, window: int = 9
                      ) -> tuple[jax.Array, jax.Array]:
  """Refine a displacement on one pair with Adam on ``-LNCC + reg_weight * diffusion``.

  Args:
    disp: ``[X, Y, Z, 3]`` starting displacement in voxels (e.g. the network's).
    fixed, moving: ``[X, Y, Z]`` images on that grid (intensities in [0, 1]).
    steps: Adam steps (one jitted ``lax.scan``).
    lr: Adam learning rate, voxels per step.
    reg_weight: weight of the diffusion regulariser.
    window: LNCC window.

  Returns:
    ``(refined displacement, loss per step [steps])``.
  """
  if steps < 1:
    return disp, jnp.zeros((0,))
  return _optimise(jnp.asarray(disp), jnp.asarray(fixed), jnp.asarray(moving), steps,
                   float(lr), float(reg_weight), window)


def _peak_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def register(fixed: Volume, moving: Volume, *, net=None, config=None,
             fixed_labels: Volume | None = None, moving_labels: Volume | None = None,
             io_steps: int = 50, io_lr: float = 0.05, io_reg_weight: float = 1.0,
             affine: str = "affine", inverse: bool = False,
             label_ids=None, names: tuple[str, str] = ("fixed", "moving")) -> Registration:
  """Register ``moving`` to ``fixed`` (see the module docstring).

  Args:
    fixed, moving: CT volumes in HU with their affines (any shape, spacing,
      orientation; they must overlap in world space).
    net, config: a network and its training config (default: the shipped demo model).
    fixed_labels, moving_labels: optional label maps on their image's grid;
      with both, Dice and HD95 per label are reported.
    io_steps: instance-optimisation steps (0: the network's field alone).
    io_lr, io_reg_weight: its Adam learning rate and regulariser weight.
    affine: global pre-alignment, ``"affine"`` (12 parameters), ``"rigid"`` or ``"none"``.
    inverse: also compute the inverse map (``Registration.inverse_mm``).
    label_ids: labels to score (default: every label in both maps).
    names: file names for error messages.

  Returns:
    :class:`Registration`.

  Raises:
    InputError: no overlap (the images must share a world frame: they are
      checked before the affine stage), or a bad input.
    ValueError: unknown ``affine``.
  """
  from jaxreg import weights  # lazy: the shipped model is only loaded when needed

  if affine not in ("affine", "rigid", "none"):
    raise ValueError(f"affine must be 'affine', 'rigid' or 'none', got {affine!r}")
  if io_steps < 0:
    raise InputError(f"io_steps must be >= 0, got {io_steps}")
  for volume, name in ((fixed, names[0]), (moving, names[1])):
    lo, hi = float(np.min(volume.array)), float(np.max(volume.array))
    if not hi > lo:
      raise InputError(f"{name}: the image is constant ({lo:g} everywhere): nothing to register")
  t0 = time.time()
  fixed_grid = _preprocess.Grid.of(fixed)
  _preprocess.check_overlap(fixed_grid, _preprocess.Grid.of(moving), names)
  if net is None:
    net, config = weights.demo_model()
  stride = _model.unet_stride(config.model.widths)
  shape = None if config.data.shape is None else tuple(config.data.shape)
  needs_labels = config.model.get("label_inputs", False)
  if needs_labels and (fixed_labels is None or moving_labels is None):
    raise InputError(f"{names[1]}: this model takes organ masks as input; give both "
                     "--fixed-labels and --moving-labels")
  matrix, affine_seconds = np.eye(4), 0.0
  if affine != "none":
    stage = _affine.register(fixed, moving, model=affine, hu_window=tuple(config.data.hu_window))
    matrix, affine_seconds = stage.matrix, stage.seconds
  # the moving image as seen after the affine: its voxel v sits at world M^-1 A_m v
  aligned = lambda v: None if v is None else Volume(v.array, np.linalg.inv(matrix) @ v.affine)
  pair = _preprocess.prepare_pair(fixed, aligned(moving), fixed_labels if needs_labels else None,
                                  aligned(moving_labels) if needs_labels else None,
                                  spacing=config.data.spacing, divisor=stride,
                                  shape=shape, hu_window=tuple(config.data.hu_window),
                                  names=names)
  f, m = jnp.asarray(pair.fixed), jnp.asarray(pair.moving)
  extra = None
  if needs_labels:
    from jaxreg.training import sources, step
    lut = sources.class_lut(config.data.label_ids)
    classes = [jnp.asarray(sources.to_classes(x, lut))[None]
               for x in (pair.fixed_labels, pair.moving_labels)]
    extra = step.label_channels(config, *classes)
  disp, _ = _model.predict_displacement(net, f[None], m[None], method=config.decomposition,
                                        steps=config.svf_steps, extra=extra)
  disp = disp[0]
  io_losses = []
  if io_steps > 0:
    disp, values = instance_optimise(disp, f, m, steps=io_steps, lr=io_lr,
                                     reg_weight=io_reg_weight,
                                     window=config.loss.get("window", 9))
    io_losses = np.asarray(values).tolist()
  disp = np.asarray(disp)
  if not np.all(np.isfinite(disp)):
    raise InputError(f"{names[1]}: registration produced a non-finite field (constant or "
                     "empty images?); nothing written")
  world = np.asarray(_grid.voxel_to_world(_grid.identity_grid(fixed_grid.shape), fixed.affine))
  d_def = _preprocess.field_to_world(disp, pair.grid, fixed_grid)
  d_mm = apply_affine(matrix, world + d_def).astype(np.float32) - world  # p -> M (p + d(p))
  inverse_mm = None
  if inverse:
    from jaxreg import fields
    inv, residual, _ = fields.invert(disp, return_info=True)
    y = apply_affine(np.linalg.inv(matrix), world).astype(np.float32)  # q -> M^-1 q -> y + d^-1(y)
    inverse_mm = (y + _preprocess.field_at_points(np.asarray(inv), pair.grid, y) - world
                  ).astype(np.float32)
  d_vox = np.asarray(_grid.disp_mm_to_voxel(d_mm, fixed.affine), np.float32)
  warped = _preprocess.resample_moving(moving, d_mm, fixed_grid, cval=-1024.0)
  warped_labels = None
  if moving_labels is not None:
    warped_labels = _preprocess.resample_moving(moving_labels, d_mm, fixed_grid, order=0)
  metrics = {
      "seconds": time.time() - t0,
      "peak_memory_mib": _peak_mib(),
      "model_grid": {"shape": list(pair.grid.shape), "spacing_mm": float(config.data.spacing)},
      "io_steps": int(io_steps),
      "affine": affine,
      "affine_matrix_ras": matrix.tolist(),
      "affine_seconds": affine_seconds,
      "io_loss_first_last": [io_losses[0], io_losses[-1]] if io_losses else None,
      "folding_fraction": _metrics.folding_fraction(d_vox),
      "sdlogj": _metrics.sdlogj(d_vox),
  }
  if fixed_labels is not None and warped_labels is not None:
    ids = label_ids or _metrics.common_labels(fixed_labels.array, moving_labels.array)
    before = _preprocess.resample(moving_labels, fixed_grid, order=0)
    spacing = fixed.spacing
    metrics["dice"] = _metrics.dice(fixed_labels.array, warped_labels, ids)
    metrics["dice_before"] = _metrics.dice(fixed_labels.array, before, ids)
    metrics["hd95_mm"] = _metrics.hd95(fixed_labels.array, warped_labels, ids, spacing)
    for k in ("dice", "dice_before", "hd95_mm"):
      metrics[f"mean_{k}"] = _metrics.finite_mean(metrics[k])
  if inverse:
    metrics["inverse_residual_voxels"] = float(residual)
  return Registration(d_mm, d_vox, warped, warped_labels, np.asarray(fixed.affine), disp, metrics,
                      matrix, inverse_mm)
