"""Seconds per pair for any image size: ``jaxreg register`` processes and a ``--pairs`` batch
beside SimpleITK demons (and elastix), all measured in this one run.

Run: ``python benchmarks/speed.py [--repeats 3] [--out DIR]`` (demons needs SimpleITK,
elastix the ``baselines`` extra; 2-core CPU: about 10 minutes).

What it measures (the goals of issue #42, printed with each figure):

1. ``python -c "import jax"``, a fresh process, median of ``--repeats`` (the floor any JAX
   program pays).
2. Whole ``jaxreg register`` processes (imports, reading, the compiled programs from the
   persistent cache, registration, scoring, writing every output and ``report.png``) with
   both label maps and a warm cache (one untimed process first), median of ``--repeats``: the
   pair ``local_0`` of :mod:`benchmarks.families` (144x144x133, 2.5 mm) and a centred
   64x60x56 crop of it. Beside them, the same pairs' registration by demons
   (:func:`jaxreg.eval.demons.run`: histogram matching, 3 levels of 50 iterations) and, for
   the whole pair, by elastix (:func:`jaxreg.eval.elastix.run`), timed in this process.
   Goals: the whole-pair process at least 3x faster than demons' registration and 10x
   faster than elastix's; the crop's process at most 1.5 s more than ``import jax``.
3. A batch of twelve pairs of eight or more sizes (:func:`batch_pairs`) registered by one
   ``jaxreg register --pairs`` process starting from an **empty** compilation cache,
   against demons on the same twelve. Goals: the batch's wall time below demons' total, and
   each crop of at most 64³ voxels faster in the batch (its ``summary.csv`` seconds:
   reading, registering, writing) than demons' registration of it.

Nothing here is a test: it prints a markdown table of what it measured (``--out``: also
``speed.md`` and ``speed.json``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import acquired  # noqa: E402
import families  # noqa: E402

CROP = (64, 60, 56)


def _crop(case, shape):
  """``case`` cut to a centred box of ``shape`` (both images and label maps, same geometry)."""
  from jaxreg.eval.evaluation import Case
  from jaxreg.types import Volume

  def cut(vol):
    lo = [(n - c) // 2 for n, c in zip(vol.shape, shape)]
    affine = vol.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ np.asarray(lo) + affine[:3, 3]
    return Volume(vol.array[tuple(slice(a, a + c) for a, c in zip(lo, shape))], affine)
  return Case(f"{case.name}_crop{'x'.join(map(str, shape))}", cut(case.fixed), cut(case.moving),
              cut(case.fixed_labels), cut(case.moving_labels), case.fixed_points,
              case.moving_points)


def batch_pairs() -> list:
  """Twelve pairs of eight or more fixed sizes: four acquired crops (48-64 voxels per
  axis), a cut field of view, a thick-slice scan and two partial overlaps
  (:mod:`benchmarks.acquired`), two whole pairs (:mod:`benchmarks.families`) and two centred
  crops of a third (80x80x70, 112x100x96)."""
  cases = [acquired.make_case("crop", i).case for i in range(4)]
  cases += [acquired.make_case(f, i).case for f, i in (("cutfov", 0), ("thick", 0),
                                                       ("partial", 0), ("partial", 1))]
  cases += [families.make_case(f, 1) for f in ("local", "breathing")]
  misaligned = families.make_case("misaligned", 0)
  cases += [_crop(misaligned, s) for s in ((80, 80, 70), (112, 100, 96))]
  return cases


def _write_case(folder: str, case) -> dict:
  from jaxreg import io
  os.makedirs(folder, exist_ok=True)
  paths = {}
  for name, dtype in (("fixed", np.int16), ("moving", np.int16), ("fixed_labels", np.uint8),
                      ("moving_labels", np.uint8)):
    vol = getattr(case, name)
    paths[name] = os.path.join(folder, f"{name}.nii.gz")
    io.save(paths[name], np.round(vol.array).astype(dtype), vol.affine)
  return paths


def _wall(cmd, env=None) -> float:
  t0 = time.perf_counter()
  res = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if res.returncode:
    raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{res.stderr[-2000:]}")
  return time.perf_counter() - t0


def _register_cmd(paths: dict, out: str) -> list:
  return [sys.executable, "-m", "jaxreg.cli", "register", "--fixed", paths["fixed"],
          "--moving", paths["moving"], "--fixed-labels", paths["fixed_labels"],
          "--moving-labels", paths["moving_labels"], "--out", out]


def _demons(case) -> float:
  from jaxreg.eval import demons
  return demons.run(case.fixed, case.moving)[1]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  from jaxreg.eval import elastix
  results, lines = {}, []
  with tempfile.TemporaryDirectory() as tmp:
    env = dict(os.environ, JAXREG_JAX_CACHE=os.path.join(tmp, "warm-cache"))
    results["import_jax_s"] = statistics.median(
        _wall([sys.executable, "-c", "import jax"]) for _ in range(args.repeats))
    whole = families.make_case("local", 0)
    for label, case in (("144x144x133", whole), ("x".join(map(str, CROP)), _crop(whole, CROP))):
      paths = _write_case(os.path.join(tmp, label), case)
      out = os.path.join(tmp, label, "out")
      _wall(_register_cmd(paths, out), env)  # untimed: fills the cache
      walls = []
      for _ in range(args.repeats):
        walls.append(_wall(_register_cmd(paths, out), env))
      met = json.load(open(os.path.join(out, "metrics.json"), encoding="utf-8"))
      row = {"process_s": statistics.median(walls), "registration_s": met["seconds"],
             "stage_seconds": met["stage_seconds"], "mean_dice": met["mean_dice"],
             "demons_s": _demons(case)}
      if label.startswith("144") and elastix.available():
        row["elastix_s"] = elastix.run(case.fixed, case.moving)[1]
      results[label] = row
      print(label, row, flush=True)
    # the batch, from an empty cache
    cases = batch_pairs()
    rows = [_write_case(os.path.join(tmp, "batch", c.name), c) for c in cases]
    pairs_csv = os.path.join(tmp, "pairs.csv")
    with open(pairs_csv, "w", newline="", encoding="utf-8") as f:
      w = csv.DictWriter(f, fieldnames=["fixed", "moving", "fixed_labels", "moving_labels"])
      w.writeheader()
      w.writerows(rows)
    cold = dict(os.environ, JAXREG_JAX_CACHE=os.path.join(tmp, "empty-cache"))
    batch_out = os.path.join(tmp, "batch-out")
    batch_s = _wall([sys.executable, "-m", "jaxreg.cli", "register", "--pairs", pairs_csv,
                     "--out", batch_out], cold)
    with open(os.path.join(batch_out, "summary.csv"), encoding="utf-8") as f:
      summary = list(csv.DictReader(f))
    per_pair = []
    for case, srow in zip(cases, summary):
      per_pair.append({"pair": case.name, "shape": "x".join(map(str, case.fixed.shape)),
                       "voxels": int(np.prod(case.fixed.shape)), "status": srow["status"],
                       "jaxreg_s": float(srow["seconds"] or "nan"), "demons_s": _demons(case)})
      print(per_pair[-1], flush=True)
    results["batch"] = {"wall_s": batch_s, "pairs": per_pair,
                        "sizes": len({p["shape"] for p in per_pair}),
                        "demons_total_s": sum(p["demons_s"] for p in per_pair)}
  lines += _tables(results)
  text = "\n".join(lines)
  print(text)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "speed.md"), "w", encoding="utf-8") as f:
      f.write(text + "\n")
    with open(os.path.join(args.out, "speed.json"), "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)


def _tables(r: dict) -> list[str]:
  whole, crop = r["144x144x133"], r["x".join(map(str, CROP))]
  ok = lambda cond: "met" if cond else "**not met**"
  lines = [f"`import jax`: {r['import_jax_s']:.2f} s (fresh process, median)", "",
           "| pair | jaxreg process s | registration s | demons s | elastix s | Dice |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
  for label in ("144x144x133", "x".join(map(str, CROP))):
    row = r[label]
    lines.append(f"| {label} | {row['process_s']:.2f} | {row['registration_s']:.2f} | "
                 f"{row['demons_s']:.2f} | {row.get('elastix_s', float('nan')):.1f} | "
                 f"{row['mean_dice']:.3f} |")
  b = r["batch"]
  lines += ["", f"Goals: whole process vs demons {whole['demons_s'] / whole['process_s']:.2f}x "
            f"(goal >= 3x: {ok(whole['demons_s'] >= 3 * whole['process_s'])}), vs elastix "
            f"{whole.get('elastix_s', float('nan')) / whole['process_s']:.1f}x (goal >= 10x: "
            f"{ok(whole.get('elastix_s', 0) >= 10 * whole['process_s'])}); crop process "
            f"{crop['process_s'] - r['import_jax_s']:.2f} s more than `import jax` (goal <= 1.5 s: "
            f"{ok(crop['process_s'] - r['import_jax_s'] <= 1.5)}).", "",
            f"`--pairs` batch from an empty cache: {len(b['pairs'])} pairs of {b['sizes']} "
            f"sizes, {b['wall_s']:.1f} s; demons {b['demons_total_s']:.1f} s "
            f"(goal: below demons: {ok(b['wall_s'] < b['demons_total_s'])}).", "",
            "| pair | fixed shape | jaxreg in the batch s | demons s |",
            "| --- | --- | ---: | ---: |"]
  for p in b["pairs"]:
    lines.append(f"| {p['pair']} | {p['shape']} | {p['jaxreg_s']:.2f} | {p['demons_s']:.2f} |")
  small = [p for p in b["pairs"] if p["voxels"] <= 64 ** 3]
  lines.append(f"\nCrops of at most 64³ voxels faster in the batch than demons: "
               f"{sum(p['jaxreg_s'] < p['demons_s'] for p in small)} of {len(small)} "
               f"({ok(all(p['jaxreg_s'] < p['demons_s'] for p in small))}; the first pair of "
               "the batch also pays the compilation).")
  return lines


if __name__ == "__main__":
  main()
