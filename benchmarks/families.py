"""Families of seeded, hard registration pairs of the demo CT, with exact ground truth.

Run: ``python benchmarks/families.py`` builds every case and prints, per case,
the largest true displacement (mm), the mean Dice of the 12 organs and the
mean keypoint distance (mm) before registration.

Every case is made from the embedded demo CT (:func:`jaxreg.data.demo`: a real
chest/abdomen CT, 144 x 144 x 133 voxels of 2.5 mm, with a TotalSegmentator
label map), on its own grid:

* **moving** = the real CT (HU), unchanged except in the ``noise`` family;
* **fixed** = the (noise-free) CT pulled back through the true displacement
  ``disp`` (voxels): ``fixed(x) = moving(x + disp(x))``, trilinear, -1024 HU
  outside the CT; then the family's intensity changes; then Gaussian noise of
  10 HU (every family; ``noise`` uses its own, larger, level instead);
* **labels**: moving = the CT's labels; fixed = moving labels pulled back
  through ``disp`` with nearest neighbour (0 outside);
* **keypoints** (as :func:`jaxreg.eval.evaluation._demo_keypoints`): ``keypoints``
  random voxel centres inside the 12 organs :data:`ORGANS` of the fixed labels
  and their true moving positions ``v + disp(v)``, both in world mm (RAS+).

``disp`` maps fixed to moving; :func:`true_displacement` returns it. Ranges
``a-b`` are drawn uniformly per case. "Local field" is
:func:`jaxreg.data.random_smooth_field`: cubic B-spline-interpolated Gaussian
noise on a control grid of the given spacing, scaled so that its largest
vector has the given length (the field's maximum, not its typical size).

1. ``local``: a local field only, max 8-12 mm, control spacing 20-40 mm. No
   global motion; measures plain deformable accuracy.
2. ``breathing``: breathing motion (:func:`jaxreg.data.breathing_field`) of
   15-20 mm, 0 at the lung apex growing to the diaphragm (both from the lung
   labels, as :func:`jaxreg.data.synthetic_pair` places them) and decaying
   below it, with an anterior component of 20%; composed with a mild local
   field of 3-4 mm at 40 mm. Measures large, sliding-like craniocaudal motion.
3. ``misaligned``: a rigid misalignment, rotation 8-10 degrees about a random
   axis through the body's centre (centroid of the largest HU > -500
   component) and translation 20-30 mm in a random direction (world map
   ``p -> R (p - c) + c + t``), composed with a local field of 6-8 mm at 30 mm.
   Measures capture range (the rigid part alone moves far voxels by up to
   ~70 mm).
4. ``contrast``: a local field of 8-10 mm at 30 mm, and a contrast-phase
   change in the fixed image: +40 HU inside liver (5), spleen (1) and kidneys
   (2, 3) of the fixed labels, then a global gamma-like change as
   :func:`jaxreg.data.synthetic_pair` (``lo + ((I - lo) / (hi - lo))^gamma
   (hi - lo)`` with the CT's HU range, ``gamma = exp(U(-0.1, 0.1))``; over
   [-1024, 3071] HU this shifts soft tissue by up to about 150 HU, either
   way). Measures robustness to organ-wise and global intensity changes.
5. ``noise``: a local field of 8-10 mm at 30 mm; Gaussian noise of 40-60 HU
   (standard deviation) in the fixed image and 20 HU in the moving image,
   independent. Measures robustness to low-dose-like noise.

Global motion and local field are composed as in
:func:`jaxreg.data.synthetic_pair`: ``disp = compose(local, global)``
(:func:`jaxreg.ops.fields.compose`), i.e. a fixed voxel goes through the global
motion first and the local field is then taken at the point reached:
``disp(x) = g(x) + l(x + g(x))`` (``l`` extended by its border values where
``x + g(x)`` leaves the grid).

Seeds: case ``index`` of family number ``k`` (its position in
:data:`FAMILIES`) draws everything from ``numpy.random.default_rng(seed + 1000
* k + index)``; the default ``seed`` 2e9 keeps every case apart from training
(:data:`jaxreg.data.TRAIN_SEED_BASE` = 0) and evaluation
(:data:`jaxreg.data.EVAL_SEED_BASE` = 1e9) pairs.
"""

from __future__ import annotations

import functools
import time

import jax
import numpy as np
import scipy.ndimage as ndi
from scipy.spatial.transform import Rotation

from jaxreg import data as _data
from jaxreg.data import synthetic as _synthetic
from jaxreg.ops import fields as _fields
from jaxreg.ops import grid as _grid
from jaxreg import metrics as _metrics
from jaxreg.ops import points as _points
from jaxreg.ops import warp as _warp
from jaxreg.eval.evaluation import Case
from jaxreg.types import Volume

__all__ = ["FAMILIES", "ORGANS", "SEED", "make_cases", "make_case", "true_displacement"]

