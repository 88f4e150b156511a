"""Which lambda of the conditioned network starts the refinement best: one run.

Run: ``python benchmarks/network_lambda.py [--indices 10,11] [--lambdas 0.5,3,20,50,100]``

``jaxreg register``'s default (affine + the shipped network + refinement) on
the :mod:`benchmarks.families` cases with the given indices (default 10 and
11: the sweep's seeds, disjoint from ``benchmarks/register.py``'s 0 and 1), once
per network lambda; with ``--candidate FOLDER`` also with that (unconditioned)
model. Printed per lambda: Dice over the 12 organs / TRE (mm) per family and
the mean TRE. Behind :data:`jaxreg.pipeline.register.REFINE_START_REG_WEIGHT`. The
environment is read once, as ``jaxreg register`` reads it
(:func:`jaxreg.pipeline.environment.configure`): the registrations run with its warp
``implementation``, inside its stage cache.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import families  # noqa: E402


def main() -> None:
  from jaxreg.eval import evaluation
  from jaxreg.io import weights
  from jaxreg.pipeline import environment
  from jaxreg.pipeline import register
  from jaxreg.pipeline import stages
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--indices", default="10,11")
  parser.add_argument("--lambdas", default="0.5,3,20,50,100")
  parser.add_argument("--candidate", default=None,
                      help="also a model folder without lambda conditioning (e.g. "
                           "benchmarks/candidates/demo_8mm)")
  args = parser.parse_args()
  settings = environment.configure()
  net, config = weights.demo_model()
  cases = [families.make_case(f, int(i)) for f in families.FAMILIES
           for i in args.indices.split(",")]
  setups = [(f"lambda {lam}", net, config, float(lam)) for lam in args.lambdas.split(",")]
  if args.candidate:
    setups.append((args.candidate, *weights.load_weights(args.candidate), None))
  for name, n, c, lam in setups:
    results: dict[str, list] = {}
    for case in cases:
      with stages.enabled(settings.stage_folder):
        disp = register.register(case.fixed, case.moving, net=n, config=c, reg_weight=lam,
                                 implementation=settings.implementation).displacement_mm
      s = evaluation.case_metrics(case, disp, families.ORGANS)
      results.setdefault(case.name.rsplit("_", 1)[0], []).append((s["dice"], s["tre"]))
    cells = " ".join(f"{f} {np.mean([r[0] for r in v]):.4f}/{np.mean([r[1] for r in v]):.2f}"
                     for f, v in results.items())
    tre = np.mean([r[1] for v in results.values() for r in v])
    print(f"{name:14s} {cells}  mean TRE {tre:.3f}", flush=True)


if __name__ == "__main__":
  main()
