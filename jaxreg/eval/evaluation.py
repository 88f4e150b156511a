"""Evaluate registration methods on a dataset, the Learn2Reg way: evaluate.py, jaxreg evaluate.

Every method registers every pair in the same run; every result is scored the
same way on the **fixed image's original grid**: the method gives a world
displacement (RAS+ mm, fixed ``p`` <-> moving ``p + d(p)``), the moving labels
are resampled through it once (nearest neighbour), and

* ``dice``: mean Dice over the scored labels; ``hd95``: mean HD95 (mm);
* ``tre``: mean distance (mm) between fixed keypoints mapped through the field
  (:func:`jaxreg.ops.points.transform_points`) and their moving keypoints;
* ``sdlogj``, ``folding``: field quality of the displacement in fixed voxels;
* ``seconds``: the method's wall time for the pair (jaxreg methods are compiled
  once on the first pair before timing, so no pair pays compilation).

Methods: ``identity`` (no registration), ``jaxreg`` (the network alone),
``jaxreg+io`` (network + the older dense instance optimisation on the model
grid), ``jaxreg+refine`` (network + multi-resolution refinement up to the
fixed resolution, LNCC: ``jaxreg register``'s default), ``jaxreg+refine-mind``
(the same with MIND-SSC), ``elastix`` (B-spline baseline,
:mod:`jaxreg.eval.elastix`; skipped with a message if not installed) and
``demons`` (SimpleITK multi-resolution demons, :mod:`jaxreg.eval.demons`).

Data: ``demo`` (held-out synthetic pairs of the embedded CT at its 2.5 mm
grid, with exact keypoints from the known deformation), a Learn2Reg folder
(its ``registration_val`` pairs) or a pairs CSV (:func:`jaxreg.data.read_pairs_csv`).

Outputs in ``--out`` (written atomically): ``per_pair.csv``, ``summary.md``,
``summary.json`` (mean, std and 30th percentile over pairs of each metric per
method) and ``box_<metric>.png``.

Learn2Reg (:mod:`jaxreg.eval.learn2reg`): ``--scoring learn2reg`` adds the challenge's own
figures beside these (``l2r_dice``, ``l2r_hd95`` in voxels, ``l2r_sdlogj``, ``l2r_tre``
in mm, and its summary: mean, std and the "30" column), computed from the field as the
submission stores it; ``--learn2reg-submission DIR`` writes that submission,
``DIR/<method>/disp_*.npz`` (or ``.nii.gz``) for every pair, and ``DIR/pairs.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from jaxreg import data as _data
from jaxreg import io as _io
from jaxreg import metrics as _metrics
from jaxreg.eval import learn2reg as _l2r
from jaxreg.io import resample as _preprocess
from jaxreg.ops import grid as _grid
from jaxreg.ops import points as _points
from jaxreg.types import Grid, InputError, Volume, one_line

__all__ = ["Case", "METHODS", "METRICS", "demo_cases", "file_cases", "load_cases",
           "run_method", "case_metrics", "evaluate", "summarise", "write_outputs", "main"]

METHODS = ("identity", "jaxreg", "jaxreg+io", "jaxreg+refine", "jaxreg+refine-mind", "elastix",
           "demons")
_REFINE = {"jaxreg+refine": "lncc", "jaxreg+refine-mind": "mind"}
# metric -> (unit, higher is better)
METRICS = {"dice": ("", True), "hd95": ("mm", False), "tre": ("mm", False),
           "sdlogj": ("", False), "folding": ("fraction", False), "seconds": ("s", False)}


@dataclasses.dataclass(frozen=True)
class Case:
  """One pair to evaluate.

  Attributes:
    name: a short identifier (file stem or ``demo_eval_003``).
    fixed: image (HU) with its affine.
    moving: image (HU) with its affine.
    fixed_labels: label map on the fixed image's grid, or None.
    moving_labels: label map on the moving image's grid, or None.
    fixed_points: ``[N, 3]`` keypoints in the fixed image, world mm (RAS+), or None.
    moving_points: ``[N, 3]`` the corresponding keypoints in the moving image, world
      mm (RAS+), or None.
    spec: the files the case was read from (None for demo pairs): the Learn2Reg file
      ids of a submission, and the fixed mask of ``--learn2reg-mask``.
  """
  name: str
  fixed: Volume
  moving: Volume
  fixed_labels: Volume | None = None
  moving_labels: Volume | None = None
  fixed_points: np.ndarray | None = None
  moving_points: np.ndarray | None = None
  spec: _data.PairSpec | None = None


def _demo_keypoints(pair: _data.SyntheticPair, label_ids, count: int, seed: int):
  """``count`` random voxel centres inside the organs of the fixed labels, and
  where the true deformation sends them in the moving image (world mm)."""
  inside = np.argwhere(np.isin(pair.fixed_labels, list(label_ids)))
  rng = np.random.default_rng(seed)
  vox = inside[rng.choice(len(inside), size=min(count, len(inside)), replace=False)]
  moved = vox + pair.disp[tuple(vox.T)]  # exact: the field is sampled at voxel centres
  return (_points.voxel_points_to_world(vox, pair.affine),
          _points.voxel_points_to_world(moved, pair.affine))


def demo_cases(pairs: int, config, *, keypoints: int = 100) -> list[Case]:
  """Held-out synthetic pairs of the demo CT on its own 2.5 mm grid (evaluation seeds).

  The deformations follow ``config.data`` (magnitudes, contrast, noise) as in
  training; keypoints are random voxels of the scored organs mapped by the
  true field, so TRE has exact ground truth.
  """
  d = config.data
  out = []
  for i in range(pairs):
    pair = _data.demo_pair(i, split="eval", max_disp_mm=d.max_disp_mm,
                           control_spacing_mm=d.control_spacing_mm, breathing_mm=d.breathing_mm,
                           contrast=d.contrast, noise_std=d.noise_hu)
    fp, mp = _demo_keypoints(pair, d.label_ids, keypoints, seed=_data.EVAL_SEED_BASE + i)
    vol = lambda a: Volume(a, pair.affine)
    out.append(Case(f"demo_eval_{i:03d}", vol(pair.fixed), vol(pair.moving),
                    vol(pair.fixed_labels), vol(pair.moving_labels), fp, mp))
  return out


def _stem(path: str) -> str:
  return os.path.basename(path).split(".nii")[0]


def file_cases(specs: Sequence[_data.PairSpec], *, skipped: list[dict] | None = None,
               log: Callable[[str], None] = print) -> list[Case]:
  """Load the pairs of a manifest; keypoint CSVs (voxels) become world mm.

  Args:
    specs: the pairs.
    skipped: where given, a pair that cannot be loaded is left out with one warning and
      recorded here (``{"pair", "reason"}``) instead of raising.
    log: where the warnings go.

  Raises:
    InputError: unreadable files, labels off their image's grid, keypoints in
      only one image or in different numbers, or a pair without overlap (without
      ``skipped``); no pair readable (with it).
  """
  out = []
  for s in specs:
    try:
      out.append(_file_case(s))
    except (InputError, OSError, EOFError, ValueError) as e:
      if skipped is None:
        raise
      skipped.append({"pair": f"{s.fixed},{s.moving}", "reason": one_line(e)})
  if skipped and not out:
    raise InputError(f"none of the {len(specs)} pairs could be read (first: "
                     f"{skipped[0]['pair']}: {skipped[0]['reason']})")
  for item in skipped or ():
    log(f"warning: skipping pair {item['pair']}: {item['reason']}")
  return out


def _file_case(s: _data.PairSpec) -> Case:
  """One pair of a manifest, loaded (see :func:`file_cases`)."""
  fixed, moving, *labels = _data.load_pair(s)
  _preprocess.check_overlap(Grid.of(fixed), Grid.of(moving),
                            (s.fixed, s.moving))
  pts = [None, None]
  if (s.fixed_keypoints is None) != (s.moving_keypoints is None):
    raise InputError(f"{s.fixed_keypoints or s.moving_keypoints}: keypoints given for one "
                     "image of the pair only")
  if s.fixed_keypoints is not None:
    kf, km = _data.read_keypoints(s.fixed_keypoints), _data.read_keypoints(s.moving_keypoints)
    if len(kf) != len(km):
      raise InputError(f"{s.moving_keypoints}: {len(km)} keypoints, but "
                       f"{s.fixed_keypoints} has {len(kf)}")
    pts = [_points.voxel_points_to_world(kf, fixed.affine),
           _points.voxel_points_to_world(km, moving.affine)]
  return Case(f"{_stem(s.fixed)}__{_stem(s.moving)}", fixed, moving, *labels, *pts, spec=s)


def load_cases(source: str, config, *, pairs: int | None = None,
               skipped: list[dict] | None = None, log: Callable[[str], None] = print
               ) -> list[Case]:
  """``"demo"``, a Learn2Reg folder (``registration_val``) or a ``.csv`` of pairs; with
  ``skipped``, pairs that cannot be read are left out and recorded (:func:`file_cases`)."""
  if pairs is not None and pairs < 1:
    raise InputError(f"--pairs must be >= 1, got {pairs}")
  if source == "demo":
    return demo_cases(pairs or config.data.val_pairs, config)
  if source.endswith(".csv"):
    specs = _data.read_pairs_csv(source, check=skipped is None)
  elif os.path.isdir(source) or source.endswith(".json"):
    specs = _data.read_learn2reg(source, split="val", check=skipped is None)
  else:
    raise InputError(f"{source}: not 'demo', a Learn2Reg folder or a pairs .csv")
  return file_cases(specs[:pairs] if pairs else specs, skipped=skipped, log=log)


def run_method(method: str, case: Case, *, net=None, config=None, io_steps: int = 50,
               affine: str = "none", mesh=None) -> np.ndarray:
  """Register one case with one method (``mesh``: the jaxreg methods' spatial sharding,
  see :func:`jaxreg.pipeline.register.register`).

  Returns:
    ``[*case.fixed.shape, 3]`` world displacement (RAS+ mm) on the fixed grid.
  """
  if method == "identity":
    return np.zeros(case.fixed.shape + (3,), np.float32)
  if method.startswith("jaxreg"):
    from jaxreg.pipeline import register
    from jaxreg.pipeline.refine import RefineOptions
    if method not in ("jaxreg", "jaxreg+io") and method not in _REFINE:
      raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    needs = config.model.get("label_inputs", False)
    refine = RefineOptions(similarity=_REFINE[method]) if method in _REFINE else None
    result = register.register(case.fixed, case.moving, net=net, config=config,
                               fixed_labels=case.fixed_labels if needs else None,
                               moving_labels=case.moving_labels if needs else None,
                               io_steps=io_steps if method == "jaxreg+io" else 0,
                               refine=refine, affine=affine, mesh=mesh,
                               names=(f"{case.name} fixed", f"{case.name} moving"))
    return result.displacement_mm
  if method == "elastix":
    from jaxreg.eval import elastix
    return elastix.run(case.fixed, case.moving)[0]
  if method == "demons":
    from jaxreg.eval import demons
    return demons.run(case.fixed, case.moving)[0]
  raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def case_metrics(case: Case, disp_mm: np.ndarray, label_ids: Sequence[int] | None = None
                 ) -> dict:
  """Metrics of one result (see the module docstring); NaN where the data lack them:
  ``folding``, ``sdlogj``, mean ``dice`` and ``hd95`` (mm) over the labels
  (:func:`jaxreg.metrics.score`), ``tre`` (mm) over the keypoints."""
  grid = Grid.of(case.fixed)
  disp_vox = np.asarray(_grid.disp_mm_to_voxel(np.asarray(disp_mm, np.float32),
                                               case.fixed.affine))
  row = {"folding": _metrics.folding_fraction(disp_vox), "sdlogj": _metrics.sdlogj(disp_vox),
         "dice": float("nan"), "hd95": float("nan"), "tre": float("nan")}
  if case.fixed_labels is not None and case.moving_labels is not None:
    warped = _preprocess.resample_moving(case.moving_labels, disp_mm, grid, order=0)
    fixed = case.fixed_labels.array
    ids = list(label_ids) if label_ids else _metrics.common_labels(fixed,
                                                                   case.moving_labels.array)
    scores = _metrics.score(fixed, warped, spacing=case.fixed.spacing, label_ids=ids)
    row["dice"], row["hd95"] = scores["mean_dice"], scores["mean_hd95_mm"]
  if case.fixed_points is not None:
    mapped = np.asarray(_points.transform_points(case.fixed_points, disp_vox, case.fixed.affine))
    row["tre"] = float(np.mean(np.linalg.norm(mapped - case.moving_points, axis=-1)))
  return row


def _world_to_voxel(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
  inv = np.linalg.inv(np.asarray(affine, np.float64))
  return np.asarray(points, np.float64) @ inv[:3, :3].T + inv[:3, 3]


def learn2reg_metrics(case: Case, field: np.ndarray, label_ids: Sequence[int] | None = None,
                      *, masked: bool = False) -> dict:
  """The challenge's per-case figures (:func:`jaxreg.eval.learn2reg.case_scores`) of a
  submission field ``[X, Y, Z, 3]`` (voxels, :func:`jaxreg.eval.learn2reg.submission_field`):
  the labels of ``label_ids`` (default: every non-zero label of either map), the keypoints
  back in voxels of their images, and with ``masked`` SDlogJ over the fixed mask of a
  Learn2Reg/CSV pair where it has one (as the official code, without one where not).

  Raises:
    InputError: the mask is unreadable or off the fixed image's grid.
  """
  mask = None
  if masked and case.spec is not None and case.spec.fixed_mask is not None:
    mask = _io.load_labels(case.spec.fixed_mask, like=case.fixed, like_path=case.spec.fixed,
                           allow_empty=True).array
  points = {}
  if case.fixed_points is not None:
    points = {"fixed_points": _world_to_voxel(case.fixed_points, case.fixed.affine),
              "moving_points": _world_to_voxel(case.moving_points, case.moving.affine),
              "moving_spacing": case.moving.spacing}
  labels = {}
  if case.fixed_labels is not None and case.moving_labels is not None:
    labels = {"fixed_labels": case.fixed_labels.array, "moving_labels": case.moving_labels.array,
              "labels": label_ids}
  return _l2r.case_scores(field, mask=mask, **labels, **points)


def evaluate(cases: Sequence[Case], methods: Sequence[str], *, net=None, config=None,
             io_steps: int = 50, affine: str = "none", label_ids: Sequence[int] | None = None,
             mesh=None, log: Callable[[str], None] = print, scoring: str = "default",
             l2r_format: str = "npz", l2r_masked: bool = False,
             on_field: Callable[[str, int, Case, np.ndarray], None] | None = None) -> list[dict]:
  """Every method on every case; one row per (case, method) with every metric.

  ``affine`` is the jaxreg methods' pre-alignment (see :func:`jaxreg.pipeline.register.register`).
  ``scoring="learn2reg"`` adds :data:`jaxreg.eval.learn2reg.METRICS` to each row
  (:func:`learn2reg_metrics`, ``l2r_masked``: its ``masked``), scored on the field as a
  ``l2r_format`` submission stores it; ``on_field(method, case index, case, field)`` gets
  that field ``[X, Y, Z, 3]`` (voxels) of every result (to write a submission).
  """
  if scoring not in ("default", "learn2reg"):
    raise ValueError(f"scoring must be 'default' or 'learn2reg', got {scoring!r}")
  rows = []
  run = lambda method, case: run_method(method, case, net=net, config=config,
                                        io_steps=io_steps, affine=affine, mesh=mesh)
  for method in methods:
    if method.startswith("jaxreg") and cases:  # compile once, untimed
      run(method, cases[0])
    for index, case in enumerate(cases):
      t0 = time.time()
      disp = run(method, case)
      seconds = time.time() - t0
      if not np.all(np.isfinite(disp)):
        raise InputError(f"{case.name}: {method} produced a non-finite displacement")
      row = {"pair": case.name, "method": method, **case_metrics(case, disp, label_ids),
             "seconds": seconds}
      if scoring == "learn2reg" or on_field is not None:
        field = _l2r.submission_field(disp, case.fixed.affine, case.moving.affine,
                                      dtype=_l2r.FORMATS[l2r_format])
        if scoring == "learn2reg":
          row.update(learn2reg_metrics(case, field, label_ids, masked=l2r_masked))
        if on_field is not None:
          on_field(method, index, case, field)
      log(f"{method:10s} {case.name}: " + ", ".join(
          f"{k} {row[k]:.4g}" for k in (*METRICS, *_l2r.METRICS)  # a lost label's l2r_hd95: inf
          if k in row and (np.isfinite(row[k]) if k in METRICS else not np.isnan(row[k]))))
      rows.append(row)
  return rows


def _l2r_metrics(rows: Sequence[dict]) -> list[str]:
  """The Learn2Reg metrics the rows have (``--scoring learn2reg``), in table order."""
  return [m for m in _l2r.METRICS if any(m in r for r in rows)]


def summarise(rows: Sequence[dict]) -> dict:
  """``{method: {metric: {"mean", "std", "p30", "n"}}}`` over pairs (NaNs dropped).

  ``p30`` is the 30th percentile over pairs (Learn2Reg reports DSC30 as a
  robustness figure: the level the worst 30% of results fall below). Rows scored the
  Learn2Reg way also get their ``l2r_*`` metrics as the challenge summarises them
  (:func:`jaxreg.eval.learn2reg.summary_stats`: ``p30`` is its "30" column, the 0.7
  quantile for SDlogJ and TRE, and an infinite HD95 is kept).
  """
  out = {}
  extra = _l2r_metrics(rows)
  for method in dict.fromkeys(r["method"] for r in rows):
    out[method] = {m: _l2r.summary_stats([r[m] for r in rows if r["method"] == method], m)
                   for m in extra}
    for metric in METRICS:
      v = np.array([r[metric] for r in rows if r["method"] == method], np.float64)
      v = v[np.isfinite(v)]
      out[method][metric] = ({"mean": float(v.mean()), "std": float(v.std()),
                              "p30": float(np.percentile(v, 30)), "n": int(v.size)}
                             if v.size else {"mean": None, "std": None, "p30": None, "n": 0})
    out[method] = {m: out[method][m] for m in (*METRICS, *extra)}
  return out


def markdown_table(summary: dict) -> str:
  """The summary as a markdown table: ``mean ± std`` per metric, and Dice's 30th percentile."""
  head = ["method"] + [f"{m} ({u})" if u else m for m, (u, _) in METRICS.items()] + ["dice p30"]
  lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
  fmt = {"folding": "{:.5f}", "seconds": "{:.1f}", "sdlogj": "{:.3f}", "dice": "{:.3f}"}
  for method, stats in summary.items():
    cells = [method]
    for metric in METRICS:
      s = stats[metric]
      f = fmt.get(metric, "{:.2f}")
      cells.append("n/a" if not s["n"] else f"{f.format(s['mean'])} ± {f.format(s['std'])}")
    cells.append("n/a" if not stats["dice"]["n"] else f"{stats['dice']['p30']:.3f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n" + _l2r_table(summary)


def _l2r_table(summary: dict) -> str:
  """The Learn2Reg figures of ``--scoring learn2reg`` (empty without them): ``mean ± std``
  and the challenge's "30" column per metric."""
  extra = [m for m in _l2r.METRICS if any(m in s for s in summary.values())]
  if not extra:
    return ""
  head = ["method"] + [f"{m} ({_l2r.METRICS[m][0]})" if _l2r.METRICS[m][0] else m
                       for m in extra]
  lines = ["", "Learn2Reg scoring (the challenge's rules): mean ± std [30: the 0.3 quantile "
           "of Dice and HD95, the 0.7 quantile of SDlogJ and TRE]", "",
           "| " + " | ".join(head) + " |", "| --- |" + " ---: |" * len(extra)]
  fmt = {"l2r_dice": "{:.3f}", "l2r_sdlogj": "{:.4f}"}
  for method, stats in summary.items():
    cells = [method]
    for m in extra:
      s, f = stats[m], fmt.get(m, "{:.2f}")
      cells.append("n/a" if not s["n"] else
                   f"{f.format(s['mean'])} ± {f.format(s['std'])} [30: {f.format(s['p30'])}]")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_outputs(folder: str, rows: Sequence[dict], summary: dict, info: dict) -> None:
  """per_pair.csv, summary.md, summary.json and one box plot per metric in ``folder``."""
  from jaxreg.pipeline import report
  with open(os.path.join(folder, "per_pair.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=["pair", "method", *METRICS, *_l2r_metrics(rows)])
    writer.writeheader()
    writer.writerows(rows)
  with open(os.path.join(folder, "summary.json"), "w", encoding="utf-8") as f:
    json.dump({**info, "summary": summary}, f, indent=2)
  with open(os.path.join(folder, "summary.md"), "w", encoding="utf-8") as f:
    f.write(markdown_table(summary))
    for item in info.get("skipped_pairs", ()):
      f.write(f"\nSkipped, unreadable: {item['pair']} ({item['reason']})\n")
  units = {**{m: u for m, (u, _) in METRICS.items()},
           **{m: _l2r.METRICS[m][0] for m in _l2r_metrics(rows)}}
  for metric, unit in units.items():
    values = {m: [r[metric] for r in rows if r["method"] == m] for m in summary}
    if any(np.isfinite(v).any() for v in values.values()):
      report.save_box_plot(os.path.join(folder, f"box_{metric}.png"), values, metric=metric,
                           unit=unit)


def build_parser(prog: str = "evaluate.py") -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=prog, description="Evaluate registration methods on pairs: "
                              "per_pair.csv, summary.md/json and box plots in --out.")
  p.add_argument("--data", required=True,
                 help="'demo', a Learn2Reg folder (its registration_val pairs) or a pairs .csv")
  p.add_argument("--out", required=True, help="output folder (written atomically)")
  p.add_argument("--checkpoint", help="model folder (default: the shipped demo model)")
  p.add_argument("--methods", default=",".join(METHODS),
                 help=f"comma-separated, from {','.join(METHODS)} (default: all)")
  p.add_argument("--pairs", type=int, help="evaluate only the first N pairs "
                 "(demo: default config.data.val_pairs)")
  p.add_argument("--io-steps", type=int, default=50,
                 help="instance-optimisation steps of jaxreg+io")
  p.add_argument("--affine", choices=("none", "rigid", "affine"), default="none",
                 help="pre-alignment of the jaxreg methods (default none: the demo pairs start "
                 "aligned, and elastix's B-spline map has no affine stage either)")
  p.add_argument("--mesh", metavar="space=S",
                 help="run the jaxreg methods spatially sharded over S local devices")
  p.add_argument("--scoring", choices=("default", "learn2reg"), default="default",
                 help="learn2reg: also score every result by the Learn2Reg challenge's own "
                 "rules (l2r_dice, l2r_hd95 in voxels, l2r_sdlogj, l2r_tre in mm; mean, std "
                 "and its '30' column), on the field as the submission stores it")
  p.add_argument("--learn2reg-submission", metavar="DIR",
                 help="write each method's Learn2Reg submission: DIR/<method>/disp_*.npz "
                 "(fixed-voxel displacements named by the dataset's file ids; pairs of other "
                 "data numbered from 0000) and DIR/pairs.csv")
  p.add_argument("--learn2reg-format", choices=tuple(_l2r.FORMATS), default="npz",
                 help="submission files: npz (float16, default) or nii.gz (float32)")
  p.add_argument("--learn2reg-mask", action="store_true",
                 help="l2r_sdlogj over the fixed mask only, as the challenge scores LungCT, "
                 "NLST and AbdomenMRCT (masked_evaluation)")
  return p


def main(argv: list[str] | None = None, prog: str = "evaluate.py") -> int:
  """Run the evaluation; user errors print one line on stderr and exit 2."""
  from jaxreg.io import interrupt
  from jaxreg.ops.warp_kernel import KernelError
  args = build_parser(prog).parse_args(argv)
  with interrupt.interruptible():
    try:
      with _io.output_lock(args.out):
        rc = _main(args)
      interrupt.check()  # a signal dropped after the last output was written
      return rc
    except (InputError, KernelError) as e:
      print(f"{prog}: error: {e}", file=sys.stderr)
      return 2
    except KeyboardInterrupt as e:
      print(f"{prog}: {str(e) or 'interrupted'}; nothing was written", file=sys.stderr)
      return 130


def _main(args) -> int:
  from jaxreg.eval import elastix
  from jaxreg.io import weights
  from jaxreg.pipeline import environment
  environment.configure()  # the compilation cache and the CPU warp kernel ($JAXREG_*)
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = [m for m in methods if m not in METHODS]
  if unknown or not methods:
    raise InputError(f"--methods: unknown {unknown or 'empty list'}; choose from "
                     f"{','.join(METHODS)}")
  if args.io_steps < 0:
    raise InputError(f"--io-steps must be >= 0, got {args.io_steps}")
  sub = args.learn2reg_submission
  if sub is not None and os.path.abspath(sub) == os.path.abspath(args.out):
    raise InputError(f"{sub}: --learn2reg-submission must be another folder than --out")
  if sub is not None:
    _io.check_output_dir(sub)
  from jaxreg.ops import sharding as _mesh
  mesh = _mesh.inference_mesh(args.mesh)
  net, config = (weights.load_weights(args.checkpoint) if args.checkpoint
                 else weights.demo_model())
  from jaxreg.eval import demons
  for name, module in (("elastix", elastix), ("demons", demons)):
    if name in methods and not module.available():
      print(f"{args.data}: {name} skipped: {module.MISSING}", file=sys.stderr)
      methods.remove(name)
  skipped: list[dict] = []
  cases = load_cases(args.data, config, pairs=args.pairs, skipped=skipped,
                     log=lambda m: print(m, file=sys.stderr))
  label_ids = tuple(config.data.label_ids) if args.data == "demo" else None
  print(f"evaluating {', '.join(methods)} on {len(cases)} pairs of {args.data}" +
        (f" ({len(skipped)} unreadable pairs skipped)" if skipped else ""))
  info = {"data": args.data, "pairs": len(cases), "skipped_pairs": skipped, "methods": methods,
          "checkpoint": args.checkpoint or "shipped demo model", "io_steps": args.io_steps,
          "affine": args.affine, "mesh_space": _mesh.space_size(mesh),
          "labels": list(label_ids) if label_ids else "all labels in both maps"}
  if args.scoring == "learn2reg":
    info["scoring"] = {"name": "learn2reg", "format": args.learn2reg_format,
                       "sdlogj_masked": args.learn2reg_mask,
                       "units": {m: u for m, (u, _, _) in _l2r.METRICS.items()},
                       "30_quantile": {m: q for m, (_, _, q) in _l2r.METRICS.items()}}
  with contextlib.ExitStack() as stack:
    on_field = None
    if sub is not None:
      stack.enter_context(_io.output_lock(sub))
      on_field = _submission_writer(stack.enter_context(_io.atomic_dir(sub)), cases, methods,
                                    args.learn2reg_format)
      info["learn2reg_submission"] = {"folder": sub, "format": args.learn2reg_format}
    rows = evaluate(cases, methods, net=net, config=config, io_steps=args.io_steps,
                    affine=args.affine, label_ids=label_ids, mesh=mesh, scoring=args.scoring,
                    l2r_format=args.learn2reg_format, l2r_masked=args.learn2reg_mask,
                    on_field=on_field)
    summary = summarise(rows)
    with _io.atomic_dir(args.out) as tmp:
      write_outputs(tmp, rows, summary, info)
  print(markdown_table(summary), end="")
  print(f"written to {args.out}" + (f"; the Learn2Reg submission to {sub}" if sub else ""))
  return 0


def _submission_writer(folder: str, cases: Sequence[Case], methods: Sequence[str], fmt: str
                       ) -> Callable[[str, int, Case, np.ndarray], None]:
  """An ``on_field`` for :func:`evaluate` writing ``folder/<method>/<name>.<fmt>``, and
  ``folder/pairs.csv`` (file, pair, fixed, moving) now: the names of every case's file
  (:func:`jaxreg.eval.learn2reg.submission_names`)."""
  paths = [(c.spec.fixed, c.spec.moving) if c.spec else (None, None) for c in cases]
  names = _l2r.submission_names(paths)
  with open(os.path.join(folder, "pairs.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["file", "pair", "fixed", "moving"])
    for name, case, (fixed, moving) in zip(names, cases, paths):
      writer.writerow([f"{name}.{fmt}", case.name, fixed or "", moving or ""])
  for method in methods:
    os.makedirs(os.path.join(folder, method))

  def write(method: str, index: int, case: Case, field: np.ndarray) -> None:
    _l2r.write_field(os.path.join(folder, method), names[index], field, fmt, case.fixed.affine)
  return write
