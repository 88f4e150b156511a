"""`jaxreg apply`: a registration folder applied to other images, checked against what
`register` wrote and against SimpleITK reading the same folder."""

import os

import numpy as np
import pytest
import SimpleITK as sitk

from jaxreg import cli, data, io
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
                 "--out", str(d / "reg"), "--no-refine", "--itk-h5", "--ants", "--inverse"])
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
  (tmp_path / "bogus.tfm").write_text("not a transform\n")
  for registration, extra, match in (
      (d / "reg" / "transform.h5", [], "needs --reference"),
      (tmp_path / "bogus.tfm", ["--reference", str(d / "fixed.nii.gz")], "not a transform file"),
      (d / "fixed.nii.gz", [], "vector field")):
    rc = cli.main(["apply", "--registration", str(registration), *extra, "--moving",
                   str(d / "moving.nii.gz"), "--out", str(tmp_path / "x.nii.gz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and match in err[0] and str(registration) in err[0]
    assert not (tmp_path / "x.nii.gz").exists()


# --- the ANTs pair (register --ants), as SimpleITK composes it -----------------------------------

def _inside(grid_shape, grid_affine, other, margin=2):
  """Voxels of ``other`` (a Volume) whose centre lies ``margin`` voxels inside a grid."""
  world = G.voxel_to_world(np.moveaxis(np.indices(other.shape), 0, -1).astype(np.float64),
                           other.affine)
  vox = np.asarray(G.world_to_voxel(world, grid_affine))
  return np.all((vox >= margin) & (vox <= np.array(grid_shape) - 1 - margin), axis=-1)


def test_the_ants_pair_composed_by_simpleitk_is_the_registration(registered, tmp_path):
  """ants_0GenericAffine.mat (ReadTransform) and ants_1Warp.nii.gz (a DisplacementField-
  Transform) in a CompositeTransform as antsApplyTransforms -t warp -t mat builds it (the warp
  applied to the point first): jaxreg's warped labels (>= 99.9% of labelled voxels away from
  the border) and displacement.nii.gz's points within 0.01 mm; the inverse pair ([mat
  inverted] first, then ants_1InverseWarp.nii.gz) maps the moving points back within 0.01 mm
  at the fixed voxel centres (where the inverse warp is sampled) and 1 mm between them.
  `jaxreg apply` reads the pair from its prefix and from a folder holding it alone."""
  import shutil

  import jaxreg
  from jaxreg.io import ants
  d, reg = registered, registered / "reg"
  mat = sitk.ReadTransform(str(reg / "ants_0GenericAffine.mat"))
  field = lambda name: sitk.DisplacementFieldTransform(
      sitk.ReadImage(str(reg / name), sitk.sitkVectorFloat64))
  composite = sitk.CompositeTransform([mat, field("ants_1Warp.nii.gz")])  # last added: first
  theirs = np.transpose(sitk.GetArrayFromImage(sitk.Resample(
      sitk.ReadImage(str(d / "moving_labels.nii.gz")), sitk.ReadImage(str(d / "fixed.nii.gz")),
      composite, sitk.sitkNearestNeighbor, 0)), (2, 1, 0))
  ours = io.load_labels(reg / "warped_labels.nii.gz")
  labelled = _inside(ours.shape, ours.affine, ours) & ((theirs > 0) | (ours.array > 0))
  assert labelled.sum() > 1000
  assert (theirs[labelled] == ours.array[labelled]).mean() >= 0.999
  lps = _fixed_points(d, n=60, seed=2) * [-1, -1, 1]
  total = field("displacement.nii.gz")
  want = np.array([total.TransformPoint(tuple(p)) for p in lps])
  got = np.array([composite.TransformPoint(tuple(p)) for p in lps])
  np.testing.assert_allclose(got, want, atol=0.01)
  np.testing.assert_allclose(jaxreg.map_points(str(reg / "ants_"), lps * [-1, -1, 1]),
                             want * [-1, -1, 1], atol=0.01)
  inverse = sitk.CompositeTransform([field("ants_1InverseWarp.nii.gz"), mat.GetInverse()])
  fixed = io.load_labels(d / "fixed_labels.nii.gz")
  idx = np.argwhere((fixed.array > 0) & _inside(fixed.shape, fixed.affine, fixed))[::7][:60]
  nodes = (idx @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]) * [-1, -1, 1]  # LPS centres
  matrix = ants.read_matrix(reg / "ants_0GenericAffine.mat")
  q = ((nodes * [-1, -1, 1]) @ matrix[:3, :3].T + matrix[:3, 3]) * [-1, -1, 1]  # A(y), LPS
  back = np.array([inverse.TransformPoint(tuple(p)) for p in q])
  mapped = np.array([composite.TransformPoint(tuple(p)) for p in back])
  np.testing.assert_allclose(mapped, q, atol=0.01)
  np.testing.assert_allclose(np.array([inverse.TransformPoint(tuple(p)) for p in want]), lps,
                             atol=1.0)
  alone = tmp_path / "pair"
  alone.mkdir()
  for name in ("ants_0GenericAffine.mat", "ants_1Warp.nii.gz"):
    shutil.copy(reg / name, alone / name)
  for registration in (reg / "ants_", alone):
    assert cli.main(["apply", "--registration", str(registration), "--moving",
                     str(d / "moving_labels.nii.gz"), "--labels", "--out",
                     str(tmp_path / "l.nii.gz")]) == 0
    got = io.load_labels(tmp_path / "l.nii.gz")
    np.testing.assert_allclose(got.affine, ours.affine, atol=1e-5)
    assert (got.array == ours.array).mean() >= 0.999


@pytest.mark.parametrize("case", ["half a pair", "two pairs"])
def test_bad_ants_pairs_give_one_line(registered, tmp_path, capsys, case):
  import shutil
  reg = registered / "reg"
  shutil.copy(reg / "ants_0GenericAffine.mat", tmp_path / "ants_0GenericAffine.mat")
  if case == "two pairs":
    shutil.copy(reg / "ants_1Warp.nii.gz", tmp_path / "ants_1Warp.nii.gz")
    shutil.copy(reg / "ants_1Warp.nii.gz", tmp_path / "b_1Warp.nii.gz")
    shutil.copy(reg / "ants_0GenericAffine.mat", tmp_path / "b_0GenericAffine.mat")
  rc = cli.main(["apply", "--registration", str(tmp_path), "--moving",
                 str(registered / "moving.nii.gz"), "--out", str(tmp_path / "x.nii.gz")])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and "Traceback" not in err[0]
  if case == "half a pair":
    assert str(tmp_path / "ants_1Warp.nii.gz") in err[0] and "incomplete ANTs pair" in err[0]
  else:
    assert str(tmp_path) in err[0] and "several ANTs pairs" in err[0]
  assert not (tmp_path / "x.nii.gz").exists()


# --- elastix output, against transformix ----------------------------------------------------------

def _to_itk(itk, path):
  return itk.imread(str(path), itk.F)


@pytest.fixture(scope="module")
def elastix_run(registered):
  """elastix (affine then B-spline, 1 resolution, 40 iterations each) on the demo pair; its
  output folder (TransformParameters.0.txt, .1.txt chained to .0)."""
  itk = pytest.importorskip("itk")
  d = registered
  out = d / "elastix"
  out.mkdir(exist_ok=True)
  params = itk.ParameterObject.New()
  for kind, extra in (("affine", ()), ("bspline", (24.0,))):
    p = params.GetDefaultParameterMap(kind, 1, *extra)
    p["MaximumNumberOfIterations"] = ["40"]
    p["NumberOfSpatialSamples"] = ["2000"]
    p["RandomSeed"] = ["1"]
    params.AddParameterMap(p)
  itk.elastix_registration_method(_to_itk(itk, d / "fixed.nii.gz"),
                                  _to_itk(itk, d / "moving.nii.gz"), parameter_object=params,
                                  output_directory=str(out), log_to_console=False)
  text = (out / "TransformParameters.1.txt").read_text()
  assert "TransformParameters.0.txt" in text and '"BSplineTransform"' in text
  return d, out


def _transformix_file(itk, params_file, moving, tmp, interpolator):
  """transformix reading the parameter file itself (its chain followed by transformix) with the
  final interpolator replaced: the resampled moving image, [X, Y, Z]."""
  text = open(params_file).read()
  text = text.replace('(ResampleInterpolator "FinalBSplineInterpolator")',
                      f'(ResampleInterpolator "{interpolator}")')
  copy = os.path.join(tmp, "TransformParameters.1.txt")
  with open(copy, "w") as f:
    f.write(text)
  f = itk.TransformixFilter.New(_to_itk(itk, moving))
  f.SetTransformParameterFileName(copy)
  f.SetOutputDirectory(str(tmp))
  f.SetLogToConsole(False)
  f.UpdateLargestPossibleRegion()
  return np.transpose(np.asarray(f.GetOutput()), (2, 1, 0))


def test_apply_on_elastix_output_reproduces_transformix(elastix_run, tmp_path):
  """jaxreg apply on TransformParameters.1.txt (and on its folder): transformix's own
  resampling of the labels (nearest; >= 99.9% of labelled voxels) and of the image (linear:
  within 1 HU where the point lands a voxel inside the moving image; elastix's own cubic
  result.1.nii within interpolation: correlation > 0.99) on the fixed grid."""
  itk = pytest.importorskip("itk")
  d, out = elastix_run
  params = out / "TransformParameters.1.txt"
  theirs = _transformix_file(itk, params, d / "moving_labels.nii.gz", tmp_path,
                             "FinalNearestNeighborInterpolator")
  fixed = io.load(d / "fixed.nii.gz")
  for registration in (params, out):
    assert cli.main(["apply", "--registration", str(registration), "--moving",
                     str(d / "moving_labels.nii.gz"), "--labels", "--out",
                     str(tmp_path / "l.nii.gz")]) == 0
    ours = io.load_labels(tmp_path / "l.nii.gz")
    np.testing.assert_allclose(ours.affine, fixed.affine, atol=1e-4)
    labelled = (theirs > 0) | (ours.array > 0)
    assert labelled.sum() > 1000
    assert (np.round(theirs[labelled]) == ours.array[labelled]).mean() >= 0.999
  image = _transformix_file(itk, params, d / "moving.nii.gz", tmp_path,
                            "FinalLinearInterpolator")
  assert cli.main(["apply", "--registration", str(params), "--moving", str(d / "moving.nii.gz"),
                   "--out", str(tmp_path / "i.nii.gz")]) == 0
  ours = io.load(tmp_path / "i.nii.gz").array
  inner = _inside(fixed.shape, fixed.affine, fixed)
  assert np.abs(ours - image)[inner & (image != 0)].max() < 1.0
  cubic = np.transpose(np.asarray(itk.imread(str(out / "result.1.nii"))), (2, 1, 0))
  assert np.corrcoef(ours[inner].ravel(), cubic[inner].ravel())[0, 1] > 0.99


def test_points_through_elastix_output_agree_with_transformix(elastix_run, tmp_path):
  """jaxreg apply --points on TransformParameters.1.txt: transformix's outputpoints.txt for
  the same points (its own point file, LPS) within 0.01 mm; --inverse maps them back within
  0.01 mm; the transformix deformation field (deformationField.nii) as --registration maps as
  the parameter file does at the fixed voxel centres."""
  import csv
  itk = pytest.importorskip("itk")
  d, out = elastix_run
  params = out / "TransformParameters.1.txt"
  lps = _fixed_points(d, n=30, seed=4) * [-1, -1, 1]
  with open(tmp_path / "points.txt", "w") as f:
    f.write(f"point\n{len(lps)}\n" + "".join(f"{x:.17g} {y:.17g} {z:.17g}\n" for x, y, z in lps))
  f = itk.TransformixFilter.New(_to_itk(itk, d / "moving.nii.gz"))
  f.SetTransformParameterFileName(str(params))
  f.SetFixedPointSetFileName(str(tmp_path / "points.txt"))
  f.SetOutputDirectory(str(tmp_path))
  f.SetLogToConsole(False)
  f.UpdateLargestPossibleRegion()
  rows = (tmp_path / "outputpoints.txt").read_text().splitlines()
  want = np.array([[float(v) for v in r.split("OutputPoint = [")[1].split("]")[0].split()]
                   for r in rows])
  with open(tmp_path / "in.csv", "w", newline="") as fh:
    w = csv.writer(fh)
    w.writerow(["x", "y", "z"])
    w.writerows(lps.tolist())
  assert cli.main(["apply", "--registration", str(params), "--points", str(tmp_path / "in.csv"),
                   "--space", "lps", "--out", str(tmp_path / "out.csv")]) == 0
  got = np.array([[float(r[c]) for c in "xyz"] for r in csv.DictReader(open(tmp_path / "out.csv"))])
  assert np.abs(want - lps).max() > 1.0
  np.testing.assert_allclose(got, want, atol=0.01)
  assert cli.main(["apply", "--registration", str(params), "--points", str(tmp_path / "out.csv"),
                   "--space", "lps", "--inverse", "--out", str(tmp_path / "back.csv")]) == 0
  back = np.array([[float(r[c]) for c in "xyz"]
                   for r in csv.DictReader(open(tmp_path / "back.csv"))])
  np.testing.assert_allclose(back, lps, atol=0.01)
  g = itk.TransformixFilter.New(_to_itk(itk, d / "moving.nii.gz"))
  g.SetTransformParameterFileName(str(params))
  g.ComputeDeformationFieldOn()
  g.SetOutputDirectory(str(tmp_path))
  g.SetLogToConsole(False)
  g.UpdateLargestPossibleRegion()
  import jaxreg
  fixed = io.load(d / "fixed.nii.gz")
  centres = np.argwhere(_inside(fixed.shape, fixed.affine, fixed))[::50]
  centres = centres @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]
  np.testing.assert_allclose(jaxreg.map_points(str(tmp_path / "deformationField.nii"), centres),
                             jaxreg.map_points(str(params), centres), atol=0.01)


@pytest.mark.parametrize("kind", ["EulerTransform", "SimilarityTransform", "AffineTransform"])
def test_linear_elastix_transforms_map_as_simpleitk(tmp_path, kind):
  """A hand-written elastix parameter file of each linear kind maps points as SimpleITK's
  transform of the same parameters (Euler3D: ZXY angles, Similarity3D: versor, translation,
  scale; Affine: the matrix row by row, translation; all about CenterOfRotationPoint), LPS,
  within 0.01 mm; its initial transform (a translation) is applied to the point first."""
  pytest.importorskip("itk")
  import jaxreg
  centre = [10.0, -20.0, 30.0]
  values = {"EulerTransform": [0.1, -0.2, 0.3, 5.0, -3.0, 2.0],
            "SimilarityTransform": [0.05, -0.1, 0.08, 4.0, 2.0, -1.0, 1.07],
            "AffineTransform": [1.05, 0.1, -0.05, -0.08, 0.95, 0.02, 0.03, 0.04, 1.1,
                                3.0, -2.0, 1.0]}[kind]
  t = {"EulerTransform": sitk.Euler3DTransform, "SimilarityTransform": sitk.Similarity3DTransform,
       "AffineTransform": lambda: sitk.AffineTransform(3)}[kind]()
  t.SetCenter(centre)
  t.SetParameters(values)
  grid = ('(Size 20 20 20)\n(Spacing 2 2 2)\n(Origin -20 -20 -20)\n'
          '(Direction 1 0 0 0 1 0 0 0 1)\n(Index 0 0 0)\n')
  (tmp_path / "t0.txt").write_text(
      '(Transform "TranslationTransform")\n(NumberOfParameters 3)\n'
      '(TransformParameters 1.5 -2.5 4)\n(InitialTransformParameterFileName "NoInitialTransform")\n'
      + grid)
  (tmp_path / "t1.txt").write_text(
      f'(Transform "{kind}")\n(NumberOfParameters {len(values)})\n'
      f'(TransformParameters {" ".join(map(repr, values))})\n'
      f'(CenterOfRotationPoint {" ".join(map(repr, centre))})\n'
      f'(InitialTransformParameterFileName "{tmp_path / "t0.txt"}")\n'
      '(HowToCombineTransforms "Compose")\n' + grid)
  lps = np.random.default_rng(0).uniform(-15, 15, (20, 3))
  want = np.array([t.TransformPoint(tuple(p + [1.5, -2.5, 4.0])) for p in lps])
  got = jaxreg.map_points(str(tmp_path / "t1.txt"), lps * [-1, -1, 1]) * [-1, -1, 1]
  np.testing.assert_allclose(got, want, atol=0.01)


@pytest.mark.parametrize("case", ["unsupported", "missing initial", "2-D"])
def test_bad_elastix_files_give_one_line(registered, tmp_path, capsys, case):
  pytest.importorskip("itk")
  base = ('(Size 8 8 8)\n(Spacing 4 4 4)\n(Origin 0 0 0)\n(NumberOfParameters 3)\n'
          '(TransformParameters 1 2 3)\n')
  text = {"unsupported": '(Transform "SplineKernelTransform")\n',
          "missing initial": '(Transform "TranslationTransform")\n'
                             f'(InitialTransformParameterFileName "{tmp_path / "gone.txt"}")\n',
          "2-D": '(Transform "TranslationTransform")\n(FixedImageDimension 2)\n'}[case]
  path = tmp_path / "TransformParameters.0.txt"
  path.write_text(text + base)
  rc = cli.main(["apply", "--registration", str(path), "--moving",
                 str(registered / "moving.nii.gz"), "--out", str(tmp_path / "x.nii.gz")])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and "Traceback" not in err[0] and str(path) in err[0]
  assert {"unsupported": "SplineKernelTransform is not supported",
          "missing initial": "gone.txt is missing", "2-D": "2-D"}[case] in err[0]
  assert not (tmp_path / "x.nii.gz").exists()
