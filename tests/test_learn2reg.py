"""jaxreg.eval.learn2reg against an independent reading of the Learn2Reg challenge's rules
(github.com/MDL-UzL/L2R, evaluation/evaluation.py and utils.py), closed forms, and the
submission files evaluate.py writes read back the way the official code reads them.

The references here are deliberately plain: explicit rounding for the warp, all-pairs
distances between corner surface elements, ``np.gradient`` for the Jacobian. Set
``JAXREG_L2R_OFFICIAL`` to a checkout's ``evaluation`` folder to also compare with the
official functions themselves (skipped otherwise: no test needs the network).
"""

import csv
import itertools
import json
import os
import sys
import types

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxreg import io
from jaxreg.eval import evaluation as E
from jaxreg.eval import learn2reg as L
from jaxreg.types import InputError, Volume

# --- independent references ---------------------------------------------------------


def ref_warp(moving, field):
  """Nearest neighbour by explicit rounding half up; 0 outside [0, n - 1] on any axis."""
  out = np.zeros(field.shape[:3], moving.dtype)
  for i in np.ndindex(*field.shape[:3]):
    c = np.array(i, np.float64) + field[i].astype(np.float64)
    if np.all(c >= 0) and np.all(c <= np.array(moving.shape) - 1):
      out[i] = moving[tuple(int(np.floor(x + 0.5)) for x in c)]
  return out


def ref_surface(mask):
  """(corner positions [K, 3], areas [K]) of the border corners, one corner at a time."""
  areas = L.surfel_areas()
  pad = np.pad(mask, 1)
  pos, area = [], []
  for c in np.ndindex(*(n + 1 for n in mask.shape)):
    code = sum(int(pad[c[0] + o[0], c[1] + o[1], c[2] + o[2]]) << b
               for b, o in enumerate(itertools.product((0, 1), repeat=3)))
    if code not in (0, 255):
      pos.append(c)
      area.append(areas[code])
  return np.array(pos, np.float64), np.array(area)


def ref_percentile(dist, area, q=0.95):
  total, acc = sum(area), 0.0
  pairs = sorted(zip(dist, area))
  for k, (d, a) in enumerate(pairs):
    acc += a
    if acc / total >= q - 1e-12:
      return d
  return pairs[-1][0]


def ref_hd95(a, b):
  if not b.any():
    return np.inf
  (pa, wa), (pb, wb) = ref_surface(a), ref_surface(b)
  d = np.linalg.norm(pa[:, None] - pb[None], axis=-1)
  return max(ref_percentile(d.min(1), wa), ref_percentile(d.min(0), wb))


def ref_scores(fixed, moving, field, labels):
  warped = ref_warp(moving, field)
  dice, hd = [], []
  for k in labels:
    if not (fixed == k).any() or not (moving == k).any():
      continue
    f, w = fixed == k, warped == k
    dice.append(2 * (f & w).sum() / (f.sum() + w.sum()))
    hd.append(ref_hd95(f, w))
  return np.mean(dice), np.mean(hd)


def ref_sdlogj(field, mask=None):
  grads = np.stack([np.stack(np.gradient(field[..., c].astype(np.float64)), -1)
                    for c in range(3)], -2)  # [..., component, axis]
  det = np.linalg.det(grads + np.eye(3))[2:-2, 2:-2, 2:-2]
  v = np.log(np.clip(det + 3, 1e-9, 1e9))
  return np.std(v if mask is None else v[mask[2:-2, 2:-2, 2:-2] == 1])


def smooth_field(rng, shape, scale, sigma=2.0):
  u = ndi.gaussian_filter(rng.normal(size=shape + (3,)), (sigma, sigma, sigma, 0))
  u *= scale / np.abs(u).max()
  return u.astype(np.float16).astype(np.float32)  # as a float16 submission stores it


def blobs(rng, shape, labels=4, sigma=1.5):
  noise = ndi.gaussian_filter(rng.random(shape), sigma)
  edges = np.quantile(noise, np.linspace(0, 1, labels + 2)[1:-1])
  return np.digitize(noise, edges).astype(np.int16)


