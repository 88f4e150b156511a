"""The network alone, per synthetic family, on held-out seeds: identity vs the shipped model
(6 mm, ``configs/demo_6mm.py --steps 2700``) vs another model: a training run's folder (its latest
checkpoint) or a model folder written by ``jaxreg.io.weights.save_weights`` / ``export_checkpoint``
(default: benchmarks/candidates/demo_8mm, the previously shipped 8 mm ``configs/demo.py`` model).

    python benchmarks/demo_model_families.py [--candidate benchmarks/candidates/demo_8mm] [--pairs 4]

Each model is scored on its own grid (8 mm 48³ / 6 mm 64³, the same field of view) by
``jaxreg.training.evaluate``: mean Dice over the 12 organs of the warped labels, and the folding
fraction, on evaluation seeds (never trained on) of each family. A conditioned candidate is
evaluated at its config's ``loss.reg_weight``. ``JAXREG_WARP`` is read once at the start
(:func:`jaxreg.pipeline.environment.configure`, without the compilation cache): ``auto``
loads the C++ warp kernel, which the evaluation's warps then use on a CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FAMILIES = {  # data.* overrides on top of each model's config (its own grid)
    "smooth 15 mm": ["data.max_disp_mm=15.0", "data.breathing_mm=0.0"],
    "breathing 15 mm": ["data.max_disp_mm=0.0", "data.breathing_mm=15.0"],
    "multi-scale": ["data.fine_disp_mm=6.0", "data.fine_spacing_mm=25.0"],
    "rigid 5 deg / 10 mm": ["data.rigid_deg=5.0", "data.rigid_mm=10.0"],
    "field-of-view cut 20%": ["data.crop=0.2"],
}
NEUTRAL = ["data.fine_disp_mm=0.0", "data.rigid_deg=0.0", "data.rigid_mm=0.0", "data.crop=0.0"]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--candidate", default=os.path.join(ROOT, "benchmarks", "candidates", "demo_8mm"))
  p.add_argument("--pairs", type=int, default=4)
  args = p.parse_args(argv)
  from flax import nnx

  from jaxreg import training
  from jaxreg.io import weights
  from jaxreg.pipeline import environment
  environment.configure("off")
  models = {"shipped (6 mm)": weights.demo_model()}
  if os.path.isdir(os.path.join(args.candidate, "checkpoints")):
    with tempfile.TemporaryDirectory() as tmp:
      step = weights.export_checkpoint(args.candidate, os.path.join(tmp, "m"))
      models[f"candidate ({os.path.basename(args.candidate)}, step {step})"] = \
          weights.load_weights(os.path.join(tmp, "m"))
  elif os.path.isfile(os.path.join(args.candidate, "params.msgpack")):
    net, config = weights.load_weights(args.candidate)
    models[f"candidate ({os.path.basename(args.candidate)}, step {config.train.steps})"] = \
        (net, config)
  else:
    p.error(f"{args.candidate}: neither a training run (checkpoints/) nor a model folder "
            "(params.msgpack)")
  print(f"{args.pairs} held-out pairs per family; mean Dice (12 organs) / folding % "
        "(identity Dice on that model's grid)")
  print("| family | " + " | ".join(models) + " |")
  print("| --- |" + " --- |" * len(models))
  base = training.load_config(os.path.join(ROOT, "configs", "demo.py"))
  for _, config in models.values():
    for key in ("fine_disp_mm", "fine_spacing_mm", "rigid_deg", "rigid_mm", "crop"):
      if key not in config.data:  # the 8 mm model's config predates these fields
        with config.data.ignore_type():
          config.data[key] = base.data[key]
  for family, overrides in FAMILIES.items():
    cells = []
    for name, (net, config) in models.items():
      cfg = training.override(config, NEUTRAL + overrides + [f"data.val_pairs={args.pairs}"])
      r = training.evaluate(cfg, nnx.to_pure_dict(nnx.state(net)))
      cells.append(f"{r['val_dice']:.4f} / {100 * r['val_folding_fraction']:.3f} "
                   f"({r['val_dice_identity']:.4f})")
    print(f"| {family} | " + " | ".join(cells) + " |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
