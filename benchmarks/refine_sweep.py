"""The sweep behind the refinement defaults: options x pairs of every family, one run.

Run: ``python benchmarks/refine_sweep.py [--index 10]``

The pairs are :mod:`benchmarks.families` cases with index ``--index`` (default
10: seeds disjoint from the benchmark's 0 and 1, so the defaults are not
tuned on the pairs they are reported on). Each configuration of
:class:`jaxreg.refine.RefineOptions` runs after the affine stage and the
shipped network; printed: mean Dice over the 12 organs, TRE (mm), folding
fraction and the refinement's seconds (warm: each configuration is compiled
on an untimed first pair).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import families  # noqa: E402

from jaxreg.refine import RefineOptions  # noqa: E402

CONFIGS = {
    "lncc 60,10 (default)": RefineOptions(steps=(60, 10)),
    "lncc 40,5": RefineOptions(steps=(40, 5)),
    "lncc 60,20": RefineOptions(steps=(60, 20)),
    "lncc 5 mm only, 60": RefineOptions(levels_mm=(5.0,), steps=(60,)),
    "lncc reg 0.5": RefineOptions(reg_weight=0.5),
    "lncc reg 2": RefineOptions(reg_weight=2.0),
    "lncc lr 0.4": RefineOptions(lr=0.4),
    "lncc 10,5,2.5 mm": RefineOptions(levels_mm=(10.0, 5.0, 2.5), steps=(60, 60, 10)),
    "lncc no mask": RefineOptions(mask=False),
    "lncc bending": RefineOptions(regulariser="bending"),
    "mind 60,10": RefineOptions(similarity="mind"),
    "mse 60,10": RefineOptions(similarity="mse"),
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--index", type=int, default=10)
  parser.add_argument("--configs", default=";".join(CONFIGS), help="names separated by ;")
  args = parser.parse_args()
  from jaxreg import compilation, evaluation, register, weights
  compilation.enable_cache()
  net, config = weights.demo_model()
  cases = [families.make_case(f, args.index) for f in families.FAMILIES]
  print("| refinement | " + " | ".join(f"Dice {f}" for f in families.FAMILIES)
        + " | mean Dice | mean TRE (mm) | max folding | refine s |")
  print("| --- |" + " ---: |" * (len(families.FAMILIES) + 4), flush=True)
  for name in args.configs.split(";"):
    options = CONFIGS[name]
    register.register(cases[0].fixed, cases[0].moving, net=net, config=config, refine=options)
    dice, tre, fold, secs = [], [], [], []
    for case in cases:
      r = register.register(case.fixed, case.moving, net=net, config=config, refine=options)
      s = evaluation.score(case, r.displacement_mm, families.ORGANS)
      dice.append(s["dice"])
      tre.append(s["tre"])
      fold.append(s["folding"])
      secs.append(r.metrics["stage_seconds"].get("refine", 0.0))
    print(f"| {name} | " + " | ".join(f"{d:.3f}" for d in dice)
          + f" | {np.mean(dice):.3f} | {np.mean(tre):.2f} | {max(fold):.5f} | "
          f"{np.mean(secs):.1f} |", flush=True)


if __name__ == "__main__":
  main()