# --- tests --------------------------------------------------------------------------


def test_surfel_areas_closed_forms_and_cube_symmetry():
  a = L.surfel_areas()
  bit = {c: b for b, c in enumerate(itertools.product((0, 1), repeat=3))}
  code = lambda corners: sum(1 << bit[c] for c in corners)
  assert a[0] == 0 and a[255] == 0
  assert a[code([(0, 0, 0)])] == pytest.approx(np.sqrt(3) / 8)  # a corner cut off
  assert a[code([(0, 0, 0), (1, 0, 0)])] == pytest.approx(np.sqrt(2) / 2)  # an edge
  assert a[code([(0, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1)])] == pytest.approx(1.0)  # a face
  assert a[code([(0, 0, 0), (1, 1, 0)])] == pytest.approx(np.sqrt(3) / 4)  # two corners apart
  # three corners of a face: a pentagon, split as 0.5 + sqrt(3)/4 + sqrt(3)/8 (widest)
  assert a[code([(0, 0, 0), (1, 0, 0), (0, 1, 0)])] == pytest.approx(0.5 + 3 * np.sqrt(3) / 8)
  np.testing.assert_allclose(a, a[255 - np.arange(256)], atol=1e-12)
  for perm, flip in itertools.product(itertools.permutations(range(3)),
                                      itertools.product((0, 1), repeat=3)):
    moved = [code([tuple(c[perm[d]] ^ flip[d] for d in range(3))
                   for c, b in bit.items() if k >> b & 1]) for k in range(256)]
    np.testing.assert_allclose(a[moved], a, atol=1e-12)
  # anisotropic spacing scales each triangle: a face normal to axis 0 becomes s1 * s2
  face = code([(0, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1)])
  assert L.surfel_areas((2.0, 3.0, 5.0))[face] == pytest.approx(15.0)


def test_hd95_equals_brute_force_surface_elements():
  rng = np.random.default_rng(0)
  for trial in range(12):
    shape = tuple(int(n) for n in rng.integers(4, 9, 3))
    a = ndi.gaussian_filter(rng.random(shape), 1.0) > 0.5
    b = ndi.gaussian_filter(rng.random(shape), 1.0) > 0.5
    if not a.any() or not b.any():
      continue
    assert L._robust_hausdorff(a, b, (1.0, 1.0, 1.0)) == pytest.approx(ref_hd95(a, b)), trial
  box = np.zeros((6, 6, 6), bool)
  box[1:4, 1:4, 1:4] = True
  assert L._robust_hausdorff(box, box, (1.0, 1.0, 1.0)) == 0.0
  assert L._robust_hausdorff(box, np.roll(box, 2, 0), (1.0, 1.0, 1.0)) == 2.0
  assert L._robust_hausdorff(box, np.zeros_like(box), (1.0, 1.0, 1.0)) == np.inf


@pytest.mark.parametrize("crop", [False, True])
def test_labels_match_the_reference_on_random_fields(crop):
  """Random smooth fields and label maps; cropped, the organs are cut by the volume border
  and the field pulls from outside it, where the official warp gives background."""
  rng = np.random.default_rng(3 + crop)
  shape = (14, 12, 10)
  big = blobs(rng, (22, 20, 18))
  fixed = big[4:18, 4:16, 4:14] if crop else blobs(rng, shape)
  moving = np.roll(big, 2, axis=0)[4:18, 4:16, 4:14] if crop else blobs(rng, shape)
  field = smooth_field(rng, shape, 4.0 if crop else 2.5)
  if crop:
    field[..., 0] += 2.0  # pull beyond the last slice
    assert fixed[0].any() and fixed[-1].any() and fixed[:, :, 0].any()
  labels = [1, 2, 3, 4, 9]  # 9 is in neither map: nan, dropped as the official nanmean does
  warped = L.warp_labels(moving, field)
  np.testing.assert_array_equal(warped, ref_warp(moving, field))
  if crop:  # pulled from beyond the last slice: background, whatever lies there
    beyond = np.arange(shape[0])[:, None, None] + field[..., 0] > shape[0] - 1
    assert beyond.sum() > 50 and (warped[beyond] == 0).all()
  got = L.case_scores(field, fixed_labels=fixed, moving_labels=moving, labels=labels)
  want_dice, want_hd = ref_scores(fixed, moving, field, labels)
  assert got["l2r_dice"] == pytest.approx(want_dice)
  assert got["l2r_hd95"] == pytest.approx(want_hd)
  assert got["l2r_sdlogj"] == pytest.approx(ref_sdlogj(field), rel=1e-9)


