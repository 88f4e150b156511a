"""One demo pair registered end to end: ``jaxreg register`` vs elastix B-spline, seconds and Dice.

Run: ``python benchmarks/register.py [--pair 0]`` (elastix needs the ``baselines`` extra).

The held-out demo pair ``--pair`` (2.5 mm, 144x144x133, known synthetic deformation)
is written as NIfTI files; then each method runs as a user would, in a fresh
process: read the files, register, resample the moving image and labels onto the
fixed grid, write the results. Reported: the process's wall time (imports and JAX
compilation included), the registration's own time, and the mean Dice over every
label present in both maps (the same labels for both methods).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def _write_pair(folder: str, index: int) -> None:
  from jaxreg import data, io
  pair = data.demo_pair(index, split="eval")
  io.save(os.path.join(folder, "fixed.nii.gz"), np.round(pair.fixed).astype(np.int16), pair.affine)
  io.save(os.path.join(folder, "moving.nii.gz"), np.round(pair.moving).astype(np.int16),
          pair.affine)
  for name, labels in (("fixed", pair.fixed_labels), ("moving", pair.moving_labels)):
    io.save(os.path.join(folder, f"{name}_labels.nii.gz"), labels.astype(np.uint8), pair.affine)


def _elastix_child(pair: str, out: str) -> None:
  """elastix as a user script would run it; prints a JSON line of its results."""
  from jaxreg import elastix, grid, io, metrics, preprocess
  fixed = io.load(os.path.join(pair, "fixed.nii.gz"))
  moving = io.load(os.path.join(pair, "moving.nii.gz"))
  fl = io.load_labels(os.path.join(pair, "fixed_labels.nii.gz"))
  ml = io.load_labels(os.path.join(pair, "moving_labels.nii.gz"))
  disp_mm, seconds = elastix.register(fixed, moving)
  target = preprocess.Grid.of(fixed)
  warped = preprocess.resample_moving(moving, disp_mm, target, cval=-1024.0)
  warped_labels = preprocess.resample_moving(ml, disp_mm, target, order=0)
  os.makedirs(out, exist_ok=True)
  io.save(os.path.join(out, "warped.nii.gz"), warped.astype(np.float32), fixed.affine)
  io.save(os.path.join(out, "warped_labels.nii.gz"), warped_labels.astype(np.int16), fixed.affine)
  io.save_displacement(os.path.join(out, "displacement.nii.gz"),
                       grid.disp_mm_to_voxel(disp_mm, fixed.affine), fixed.affine)
  ids = sorted((set(np.unique(fl.array)) & set(np.unique(ml.array))) - {0})
  dice = np.nanmean(list(metrics.dice(fl.array, warped_labels, ids).values()))
  print(json.dumps({"seconds": seconds, "mean_dice": float(dice)}))


def _timed(cmd) -> tuple[float, str]:
  t0 = time.time()
  out = subprocess.run(cmd, capture_output=True, text=True)
  if out.returncode:
    raise SystemExit(f"{cmd[:4]} failed: {out.stderr[-2000:]}")
  return time.time() - t0, out.stdout


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pair", type=int, default=0)
  parser.add_argument("--io-steps", type=int, default=50)
  parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return _elastix_child(*args.child)
  from jaxreg import elastix
  with tempfile.TemporaryDirectory() as tmp:
    _write_pair(tmp, args.pair)
    p = lambda name: os.path.join(tmp, name)
    print(f"demo evaluation pair {args.pair}, 144x144x133 at 2.5 mm\n"
          "| method | process wall time (s) | registration (s) | mean Dice |\n"
          "| --- | ---: | ---: | ---: |")
    wall, _ = _timed([sys.executable, "-m", "jaxreg.cli", "register", "--fixed",
                      p("fixed.nii.gz"), "--moving", p("moving.nii.gz"), "--fixed-labels",
                      p("fixed_labels.nii.gz"), "--moving-labels", p("moving_labels.nii.gz"),
                      "--out", p("jaxreg"), "--io-steps", str(args.io_steps)])
    m = json.load(open(p("jaxreg/metrics.json")))
    print(f"| jaxreg register (affine + network + {args.io_steps} IO steps, report.png) | "
          f"{wall:.1f} | {m['seconds']:.1f} | {m['mean_dice']:.3f} "
          f"(before {m['mean_dice_before']:.3f}) |", flush=True)
    if not elastix.available():
      print(f"elastix skipped: {elastix.MISSING}")
      return
    wall, out = _timed([sys.executable, __file__, "--child", tmp, p("elastix")])
    e = json.loads(out.strip().splitlines()[-1])
    print(f"| elastix B-spline (jaxreg.elastix map) | {wall:.1f} | {e['seconds']:.1f} | "
          f"{e['mean_dice']:.3f} |")


if __name__ == "__main__":
  main()
