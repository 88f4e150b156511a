"""`jaxreg apply`: a registration folder applied to other images, checked against what
`register` wrote and against SimpleITK reading the same folder."""

import os

import numpy as np
import pytest
import SimpleITK as sitk

from jaxreg import cli
from jaxreg import data
from jaxreg import io
from jaxreg.ops import grid as G


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
  """A demo pair at 8 mm registered by the CLI (network only, for speed): its folder."""
  d = tmp_path_factory.mktemp("apply")
  pair = data.demo_pair(0, split="eval", spacing=8.0, shape=(32, 32, 32))
  for name, array, dtype in (("fixed", pair.fixed, np.int16), ("moving", pair.moving, np.int16),
                             ("fixed_labels", pair.fixed_labels, np.uint8),
                             ("moving_labels", pair.moving_labels, np.uint8)):
    io.save(d / f"{name}.nii.gz", np.round(array).astype(dtype), pair.affine)
  rc = cli.main(["register", "--fixed", str(d / "fixed.nii.gz"), "--moving",
                 str(d / "moving.nii.gz"), "--moving-labels", str(d / "moving_labels.nii.gz"),
                 "--out", str(d / "reg"), "--no-refine", "--itk-h5"])
  assert rc == 0
  return d


def test_apply_reproduces_what_register_wrote(registered, capsys):
  d = registered
  assert cli.main(["apply", "--registration", str(d / "reg"), "--moving",
                   str(d / "moving_labels.nii.gz"), "--labels", "--out",
                   str(d / "labels.nii.gz")]) == 0
  assert capsys.readouterr().out.startswith(f"jaxreg apply: {d / 'labels.nii.gz'}")
  ours = io.load_labels(d / "labels.nii.gz")
  theirs = io.load_labels(d / "reg" / "warped_labels.nii.gz")
  np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-6)
  assert (ours.array == theirs.array).mean() >= 0.999
  assert cli.main(["apply", "--registration", str(d / "reg"), "--moving",
                   str(d / "moving.nii.gz"), "--out", str(d / "image.nii.gz"),
                   "--cval", "-1024"]) == 0
  np.testing.assert_allclose(io.load(d / "image.nii.gz").array,
                             io.load(d / "reg" / "warped.nii.gz").array, atol=0.5)


def test_apply_onto_another_grid_agrees_with_simpleitk(registered):
  """An oblique, anisotropic reference grid with another field of view: the labels through
  the folder's displacement.nii.gz as SimpleITK applies it (DisplacementFieldTransform)."""
  d = registered
  fixed = io.load(d / "fixed.nii.gz")
  rot = np.array([[np.cos(0.3), -np.sin(0.3), 0], [np.sin(0.3), np.cos(0.3), 0], [0, 0, 1]])
  affine = np.eye(4)
  affine[:3, :3] = rot @ np.diag([5.0, 6.0, 7.0])
  centre = fixed.affine[:3, :3] @ (np.array(fixed.shape) - 1) / 2 + fixed.affine[:3, 3]
  shape = (36, 30, 26)
  affine[:3, 3] = centre - affine[:3, :3] @ (np.array(shape) - 1) / 2
  io.save(d / "reference.nii.gz", np.zeros(shape, np.int16), affine)
  assert cli.main(["apply", "--registration", str(d / "reg"), "--moving",
                   str(d / "moving_labels.nii.gz"), "--labels", "--reference",
                   str(d / "reference.nii.gz"), "--out", str(d / "on_reference.nii.gz")]) == 0
  ours = io.load_labels(d / "on_reference.nii.gz")
  assert ours.shape == shape
  np.testing.assert_allclose(ours.affine, affine, atol=1e-5)
  field = sitk.ReadImage(str(d / "reg" / "displacement.nii.gz"), sitk.sitkVectorFloat64)
  theirs = np.transpose(sitk.GetArrayFromImage(sitk.Resample(
      sitk.ReadImage(str(d / "moving_labels.nii.gz")), sitk.ReadImage(str(d / "reference.nii.gz")),
      sitk.DisplacementFieldTransform(field), sitk.sitkNearestNeighbor, 0)), (2, 1, 0))
  # compare where the reference voxel lies inside the field's grid, away from its border (ITK
  # gives zero displacement outside the field; jaxreg repeats the edge value)
  world = G.voxel_to_world(np.moveaxis(np.indices(shape), 0, -1).astype(np.float64), affine)
  inside_vox = G.world_to_voxel(world, fixed.affine)
  inside = np.all((inside_vox >= 2) & (inside_vox <= np.array(fixed.shape) - 3), axis=-1)
  labelled = inside & ((theirs > 0) | (ours.array > 0))
  assert labelled.sum() > 1000
  assert (theirs[labelled] == ours.array[labelled]).mean() >= 0.999