def test_half_voxel_rounding_and_border():
  """Rounding half up (i + 0.5 -> i + 1), and nothing sampled beyond [0, n - 1]."""
  moving = np.arange(1, 6, dtype=np.int16)[:, None, None] * np.ones((5, 1, 1), np.int16)
  moving = np.broadcast_to(moving, (5, 5, 5)).copy()
  field = np.zeros((5, 5, 5, 3), np.float32)
  for shift, want in ((0.5, [2, 3, 4, 5, 0]), (-0.5, [0, 2, 3, 4, 5]), (0.25, [1, 2, 3, 4, 0]),
                      (-0.25, [0, 2, 3, 4, 5])):
    field[..., 0] = shift
    np.testing.assert_array_equal(L.warp_labels(moving, field)[:, 2, 2], want, err_msg=shift)


def test_sdlogj_tre_and_masks_against_plain_numpy():
  rng = np.random.default_rng(5)
  shape = (16, 14, 12)
  field = smooth_field(rng, shape, 3.0, sigma=1.5)
  mask = (rng.random(shape) > 0.4).astype(np.uint8)
  mask[mask == 0] = rng.integers(0, 3, size=int((mask == 0).sum()))  # 2s are not "1"
  assert L.sdlogj(field) == pytest.approx(ref_sdlogj(field), rel=1e-9)
  assert L.sdlogj(field, mask) == pytest.approx(ref_sdlogj(field, mask), rel=1e-9)
  # TRE at integer keypoints: the interpolating spline returns the samples themselves
  p = rng.integers(0, 12, size=(20, 3)).astype(np.float64)
  q = rng.uniform(0, 12, size=(20, 3))
  spacing = (1.5, 0.8, 2.0)
  want = np.linalg.norm((p + field[tuple(p.astype(int).T)] - q) * spacing, axis=1)
  np.testing.assert_allclose(L.tre(p, q, field, spacing), want, rtol=1e-5, atol=1e-5)


def test_closed_forms_zero_and_affine_fields():
  rng = np.random.default_rng(6)
  shape = (24, 24, 24)
  labels = blobs(rng, shape)
  zero = np.zeros(shape + (3,), np.float32)
  # the official SDlogJ of a zero field: std(log(1 + 3)) over a constant = 0
  got = L.case_scores(zero, fixed_labels=labels, moving_labels=labels,
                      fixed_points=np.array([[3.0, 4, 5]]), moving_points=np.array([[4.0, 4, 7]]),
                      moving_spacing=(2.0, 1.0, 3.0))
  assert got == {"l2r_dice": 1.0, "l2r_hd95": 0.0, "l2r_sdlogj": pytest.approx(0.0, abs=1e-12),
                 "l2r_tre": pytest.approx(np.hypot(2.0, 6.0))}
  # an affine field: det J constant, so SDlogJ 0; TRE follows it exactly inside the grid
  m = np.array([[0.05, 0.02, 0.0], [-0.01, 0.03, 0.02], [0.0, 0.01, -0.04]])
  grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij"), -1)
  field = (grid @ m.T + [1.5, -2.0, 0.5]).astype(np.float32)
  assert L.sdlogj(field) == pytest.approx(0.0, abs=1e-6)
  p = rng.uniform(9, 15, size=(10, 3))  # away from the border's zero padding
  moved = p + p @ m.T + [1.5, -2.0, 0.5]
  np.testing.assert_allclose(L.tre(p, moved, field, (1, 1, 1)), 0, atol=1e-3)


