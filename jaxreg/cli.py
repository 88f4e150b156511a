"""The ``jaxreg`` command line: ``jaxreg [--version] COMMAND ...``.

User errors (bad files, bad arguments) print one line on stderr and exit 2,
without a traceback.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import numpy as np

import jaxreg
from jaxreg.types import Volume


class UserError(Exception):
  """An error caused by the user's input: reported as one line, exit code 2."""


def _write_example(folder: str, net, config, implementation: str | None) -> None:
  """Demo evaluation pair 0 (the embedded CT's own 2.5 mm grid) through :func:`register`:
  its outputs and report.png, plus the pair itself and the true displacement."""
  from jaxreg import data, io
  from jaxreg.pipeline import outputs, register

  d = config.data
  pair = data.demo_pair(0, split="eval", max_disp_mm=d.max_disp_mm,
                        control_spacing_mm=d.control_spacing_mm, breathing_mm=d.breathing_mm,
                        contrast=d.contrast, noise_std=d.noise_hu)
  vol = lambda a: Volume(a, pair.affine)
  fixed, moving = vol(pair.fixed), vol(pair.moving)
  fixed_labels, moving_labels = vol(pair.fixed_labels), vol(pair.moving_labels)
  result = register.register(fixed, moving, net=net, config=config, fixed_labels=fixed_labels,
                             moving_labels=moving_labels, affine="none",
                             implementation=implementation)
  outputs.write_registration(result, folder, fixed=fixed, moving=moving,
                             fixed_labels=fixed_labels, moving_labels=moving_labels,
                             title="demo evaluation pair 0", label_ids=tuple(d.label_ids))
  save = lambda name, a: io.save(os.path.join(folder, name), a, pair.affine)
  save("fixed.nii.gz", np.round(pair.fixed).astype(np.int16))
  save("moving.nii.gz", np.round(pair.moving).astype(np.int16))
  save("fixed_labels.nii.gz", pair.fixed_labels.astype(np.uint8))
  save("moving_labels.nii.gz", pair.moving_labels.astype(np.uint8))
  io.save_displacement(os.path.join(folder, "true_displacement.nii.gz"), pair.disp, pair.affine)


def _demo(args: argparse.Namespace) -> int:
  """Short training + evaluation on the embedded CT; outputs in ``args.out``."""
  import json

  from flax import nnx

  from jaxreg import io, training
  from jaxreg.io import weights
  from jaxreg.pipeline import environment, stages

  settings = environment.configure()
  io.check_output_dir(args.out)  # fail now, not after the training
  net, config = weights.demo_model()
  config = training.override(config, [f"data.val_pairs={args.pairs}"])
  short = training.override(config, ["train.devices=1", f"train.steps={args.steps}",
                                     f"train.eval_every={args.steps}",
                                     f"train.checkpoint_every={args.steps}",
                                     f"optim.warmup_steps={min(50, args.steps // 3)}"])
  print(f"jaxreg demo -> {args.out}\n"
        f"1/3 training a network from scratch for {args.steps} steps "
        f"(the shipped model, configs/demo_6mm.py, trained {config.train.steps} steps) ...")
  with io.atomic_dir(args.out) as tmp:
    trained = training.train_and_evaluate(short, os.path.join(tmp, "train"),
                                          progress=sys.stdout.isatty(), log=lambda s: None)
    print(f"2/3 evaluating on {args.pairs} held-out synthetic pairs ...")
    shipped = training.evaluate(config, nnx.to_pure_dict(nnx.state(net)))
    print("3/3 writing an example pair registered by the shipped model ...")
    with stages.enabled(settings.stage_folder):
      _write_example(os.path.join(tmp, "example"), net, config, settings.implementation)
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
    with open(os.path.join(tmp, "summary.json"), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2)
    with open(os.path.join(tmp, "summary.md"), "w", encoding="utf-8") as f:
      f.write("\n".join(table) + "\n")
  print("\n".join(table))
  print(f"Dice over {len(config.data.label_ids)} organs on the "
        f"{config.data.spacing:g} mm model grid, mean of {args.pairs} pairs. "
        f"Open {os.path.join(args.out, 'example')}/moving.nii.gz in 3D Slicer with "
        "displacement.nii.gz as its transform to see it land on fixed.nii.gz.")
  return 0


