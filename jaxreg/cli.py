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

class UserError(Exception):
  """An error caused by the user's input: reported as one line, exit code 2."""


def _write_example(folder: str, net, config) -> None:
  """Demo evaluation pair 0 registered by ``net``: images, labels, fields (ITK convention)."""
  from jaxreg import io, model, preprocess, warp
  from jaxreg.training import sources

  pair = sources.demo_pair_for(config, 0, "eval")
  lo, hi = config.data.hu_window
  f = preprocess.window(pair.fixed, lo, hi)[None]
  m = preprocess.window(pair.moving, lo, hi)[None]
  disp = np.asarray(model.predict_displacement(net, f, m, method=config.decomposition,
                                               steps=config.svf_steps)[0][0])
  os.makedirs(folder)
  save = lambda name, a: io.save(os.path.join(folder, name), a, pair.affine)
  save("fixed.nii.gz", np.round(pair.fixed).astype(np.int16))
  save("moving.nii.gz", np.round(pair.moving).astype(np.int16))
  save("warped.nii.gz", np.round(np.asarray(warp.warp(pair.moving, disp, cval=-1024.0)))
       .astype(np.int16))
  save("fixed_labels.nii.gz", pair.fixed_labels.astype(np.uint8))
  save("moving_labels.nii.gz", pair.moving_labels.astype(np.uint8))
  save("warped_labels.nii.gz", np.asarray(warp.warp(pair.moving_labels, disp, order=0))
       .astype(np.uint8))
  io.save_displacement(os.path.join(folder, "displacement.nii.gz"), disp, pair.affine)
  io.save_displacement(os.path.join(folder, "true_displacement.nii.gz"), pair.disp, pair.affine)


