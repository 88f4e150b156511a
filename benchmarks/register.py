"""Registration accuracy and time on hard, varied pairs: jaxreg vs elastix vs demons, one run.

Run: ``python benchmarks/register.py [--per-family 2] [--set whole|acquired|all]
[--out bench-register]``
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

``--set acquired`` registers the pairs of :mod:`benchmarks.acquired` instead (``--set all``:
both sets, one after the other): scans as they are acquired (crops, a cut cranio-caudal
field of view, thick slices, partial overlap) whose moving image is on its own grid,
with the true field and the region where data define it (``shared``: fixed voxels whose
true point lies inside the moving scan; ``edge``: its outer 3 voxels; ``interior``: the
rest). Scored on the fixed grid:

* ``dice_shared``: mean Dice inside ``shared`` over the labels present in both scans (the
  moving labels warped with nearest neighbour through the method's field);
* ``tre_shared``: mean ``|d_method(x) - d_true(x)|`` (mm) over the labelled voxels
  (label > 0) inside ``shared``; ``tre_edge``, ``tre_interior``: the same over the body
  voxels (fixed image above -500 HU) of ``edge`` and ``interior`` (the CT table and its
  pad count as body); ``tre_edge_labels``, ``tre_interior_labels``: over their labelled
  voxels (anatomy, as ``tre_shared``);
* ``fold_body``: fraction of the body voxels inside ``shared`` with ``det J <= 0``;
  ``fold_grid``: the same over the whole fixed grid (Jacobian of the field in fixed voxels);
* ``max_disp_mm``: the largest ``|d_method|`` on the grid; ``seconds`` as above (the
  pairs differ in shape: jaxreg's include compiling any shape bucket not met before).

Per family it also counts the pairs where jaxreg's ``tre_shared`` is worse than demons'
and gives jaxreg's ``tre_edge / tre_interior`` (ratio of the family means).

``--set thick-margin`` registers each ``thick`` pair and the same pair with its moving scan
on the CT's own 2.5 mm grid (:func:`acquired.on_one_grid`: the CT's voxels in the same world
box), scored on the same voxels: the cost of the thick slices.

Outputs: per-pair rows and the per-family table on stdout, and
``--out``/``per_pair.csv`` + ``tables.md`` (``--set acquired``: ``per_pair_acquired.csv`` +
``tables_acquired.md``).
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
import acquired  # noqa: E402
import families  # noqa: E402

METHODS = ("before", "network", "jaxreg", "jaxreg-mind", "jaxreg-bending", "elastix", "demons")
COLUMNS = ("dice12", "dice_all", "hd95", "tre", "sdlogj", "folding", "seconds")
ACQUIRED_COLUMNS = ("dice_shared", "tre_shared", "tre_edge", "tre_interior", "tre_edge_labels",
                    "tre_interior_labels", "fold_body", "fold_grid", "max_disp_mm", "seconds")
# column -> (table header, format)
_HEADERS = {"dice12": ("Dice 12 organs", "{:.3f}"), "dice_all": ("Dice all labels", "{:.3f}"),
            "hd95": ("HD95 (mm)", "{:.2f}"), "tre": ("TRE (mm)", "{:.2f}"),
            "sdlogj": ("SDlogJ", "{:.3f}"), "folding": ("folding", "{:.5f}"),
            "seconds": ("seconds", "{:.1f}"), "dice_shared": ("Dice shared", "{:.3f}"),
            "tre_shared": ("TRE shared (mm)", "{:.2f}"), "tre_edge": ("TRE edge (mm)", "{:.2f}"),
            "tre_interior": ("TRE interior (mm)", "{:.2f}"),
            "tre_edge_labels": ("TRE edge, labels (mm)", "{:.2f}"),
            "tre_interior_labels": ("TRE interior, labels (mm)", "{:.2f}"),
            "fold_body": ("folding body", "{:.5f}"), "fold_grid": ("folding grid", "{:.5f}"),
            "max_disp_mm": ("max disp (mm)", "{:.1f}")}
_BODY_HU = -500.0  # acquired set: body voxels are fixed voxels above this


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


def _score_acquired(acase, disp) -> dict:
  """The acquired set's scores (module docstring) of ``disp`` (``[*fixed.shape, 3]`` world
  mm) for an :class:`acquired.AcquiredCase`."""
  from jaxreg import metrics
  from jaxreg.ops import grid
  case = acase.case
  disp = np.asarray(disp, np.float32)
  error = np.linalg.norm(disp - acase.true_mm, axis=-1)  # [X, Y, Z] mm
  body = case.fixed.array > _BODY_HU
  labelled = case.fixed_labels.array > 0
  folded = metrics.jacobian_determinant(
      np.asarray(grid.disp_mm_to_voxel(disp, case.fixed.affine))) <= 0
  mean = lambda values, mask: float(values[mask].mean()) if mask.any() else float("nan")
  return {"dice_shared": acquired.dice_shared(acase, disp),
          "tre_shared": mean(error, acase.shared & labelled),
          "tre_edge": mean(error, acase.edge & body),
          "tre_interior": mean(error, acase.interior & body),
          "tre_edge_labels": mean(error, acase.edge & labelled),
          "tre_interior_labels": mean(error, acase.interior & labelled),
          "fold_body": mean(folded, acase.shared & body), "fold_grid": float(folded.mean()),
          "max_disp_mm": float(np.linalg.norm(disp, axis=-1).max())}


def _available(methods) -> list[str]:
  """``methods`` without elastix or demons where they are not installed."""
  from jaxreg.eval import demons, elastix
  return [m for m in methods
          if not (m == "elastix" and not elastix.available())
          and not (m == "demons" and not demons.available())]


def _registrations(pairs, methods, score, columns) -> list[dict]:
  """Every method registers every pair, one row per pair and method, printed as it comes.

  Args:
    pairs: ``(Case, truth)`` tuples; ``score(truth, disp_mm)`` gives a row's metrics.
    methods: names of :data:`METHODS` (jaxreg's are compiled on the first pair, untimed).
    score: ``(truth, [*fixed.shape, 3] world mm) -> {column: value}``.
    columns: the columns printed per row.
  """
  from jaxreg.io import weights
  from jaxreg.pipeline import environment, stages
  settings = environment.configure()
  net, config = weights.demo_model()
  run = lambda m, case: _run(m, case, net, config, settings.implementation)
  rows = []
  with stages.enabled(settings.stage_folder):
    for m in methods:  # compile (or read the cache) once, untimed
      if m.startswith(("network", "jaxreg")):
        run(m, pairs[0][0])
    for case, truth in pairs:
      for m in methods:
        t0 = time.time()
        disp = run(m, case)
        seconds = time.time() - t0
        row = {"pair": case.name, "family": case.name.rsplit("_", 1)[0], "method": m,
               **score(truth, disp), "seconds": seconds if m != "before" else 0.0}
        rows.append(row)
        print(f"{case.name:14s} {m:12s} " + " ".join(f"{k} {row[k]:.4g}" for k in columns),
              flush=True)
  return rows


def _write(out: str | None, rows, table: str, suffix: str = "") -> None:
  """``per_pair{suffix}.csv`` and ``tables{suffix}.md`` in ``out`` (nothing without it)."""
  if not out:
    return
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, f"per_pair{suffix}.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  with open(os.path.join(out, f"tables{suffix}.md"), "w") as f:
    f.write(table)


def accuracy(per_family: int, methods, out: str | None) -> list[dict]:
  """The whole-CT families (:mod:`benchmarks.families`): rows, tables, files."""
  methods = _available(methods)
  cases = families.make_cases(per_family=per_family)
  rows = _registrations([(c, c) for c in cases], methods, _score, COLUMNS)
  table = tables(rows, methods)
  print(table)
  _write(out, rows, table)
  return rows


def accuracy_acquired(per_family: int, methods, out: str | None) -> list[dict]:
  """The acquired families (:mod:`benchmarks.acquired`): rows, tables and the jaxreg
  lines, files."""
  methods = _available(methods)
  cases = acquired.make_cases(per_family=per_family)
  rows = _registrations([(a.case, a) for a in cases], methods, _score_acquired,
                        ACQUIRED_COLUMNS)
  table = tables(rows, methods, ACQUIRED_COLUMNS) + jaxreg_lines(rows)
  print(table)
  _write(out, rows, table, "_acquired")
  return rows


def tables(rows, methods, columns=COLUMNS) -> str:
  """One markdown table per family: the mean over its pairs of every column."""
  out = []
  for family in dict.fromkeys(r["family"] for r in rows):
    n = len({r["pair"] for r in rows if r["family"] == family})
    out += [f"\n**{family}** ({n} pairs)\n",
            "| method | " + " | ".join(_HEADERS[c][0] for c in columns) + " |",
            "| --- |" + " ---: |" * len(columns)]
    for m in methods:
      sel = [r for r in rows if r["family"] == family and r["method"] == m]
      cells = [_HEADERS[c][1].format(np.nanmean([r[c] for r in sel])) for c in columns]
      out.append(f"| {m} | " + " | ".join(cells) + " |")
  return "\n".join(out) + "\n"


def thick_margin(per_family: int, methods, out: str | None) -> list[dict]:
  """Each ``thick`` pair of :mod:`benchmarks.acquired` beside the same pair with its moving
  scan on the CT's own 2.5 mm grid (:func:`acquired.on_one_grid`), scored on the same
  voxels: how much the thick slices cost."""
  methods = _available(methods)
  pairs = []
  for i in range(per_family):
    thick = acquired.make_case("thick", i)
    pairs += [(thick.case, thick), (acquired.on_one_grid(thick).case, acquired.on_one_grid(thick))]
  rows = _registrations(pairs, methods, _score_acquired, ACQUIRED_COLUMNS)
  table = tables(rows, methods, ACQUIRED_COLUMNS)
  print(table)
  _write(out, rows, table, "_thick_margin")
  return rows


def jaxreg_lines(rows) -> str:
  """Per family: the pairs where jaxreg's ``tre_shared`` is worse than demons', and
  jaxreg's ``tre_edge / tre_interior`` (ratio of the family means); n/a without them."""
  value = {(r["pair"], r["method"]): r for r in rows}
  lines = []
  for family in dict.fromkeys(r["family"] for r in rows):
    pairs = list(dict.fromkeys(r["pair"] for r in rows if r["family"] == family))
    both = [p for p in pairs if (p, "jaxreg") in value and (p, "demons") in value]
    worse = sum(value[p, "jaxreg"]["tre_shared"] > value[p, "demons"]["tre_shared"]
                for p in both)
    mine = [value[p, "jaxreg"] for p in pairs if (p, "jaxreg") in value]
    ratio = lambda e, i: (np.nanmean([r[e] for r in mine]) / np.nanmean([r[i] for r in mine])
                          if mine else float("nan"))
    text = lambda v: f"{v:.2f}" if np.isfinite(v) else "n/a"
    lines.append(f"{family}: jaxreg's TRE shared worse than demons' on "
                 + (f"{worse} of {len(both)} pairs" if both else "n/a (run both)")
                 + "; jaxreg's TRE edge / interior "
                 + text(ratio("tre_edge", "tre_interior")) + " (body voxels), "
                 + text(ratio("tre_edge_labels", "tre_interior_labels")) + " (labelled voxels)")
  return "\n" + "\n".join(lines) + "\n"


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
  parser.add_argument("--set", choices=("whole", "acquired", "all", "thick-margin"),
                      default="whole", help="the pairs: whole-CT families, acquired scans, "
                      "both, or each thick-slice pair beside the same pair on one grid")
  parser.add_argument("--out", default=None, help="folder for per_pair.csv and tables.md "
                      "(acquired set: per_pair_acquired.csv and tables_acquired.md)")
  parser.add_argument("--process", action="store_true", help="also time whole processes")
  parser.add_argument("--process-only", action="store_true")
  parser.add_argument("--warp-paths", action="store_true",
                      help="only time the kernel against the pure-JAX warp (jaxreg's default)")
  args = parser.parse_args()
  if args.warp_paths:
    print(warp_paths(args.per_family))
    return
  methods = [m for m in args.methods.split(",") if m]
  if not args.process_only and args.set in ("whole", "all"):
    accuracy(args.per_family, methods, args.out)
  if not args.process_only and args.set in ("acquired", "all"):
    accuracy_acquired(args.per_family, methods, args.out)
  if args.set == "thick-margin":
    thick_margin(args.per_family, methods, args.out)
  if args.process or args.process_only:
    print(process_times())


if __name__ == "__main__":
  main()