@pytest.mark.parametrize("case", ["no folder", "no field", "far away"])
def test_bad_apply_inputs_give_one_line_and_write_nothing(registered, tmp_path, capsys, case):
  d = registered
  folder, moving = d / "reg", d / "moving.nii.gz"
  if case == "no folder":
    folder = tmp_path / "missing"
  elif case == "no field":
    folder = tmp_path / "empty"
    folder.mkdir()
  else:
    vol = io.load(moving)
    shifted = vol.affine.copy()
    shifted[:3, 3] += 5000.0
    moving = tmp_path / "far.nii.gz"
    io.save(moving, vol.array, shifted)
  out = tmp_path / "out.nii.gz"
  rc = cli.main(["apply", "--registration", str(folder), "--moving", str(moving),
                 "--out", str(out)])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and "Traceback" not in err[0]
  assert str(folder if case != "far away" else moving) in err[0]
  assert not os.path.exists(out)


def _fixed_points(d, n=40, seed=0):
  """World points (RAS mm) inside the fixed image's labelled voxels, a voxel or more inside
  its grid (beyond the last voxel centre, field readers extrapolate differently)."""
  fixed = io.load_labels(d / "fixed_labels.nii.gz")
  rng = np.random.default_rng(seed)
  idx = np.argwhere(fixed.array > 0)
  idx = idx[np.all((idx >= 1) & (idx <= np.array(fixed.shape) - 2), axis=1)]
  idx = idx[rng.choice(len(idx), n, replace=False)] + rng.uniform(-0.4, 0.4, (n, 3))
  return idx @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]


