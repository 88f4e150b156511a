"""The sweep behind the refinement defaults: options x pairs of every family, one run.

Run: ``python benchmarks/refine_sweep.py [--index 10]``

The pairs are :mod:`benchmarks.families` cases with index ``--index`` (default
10: seeds disjoint from the benchmark's 0 and 1, so the defaults are not
tuned on the pairs they are reported on). Each configuration of
:class:`jaxreg.pipeline.refine.RefineOptions` runs after the affine stage and the
shipped network; printed: Dice over the 12 organs and TRE (mm) per family and
their means, the largest folding fraction and the refinement's mean seconds
(warm: each configuration is compiled on an untimed first pair). The
``demons (reference)`` row is :mod:`jaxreg.eval.demons` on the same pairs (its
whole registration's seconds). The environment is read once, as ``jaxreg register`` reads
it (:func:`jaxreg.pipeline.environment.configure`): the registrations run with its warp
``implementation``, inside its stage cache.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import families  # noqa: E402

from jaxreg.pipeline.refine import RefineOptions  # noqa: E402

# The rows before the smoothing ones pin smooth=0, reg_weight=1 (the defaults until
# the smoothing sweep), so each row is the configuration that was measured.
_OLD = dict(smooth=0, reg_weight=1.0)
_NEW = dict(smooth=2, reg_weight=0.3)  # the defaults since, pinned likewise
_TWO = (5.0, 2.5)  # the default levels (mm, 2.5 mm CT) until 2026-12-05; their steps 60, 10
CONFIGS = {
    "lncc 60,10 smooth 0 reg 1 (old default)": RefineOptions(levels_mm=_TWO, steps=(60, 10), **_OLD),
    "lncc 40,5": RefineOptions(levels_mm=_TWO, steps=(40, 5), **_OLD),
    "lncc 60,20": RefineOptions(levels_mm=_TWO, steps=(60, 20), **_OLD),
    "lncc 5 mm only, 60": RefineOptions(levels_mm=(5.0,), steps=(60,), **_OLD),
    "lncc reg 0.5": RefineOptions(levels_mm=_TWO, reg_weight=0.5, smooth=0),
    "lncc reg 2": RefineOptions(levels_mm=_TWO, reg_weight=2.0, smooth=0),
    "lncc lr 0.4": RefineOptions(levels_mm=_TWO, lr=0.4, **_OLD),
    "lncc 10,5,2.5 mm": RefineOptions(levels_mm=(10.0, 5.0, 2.5), steps=(60, 60, 10), **_OLD),
    "lncc no mask": RefineOptions(levels_mm=_TWO, mask=False, **_OLD),
    "lncc bending": RefineOptions(levels_mm=_TWO, regulariser="bending", **_OLD),
    "mind 60,10": RefineOptions(levels_mm=_TWO, similarity="mind", smooth=0),
    "mse 60,10": RefineOptions(levels_mm=_TWO, similarity="mse", smooth=0),
    # ConvexAdam-style smoothing of the control increment (RefineOptions.smooth passes).
    "lncc smooth 1 reg 1": RefineOptions(levels_mm=_TWO, smooth=1, reg_weight=1.0),
    "lncc smooth 2 reg 1": RefineOptions(levels_mm=_TWO, smooth=2, reg_weight=1.0),
    "lncc smooth 1 reg 0.3": RefineOptions(levels_mm=_TWO, smooth=1, reg_weight=0.3),
    "lncc smooth 3 reg 1": RefineOptions(levels_mm=_TWO, smooth=3, reg_weight=1.0),
    "lncc smooth 2 reg 0.3 (default to 2026-12-05)": RefineOptions(levels_mm=_TWO, **_NEW),
    "lncc smooth 2 reg 0.1": RefineOptions(levels_mm=_TWO, smooth=2, reg_weight=0.1),
    "lncc smooth 2 reg 0": RefineOptions(levels_mm=_TWO, smooth=2, reg_weight=0.0),
    "lncc smooth 3 reg 0.3": RefineOptions(levels_mm=_TWO, smooth=3, reg_weight=0.3),
    "lncc smooth 2 reg 0.1 lr 0.4": RefineOptions(levels_mm=_TWO, smooth=2, reg_weight=0.1, lr=0.4),
    "lncc smooth 2 reg 0.1 60,20": RefineOptions(levels_mm=_TWO, smooth=2, reg_weight=0.1, steps=(60, 20)),
    "lncc smooth 2,1 reg 0.1": RefineOptions(levels_mm=_TWO, smooth=(2, 1), reg_weight=0.1),
    "lncc smooth 2,0 reg 0.1": RefineOptions(levels_mm=_TWO, smooth=(2, 0), reg_weight=0.1),
    "lncc smooth 3,1 reg 0.1": RefineOptions(levels_mm=_TWO, smooth=(3, 1), reg_weight=0.1),
    # Towards demons on breathing / local TRE: a dense (control stride 1), smoothed finest level
    # represents sharper gradients (2 passes at 2.5 mm: sigma ~2.9 mm, about demons' 1.5 voxels).
    "lncc smooth 2 reg 0.3 control 2,1": RefineOptions(levels_mm=_TWO, control=(2, 1), **_NEW),
    "lncc smooth 2 reg 0.3 60,30": RefineOptions(levels_mm=_TWO, steps=(60, 30), **_NEW),
    "lncc smooth 2 reg 0.3 control 2,1 60,30": RefineOptions(levels_mm=_TWO, control=(2, 1), steps=(60, 30), **_NEW),
    # Demons' own force is an SSD: the same-contrast families may prefer it once smoothed.
    "mse smooth 2 reg 0.003": RefineOptions(levels_mm=_TWO, similarity="mse", smooth=2, reg_weight=0.003),
    "mse smooth 2 reg 0.001": RefineOptions(levels_mm=_TWO, similarity="mse", smooth=2, reg_weight=0.001),
    # After the moving image is sampled once on lattice-aligned levels (2026-12-05).
    "lncc smooth 2 reg 0.3 60,20": RefineOptions(levels_mm=_TWO, steps=(60, 20), **_NEW),
    "lncc smooth 2,1 reg 0.3": RefineOptions(levels_mm=_TWO, smooth=(2, 1), reg_weight=0.3),
    "lncc smooth 2 reg 0.3 lr 0.3": RefineOptions(levels_mm=_TWO, lr=0.3, **_NEW),
    "lncc smooth 2 reg 0.3 10,5,2.5 mm": RefineOptions(levels_mm=(10.0, 5.0, 2.5),
                                                       steps=(40, 60, 10), **_NEW),
    "lncc smooth 2 reg 0.3 window 7": RefineOptions(levels_mm=_TWO, window=7, **_NEW),
    "lncc smooth 2 reg 0.3 window 3": RefineOptions(levels_mm=_TWO, window=3, **_NEW),
    # The default since 2026-12-05 (4x, 2x, 1x the finest spacing; 40, 60, 10 steps).
    "default (lncc smooth 2 reg 0.1, 10,5,2.5 mm)": RefineOptions(),
    "lncc smooth 2 reg 0.1 10,5,2.5 mm": RefineOptions(levels_mm=(10.0, 5.0, 2.5),
                                                       steps=(40, 60, 10), smooth=2,
                                                       reg_weight=0.1),
    "lncc smooth 2 reg 0.05": RefineOptions(levels_mm=_TWO, smooth=2, reg_weight=0.05),
    "lncc smooth 2 reg 0.05 10,5,2.5 mm": RefineOptions(levels_mm=(10.0, 5.0, 2.5),
                                                        steps=(40, 60, 10), smooth=2,
                                                        reg_weight=0.05),
    # The anchor, measured in the same run (jaxreg.eval.demons; its total seconds in the last column).
    "demons (reference)": None,
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--index", type=int, default=10)
  parser.add_argument("--configs", default=";".join(CONFIGS), help="names separated by ;")
  args = parser.parse_args()
  from jaxreg.eval import demons
  from jaxreg.eval import evaluation
  from jaxreg.io import weights
  from jaxreg.pipeline import environment
  from jaxreg.pipeline import register
  from jaxreg.pipeline import stages
  settings = environment.configure()
  net, config = weights.demo_model()

  def run(case, options):
    with stages.enabled(settings.stage_folder):
      return register.register(case.fixed, case.moving, net=net, config=config, refine=options,
                               implementation=settings.implementation)

  cases = [families.make_case(f, args.index) for f in families.FAMILIES]
  print("| refinement | " + " | ".join(f"Dice {f}" for f in families.FAMILIES)
        + " | " + " | ".join(f"TRE {f}" for f in families.FAMILIES)
        + " | mean Dice | mean TRE (mm) | max folding | refine s |")
  print("| --- |" + " ---: |" * (2 * len(families.FAMILIES) + 4), flush=True)
  for name in args.configs.split(";"):
    options = CONFIGS[name]
    if options is not None:
      run(cases[0], options)
    dice, tre, fold, secs = [], [], [], []
    for case in cases:
      if options is None:
        start = time.perf_counter()
        disp_mm = demons.run(case.fixed, case.moving)[0]
        secs.append(time.perf_counter() - start)
      else:
        r = run(case, options)
        disp_mm = r.displacement_mm
        secs.append(r.metrics["stage_seconds"].get("refine", 0.0))
      s = evaluation.case_metrics(case, disp_mm, families.ORGANS)
      dice.append(s["dice"])
      tre.append(s["tre"])
      fold.append(s["folding"])
    print(f"| {name} | " + " | ".join(f"{d:.3f}" for d in dice)
          + " | " + " | ".join(f"{t:.2f}" for t in tre)
          + f" | {np.mean(dice):.3f} | {np.mean(tre):.2f} | {max(fold):.5f} | "
          f"{np.mean(secs):.1f} |", flush=True)


if __name__ == "__main__":
  main()