FAMILIES = ("local", "breathing", "misaligned", "contrast", "noise")
# Organs the keypoints are drawn in and the printed Dice is averaged over.
ORGANS = (1, 2, 3, 5, 6, 10, 11, 12, 13, 14, 51, 52)
SEED = 2_000_000_000
SEED_STRIDE = 1000  # seed of case i of family k: seed + SEED_STRIDE * k + i

_LUNGS = (10, 11, 12, 13, 14)
_ENHANCED = (1, 2, 3, 5)  # spleen, kidneys, liver
_ENHANCEMENT_HU = 40.0
_GAMMA = 0.1  # contrast family: gamma = exp(U(-_GAMMA, _GAMMA))
_NOISE_HU = 10.0  # fixed-image noise of every family but "noise"
_BACKGROUND = -1024.0

_compose = jax.jit(_fields.compose)
_warp_jit = jax.jit(_warp.warp, static_argnames=("order", "padding", "cval"))


@functools.lru_cache(maxsize=1)
def _source():
  """The demo CT (float32 HU), its labels (int32) and affine, and the body centre (mm)."""
  d = _data.demo()
  ct = np.asarray(d.ct.array, np.float32)
  labels = np.asarray(d.labels.array, np.int32)
  affine = np.asarray(d.ct.affine, np.float64)
  components, n = ndi.label(ct > -500.0)
  if n == 0:
    raise ValueError("demo CT has no voxel above -500 HU")
  body = components == 1 + np.argmax(np.bincount(components.ravel())[1:])
  centre = _points.voxel_points_to_world(np.argwhere(body).mean(0)[None], affine)[0]
  return ct, labels, affine, centre


def _family_index(family: str) -> int:
  if family not in FAMILIES:
    raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
  return FAMILIES.index(family)


def _rng(family: str, index: int, seed: int) -> np.random.Generator:
  k = _family_index(family)
  if not 0 <= index < SEED_STRIDE:
    raise ValueError(f"index must be in [0, {SEED_STRIDE}) so that families keep disjoint "
                     f"seeds, got {index}")
  return np.random.default_rng(seed + SEED_STRIDE * k + index)


def _unit_vector(rng: np.random.Generator) -> np.ndarray:
  v = rng.normal(size=3)
  return v / np.linalg.norm(v)


def rigid_displacement(shape, affine, rotation: np.ndarray, centre_mm, translation_mm
                       ) -> np.ndarray:
  """Dense pull-back displacement of the world rigid map ``p -> R (p - c) + c + t``.

  Args:
    shape: ``(X, Y, Z)`` grid.
    affine: ``[4, 4]`` voxel-to-world affine of the grid (mm, RAS+).
    rotation: ``[3, 3]`` rotation matrix ``R`` (world frame).
    centre_mm: ``[3]`` centre of rotation ``c``, world mm.
    translation_mm: ``[3]`` translation ``t``, world mm.

  Returns:
    ``[X, Y, Z, 3]`` float32 displacement in voxels: voxel ``x`` maps to
    ``A^-1 (R (A x - c) + c + t)``, with ``A`` the affine.
  """
  affine = np.asarray(affine, np.float64)
  c = np.asarray(centre_mm, np.float64)
  world = np.eye(4)
  world[:3, :3] = rotation
  world[:3, 3] = c + np.asarray(translation_mm, np.float64) - rotation @ c
  voxel = np.linalg.inv(affine) @ world @ affine
  return np.asarray(_grid.affine_displacement(voxel, shape), np.float32)


def _local(rng, shape, affine, max_mm, spacing_mm) -> np.ndarray:
  return _data.random_smooth_field(rng, shape, affine, max_mm=rng.uniform(*max_mm),
                                   control_spacing_mm=rng.uniform(*spacing_mm))


def _displacement(family: str, rng: np.random.Generator) -> np.ndarray:
  """The family's true displacement (voxels), drawn first from the case's ``rng``."""
  ct, labels, affine, centre = _source()
  shape = ct.shape
  if family == "local":
    return _local(rng, shape, affine, (8.0, 12.0), (20.0, 40.0))
  if family == "breathing":
    apex, base = _synthetic._lung_levels(shape, affine, labels, _LUNGS)
    breath = _data.breathing_field(shape, affine, amplitude_mm=rng.uniform(15.0, 20.0),
                                   diaphragm_mm=base, apex_mm=apex)
    local = _local(rng, shape, affine, (3.0, 4.0), (40.0, 40.0))
    return np.asarray(_compose(local, breath))
  if family == "misaligned":
    rotation = Rotation.from_rotvec(
        np.deg2rad(rng.uniform(8.0, 10.0)) * _unit_vector(rng)).as_matrix()
    translation = rng.uniform(20.0, 30.0) * _unit_vector(rng)
    rigid = rigid_displacement(shape, affine, rotation, centre, translation)
    local = _local(rng, shape, affine, (6.0, 8.0), (30.0, 30.0))
    return np.asarray(_compose(local, rigid))
  # contrast, noise
  return _local(rng, shape, affine, (8.0, 10.0), (30.0, 30.0))


