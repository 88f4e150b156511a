"""evaluate.py / jaxreg evaluate: scores against closed forms, outputs, bad inputs."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxreg import data, io
from jaxreg.eval import elastix
from jaxreg.eval import evaluation as E
from jaxreg.types import Volume

LAS = np.diag([-2.0, 2.0, 2.0, 1.0])
SHAPE = (20, 18, 16)
T = np.array([4.0, -2.0, 6.0])  # world mm; in LAS voxels (-2, -1, 3)


def _shifted_case():
  """Moving = fixed one world translation T away: fixed p <-> moving p + T exactly."""
  rng = np.random.default_rng(0)
  image = rng.normal(size=SHAPE).astype(np.float32)
  labels = np.zeros(SHAPE, np.int16)
  labels[4:14, 3:12, 5:13] = 1  # a 10 x 9 x 8 box
  moving_affine = LAS.copy()
  moving_affine[:3, 3] += T
  pts = rng.uniform(0, 30, size=(25, 3)) * [-1, 1, 1]
  return E.Case("shifted", Volume(image, LAS), Volume(image, moving_affine),
                Volume(labels, LAS), Volume(labels, moving_affine), pts, pts + T)


def test_score_identity_and_exact_field_against_closed_forms():
  case = _shifted_case()
  ident = E.case_metrics(case, np.zeros(SHAPE + (3,), np.float32))
  overlap = (10 - 2) * (9 - 1) * (8 - 3)  # the box against itself shifted by (2, 1, 3) voxels
  assert ident["dice"] == pytest.approx(2 * overlap / (2 * 10 * 9 * 8))
  assert ident["tre"] == pytest.approx(np.linalg.norm(T), abs=1e-4)
  assert ident["hd95"] > 0 and ident["folding"] == 0 and ident["sdlogj"] == pytest.approx(0)
  exact = E.case_metrics(case, np.broadcast_to(T, SHAPE + (3,)).astype(np.float32))
  assert exact["dice"] == 1.0 and exact["hd95"] == 0.0
  assert exact["tre"] == pytest.approx(0, abs=1e-4)
  assert exact["folding"] == 0 and exact["sdlogj"] == pytest.approx(0, abs=1e-6)


def test_score_without_labels_or_points_gives_nan():
  c = _shifted_case()
  bare = E.Case("bare", c.fixed, c.moving)
  row = E.case_metrics(bare, np.zeros(SHAPE + (3,), np.float32))
  assert np.isnan(row["dice"]) and np.isnan(row["hd95"]) and np.isnan(row["tre"])


def test_summarise_matches_numpy_and_drops_nan():
  rows = [{"pair": str(i), "method": m, "dice": d, "hd95": h, "tre": np.nan, "sdlogj": 0.1 * i,
           "folding": 0.0, "seconds": 1.0 + i}
          for i, (d, h) in enumerate([(0.5, 3.0), (0.7, np.nan), (0.9, 5.0), (0.6, 4.0)])
          for m in ("a", "b")]
  s = E.summarise(rows)
  dice = np.array([0.5, 0.7, 0.9, 0.6])
  assert s["a"]["dice"] == {"mean": pytest.approx(dice.mean()), "std": pytest.approx(dice.std()),
                            "p30": pytest.approx(np.percentile(dice, 30)), "n": 4}
  assert s["b"]["hd95"]["n"] == 3 and s["b"]["hd95"]["mean"] == pytest.approx(4.0)
  assert s["a"]["tre"] == {"mean": None, "std": None, "p30": None, "n": 0}
  table = E.markdown_table(s)
  assert table.count("\n") == 4 and "| a | 0.675 ± 0.148 |" in table and "n/a" in table


def test_summarise_learn2reg_metrics_by_the_challenge_rules():
  """--scoring learn2reg rows: the "30" column is the 0.3 quantile of Dice and HD95 and the
  0.7 quantile of SDlogJ and TRE; an infinite HD95 (a lost label) is kept; NaN dropped.
  Rows without them summarise and print exactly as before."""
  vals = {"l2r_dice": [0.5, 0.7, 0.9, 0.6], "l2r_hd95": [3.0, np.nan, 5.0, 4.0],
          "l2r_sdlogj": [0.1, 0.3, 0.2, 0.4], "l2r_tre": [2.0, 1.0, 4.0, 3.0]}
  rows = [{"pair": str(i), "method": "a", **{m: np.nan for m in E.METRICS},
           **{m: v[i] for m, v in vals.items()}} for i in range(4)]
  s = E.summarise(rows)["a"]
  assert list(s) == [*E.METRICS, *vals]
  for m, q in (("l2r_dice", 0.3), ("l2r_hd95", 0.3), ("l2r_sdlogj", 0.7), ("l2r_tre", 0.7)):
    v = np.array(vals[m])
    v = v[~np.isnan(v)]
    assert s[m] == {"mean": pytest.approx(v.mean()), "std": pytest.approx(v.std()),
                    "p30": pytest.approx(np.quantile(v, q)), "n": len(v)}, m
  table = E.markdown_table({"a": s})
  assert "Learn2Reg scoring" in table and "| a | 0.675 ± 0.148 [30: 0.590] |" in table
  rows[1]["l2r_hd95"] = np.inf
  assert E.summarise(rows)["a"]["l2r_hd95"]["mean"] == np.inf
  plain = [{k: v for k, v in r.items() if not k.startswith("l2r_")} for r in rows]
  assert list(E.summarise(plain)["a"]) == list(E.METRICS)
  assert "Learn2Reg" not in E.markdown_table(E.summarise(plain))


def test_failed_evaluation_writes_no_submission(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(E, "run_method", lambda method, case, **_: np.full(
      case.fixed.shape + (3,), np.nan, np.float32))
  rc = E.main(["--data", "demo", "--pairs", "1", "--methods", "identity", "--out",
               str(tmp_path / "ev"), "--learn2reg-submission", str(tmp_path / "sub")])
  assert rc == 2 and "non-finite displacement" in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == []
  assert E.main(["--data", "demo", "--out", str(tmp_path / "ev"),
                 "--learn2reg-submission", str(tmp_path / "ev")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "must be another folder than --out" in err[0]


def _write_pair(folder, shift=(0.0, 0.0, 0.0), shape=SHAPE):
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(1)
  moving_affine = LAS.copy()
  moving_affine[:3, 3] += shift
  io.save(folder / "f.nii.gz", rng.normal(size=shape).astype(np.float32), LAS)
  io.save(folder / "m.nii.gz", rng.normal(size=shape).astype(np.float32), moving_affine)
  np.savetxt(folder / "f.csv", [[1, 2, 3], [4, 5, 6]], delimiter=",")
  np.savetxt(folder / "m.csv", [[2, 2, 3], [4, 6, 6]], delimiter=",")
  return moving_affine


def test_file_cases_read_keypoints_in_world_mm(tmp_path):
  moving_affine = _write_pair(tmp_path)
  (tmp_path / "pairs.csv").write_text("fixed,moving,fixed_keypoints,moving_keypoints\n"
                                      "f.nii.gz,m.nii.gz,f.csv,m.csv\n")
  (case,) = E.load_cases(str(tmp_path / "pairs.csv"), config=None)
  assert case.name == "f__m"
  np.testing.assert_allclose(case.fixed_points, [[-2, 4, 6], [-8, 10, 12]])
  want = [(moving_affine @ [2, 2, 3, 1])[:3], (moving_affine @ [4, 6, 6, 1])[:3]]
  np.testing.assert_allclose(case.moving_points, want)


@pytest.mark.parametrize("problem", ["one keypoint file", "keypoint counts", "no overlap",
                                     "2-D image", "labels of another grid", "not demo/csv/folder"])
def test_bad_data_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, problem):
  _write_pair(tmp_path, shift=(500.0, 0, 0) if problem == "no overlap" else (0, 0, 0))
  row, expect = "f.nii.gz,m.nii.gz,,", None
  header = "fixed,moving,fixed_labels,moving_labels"
  if problem == "one keypoint file":
    header, row, expect = "fixed,moving,fixed_keypoints", "f.nii.gz,m.nii.gz,f.csv", "one image"
  elif problem == "keypoint counts":
    np.savetxt(tmp_path / "m.csv", [[2, 2, 3]], delimiter=",")
    header, row = "fixed,moving,fixed_keypoints,moving_keypoints", "f.nii.gz,m.nii.gz,f.csv,m.csv"
    expect = "m.csv: 1 keypoints, but"
  elif problem == "no overlap":
    expect = "m.nii.gz: no overlap with"
  elif problem == "2-D image":
    import nibabel as nib
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), tmp_path / "flat.nii.gz")
    row, expect = "flat.nii.gz,m.nii.gz,,", "flat.nii.gz"
  elif problem == "labels of another grid":
    io.save(tmp_path / "l.nii.gz", np.zeros((8, 8, 8), np.int16), LAS)
    row, expect = "f.nii.gz,m.nii.gz,l.nii.gz,", "l.nii.gz"
  (tmp_path / "pairs.csv").write_text(f"{header}\n{row}\n")
  source = str(tmp_path / "pairs.csv")
  if problem == "not demo/csv/folder":
    source, expect = str(tmp_path / "f.nii.gz"), "not 'demo', a Learn2Reg folder"
  rc = E.main(["--data", source, "--out", str(tmp_path / "ev"), "--methods", "identity"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and expect in err[0], err
  assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("args, expect", [
    (["--methods", ""], "--methods: unknown empty list"),
    (["--io-steps", "-1"], "--io-steps must be >= 0"),
    (["--pairs", "0"], "--pairs must be >= 1"),
    (["--checkpoint", "."], "not a jaxreg model folder"),
])
def test_bad_flags_are_one_line_exit_2(tmp_path, capsys, args, expect):
  rc = E.main(["--data", "demo", "--out", str(tmp_path / "ev"), *args])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and expect in err[0], err
  assert not (tmp_path / "ev").exists()


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
  (tmp_path / "ev").write_text("keep me")
  assert E.main(["--data", "demo", "--out", str(tmp_path / "ev")]) == 2
  assert "exists and is not a folder" in capsys.readouterr().err
  assert (tmp_path / "ev").read_text() == "keep me"


def test_missing_elastix_is_skipped_with_a_message(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(elastix, "available", lambda: False)
  assert E.main(["--data", "demo", "--pairs", "1", "--out", str(tmp_path / "ev"),
                 "--methods", "identity,elastix"]) == 0
  captured = capsys.readouterr()
  assert "elastix skipped: the elastix baseline needs itk-elastix" in captured.err
  rows = list(csv.DictReader(open(tmp_path / "ev" / "per_pair.csv")))
  assert [r["method"] for r in rows] == ["identity"]


def test_demo_evaluation_end_to_end(tmp_path):
  """evaluate.py as a user runs it: files, consistent summary, jaxreg+io beats identity."""
  out = subprocess.run([sys.executable, "evaluate.py", "--data", "demo", "--pairs", "2",
                        "--methods", "identity,jaxreg,jaxreg+io", "--io-steps", "20",
                        "--out", str(tmp_path / "ev")], capture_output=True, text=True,
                       timeout=900, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.returncode == 0, out.stderr[-3000:]
  ev = tmp_path / "ev"
  assert sorted(os.listdir(ev)) == sorted(
      ["per_pair.csv", "summary.json", "summary.md"] +
      [f"box_{m}.png" for m in ("dice", "hd95", "tre", "sdlogj", "folding", "seconds")])
  rows = list(csv.DictReader(open(ev / "per_pair.csv")))
  assert len(rows) == 6
  summary = json.load(open(ev / "summary.json"))
  by = lambda m, k: np.array([float(r[k]) for r in rows if r["method"] == m])
  for m in ("identity", "jaxreg", "jaxreg+io"):
    for k in ("dice", "tre", "hd95"):
      assert summary["summary"][m][k]["mean"] == pytest.approx(by(m, k).mean())
  # identity's TRE is the true displacement's size at the keypoints (exact ground truth)
  cases = E.demo_cases(2, _demo_config())
  want = [np.linalg.norm(c.moving_points - c.fixed_points, axis=1).mean() for c in cases]
  np.testing.assert_allclose(by("identity", "tre"), want, rtol=1e-4)
  assert by("jaxreg+io", "tre").mean() < 0.8 * by("identity", "tre").mean()
  assert by("jaxreg+io", "dice").mean() > by("identity", "dice").mean() + 0.03
  assert by("jaxreg", "folding").max() < 0.01
  assert "| jaxreg+io |" in (ev / "summary.md").read_text()


def _demo_config():
  from jaxreg.io import weights
  return weights.demo_model()[1]


def test_demo_keypoints_follow_the_true_field():
  config = _demo_config()
  (case,) = E.demo_cases(1, config, keypoints=30)
  pair = data.demo_pair(0, split="eval", max_disp_mm=config.data.max_disp_mm,
                        control_spacing_mm=config.data.control_spacing_mm,
                        breathing_mm=config.data.breathing_mm, contrast=config.data.contrast,
                        noise_std=config.data.noise_hu)
  inv = np.linalg.inv(pair.affine)
  vox = np.rint(case.fixed_points @ inv[:3, :3].T + inv[:3, 3]).astype(int)
  assert np.isin(pair.fixed_labels[tuple(vox.T)], config.data.label_ids).all()
  moved = (vox + pair.disp[tuple(vox.T)]) @ pair.affine[:3, :3].T + pair.affine[:3, 3]
  np.testing.assert_allclose(case.moving_points, moved, atol=1e-4)
  np.testing.assert_array_equal(case.fixed.array, pair.fixed)


def test_mesh_evaluation_equals_one_device(tmp_path, capsys):
  """evaluate.py --mesh space=8: the jaxreg method split over 8 fake devices scores as one."""
  import jax
  assert jax.device_count() == 8
  rows = {}
  for name, extra in (("one", []), ("split", ["--mesh", "space=8"])):
    assert E.main(["--data", "demo", "--pairs", "1", "--methods", "jaxreg", "--out",
                   str(tmp_path / name), *extra]) == 0
    rows[name] = list(csv.DictReader(open(tmp_path / name / "per_pair.csv")))[0]
  info = json.load(open(tmp_path / "split" / "summary.json"))
  assert info["mesh_space"] == 8
  for k in ("dice", "hd95", "tre", "sdlogj"):
    assert float(rows["split"][k]) == pytest.approx(float(rows["one"][k]), rel=1e-4, abs=1e-5), k
  assert E.main(["--data", "demo", "--out", str(tmp_path / "bad"), "--mesh", "data=2"]) == 2
  assert "one registration has no batch to split" in capsys.readouterr().err


def test_unreadable_pairs_are_skipped_and_reported(tmp_path, capsys):
  _write_pair(tmp_path)
  good = (tmp_path / "f.nii.gz").read_bytes()
  (tmp_path / "cut.nii.gz").write_bytes(good[: len(good) // 2])  # a truncated download
  (tmp_path / "pairs.csv").write_text("fixed,moving\nf.nii.gz,m.nii.gz\ncut.nii.gz,m.nii.gz\n"
                                      "gone.nii.gz,m.nii.gz\n")
  rc = E.main(["--data", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "ev"),
               "--methods", "identity"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 0
  assert len(err) == 2 and all(line.startswith("warning: skipping pair ") for line in err), err
  assert "cut.nii.gz" in err[0] and "gone.nii.gz" in err[1]
  summary = json.load(open(tmp_path / "ev" / "summary.json"))
  assert summary["pairs"] == 1 and [s["pair"].split(",")[0].rsplit("/", 1)[-1]
                                    for s in summary["skipped_pairs"]] == ["cut.nii.gz",
                                                                           "gone.nii.gz"]
  assert "Skipped, unreadable" in (tmp_path / "ev" / "summary.md").read_text()
