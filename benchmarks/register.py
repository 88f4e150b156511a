"""Registration accuracy and time on hard, varied pairs: jaxreg vs elastix vs demons, one run.

Run: ``python benchmarks/register.py [--per-family 2] [--out bench-register]``
(elastix needs the ``baselines`` extra, demons SimpleITK).

Pairs: :mod:`benchmarks.families` (the embedded CT at 2.5 mm, 144x144x133,
deformed by families the training never uses: local smooth motion,
breathing, a misaligned start, a contrast-phase change, heavy noise), with
exact ground truth. Every method registers every pair in this process and is
scored the same way on the fixed grid (:func:`jaxreg.eval.evaluation.case_metrics`):
Dice over the 12 organs and over every label, HD95 (mm, 12 organs), TRE (mm,
100 keypoints in the organs mapped by the true field), SDlogJ, folding, and
the method's own registration seconds (jaxreg is compiled on a first,
untimed pair: a warm process, as in a batch). Methods:

* ``before``: no registration;
* ``network``: affine stage + the shipped network (``refine=None``);
* ``jaxreg``: ``jaxreg register``'s default (affine + network + refinement, LNCC);
* ``jaxreg-mind``: the same with MIND-SSC refinement;
* ``jaxreg-bending``: the same with a bending-energy regulariser (weight 0.3);
* ``elastix``: :mod:`jaxreg.eval.elastix` (B-spline, 3 resolutions, as shipped);
* ``demons``: :mod:`jaxreg.eval.demons` (SimpleITK multi-resolution demons).

``--process`` also times ``jaxreg register`` as whole processes (imports,
loading, compilation or cache, registration, writing) for one pair of this
size and one small pair (80x80x70), with an empty and with a warm
compilation cache, and warm with the exported stages off (``JAXREG_EXPORTED=off``:
traced and lowered again, only XLA's compilation cached).

In this process the environment is read once, as ``jaxreg register`` reads it
(:func:`jaxreg.pipeline.environment.configure`: ``JAXREG_WARP``, ``JAXREG_JAX_CACHE``,
``JAXREG_EXPORTED``...), and jaxreg's registrations run with its warp ``implementation``
and inside its stage cache (:func:`jaxreg.pipeline.stages.enabled`), as the command does.

``--warp-paths`` times ``jaxreg``'s default with the C++ warp kernel and with the pure-JAX
warp (``implementation="ffi"`` and ``"xla"``), interleaved pair by pair in one warm process:
the refinement stage's and the whole registration's median seconds per path, their ratio,
and each path's Dice/TRE (the two paths agree to rounding per step; the optimiser's steps let the
fields drift apart in flat background, not in the organs).

Outputs: per-pair rows and the per-family table on stdout, and
``--out``/``per_pair.csv`` + ``tables.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import families  # noqa: E402

METHODS = ("before", "network", "jaxreg", "jaxreg-mind", "jaxreg-bending", "elastix", "demons")
COLUMNS = ("dice12", "dice_all", "hd95", "tre", "sdlogj", "folding", "seconds")


def _run(method: str, case, net, config, implementation=None):
  from jaxreg.eval import demons
  from jaxreg.eval import elastix
  from jaxreg.pipeline import register
  from jaxreg.pipeline.refine import RefineOptions
  if method == "before":
    return np.zeros(case.fixed.shape + (3,), np.float32)
  if method.startswith("network") or method.startswith("jaxreg"):
    refine = {"network": None, "jaxreg": RefineOptions(),
              "jaxreg-mind": RefineOptions(similarity="mind"),
              "jaxreg-bending": RefineOptions(regulariser="bending", reg_weight=0.3)}[method]
    return register.register(case.fixed, case.moving, net=net, config=config,
                             refine=refine, implementation=implementation).displacement_mm
  if method == "elastix":
    return elastix.run(case.fixed, case.moving)[0]
  if method == "demons":
    return demons.run(case.fixed, case.moving)[0]
  raise ValueError(method)


def _score(case, disp):
  from jaxreg.eval import evaluation
  organs = evaluation.case_metrics(case, disp, families.ORGANS)
  every = evaluation.case_metrics(case, disp, None)
  return {"dice12": organs["dice"], "dice_all": every["dice"], "hd95": organs["hd95"],
          "tre": organs["tre"], "sdlogj": organs["sdlogj"], "folding": organs["folding"]}


def accuracy(per_family: int, methods, out: str | None) -> list[dict]:
  from jaxreg.eval import demons
  from jaxreg.eval import elastix
  from jaxreg.io import weights
  from jaxreg.pipeline import environment
  from jaxreg.pipeline import stages
  settings = environment.configure()
  methods = [m for m in methods
             if not (m == "elastix" and not elastix.available())
             and not (m == "demons" and not demons.available())]
  cases = families.make_cases(per_family=per_family)
  net, config = weights.demo_model()
  run = lambda m, case: _run(m, case, net, config, settings.implementation)
  rows = []
  with stages.enabled(settings.stage_folder):
    for m in methods:  # compile (or read the cache) once, untimed
      if m.startswith("network") or m.startswith("jaxreg"):
        run(m, cases[0])
    for case in cases:
      for m in methods:
        t0 = time.time()
        disp = run(m, case)
        seconds = time.time() - t0
        row = {"pair": case.name, "family": case.name.rsplit("_", 1)[0], "method": m,
               **_score(case, disp), "seconds": seconds if m != "before" else 0.0}
        rows.append(row)
        print(f"{case.name:14s} {m:12s} " + " ".join(f"{k} {row[k]:.4g}" for k in COLUMNS),
              flush=True)
  table = tables(rows, methods)
  print(table)
  if out:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "per_pair.csv"), "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=list(rows[0]))
      w.writeheader()
      w.writerows(rows)
    with open(os.path.join(out, "tables.md"), "w") as f:
      f.write(table)
  return rows


def tables(rows, methods) -> str:
  """One markdown table per family: the mean over its pairs of every column."""
  fmt = {"dice12": "{:.3f}", "dice_all": "{:.3f}", "hd95": "{:.2f}", "tre": "{:.2f}",
         "sdlogj": "{:.3f}", "folding": "{:.5f}", "seconds": "{:.1f}"}
  out = []
  for family in dict.fromkeys(r["family"] for r in rows):
    n = len({r["pair"] for r in rows if r["family"] == family})
    out += [f"\n**{family}** ({n} pairs)\n",
            "| method | Dice 12 organs | Dice all labels | HD95 (mm) | TRE (mm) | SDlogJ | "
            "folding | seconds |", "| --- |" + " ---: |" * 7]
    for m in methods:
      sel = [r for r in rows if r["family"] == family and r["method"] == m]
      cells = [fmt[c].format(np.nanmean([r[c] for r in sel])) for c in COLUMNS]
      out.append(f"| {m} | " + " | ".join(cells) + " |")
  return "\n".join(out) + "\n"


def _write_pair(folder: str, case, crop=None) -> list[str]:
  from jaxreg import io
  paths = []
  for name, vol, dtype in (("fixed", case.fixed, np.int16), ("moving", case.moving, np.int16),
                           ("fixed_labels", case.fixed_labels, np.uint8),
                           ("moving_labels", case.moving_labels, np.uint8)):
    array, affine = vol.array, vol.affine
    if crop is not None:  # a centred crop: a smaller pair on the same geometry
      lo = [(n - c) // 2 for n, c in zip(array.shape, crop)]
      array = array[tuple(slice(a, a + c) for a, c in zip(lo, crop))]
      affine = affine.copy()
      affine[:3, 3] = affine[:3, :3] @ np.asarray(lo) + affine[:3, 3]
    path = os.path.join(folder, f"{name}.nii.gz")
    io.save(path, np.round(array).astype(dtype), affine)
    paths.append(path)
  return paths


def process_times() -> str:
  """Whole ``jaxreg register`` processes, empty and warm compilation cache, two sizes."""
  lines = ["| pair | compilation cache | process wall (s) | registration (s) | XLA compilations "
           "| cache hits | stages loaded / exported | mean Dice (all labels) |",
           "| --- | --- |" + " ---: |" * 6]
  case = families.make_case("local", 0)
  with tempfile.TemporaryDirectory() as tmp:
    for label, crop in (("144x144x133", None), ("80x80x70", (80, 80, 70))):
      folder = os.path.join(tmp, label)
      os.makedirs(folder)
      f, m, fl, ml = _write_pair(folder, case, crop)
      cache = os.path.join(folder, "cache")
      # the stages' plain-jit programs are not in the cache the exported run filled: an
      # untimed run with the stages off fills it, so that row is warm too
      for state in ("empty", "warm", "stages off, untimed", "warm, stages off"):
        out = os.path.join(folder, f"out-{state.replace(', ', '-').replace(' ', '-')}")
        env = dict(os.environ, JAXREG_JAX_CACHE=cache,
                   JAXREG_EXPORTED="off" if "off" in state else "on")
        t0 = time.time()
        res = subprocess.run([sys.executable, "-m", "jaxreg.cli", "register", "--fixed", f,
                              "--moving", m, "--fixed-labels", fl, "--moving-labels", ml,
                              "--out", out], capture_output=True, text=True, env=env)
        wall = time.time() - t0
        if res.returncode:
          raise SystemExit(res.stderr[-2000:])
        if "untimed" in state:
          continue
        met = json.load(open(os.path.join(out, "metrics.json")))
        lines.append(f"| {label} | {state} | {wall:.1f} | {met['seconds']:.1f} | "
                     f"{met['xla_compilations']} | {met['xla_cache_hits']} | "
                     f"{met['stages_loaded']} / {met['stages_exported']} | "
                     f"{met['mean_dice']:.3f} |")
        print(lines[-1], flush=True)
  return "\n".join(lines) + "\n"


def warp_paths(per_family: int, repeats: int = 2) -> str:
  """``jaxreg``'s default with each warp path, interleaved; a markdown table."""
  import statistics

  from _common import implementation

  from jaxreg.io import weights
  from jaxreg.ops import warp_kernel
  from jaxreg.pipeline import environment
  from jaxreg.pipeline import register
  from jaxreg.pipeline import stages
  settings = environment.configure()
  warp_kernel.load(required=True)  # the "ffi" path, whatever $JAXREG_WARP says
  cases = families.make_cases(per_family=per_family)
  net, config = weights.demo_model()
  paths = ("ffi", "jax")
  seconds = {p: {"refine": [], "total": []} for p in paths}
  scores = {p: [] for p in paths}

  def run(path, case):  # each path its own programs
    with stages.enabled(settings.stage_folder):
      return register.register(case.fixed, case.moving, net=net, config=config,
                               implementation=implementation(path))

  for p in paths:  # compile or load, untimed
    run(p, cases[0])
  for rep in range(repeats):
    for case in cases:
      for p in paths:
        r = run(p, case)
        seconds[p]["refine"].append(r.metrics["stage_seconds"]["refine"])
        seconds[p]["total"].append(r.metrics["seconds"])
        if rep == 0:
          scores[p].append(_score(case, r.displacement_mm))
  med = {p: {k: statistics.median(v) for k, v in seconds[p].items()} for p in paths}
  lines = ["| warp | refinement s | registration s | Dice12 | TRE mm |",
           "| --- | ---: | ---: | ---: | ---: |"]
  for p in paths:
    lines.append(f"| {'kernel' if p == 'ffi' else 'pure JAX'} | {med[p]['refine']:.2f} | "
                 f"{med[p]['total']:.2f} | "
                 f"{np.mean([s['dice12'] for s in scores[p]]):.4f} | "
                 f"{np.mean([s['tre'] for s in scores[p]]):.3f} |")
  lines.append(f"\nrefinement {med['jax']['refine'] / med['ffi']['refine']:.2f}x faster with "
               f"the kernel, registration {med['jax']['total'] / med['ffi']['total']:.2f}x "
               f"({len(cases)} pairs x {repeats} repeats, medians)")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--per-family", type=int, default=2)
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--out", default=None, help="folder for per_pair.csv and tables.md")
  parser.add_argument("--process", action="store_true", help="also time whole processes")
  parser.add_argument("--process-only", action="store_true")
  parser.add_argument("--warp-paths", action="store_true",
                      help="only time the kernel against the pure-JAX warp (jaxreg's default)")
  args = parser.parse_args()
  if args.warp_paths:
    print(warp_paths(args.per_family))
    return
  if not args.process_only:
    accuracy(args.per_family, [m for m in args.methods.split(",") if m], args.out)
  if args.process or args.process_only:
    print(process_times())


if __name__ == "__main__":
  main()
