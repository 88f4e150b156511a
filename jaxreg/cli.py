"""The ``jaxreg`` command line: ``jaxreg [--version] COMMAND ...``.

User errors (bad files, bad arguments) print one line on stderr and exit 2,
without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

import jaxreg
import jaxreg.grid

# Commands that later work adds; listed so that `jaxreg --help` tells the truth.
_PLANNED = {
    "register": "register a fixed/moving CT pair (not built yet)",
    "evaluate": "evaluate methods on a dataset (not built yet)",
}


class UserError(Exception):
  """An error caused by the user's input: reported as one line, exit code 2."""


def _demo(args: argparse.Namespace) -> int:
  """Write synthetic evaluation pairs from the embedded CT, with their true fields."""
  from jaxreg import data, fields, io, metrics  # imported here: `jaxreg --help` stays fast

  demo = data.demo()
  print(f"jaxreg demo: {args.pairs} synthetic evaluation pair(s) from the embedded CT "
        f"{demo.ct.shape} at 2.5 mm -> {args.out}")
  rows = []
  with io.atomic_dir(args.out) as tmp:
    for i in range(args.pairs):
      pair = data.demo_pair(i, split="eval")
      folder = os.path.join(tmp, f"pair_{i:03d}")
      os.makedirs(folder)
      for name in ("fixed", "moving"):
        hu = np.round(getattr(pair, name)).astype(np.int16)
        io.save(os.path.join(folder, f"{name}.nii.gz"), hu, pair.affine)
        io.save(os.path.join(folder, f"{name}_labels.nii.gz"),
                getattr(pair, f"{name}_labels").astype(np.uint8), pair.affine)
      io.save_displacement(os.path.join(folder, "true_displacement.nii.gz"), pair.disp,
                           pair.affine, convention="itk")
      io.save_displacement(os.path.join(folder, "true_displacement_voxel.nii.gz"), pair.disp,
                           pair.affine, convention="voxel")
      scores = metrics.dice(pair.fixed_labels, pair.moving_labels, demo.evaluated)
      mm = np.linalg.norm(np.asarray(jaxreg.grid.disp_voxel_to_mm(pair.disp, pair.affine)), axis=-1)
      folding = float((np.asarray(fields.jacobian_determinant(pair.disp)) <= 0).mean())
      rows.append((i, float(np.nanmean(list(scores.values()))), float(mm.mean()), float(mm.max()),
                   folding))
  print("pair  Dice before registration  |u| mean / max (mm)  folding")
  for i, d, mean, mx, fold in rows:
    print(f"{i:4d}  {d:26.3f}  {mean:8.2f} / {mx:6.2f}  {fold:7.4f}")
  print(f"Mean Dice over {len(demo.evaluated)} organs; each folder holds fixed/moving images and "
        "labels and the true field (ITK/Slicer and voxel conventions).\n"
        "Not built yet: the model, training, `register` and `evaluate`; once they land this "
        "command trains the demo model and reports Dice after registration.")
  return 0


def _not_built(name: str):
  def run(args: argparse.Namespace) -> int:
    del args
    raise UserError(f"'jaxreg {name}' is not built yet")
  return run


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="jaxreg",
      description="Learned deformable CT registration with field decomposition, in JAX.")
  parser.add_argument("--version", action="version", version=f"jaxreg {jaxreg.__version__}")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  demo = sub.add_parser("demo", help="run the demo job on the embedded data")
  demo.add_argument("--out", default="jaxreg-demo", help="output folder (replaced atomically)")
  demo.add_argument("--pairs", type=int, default=2, help="number of evaluation pairs")
  demo.set_defaults(func=_demo)
  train = sub.add_parser("train", help="train a model from a config (as train.py)",
                         add_help=False)
  train.set_defaults(func=None)
  for name, text in _PLANNED.items():
    sub.add_parser(name, help=text).set_defaults(func=_not_built(name))
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["train"]:  # its own flags, including --config.FIELD=VALUE overrides
    from jaxreg.training.main import main as train_main
    return train_main(argv[1:], prog="jaxreg train")
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help()
    return 2
  from jaxreg.io import InputError
  try:
    return args.func(args)
  except (UserError, InputError) as e:
    print(f"jaxreg {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