def _refine_options(args):
  """RefineOptions from the register flags (None with --no-refine)."""
  from jaxreg.pipeline.refine import RefineOptions
  from jaxreg.types import InputError
  if args.no_refine:
    return None

  def numbers(text, kind, flag):
    try:
      return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
      raise InputError(f"{flag}: expected comma-separated numbers, got {text!r}") from None

  given = {"levels_mm": numbers(args.levels, float, "--levels") if args.levels else None,
           "steps": numbers(args.level_steps, int, "--level-steps") if args.level_steps else None,
           "similarity": args.similarity, "regulariser": args.regulariser,
           "reg_weight": args.refine_reg_weight, "lr": args.refine_lr,
           "smooth": (numbers(args.refine_smooth, int, "--refine-smooth")
                      if args.refine_smooth else None)}
  options = RefineOptions(**{k: v for k, v in given.items() if v is not None},
                          mask=not args.no_mask)
  return options


def _register(args: argparse.Namespace) -> int:
  """Register --moving to --fixed (or every pair of --pairs); outputs written atomically,
  under a lock on --out (a second process writing there gets a one-line error)."""
  from jaxreg import io
  with io.output_lock(args.out):
    return _register_locked(args)


def _register_locked(args: argparse.Namespace) -> int:
  import jax

  if args.device:
    jax.config.update("jax_platforms", args.device)
  from jaxreg import data
  from jaxreg.io import weights
  from jaxreg.pipeline import environment, outputs, register, stages

  settings = environment.configure(args.jax_cache)
  if args.pairs is None and (args.fixed is None or args.moving is None):
    raise UserError("give --fixed and --moving, or --pairs pairs.csv")
  if args.pairs is not None and (args.fixed or args.moving):
    raise UserError("--pairs registers the pairs of a CSV: give it without --fixed/--moving")
  options = _refine_options(args)
  if options is not None:
    options.checked((2.0,))  # bad flags fail now, before any file is read
  specs = data.read_pairs_csv(args.pairs) if args.pairs else None
  pair = None
  if specs is None:
    spec = data.PairSpec(args.fixed, args.moving, args.fixed_labels, args.moving_labels,
                         fixed_mask=args.fixed_mask, moving_mask=args.moving_mask)
    pair = register.load_pair(spec, series=args.series)
    pair = (*pair, *register.load_masks(spec, pair[0], pair[1]))
  try:
    net, config = (weights.load_weights(args.checkpoint) if args.checkpoint
                   else weights.demo_model())
  except RuntimeError as e:  # e.g. --device gpu without a GPU
    raise UserError(f"--device {args.device}: {e}".splitlines()[0]) from e
  register.check_reg_weight(config, args.reg_weight)  # before any work
  from jaxreg.ops import sharding as _mesh
  kwargs = dict(net=net, config=config, affine=args.affine, refine=options,
                io_steps=args.io_steps, reg_weight=args.reg_weight, inverse=args.inverse,
                mesh=_mesh.inference_mesh(args.mesh), implementation=settings.implementation)
  write = functools.partial(outputs.write_registration, fmt=args.output_format,
                            learn2reg=args.learn2reg, itk_h5=args.itk_h5, ants=args.ants)
  with stages.enabled(settings.stage_folder):
    if specs is not None:
      return _register_pairs(args, specs, kwargs, write)
    return _register_one(args, pair, kwargs, write)


def _register_pairs(args, specs, kwargs, write) -> int:
  from jaxreg.pipeline import register
  rows = register.register_many(specs, args.out, write=write, series=args.series, **kwargs)
  counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "skipped", "failed")}
  print(f"jaxreg register: {len(rows)} pairs -> {args.out} ({counts['done']} done, "
        f"{counts['skipped']} already complete, {counts['failed']} failed; summary.csv)")
  for row in rows:
    if row["status"] == "failed":
      print(f"jaxreg register: error: {row['pair']}: {row['error']}", file=sys.stderr)
  return 2 if counts["failed"] else 0