def true_displacement(family: str, index: int, *, seed: int = SEED) -> np.ndarray:
  """The true displacement of case ``index`` of ``family`` (as :func:`make_case` builds it).

  Returns:
    ``[X, Y, Z, 3]`` float32 pull-back displacement in voxels of the demo grid:
    fixed voxel ``x`` corresponds to moving voxel ``x + disp(x)``; multiply by
    ``affine[:3, :3]`` (:func:`jaxreg.ops.grid.disp_voxel_to_mm`) for world mm.

  Raises:
    ValueError: unknown family, or ``index`` outside ``[0, 1000)``.
  """
  return _displacement(family, _rng(family, index, seed)).astype(np.float32)


def make_case(family: str, index: int, *, seed: int = SEED, keypoints: int = 100) -> Case:
  """Case ``index`` of ``family``, named ``f"{family}_{index}"`` (see the module docstring).

  Args:
    family: one of :data:`FAMILIES`.
    index: case number in ``[0, 1000)``.
    seed: base seed; the case uses ``seed + 1000 * FAMILIES.index(family) + index``.
    keypoints: number of keypoint pairs (>= 1).

  Returns:
    :class:`jaxreg.eval.evaluation.Case` on the demo grid: fixed and moving images
    (float32 HU), label maps (int32), and ``[keypoints, 3]`` fixed and moving
    points in world mm (RAS+).

  Raises:
    ValueError: unknown family, ``index`` out of range or ``keypoints < 1``.
  """
  if keypoints < 1:
    raise ValueError(f"keypoints must be >= 1, got {keypoints}")
  rng = _rng(family, index, seed)
  ct, labels, affine, _ = _source()
  disp = _displacement(family, rng)  # first draws of rng: true_displacement repeats them
  fixed = np.asarray(_warp_jit(ct, disp, cval=_BACKGROUND))
  fixed_labels = np.asarray(_warp_jit(labels, disp, order=0))
  moving = ct
  noise_hu = _NOISE_HU
  if family == "contrast":
    fixed = fixed + _ENHANCEMENT_HU * np.isin(fixed_labels, _ENHANCED)
    lo, hi = float(ct.min()), float(ct.max())
    gamma = np.exp(rng.uniform(-_GAMMA, _GAMMA))
    fixed = lo + np.clip((fixed - lo) / (hi - lo), 0.0, 1.0) ** gamma * (hi - lo)
  elif family == "noise":
    noise_hu = rng.uniform(40.0, 60.0)
    moving = ct + rng.normal(scale=20.0, size=ct.shape)
  fixed = fixed + rng.normal(scale=noise_hu, size=ct.shape)

  inside = np.argwhere(np.isin(fixed_labels, ORGANS))
  vox = inside[rng.choice(len(inside), size=min(keypoints, len(inside)), replace=False)]
  moved = vox + disp[tuple(vox.T)]  # exact: the field is sampled at voxel centres
  vol = lambda a, dtype: Volume(np.asarray(a, dtype), affine)
  return Case(f"{family}_{index}", vol(fixed, np.float32), vol(moving, np.float32),
              vol(fixed_labels, np.int32), vol(labels, np.int32),
              _points.voxel_points_to_world(vox, affine),
              _points.voxel_points_to_world(moved, affine))


def make_cases(*, per_family: int = 2, seed: int = SEED, keypoints: int = 100) -> list[Case]:
  """``per_family`` cases of every family in :data:`FAMILIES`, family by family.

  Names are ``local_0, local_1, ..., noise_{per_family - 1}``; see
  :func:`make_case` for the arguments.
  """
  if not 0 <= per_family <= SEED_STRIDE:
    raise ValueError(f"per_family must be in [0, {SEED_STRIDE}], got {per_family}")
  return [make_case(f, i, seed=seed, keypoints=keypoints)
          for f in FAMILIES for i in range(per_family)]


def _main() -> None:
  t0 = time.perf_counter()
  cases = make_cases()
  seconds = time.perf_counter() - t0
  print(f"{'case':14s} {'max |disp| mm':>13s} {'Dice before':>11s} {'keypoints mm':>12s}")
  for case in cases:
    family, index = case.name.rsplit("_", 1)
    disp_mm = np.asarray(_grid.disp_voxel_to_mm(
        true_displacement(family, int(index)), case.fixed.affine))
    dice = _metrics.finite_mean(_metrics.dice(case.fixed_labels.array,
                                              case.moving_labels.array, ORGANS))
    dist = np.linalg.norm(case.moving_points - case.fixed_points, axis=-1).mean()
    print(f"{case.name:14s} {np.linalg.norm(disp_mm, axis=-1).max():13.1f} {dice:11.3f} "
          f"{dist:12.1f}")
  print(f"built {len(cases)} cases in {seconds:.1f} s ({seconds / len(cases):.1f} s each)")


if __name__ == "__main__":
  _main()