def test_submission_names_follow_the_official_lookup():
  lung = ("x/imagesTr/LungCT_0001_0000.nii.gz", "x/imagesTr/LungCT_0001_0001.nii.gz")
  abdomen = ("imagesTr/AbdomenCTCT_0001_0000.nii.gz", "imagesTr/AbdomenCTCT_0004_0000.nii.gz")
  cbct = ("imagesTr/ThoraxCBCT_0011_0001.nii.gz", "imagesTr/ThoraxCBCT_0011_0000.nii.gz")
  assert L.submission_names([lung, abdomen, cbct]) == [
      "disp_0001_0001", "disp_0001_0000_0004_0000", "disp_0011_0001_0011_0000"]
  assert L.submission_names([lung, ("a.nii.gz", "b.nii.gz"), (None, None)]) == [
      "disp_0000_0000", "disp_0001_0001", "disp_0002_0002"]
  with pytest.raises(InputError, match="would both be written as disp_0001_0001"):
    L.submission_names([lung, lung])


def test_submission_field_maps_fixed_voxels_to_moving_voxels():
  rng = np.random.default_rng(7)
  fixed = np.diag([-2.0, 2.0, 2.5, 1.0])
  moving = np.diag([-1.0, 2.0, 2.5, 1.0])
  moving[:3, 3] = [3.0, -4.0, 1.0]
  disp = rng.normal(size=(6, 5, 4, 3)) * 3
  u = L.submission_field(disp, fixed, moving, dtype=np.float32)
  i = np.stack(np.meshgrid(*(np.arange(n) for n in (6, 5, 4)), indexing="ij"), -1)
  world = lambda a, v: v @ a[:3, :3].T + a[:3, 3]
  np.testing.assert_allclose(world(moving, i + u), world(fixed, i) + disp, atol=1e-4)
  u16 = L.submission_field(disp, fixed, moving)
  assert u16.dtype == np.float32
  np.testing.assert_array_equal(u16, u.astype(np.float16).astype(np.float32))


def _learn2reg_folder(root):
  """A Learn2Reg folder: LungCT-style 0000 -> 0001 pair and an AbdomenCTCT-style 0000 -> 0000
  pair, labels touching the border, keypoints, and a moving grid shifted by 3 mm."""
  rng = np.random.default_rng(11)
  shape = (20, 18, 16)
  fixed_affine = np.diag([2.0, 2.0, 2.0, 1.0])
  moving_affine = fixed_affine.copy()
  moving_affine[:3, 3] = [3.0, 0.0, -1.0]
  for d in ("imagesTr", "labelsTr", "keypointsTr", "masksTr"):
    (root / d).mkdir(parents=True)
  names = ["Toy_0001_0000", "Toy_0001_0001", "Toy_0002_0000", "Toy_0003_0000"]
  for k, name in enumerate(names):
    affine = fixed_affine if k % 2 == 0 else moving_affine
    io.save(root / "imagesTr" / f"{name}.nii.gz", rng.normal(size=shape).astype(np.float32),
            affine)
    io.save(root / "labelsTr" / f"{name}.nii.gz", blobs(rng, shape), affine)
    np.savetxt(root / "keypointsTr" / f"{name}.csv", rng.uniform(2, 13, (12, 3)), delimiter=",")
    io.save(root / "masksTr" / f"{name}.nii.gz", (rng.random(shape) > 0.3).astype(np.uint8), affine)
  pairs = [{"fixed": f"./imagesTr/{f}.nii.gz", "moving": f"./imagesTr/{m}.nii.gz"}
           for f, m in ((names[0], names[1]), (names[2], names[3]))]
  (root / "Toy_dataset.json").write_text(json.dumps({"name": "Toy", "registration_val": pairs}))
  return shape