def _register_one(args, pair, kwargs, write) -> int:
  from jaxreg.pipeline import register
  fixed, moving, fixed_labels, moving_labels, fixed_mask, moving_mask = pair
  result = register.register(fixed, moving, fixed_labels=fixed_labels,
                             moving_labels=moving_labels, fixed_mask=fixed_mask,
                             moving_mask=moving_mask, names=(args.fixed, args.moving),
                             **kwargs)
  m = write(
      result, args.out, fixed=fixed, moving=moving, fixed_labels=fixed_labels,
      moving_labels=moving_labels,
      title=f"{os.path.basename(args.moving)} -> {os.path.basename(args.fixed)}")
  line = (f"jaxreg register: {args.out} in {m['seconds']:.1f} s, folding "
          f"{m['folding_fraction']:.5f} (body {m['folding_fraction_body']:.5f}), "
          f"SDlogJ {m['sdlogj']:.3f}")
  if "mean_dice" in m:
    line += f", mean Dice {m['mean_dice_before']:.3f} -> {m['mean_dice']:.3f}"
  print(line)
  return 0


def _apply(args: argparse.Namespace) -> int:
  """Resample --moving through the registration (a jaxreg folder, an ANTs pair, elastix
  parameter files, a field or an ITK transform file); one output file, written atomically."""
  from jaxreg import io
  from jaxreg.pipeline import apply
  from jaxreg.types import Grid
  if (args.moving is None) == (args.points is None):
    raise UserError("give --moving IMAGE or --points FILE (one of them)")
  if args.points is not None and (args.labels or args.order):
    raise UserError("--labels and --order are for --moving images, not --points")
  reference = Grid.of(io.load(args.reference)) if args.reference else None
  which, _ = apply.kind(args.registration)  # a missing path or folder: one line, now
  if which == "itk" and reference is None:
    raise UserError(f"{args.registration}: a transform file needs --reference (the grid to "
                    "apply it on)")
  transform = apply.load_any(args.registration, reference)
  if args.points is not None:
    from jaxreg.io import landmarks
    points = landmarks.read_landmarks(args.points, space=args.space)
    mapped = apply.map_points(transform, points.ras, inverse=args.inverse)
    landmarks.write_landmarks(args.out, points, mapped)
    print(f"jaxreg apply: {args.out} ({len(mapped)} points, "
          f"{'moving -> fixed' if args.inverse else 'fixed -> moving'})")
    return 0
  if args.inverse:
    raise UserError("--inverse maps --points; images go moving -> fixed already")
  moving = (io.load_labels(args.moving) if args.labels else io.load(args.moving))
  order = {"linear": 1, "nearest": 0, None: 0 if args.labels else 1}[args.order]
  out = apply.apply(transform, moving, reference=reference, order=order, cval=args.cval,
                    name=args.moving)
  apply.save(args.out, out, reference or transform.grid)
  print(f"jaxreg apply: {args.out} ({'x'.join(map(str, out.shape))}, "
        f"{'nearest' if order == 0 else 'linear'})")
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="jaxreg",
      description="Learned deformable CT registration with field decomposition, in JAX.")
  parser.add_argument("--version", action="version", version=f"jaxreg {jaxreg.__version__}")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  demo = sub.add_parser("demo", help="run the demo job on the embedded data")
  demo.add_argument("--out", default="jaxreg-demo", help="output folder (replaced atomically)")
  demo.add_argument("--steps", type=int, default=60, help="training steps of the short run")
  demo.add_argument("--pairs", type=int, default=4, help="held-out evaluation pairs")
  demo.set_defaults(func=_demo)
  reg = sub.add_parser("register", help="register a moving CT to a fixed CT",
                       description="Outputs, all on the fixed image's grid and affine: "
                       "warped.nii.gz, warped_labels.nii.gz, displacement.nii.gz (ITK/ANTs/Slicer: "
                       "vector, mm, LPS), affine.txt, metrics.json, report.png; "
                       "displacement_voxel.nii.gz with --learn2reg.")
  reg.add_argument("--fixed", help="fixed CT: NIfTI, NRRD, MetaImage, or a DICOM series folder")
  reg.add_argument("--moving", help="moving CT (the same formats)")
  reg.add_argument("--pairs", help="a CSV of pairs (columns fixed,moving[,fixed_labels,"
                   "moving_labels,fixed_mask,moving_mask]) registered in one process: one "
                   "sub-folder per pair in "
                   "--out and summary.csv; complete pairs are skipped on a re-run")
  reg.add_argument("--out", required=True, help="output folder (written atomically)")
  reg.add_argument("--fixed-labels", help="fixed label map (for Dice/HD95)")
  reg.add_argument("--moving-labels", help="moving label map (warped with the moving image)")
  reg.add_argument("--fixed-mask", help="where the fixed image may be compared (a binary map "
                   "on its grid; default: its whole field of view)")
  reg.add_argument("--moving-mask", help="where the moving image may be compared (a binary map "
                   "on its grid; default: its whole field of view)")
  reg.add_argument("--checkpoint", help="model folder (default: the shipped demo model)")
  reg.add_argument("--affine", choices=("affine", "rigid", "none"), default="affine",
                   help="global pre-alignment before the deformable step (written as affine.txt, "
                   "ITK format; displacement.nii.gz is the composed total)")
  ref = reg.add_argument_group("refinement (multi-resolution instance optimisation after the "
                               "network, up to the fixed image's resolution)")
  ref.add_argument("--no-refine", action="store_true", help="the network's field alone")
  ref.add_argument("--similarity",
                   help="lncc (default), mind (MIND-SSC: robust to contrast changes) or mse")
  ref.add_argument("--regulariser", help="diffusion (default) or bending")
  ref.add_argument("--levels", help="level spacings in mm, coarse to fine, e.g. 5,2.5 "
                   "(default: 4x, 2x and 1x the finest = the fixed spacing or 2 mm)")
  ref.add_argument("--level-steps", help="Adam steps per level, e.g. 60,30 (one number: "
                   "the same at every level; default 40 on coarse levels, 60, then 10 on the "
                   "finest)")
  ref.add_argument("--refine-reg-weight", type=float,
                   help="regulariser weight (default per similarity: lncc 0.1, mind 0.1, mse 0.003)")
  ref.add_argument("--refine-lr", type=float,
                   help="Adam learning rate, level voxels per step (default: RefineOptions)")
  ref.add_argument("--refine-smooth",
                   help="passes of a 3x3x3 box mean over each level's control increment, one "
                   "number for all levels or one per level, e.g. 2,1 (default 2; 0: none)")
  ref.add_argument("--no-mask", action="store_true",
                   help="compare the images everywhere, not only over the fixed body")
  reg.add_argument("--output-format", choices=("nifti", "nrrd", "mha"), default="nifti",
                   help="format of the warped images and ITK displacements (default nifti; "
                        "nrrd/mha need the itk extra)")
  reg.add_argument("--learn2reg", action="store_true",
                   help="also write displacement_voxel.nii.gz: the same field as Learn2Reg "
                   "stores it ([X, Y, Z, 3] displacements in fixed voxels, array axis order)")
  reg.add_argument("--itk-h5", action="store_true",
                   help="also write transform.h5: the same map as one ITK composite transform "
                   "(affine + displacement field; SimpleITK, 3D Slicer, antsApplyTransforms)")
  reg.add_argument("--ants", action="store_true",
                   help="also write the ANTs pair ants_0GenericAffine.mat + ants_1Warp.nii.gz "
                   "(and ants_1InverseWarp.nii.gz with --inverse), as antsRegistration names "
                   "them: antsApplyTransforms -t ants_1Warp.nii.gz -t ants_0GenericAffine.mat")
  reg.add_argument("--series", metavar="UID",
                   help="DICOM series instance UID, for an image folder holding several series")
  reg.add_argument("--reg-weight", type=float, metavar="LAMBDA",
                   help="smoothness trade-off of a lambda-conditioned model (--checkpoint), "
                        "within the range it was trained on (default: 20 with the refinement, "
                        "its config's with --no-refine)")
  reg.add_argument("--io-steps", type=int, default=0,
                   help="older dense instance optimisation on the model grid (default 0: off)")
  reg.add_argument("--inverse", action="store_true",
                   help="also write inverse_displacement.nii.gz (moving -> fixed)")
  reg.add_argument("--device", choices=("cpu", "gpu", "tpu"), help="JAX platform to run on")
  reg.add_argument("--mesh", metavar="space=S",
                   help="split each volume along its first axis over S local devices (the "
                   "network and the refinement; for pairs too large for one device)")
  reg.add_argument("--jax-cache", help="JAX compilation cache folder, or 'off' (default: "
                   "$JAXREG_JAX_CACHE or ~/.cache/jaxreg/jax)")
  reg.set_defaults(func=_register)
  app = sub.add_parser("apply", help="apply a registration (jaxreg, ANTs, elastix) to an image, "
                       "a label map or points",
                       description="Resample an image or label map of the moving scan (any "
                       "grid) through the total transform of a registration (a `jaxreg "
                       "register` folder's displacement.nii.gz, an ANTs pair, elastix parameter "
                       "files), in one interpolation, onto the fixed grid or --reference's; or "
                       "map world points through it.")
  app.add_argument("--registration", required=True, metavar="DIR|FILE|PREFIX",
                   help="a folder written by jaxreg register; an ANTs pair (a folder or prefix "
                   "with *0GenericAffine.mat + *1Warp.nii.gz); elastix's TransformParameters.N.txt "
                   "(its initial transforms followed) or its output folder; a displacement "
                   "field (transformix's deformationField, ITK convention); or a transform "
                   "file ITK reads (.h5, .tfm, .txt, .mat; needs --reference, the grid it is "
                   "applied on)")
  app.add_argument("--moving", help="the image or label map to resample (NIfTI, "
                   "or NRRD / MetaImage / DICOM with the itk extra), on any grid")
  app.add_argument("--points", help="world points to map instead: a CSV with columns x, y, z "
                   "(--space says RAS or LPS; other columns kept) or a 3D Slicer .mrk.json; "
                   "fixed -> moving, or moving -> fixed with --inverse; --out in the same form")
  app.add_argument("--space", type=str.upper, choices=("RAS", "LPS"),
                   help="the frame of a CSV's x, y, z (required for a CSV)")
  app.add_argument("--inverse", action="store_true",
                   help="map --points from the moving scan to the fixed one")
  app.add_argument("--out", required=True, help="output file: .nii.gz or .nii (.nrrd, .mha with "
                   "the itk extra), written atomically")
  app.add_argument("--labels", action="store_true",
                   help="--moving is a label map: nearest neighbour, integer values kept")
  app.add_argument("--reference", help="an image whose grid the output takes (default: the "
                   "registration's fixed grid)")
  app.add_argument("--order", choices=("linear", "nearest"),
                   help="interpolation (default: linear; nearest with --labels)")
  app.add_argument("--cval", type=float, default=0.0,
                   help="value where a point maps outside --moving (default 0; -1024 for CT)")
  app.set_defaults(func=_apply)
  train = sub.add_parser("train", help="train a model from a config (as train.py)",
                         add_help=False)
  train.set_defaults(func=None)
  evaluate = sub.add_parser("evaluate", help="evaluate methods on pairs (as evaluate.py)",
                            add_help=False)
  evaluate.set_defaults(func=None)
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  from jaxreg.pipeline import environment
  from jaxreg.types import InputError
  try:
    environment.warp_implementation()  # a bad $JAXREG_WARP fails before any work
  except InputError as e:
    print(f"jaxreg: error: {e}", file=sys.stderr)
    return 2
  if argv[:1] == ["train"]:  # its own flags, including --config.FIELD=VALUE overrides
    from jaxreg.training.main import main as train_main
    return train_main(argv[1:], prog="jaxreg train")
  if argv[:1] == ["evaluate"]:
    from jaxreg.eval.evaluation import main as evaluate_main
    return evaluate_main(argv[1:], prog="jaxreg evaluate")
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help()
    return 2
  from jaxreg.io import interrupt
  from jaxreg.ops.warp_kernel import KernelError
  from jaxreg.types import InputError
  with interrupt.interruptible():
    try:
      rc = args.func(args)
      interrupt.check()  # a signal dropped after the last output was written
      return rc
    except (UserError, InputError, KernelError) as e:
      print(f"jaxreg {args.command}: error: {e}", file=sys.stderr)
      return 2
    except KeyboardInterrupt as e:
      print(f"jaxreg {args.command}: {str(e) or 'interrupted'}; no partial output was left "
            "(a finished output folder is kept; run again to complete the rest)",
            file=sys.stderr)
      return 130


def run() -> None:
  """The ``jaxreg`` command: :func:`main`; after ``register``, the process ends without the
  interpreter's teardown (freeing XLA's programs and every module took ~0.5 s of a 2-core
  machine, a tenth of a small pair's process). Every output is written, closed and renamed
  into place by then, and JAX writes its compilation cache as it compiles."""
  argv = sys.argv[1:]
  code = main(argv)
  if argv[:1] == ["register"]:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


if __name__ == "__main__":
  run()
