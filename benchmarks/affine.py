"""Affine pre-alignment: jaxreg.pipeline.affine vs elastix's affine stage, and what it buys afterwards.

Run: ``python benchmarks/affine.py [--spacing 2.0] [--pairs 2]`` (elastix needs the
``baselines`` extra; it is skipped with a message otherwise).

1. Affine stage. The demo CT resampled to ``--spacing`` mm is the fixed image;
   the moving image is the same CT moved by a known affine (rotation 10, -8,
   15 degrees, scaling 1.06 / 0.95 / 1.03, translation 25 / -20 / 15 mm). Both
   methods register the pair; reported: wall time (jaxreg: first call including
   compilation, and a second call), and the mean error (mm) of the recovered
   map over body voxels (HU > -500) against the known one. elastix runs its
   default ``affine`` parameter map (4 resolutions, Mattes MI, 256 iterations,
   adaptive stochastic gradient descent).
2. Deformable step on misaligned pairs. Held-out demo pairs (known deformation,
   exact keypoints) whose moving image is moved by a rotation of 8 degrees and
   a 20 mm shift (in its affine: no resampling), registered by the shipped
   model + 50 IO steps with ``affine="none"`` and ``affine="affine"``; mean Dice
   and TRE (mm) as in evaluate.py.

``JAXREG_WARP`` is read once at the start (:func:`jaxreg.pipeline.environment.configure`,
JAX's persistent compilation cache left off so that the first call compiles): ``auto``
loads the C++ warp kernel, and jaxreg's warps run with that ``implementation``.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import scipy.spatial.transform as sst

from jaxreg.pipeline import affine as AF
from jaxreg import data
from jaxreg.eval import elastix
from jaxreg.eval import evaluation
from jaxreg.io import resample as preprocess
from jaxreg.io import weights
from jaxreg.pipeline import environment
from jaxreg.types import Volume


def _known(centre, angles, scales, shift):
  m = np.eye(4)
  m[:3, :3] = sst.Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(scales)
  m[:3, 3] = centre + np.asarray(shift, float) - m[:3, :3] @ centre
  return m


def _error_mm(fixed, m, true):
  body = np.argwhere(fixed.array > -500) @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]
  return float(np.linalg.norm(body @ (m - true)[:3, :3].T + (m - true)[:3, 3], axis=1).mean())


def _elastix_affine(fixed, moving):
  import itk
  base = itk.ParameterObject.New().GetDefaultParameterMap("affine")
  params = {k: list(base[k]) for k in base.keys()}
  params.update({"RandomSeed": ["0"], "WriteResultImage": ["false"]})
  obj = itk.ParameterObject.New()
  obj.AddParameterMap(params)
  t0 = time.time()
  _, tp = itk.elastix_registration_method(elastix.to_itk(fixed), elastix.to_itk(moving),
                                          parameter_object=obj, log_to_console=False)
  seconds = time.time() - t0
  p = [float(v) for v in tp.GetParameter(0, "TransformParameters")]
  centre = [float(v) for v in tp.GetParameter(0, "CenterOfRotationPoint")]
  lin, t, c = np.array(p[:9]).reshape(3, 3), np.array(p[9:]), np.array(centre)
  lps = np.eye(4)  # x -> A (x - c) + c + t in LPS
  lps[:3, :3], lps[:3, 3] = lin, c + t - lin @ c
  flip = np.diag([-1.0, -1.0, 1.0, 1.0])
  return flip @ lps @ flip, seconds


def affine_stage(spacing: float, implementation: str | None = None) -> None:
  ct = data.demo().ct
  grid = preprocess.model_grid(ct, spacing=spacing, divisor=1)
  fixed = Volume(preprocess.resample(ct, grid, cval=-1024.0), grid.affine)
  true = _known(AF.centre_of_mass(fixed), (10, -8, 15), (1.06, 0.95, 1.03), (25, -20, 15))
  moving = Volume(preprocess.resample_moving(fixed, AF.displacement_mm(np.linalg.inv(true), grid),
                                             grid, cval=-1024.0), grid.affine)
  print(f"\n1. affine stage, {fixed.shape} at {spacing:g} mm; start error "
        f"{_error_mm(fixed, np.eye(4), true):.1f} mm")
  print("| method | seconds | mean error (mm) |\n| --- | ---: | ---: |")
  first = AF.align(fixed, moving, implementation=implementation)
  second = AF.align(fixed, moving, implementation=implementation)
  print(f"| jaxreg.pipeline.affine (8 + 4 mm levels, NCC) | {first.seconds:.1f} (first call) / "
        f"{second.seconds:.1f} | {_error_mm(fixed, second.matrix, true):.2f} |")
  if elastix.available():
    m, seconds = _elastix_affine(fixed, moving)
    print(f"| elastix affine (default map) | {seconds:.1f} | {_error_mm(fixed, m, true):.2f} |")
  else:
    print(f"elastix skipped: {elastix.MISSING}")


def deformable_on_misaligned(pairs: int) -> None:
  net, config = weights.demo_model()
  print(f"\n2. shipped model + 50 IO steps on {pairs} misaligned demo pairs (8 deg, 20 mm)")
  cases = []
  for case in evaluation.demo_cases(pairs, config):
    m0 = _known(AF.centre_of_mass(case.fixed), (0, 3, 8), (1, 1, 1), (20, -10, 8))
    move = lambda v: Volume(v.array, m0 @ v.affine)  # moving content now sits at M0 q
    cases.append(evaluation.Case(case.name, case.fixed, move(case.moving), case.fixed_labels,
                                 move(case.moving_labels), case.fixed_points,
                                 case.moving_points @ m0[:3, :3].T + m0[:3, 3]))
  print("| affine | Dice | TRE (mm) | seconds / pair |\n| --- | ---: | ---: | ---: |")
  for affine in ("none", "affine"):
    rows = evaluation.evaluate(cases, ["jaxreg+io"], net=net, config=config, affine=affine,
                               label_ids=config.data.label_ids, log=lambda s: None)
    mean = lambda k: np.mean([r[k] for r in rows])
    print(f"| {affine} | {mean('dice'):.3f} | {mean('tre'):.2f} | {mean('seconds'):.1f} |")
  ident = [evaluation.case_metrics(c, np.zeros(c.fixed.shape + (3,), np.float32),
                                   config.data.label_ids) for c in cases]
  print(f"| (before registration) | {np.mean([r['dice'] for r in ident]):.3f} | "
        f"{np.mean([r['tre'] for r in ident]):.2f} | |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--spacing", type=float, default=2.0)
  parser.add_argument("--pairs", type=int, default=2)
  args = parser.parse_args()
  settings = environment.configure("off")  # no compilation cache: a first call compiles
  print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}")
  affine_stage(args.spacing, settings.implementation)
  deformable_on_misaligned(args.pairs)


if __name__ == "__main__":
  main()