def _demo(args: argparse.Namespace) -> int:
  """Short training + evaluation on the embedded CT; outputs in ``args.out``."""
  import json

  from flax import nnx

  from jaxreg import io, training, weights

  io.check_output_dir(args.out)  # fail now, not after the training
  net, config = weights.demo_model()
  config = training.override(config, [f"data.val_pairs={args.pairs}"])
  short = training.override(config, ["train.devices=1", f"train.steps={args.steps}",
                                     f"train.eval_every={args.steps}",
                                     f"train.checkpoint_every={args.steps}",
                                     f"optim.warmup_steps={min(50, args.steps // 3)}"])
  print(f"jaxreg demo -> {args.out}\n"
        f"1/3 training a network from scratch for {args.steps} steps "
        f"(configs/demo.py trains {config.train.steps}) ...")
  with io.atomic_dir(args.out) as tmp:
    trained = training.train_and_evaluate(short, os.path.join(tmp, "train"),
                                          progress=sys.stdout.isatty(), log=lambda s: None)
    print(f"2/3 evaluating on {args.pairs} held-out synthetic pairs ...")
    shipped = training.evaluate(config, nnx.to_pure_dict(nnx.state(net)))
    print("3/3 writing an example pair registered by the shipped model ...")
    _write_example(os.path.join(tmp, "example"), net, config)
    rows = [
        ("identity (no registration)", shipped["val_dice_identity"], 0.0),
        (f"shipped demo model ({config.train.steps} steps)", shipped["val_dice"],
         shipped["val_folding_fraction"]),
        (f"trained here ({args.steps} steps)", trained["val_dice"],
         trained["val_folding_fraction"]),
    ]
    table = ["| method | mean Dice | folding fraction |", "| --- | ---: | ---: |"]
    table += [f"| {name} | {dice:.3f} | {fold:.5f} |" for name, dice, fold in rows]
    summary = {"pairs": args.pairs, "labels": list(config.data.label_ids),
               "shipped": shipped, "trained_here": trained}
    with open(os.path.join(tmp, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    with open(os.path.join(tmp, "summary.md"), "w") as f:
      f.write("\n".join(table) + "\n")
  print("\n".join(table))
  print(f"Dice over {len(config.data.label_ids)} organs on the "
        f"{config.data.spacing:g} mm model grid, mean of {args.pairs} pairs. "
        f"Open {os.path.join(args.out, 'example')}/moving.nii.gz in 3D Slicer with "
        "displacement.nii.gz as its transform to see it land on fixed.nii.gz.")
  return 0


def _register(args: argparse.Namespace) -> int:
  """Register --moving to --fixed; every output on the fixed image's grid, written atomically."""
  import json

  import jax

  if args.device:
    jax.config.update("jax_platforms", args.device)
  from jaxreg import affine, grid, io, preprocess, register, report, weights

  fixed = io.load(args.fixed)
  moving = io.load(args.moving)
  fixed_labels = (io.load_labels(args.fixed_labels, like=fixed, like_path=args.fixed)
                  if args.fixed_labels else None)
  moving_labels = (io.load_labels(args.moving_labels, like=moving, like_path=args.moving)
                   if args.moving_labels else None)
  io.check_output_dir(args.out)  # fail now, not after the registration
  try:
    net, config = (weights.load_weights(args.checkpoint) if args.checkpoint
                   else weights.demo_model())
  except RuntimeError as e:  # e.g. --device gpu without a GPU
    raise UserError(f"--device {args.device}: {e}".splitlines()[0]) from e
  result = register.register(fixed, moving, net=net, config=config, fixed_labels=fixed_labels,
                             moving_labels=moving_labels, io_steps=args.io_steps,
                             affine=args.affine, inverse=args.inverse,
                             names=(args.fixed, args.moving))
  with io.atomic_dir(args.out) as tmp:
    out = lambda name: os.path.join(tmp, name)
    io.save(out("warped.nii.gz"), result.warped.astype(np.float32), result.affine)
    if result.warped_labels is not None:
      io.save(out("warped_labels.nii.gz"), result.warped_labels.astype(np.int16), result.affine)
    io.save_displacement(out("displacement.nii.gz"), result.displacement_voxel, result.affine,
                         convention="itk")
    io.save_displacement(out("displacement_voxel.nii.gz"), result.displacement_voxel,
                         result.affine, convention="voxel")
    if args.affine != "none":
      affine.save_itk(out("affine.txt"), result.affine_matrix)
    if result.inverse_mm is not None:
      io.save_displacement(out("inverse_displacement.nii.gz"),
                           grid.disp_mm_to_voxel(result.inverse_mm, result.affine), result.affine,
                           convention="itk")
    with open(out("metrics.json"), "w") as f:
      json.dump(result.metrics, f, indent=2, default=float)
    before = preprocess.resample(moving, preprocess.Grid.of(fixed), cval=-1024.0,
                                 antialias=False)
    report.save_report(out("report.png"), fixed.array, before, result.warped,
                       result.displacement_voxel, result.affine,
                       title=f"{os.path.basename(args.moving)} -> {os.path.basename(args.fixed)}")
  m = result.metrics
  line = (f"jaxreg register: {args.out} in {m['seconds']:.1f} s, folding "
          f"{m['folding_fraction']:.5f}, SDlogJ {m['sdlogj']:.3f}")
  if "mean_dice" in m:
    line += f", mean Dice {m['mean_dice_before']:.3f} -> {m['mean_dice']:.3f}"
  print(line)
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="jaxreg",
      description="Learned deformable CT registration with field decomposition, in JAX.")
  parser.add_argument("--version", action="version", version=f"jaxreg {jaxreg.__version__}")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  demo = sub.add_parser("demo", help="run the demo job on the embedded data")
  demo.add_argument("--out", default="jaxreg-demo", help="output folder (replaced atomically)")
  demo.add_argument("--steps", type=int, default=150, help="training steps of the short run")
  demo.add_argument("--pairs", type=int, default=4, help="held-out evaluation pairs")
  demo.set_defaults(func=_demo)
  reg = sub.add_parser("register", help="register a moving CT to a fixed CT",
                       description="Outputs, all on the fixed image's grid and affine: "
                       "warped.nii.gz, warped_labels.nii.gz, displacement.nii.gz (ITK/ANTs/Slicer: "
                       "vector, mm, LPS), displacement_voxel.nii.gz (Learn2Reg), metrics.json.")
  reg.add_argument("--fixed", required=True, help="fixed CT (NIfTI)")
  reg.add_argument("--moving", required=True, help="moving CT (NIfTI)")
  reg.add_argument("--out", required=True, help="output folder (written atomically)")
  reg.add_argument("--fixed-labels", help="fixed label map (for Dice/HD95)")
  reg.add_argument("--moving-labels", help="moving label map (warped with the moving image)")
  reg.add_argument("--checkpoint", help="model folder (default: the shipped demo model)")
  reg.add_argument("--io-steps", type=int, default=50,
                   help="instance-optimisation steps (0: the network alone)")
  reg.add_argument("--affine", choices=("affine", "rigid", "none"), default="affine",
                   help="global pre-alignment before the deformable step (written as affine.txt, "
                   "ITK format; displacement.nii.gz is the composed total)")
  reg.add_argument("--inverse", action="store_true",
                   help="also write inverse_displacement.nii.gz (moving -> fixed)")
  reg.add_argument("--device", choices=("cpu", "gpu", "tpu"), help="JAX platform to run on")
  reg.set_defaults(func=_register)
  train = sub.add_parser("train", help="train a model from a config (as train.py)",
                         add_help=False)
  train.set_defaults(func=None)
  evaluate = sub.add_parser("evaluate", help="evaluate methods on pairs (as evaluate.py)",
                            add_help=False)
  evaluate.set_defaults(func=None)
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["train"]:  # its own flags, including --config.FIELD=VALUE overrides
    from jaxreg.training.main import main as train_main
    return train_main(argv[1:], prog="jaxreg train")
  if argv[:1] == ["evaluate"]:
    from jaxreg.evaluation import main as evaluate_main
    return evaluate_main(argv[1:], prog="jaxreg evaluate")
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