def test_points_through_the_folder_agree_with_simpleitk_and_invert(registered, tmp_path):
  """Fixed -> moving as SimpleITK's DisplacementFieldTransform maps them (LPS) within
  0.01 mm, from a CSV in LPS and from a Slicer markups file in RAS; moving -> fixed inverts
  it within 0.01 mm; the CSV's other columns are kept."""
  import csv
  import json
  d = registered
  ras = _fixed_points(d)
  field = sitk.ReadImage(str(d / "reg" / "displacement.nii.gz"), sitk.sitkVectorFloat64)
  t = sitk.DisplacementFieldTransform(field)
  lps = ras * [-1, -1, 1]
  want = np.array([t.TransformPoint(tuple(p)) for p in lps])  # LPS
  with open(tmp_path / "in.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["name", "X", "y", "z"])
    w.writerows([[f"p{i}", *p] for i, p in enumerate(lps)])
  assert cli.main(["apply", "--registration", str(d / "reg"), "--points",
                   str(tmp_path / "in.csv"), "--space", "lps", "--out",
                   str(tmp_path / "out.csv")]) == 0
  rows = list(csv.DictReader(open(tmp_path / "out.csv")))
  assert [r["name"] for r in rows] == [f"p{i}" for i in range(len(lps))]
  got = np.array([[float(r[c]) for c in ("X", "y", "z")] for r in rows])
  np.testing.assert_allclose(got, want, atol=0.01)
  assert np.abs(got - lps).max() > 1.0  # the registration moved them
  doc = {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/"
         "Markups/Resources/Schema/markups-schema-v1.0.3.json#",
         "markups": [{"type": "Fiducial", "coordinateSystem": "RAS", "controlPoints": [
             {"id": str(i), "label": f"F-{i}", "position": p.tolist()} for i, p in enumerate(ras)]}]}
  (tmp_path / "in.mrk.json").write_text(json.dumps(doc))
  assert cli.main(["apply", "--registration", str(d / "reg"), "--points",
                   str(tmp_path / "in.mrk.json"), "--out", str(tmp_path / "moved.mrk.json")]) == 0
  moved = json.loads((tmp_path / "moved.mrk.json").read_text())
  assert moved["markups"][0]["controlPoints"][3]["label"] == "F-3"
  got = np.array([cp["position"] for cp in moved["markups"][0]["controlPoints"]])
  np.testing.assert_allclose(got * [-1, -1, 1], want, atol=0.01)
  assert cli.main(["apply", "--registration", str(d / "reg"), "--points",
                   str(tmp_path / "moved.mrk.json"), "--inverse", "--out",
                   str(tmp_path / "back.mrk.json")]) == 0
  back = json.loads((tmp_path / "back.mrk.json").read_text())
  np.testing.assert_allclose([cp["position"] for cp in back["markups"][0]["controlPoints"]],
                             ras, atol=0.01)
  import jaxreg
  np.testing.assert_allclose(jaxreg.map_points(str(d / "reg"), ras) * [-1, -1, 1], want,
                             atol=0.01)


@pytest.mark.parametrize("content, flags, match", [
    ("a,b,c\n1,2,3\n", ["--space", "ras"], "columns x, y, z"),
    ("x,y,z\n1,2,3\n", [], "RAS or LPS"),
    ("x,y,z\n1,two,3\n", ["--space", "ras"], "must be numbers"),
])
def test_bad_points_files_give_one_line_and_write_nothing(registered, tmp_path, capsys,
                                                          content, flags, match):
  (tmp_path / "p.csv").write_text(content)
  rc = cli.main(["apply", "--registration", str(registered / "reg"), "--points",
                 str(tmp_path / "p.csv"), "--out", str(tmp_path / "o.csv"), *flags])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and match in err[0] and str(tmp_path / "p.csv") in err[0]
  assert not (tmp_path / "o.csv").exists()


def test_the_itk_composite_maps_as_the_displacement_and_applies_again(registered, tmp_path,
                                                                      capsys):
  """transform.h5 (affine + the deformable rest, read by SimpleITK) maps points as
  displacement.nii.gz does within 0.01 mm, and `jaxreg apply` reading it reproduces the
  warped labels; a transform file needs --reference; a file that is no transform: one line."""
  d = registered
  composite = sitk.ReadTransform(str(d / "reg" / "transform.h5"))
  field = sitk.DisplacementFieldTransform(
      sitk.ReadImage(str(d / "reg" / "displacement.nii.gz"), sitk.sitkVectorFloat64))
  lps = _fixed_points(d, n=60, seed=1) * [-1, -1, 1]
  a = np.array([composite.TransformPoint(tuple(p)) for p in lps])
  b = np.array([field.TransformPoint(tuple(p)) for p in lps])
  np.testing.assert_allclose(a, b, atol=0.01)
  assert np.abs(a - lps).max() > 1.0
  assert cli.main(["apply", "--registration", str(d / "reg" / "transform.h5"), "--reference",
                   str(d / "fixed.nii.gz"), "--moving", str(d / "moving_labels.nii.gz"),
                   "--labels", "--out", str(tmp_path / "l.nii.gz")]) == 0
  ours = io.load_labels(tmp_path / "l.nii.gz").array
  assert (ours == io.load_labels(d / "reg" / "warped_labels.nii.gz").array).mean() >= 0.999
  capsys.readouterr()
  for registration, extra, match in (
      (d / "reg" / "transform.h5", [], "needs --reference"),
      (d / "fixed.nii.gz", ["--reference", str(d / "fixed.nii.gz")], "not a transform file")):
    rc = cli.main(["apply", "--registration", str(registration), *extra, "--moving",
                   str(d / "moving.nii.gz"), "--out", str(tmp_path / "x.nii.gz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and match in err[0] and str(registration) in err[0]
    assert not (tmp_path / "x.nii.gz").exists()
