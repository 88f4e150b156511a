"""Data pipeline throughput at the paper's scale: pairs per second read, resampled, cropped and
augmented by the Grain pipeline (``jaxreg.data.pipeline``) with 0, 1 and 2 worker processes,
beside the paper-scale train step those pairs feed, timed in the same run.

Run: ``python benchmarks/data.py [--pairs 4] [--batches 6] [--workers 0 1 2] [--no-step]``

The benchmark writes ``--pairs`` real ``.nii.gz`` pairs from the embedded CT (int16 HU and
uint8 labels, gzip level 6 as scanners' exports are): each fixed image on a 192x160x256 grid
at 2 mm, its moving image a synthetic deformation of it on a grid shifted by (1.3, -0.7, 2.1)
mm, so resampling the moving image is real work. The pipeline reads them as
``configs/default.py`` trains (2 mm, 192x160x256, 14 labels, augmentation on), batch 1.
Time per pair: median of ``--batches`` batches after the first (worker start-up is timed
apart). The train step: ``configs/default.py``'s network and loss on one such pair, one Adam
step (median of 2 after one warm-up), in a fresh process (``--no-step`` skips it: about two
minutes and 20 GB here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

SHAPE = (192, 160, 256)
SPACING = 2.0


def write_pairs(folder: str, count: int) -> str:
  """``count`` pairs of paper-scale NIfTI files and their CSV manifest; the CSV's path."""
  import nibabel as nib

  from jaxreg.data import demo_pair
  rows = ["fixed,moving,fixed_labels,moving_labels"]
  for i in range(count):
    pair = demo_pair(i, spacing=SPACING, shape=SHAPE, engine="numpy", max_disp_mm=10.0)
    moved = pair.affine.copy()
    moved[:3, 3] += (1.3, -0.7, 2.1)
    names = [f"f{i}.nii.gz", f"m{i}.nii.gz", f"fl{i}.nii.gz", f"ml{i}.nii.gz"]
    for name, array, affine, dtype in zip(
        names, (pair.fixed, pair.moving, pair.fixed_labels, pair.moving_labels),
        (pair.affine, moved, pair.affine, moved), (np.int16, np.int16, np.uint8, np.uint8)):
      image = nib.Nifti1Image(np.round(array).astype(dtype), affine)
      nib.save(image, os.path.join(folder, name))
    rows.append(",".join(names))
  path = os.path.join(folder, "pairs.csv")
  with open(path, "w") as f:
    f.write("\n".join(rows) + "\n")
  return path


def _config(csv: str):
  from jaxreg import training
  config = training.load_config("default")
  return training.override(config, [f"data.path={csv!r}", "data.val_pairs=1",
                                    "train.batch_size=1"])


def time_pipeline(csv: str, workers: int, batches: int) -> dict:
  """Seconds of the first batch (start-up) and the median per pair after it."""
  from jaxreg.data import pipeline
  from jaxreg.training import sources
  config = _config(csv)
  found = sources.make_sources(config)
  t0 = time.perf_counter()
  it = pipeline.batches(found.train, 1, num_examples=found.num_train, seed=0, workers=workers,
                        buffer=2, augment=sources.augment_of(config), log=lambda s: None)
  times = []
  try:
    batch = next(it)
    first = time.perf_counter() - t0
    for _ in range(batches):
      t0 = time.perf_counter()
      batch = next(it)
      times.append(time.perf_counter() - t0)
  finally:
    it.close()
  assert batch["fixed"].shape == (1, *SHAPE) and "moving_labels" in batch
  return {"workers": workers, "first_s": first, "per_pair_s": statistics.median(times)}


def time_step(csv: str) -> float:
  """Median seconds of a paper-scale train step (``configs/default.py``, batch 1), measured in
  this process (run it in a fresh one)."""
  import jax

  from jaxreg.training import sharding, sources, state, step
  config = _config(csv)
  found = sources.make_sources(config)
  example = found.train(0)
  batch = {k: v[None] for k, v in example.items()}
  graphdef, template, s = state.init_state(config)
  mesh = sharding.make_mesh(jax.devices()[:1])
  s = jax.device_put(s, sharding.replicated(mesh))
  fn = step.jit_train_step(step.make_train_step(graphdef, template, config,
                                                state.make_optimizer(config)), mesh, s)
  times = []
  for i in range(3):
    t0 = time.perf_counter()
    s, m = fn(s, sharding.global_batch(batch, mesh))
    float(m["loss"])
    if i:
      times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--pairs", type=int, default=4)
  p.add_argument("--batches", type=int, default=6)
  p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--no-step", action="store_true")
  p.add_argument("--folder", help="write the pairs here (default: a temporary folder)")
  p.add_argument("--step-only", help=argparse.SUPPRESS)  # the step's fresh process
  args = p.parse_args()
  if args.step_only:
    print(json.dumps({"step_s": time_step(args.step_only)}))
    return
  with tempfile.TemporaryDirectory() as tmp:
    folder = args.folder or tmp
    os.makedirs(folder, exist_ok=True)
    t0 = time.perf_counter()
    csv = write_pairs(folder, args.pairs)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    print(f"wrote {args.pairs} pairs of {SHAPE} at {SPACING} mm ({size / 2**20:.0f} MiB of "
          f".nii.gz) in {time.perf_counter() - t0:.1f} s; {os.cpu_count()} cores")
    rows = [time_pipeline(csv, w, args.batches) for w in args.workers]
    step = None
    if not args.no_step:
      out = subprocess.run([sys.executable, __file__, "--step-only", csv], capture_output=True,
                           text=True)
      if out.returncode:
        print(f"the train step's process failed (exit {out.returncode}): "
              f"{out.stderr.strip().splitlines()[-1:] or ''}")
      else:
        step = json.loads(out.stdout.strip().splitlines()[-1])["step_s"]
  print("| workers | start-up (first batch) | s / pair | pairs / s | feeds a step of |")
  print("| ---: | ---: | ---: | ---: | ---: |")
  for r in rows:
    print(f"| {r['workers']} | {r['first_s']:.2f} s | {r['per_pair_s']:.2f} | "
          f"{1 / r['per_pair_s']:.2f} | >= {r['per_pair_s']:.2f} s |")
  if step is not None:
    one = next((r for r in rows if r["workers"] == 1), rows[0])
    print(f"paper-scale train step (configs/default.py, batch 1, this machine): {step:.1f} s; "
          f"one worker prepares a pair in {one['per_pair_s']:.2f} s "
          f"({step / one['per_pair_s']:.0f}x faster than the step)")


if __name__ == "__main__":
  main()