@pytest.mark.parametrize("fmt", ["npz", "nii.gz"])
def test_submission_read_back_as_the_official_code_reads_it(tmp_path, monkeypatch, fmt):
  """evaluate.py --learn2reg-submission on a Learn2Reg folder: the official names, the field
  (read as their load_disp does) equal to the result's to float16 precision, and the
  l2r_* figures evaluate.py reports equal to those of the file read back."""
  shape = _learn2reg_folder(tmp_path / "Toy")
  rng = np.random.default_rng(12)
  fields = {}

  def fake_method(method, case, **_):
    fields[case.name] = rng.normal(size=case.fixed.shape + (3,)).astype(np.float32) * 3
    return ndi.gaussian_filter(fields[case.name], (1, 1, 1, 0))
  monkeypatch.setattr(E, "run_method", fake_method)
  sub, out = tmp_path / "sub", tmp_path / "ev"
  assert E.main(["--data", str(tmp_path / "Toy"), "--out", str(out), "--methods", "identity",
                 "--scoring", "learn2reg", "--learn2reg-submission", str(sub),
                 "--learn2reg-format", fmt]) == 0
  files = sorted(os.listdir(sub / "identity"))
  assert files == sorted([f"disp_0001_0001.{fmt}", f"disp_0002_0000_0003_0000.{fmt}"])
  listed = list(csv.DictReader(open(sub / "pairs.csv")))
  assert [r["file"] for r in listed] == [f"disp_0001_0001.{fmt}",
                                         f"disp_0002_0000_0003_0000.{fmt}"]
  rows = {r["pair"]: r for r in csv.DictReader(open(out / "per_pair.csv"))}
  cases = E.load_cases(str(tmp_path / "Toy"), config=None)
  for case, entry in zip(cases, listed):
    path = str(sub / "identity" / entry["file"])
    if fmt == "npz":  # their loader: the single array of any key, as float32
      with np.load(path) as z:
        assert len(z.files) == 1 and z[z.files[0]].dtype == np.float16
        read = z[z.files[0]].astype(np.float32)
    else:
      read = nib.load(path).get_fdata()
    assert read.shape == shape + (3,)
    disp = ndi.gaussian_filter(fields[case.name], (1, 1, 1, 0))
    want = L.submission_field(disp, case.fixed.affine, case.moving.affine, dtype=np.float64)
    np.testing.assert_allclose(read, want, rtol=2.0 ** -11, atol=1e-6)
    np.testing.assert_array_equal(L.read_field(path), read)
    scores = E.learn2reg_metrics(case, read.astype(np.float32))
    for k, v in scores.items():
      assert float(rows[case.name][k]) == pytest.approx(v, rel=1e-6), k
  # --learn2reg-mask: SDlogJ over the fixed mask's voxels equal to 1 (masked_evaluation)
  mask = nib.load(str(tmp_path / "Toy" / "masksTr" / "Toy_0001_0000.nii.gz")).get_fdata()
  field = L.read_field(str(sub / "identity" / listed[0]["file"])).astype(np.float32)
  masked = E.learn2reg_metrics(cases[0], field, masked=True)["l2r_sdlogj"]
  assert masked == pytest.approx(ref_sdlogj(field, mask), rel=1e-9)
  assert masked != pytest.approx(ref_sdlogj(field), rel=1e-3)
  summary = json.load(open(out / "summary.json"))
  assert summary["scoring"]["30_quantile"] == {"l2r_dice": 0.3, "l2r_hd95": 0.3,
                                               "l2r_sdlogj": 0.7, "l2r_tre": 0.7}
  assert "Learn2Reg scoring" in (out / "summary.md").read_text()


def test_demo_submission_is_numbered_and_identity_scores_as_today(tmp_path):
  sub, out = tmp_path / "sub", tmp_path / "ev"
  assert E.main(["--data", "demo", "--pairs", "1", "--methods", "identity", "--out", str(out),
                 "--scoring", "learn2reg", "--learn2reg-submission", str(sub)]) == 0
  assert os.listdir(sub / "identity") == ["disp_0000_0000.npz"]  # numbered: not Learn2Reg files
  for f in os.listdir(sub / "identity"):
    assert not L.read_field(str(sub / "identity" / f)).any()
  for r in csv.DictReader(open(out / "per_pair.csv")):
    # same grid, no warp: Dice and TRE agree with today's; HD95 in voxels differs
    assert float(r["l2r_dice"]) == pytest.approx(float(r["dice"]))
    assert float(r["l2r_tre"]) == pytest.approx(float(r["tre"]), rel=1e-5)
    assert float(r["l2r_sdlogj"]) == 0.0


def _official(folder):
  """The official utils and surface_distance modules, under numpy 2's missing aliases."""
  sys.modules.setdefault("evalutils", types.ModuleType("evalutils"))
  exc = types.ModuleType("evalutils.exceptions")
  exc.ValidationError = type("ValidationError", (Exception,), {})
  sys.modules.setdefault("evalutils.exceptions", exc)
  for name, value in (("bool", np.bool_), ("Inf", np.inf), ("NAN", np.nan)):
    if not hasattr(np, name):
      setattr(np, name, value)
  sys.path[:0] = [folder, os.path.join(folder, "surface-distance")]
  import utils  # noqa: PLC0415  (the official evaluation/utils.py)
  return utils


@pytest.mark.skipif(not os.environ.get("JAXREG_L2R_OFFICIAL"),
                    reason="set JAXREG_L2R_OFFICIAL to an L2R checkout's evaluation folder")
def test_against_the_official_functions():
  U = _official(os.environ["JAXREG_L2R_OFFICIAL"])
  rng = np.random.default_rng(13)
  shape = (18, 16, 14)
  for _ in range(3):
    fixed, moving = blobs(rng, shape), blobs(rng, shape)
    field = smooth_field(rng, shape, 4.0)
    grid = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    warped = ndi.map_coordinates(moving.astype(float), grid + field.transpose(3, 0, 1, 2), order=0)
    labels = [1, 2, 3, 4]
    p, q = rng.uniform(0, 13, (15, 3)), rng.uniform(0, 13, (15, 3))
    got = L.case_scores(field, fixed_labels=fixed, moving_labels=moving, labels=labels,
                        fixed_points=p, moving_points=q, moving_spacing=(1.0, 1.5, 2.0))
    jac = (U.jacobian_determinant(field[None].transpose(0, 4, 1, 2, 3)) + 3).clip(1e-9, 1e9)
    assert got["l2r_sdlogj"] == pytest.approx(np.log(jac).std(), rel=1e-6)
    assert got["l2r_dice"] == pytest.approx(U.compute_dice(fixed, moving, warped, labels)[0])
    assert got["l2r_hd95"] == pytest.approx(U.compute_hd95(fixed, moving, warped, labels)[0])
    tre = U.compute_tre(p, q, field, None, (1.0, 1.5, 2.0)).mean()
    assert got["l2r_tre"] == pytest.approx(tre, rel=1e-5)


def test_bad_submission_files_are_refused(tmp_path):
  np.savez(tmp_path / "two.npz", np.zeros(3), np.ones(3))
  with pytest.raises(InputError, match="one array"):
    L.read_field(str(tmp_path / "two.npz"))
  with pytest.raises(InputError, match=".npz or .nii.gz"):
    L.read_field(str(tmp_path / "x.npy"))
  with pytest.raises(InputError, match="unknown submission format"):
    L.write_field(str(tmp_path), "disp_0000_0000", np.zeros((5, 5, 5, 3)), "mha")
  case = E.Case("c", Volume(np.zeros((5, 5, 5), np.float32), np.eye(4)),
                Volume(np.zeros((5, 5, 5), np.float32), np.eye(4)))
  assert np.isnan(E.learn2reg_metrics(case, np.zeros((5, 5, 5, 3), np.float32))["l2r_dice"])
