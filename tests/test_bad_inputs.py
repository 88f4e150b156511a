"""A table of bad inputs: each gives one line naming the problem, exit code 2, nothing on disk.

Every case runs through the ``jaxreg`` CLI (in-process, stderr captured) and, where it is a
file, through the Python API (``jaxreg.io.load`` / ``load_labels`` raise ``InputError``).
The README's "Bad input" table lists the same cases.
"""

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import write_dicom_series

from jaxreg import cli
from jaxreg import io
from jaxreg.types import InputError

SHAPE = (24, 24, 24)
AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])


def _ct(seed=0):
  rng = np.random.default_rng(seed)
  body = np.linalg.norm(np.indices(SHAPE) - 11.5, axis=0) < 9
  return np.where(body, 40.0, -1000.0) + rng.normal(0, 20, SHAPE)


def _nifti(path, array, affine=AFFINE, pixdim=None):
  img = nib.Nifti1Image(np.asarray(array), affine)
  if pixdim is not None:
    img.header["pixdim"][1:4] = pixdim
  nib.save(img, str(path))
  return path


@pytest.fixture()
def files(tmp_path):
  inputs = tmp_path / "in"
  inputs.mkdir()
  _nifti(inputs / "fixed.nii.gz", _ct(0).astype(np.float32))
  _nifti(inputs / "moving.nii.gz", _ct(1).astype(np.int16))
  labels = (np.linalg.norm(np.indices(SHAPE) - 11.5, axis=0) < 6).astype(np.uint8)
  _nifti(inputs / "labels.nii.gz", labels)
  return inputs


def _truncated(d):
  data = open(d / "fixed.nii.gz", "rb").read()
  (d / "bad.nii.gz").write_bytes(data[: len(data) // 2])
  return d / "bad.nii.gz"


def _bad_checkpoint(d):
  from jaxreg.io import weights
  model = d / "model"
  shutil.copytree(weights.DEMO_MODEL, model)
  config = json.load(open(model / "config.json"))
  config["model"]["widths"] = [8, 8, 8, 8]  # another network than params.msgpack holds
  json.dump(config, open(model / "config.json", "w"))
  return model


# name -> (make(inputs) -> {flag: value}, expected part of the message, Python API check)
CASES = {
    "missing file": (lambda d: {"--moving": d / "nope.nii.gz"}, "nope.nii.gz: no such file", "load"),
    "empty file": (lambda d: {"--fixed": _touch(d / "empty.nii.gz")}, "file is empty", "load"),
    "truncated file": (lambda d: {"--fixed": _truncated(d)}, "", "load"),
    "not NIfTI": (lambda d: {"--fixed": _text(d / "notes.nii.gz")}, "not a readable NIfTI", "load"),
    "a folder without DICOM": (lambda d: {"--fixed": d}, "no DICOM series in this folder",
                               "load"),
    "an empty DICOM folder": (lambda d: {"--fixed": _mkdir(d / "dicom")},
                              "no DICOM series in this folder", "load"),
    "mixed DICOM series": (lambda d: {"--moving": _mixed_dicom(d / "dicom")},
                           "2 DICOM series here; pick one with --series UID", "load"),
    "2-D DICOM": (lambda d: {"--fixed": write_dicom_series(d / "dicom", _ct()[:, :, :1], AFFINE)},
                  "every axis needs at least 2 voxels", "load"),
    "DICOM with gantry tilt": (lambda d: {"--fixed": write_dicom_series(
        d / "dicom", _ct(), AFFINE, tilt_mm=1.0)}, "gantry tilt of", "load"),
    "NRRD with a non-spatial axis": (lambda d: {"--fixed": _itk(d / "x.nrrd", np.zeros(
        (2,) + SHAPE, np.int16))}, "expected a 3-D image, got 4-D", "load"),
    ".mhd without its raw file": (lambda d: {"--moving": _mhd_without_raw(d)},
                                  "ITK cannot read it", "load"),
    "2-D image": (lambda d: {"--fixed": _nifti(d / "x.nii.gz", np.zeros((24, 24), np.float32))},
                  "expected a 3-D image", "load"),
    "4-D image": (lambda d: {"--fixed": _nifti(d / "x.nii.gz", np.zeros(SHAPE + (2,)))},
                  "expected a 3-D image", "load"),
    "5-D image": (lambda d: {"--fixed": _nifti(d / "x.nii.gz", np.zeros(SHAPE + (1, 3)))},
                  "expected a 3-D image", "load"),
    "one voxel thick": (lambda d: {"--fixed": _nifti(d / "x.nii.gz", np.zeros((24, 24, 1)))},
                        "at least 2 voxels", "load"),
    "NaN voxels": (lambda d: {"--fixed": _nifti(d / "x.nii.gz", _with(_ct(), np.nan))},
                   "voxels are NaN or infinite", "load"),
    "Inf voxels": (lambda d: {"--moving": _nifti(d / "x.nii.gz", _with(_ct(), np.inf))},
                   "voxels are NaN or infinite", "load"),
    "complex voxels": (lambda d: {"--fixed": _nifti(d / "x.nii.gz", _ct().astype(np.complex64))},
                       "unsupported voxel type complex64", "load"),
    "constant image": (lambda d: {"--moving": _nifti(d / "x.nii.gz", np.full(SHAPE, -1000.0))},
                       "the image is constant (-1000 everywhere)", None),
    "zero spacing": (lambda d: {"--fixed": _nifti(d / "x.nii.gz", _ct(), pixdim=[4, 0, 4])},
                     "voxel spacing must be positive", "load"),
    "negative spacing": (lambda d: {"--fixed": _nifti(d / "x.nii.gz", _ct(), pixdim=[4, -4, 4])},
                         "voxel spacing must be positive", "load"),
    "singular affine": (lambda d: {"--fixed": _singular(d / "x.nii.gz")}, "singular", "load"),
    "non-finite affine": (lambda d: {"--fixed": _nifti(d / "x.nii.gz", _ct(),
                                                       _aff(0, 3, np.nan))}, "non-finite", "load"),
    "huge spacing": (lambda d: {"--fixed": _nifti(d / "x.nii.gz", _ct(),
                                                  np.diag([4e4, 4.0, 4.0, 1.0]))},
                     "implausible voxel spacing", "load"),
    "tiny spacing": (lambda d: {"--fixed": _nifti(d / "x.nii.gz", _ct(),
                                                  np.diag([1e-5, 4.0, 4.0, 1.0]))},
                     "implausible voxel spacing", "load"),
    "no overlap": (lambda d: {"--moving": _nifti(d / "x.nii.gz", _ct(), _aff(0, 3, 5000.0))},
                   "no overlap with", None),
    "labels of another grid": (lambda d: {"--moving-labels": _nifti(
        d / "l.nii.gz", np.ones((20, 24, 24), np.uint8))}, "differs from", "labels"),
    "float labels": (lambda d: {"--moving-labels": _nifti(d / "l.nii.gz", _ct())},
                     "non-integer values", "labels"),
    "negative labels": (lambda d: {"--moving-labels": _nifti(
        d / "l.nii.gz", -np.ones(SHAPE, np.int16))}, "negative values", "labels"),
    "empty labels": (lambda d: {"--fixed-labels": _nifti(d / "l.nii.gz", np.zeros(SHAPE, np.uint8))},
                     "label map is empty", "labels"),
    "mask of another grid": (lambda d: {"--moving-mask": _nifti(
        d / "m.nii.gz", np.ones((20, 24, 24), np.uint8))}, "differs from", "mask"),
    "mask of another affine": (lambda d: {"--fixed-mask": _nifti(
        d / "m.nii.gz", np.ones(SHAPE, np.uint8), _aff(0, 3, 7.0))}, "affine differs", "mask"),
    "empty mask": (lambda d: {"--fixed-mask": _nifti(d / "m.nii.gz", np.zeros(SHAPE, np.uint8))},
                   "the mask is empty", "mask"),
    "output is a file": (lambda d: {"--out": _text(d / "out")}, "exists and is not a folder", None),
    "output folder missing": (lambda d: {"--out": d / "no" / "out"}, "parent folder", None),
    "unwritable output": (lambda d: {"--out": "/proc/jaxreg-out"}, "cannot write in /proc", None),
    "checkpoint of another model": (lambda d: {"--checkpoint": _bad_checkpoint(d)},
                                    "does not fit the network", None),
    "checkpoint folder without a model": (lambda d: {"--checkpoint": d},
                                          "not a jaxreg model folder", None),
    "negative --io-steps": (lambda d: {"--io-steps": "-3"}, "io_steps must be >= 0", None),
    "unknown --similarity": (lambda d: {"--similarity": "ssd"},
                             "unknown similarity 'ssd'; registered: lncc, mind, mse, ncc", None),
    "unknown --regulariser": (lambda d: {"--regulariser": "tv"},
                              "unknown regulariser 'tv'; registered: bending, diffusion", None),
    "--levels not coarse to fine": (lambda d: {"--levels": "2,4"},
                                    "refinement levels must be spacings >= 0.5 mm", None),
    "negative --refine-smooth": (lambda d: {"--refine-smooth": "-1"},
                                 "refinement smooth must be >= 0 passes", None),
    "--refine-smooth not numbers": (lambda d: {"--refine-smooth": "2,x"},
                                    "--refine-smooth: expected comma-separated numbers", None),
    "--levels not numbers": (lambda d: {"--levels": "4,x"},
                             "--levels: expected comma-separated numbers", None),
    "--level-steps of another length": (lambda d: {"--levels": "4,2", "--level-steps": "9,9,9"},
                                        "one positive number per level", None),
    "--pairs with --fixed": (lambda d: {"--pairs": _text(d / "p.csv")},
                             "--pairs registers the pairs of a CSV", None),
}


def _singular(path):
  """An sform whose third column is zero (nibabel refuses to write one: set the fields)."""
  header = nib.Nifti1Header()
  header.set_data_shape(SHAPE)
  header.set_data_dtype(np.float32)
  header["sform_code"] = 1
  for row, name in enumerate(("srow_x", "srow_y", "srow_z")):
    header[name] = np.diag([4.0, 4.0, 0.0, 1.0])[row]
  header["pixdim"][1:4] = 4.0
  nib.save(nib.Nifti1Image(_ct().astype(np.float32), None, header=header), str(path))
  return path


def _mkdir(path):
  path.mkdir()
  return path


def _mixed_dicom(path):
  write_dicom_series(path, _ct(), AFFINE, uid="1.2.3.1")
  return write_dicom_series(path, _ct(1), AFFINE, uid="1.2.3.2", prefix="other")


def _itk(path, array):
  import SimpleITK as sitk
  sitk.WriteImage(sitk.GetImageFromArray(array, isVector=False), str(path))
  return path


def _mhd_without_raw(d):
  import SimpleITK as sitk
  sitk.WriteImage(sitk.GetImageFromArray(_ct().astype(np.int16)), str(d / "m.mhd"))
  for name in os.listdir(d):
    if name.startswith("m.") and not name.endswith(".mhd"):
      os.remove(d / name)
  return d / "m.mhd"


def _touch(path):
  path.write_bytes(b"")
  return path


def _text(path):
  path.write_text("this is not an image\n")
  return path


def _with(array, value):
  array = array.astype(np.float32)
  array[3, 4, 5] = value
  return array


def _aff(i, j, value):
  a = AFFINE.copy()
  a[i, j] = value
  return a


@pytest.mark.parametrize("case", sorted(CASES))
def test_register_rejects_bad_input(files, tmp_path, capsys, case):
  make, expect, api = CASES[case]
  args = {"--fixed": files / "fixed.nii.gz", "--moving": files / "moving.nii.gz",
          "--out": tmp_path / "out"}
  args.update(make(files))
  listing = sorted(os.listdir(tmp_path)), sorted(os.listdir(files))
  rc = cli.main(["register", *[str(x) for kv in args.items() for x in kv]])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2, err
  assert len(err) == 1 and err[0].startswith("jaxreg register: error: "), err
  assert expect in err[0], err
  assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(files))) == listing  # nothing left
  bad = [v for k, v in args.items() if k != "--out" and os.fspath(v) in err[0]]
  if api is not None:
    assert bad, f"the message should name the file: {err}"
    if api == "mask":  # the mask's file, first
      bad = [args.get("--fixed-mask") or args.get("--moving-mask")]
      assert err[0].startswith(f"jaxreg register: error: {bad[0]}"), err
    with pytest.raises(InputError, match="^" + str(bad[0])):
      if api == "load":
        io.load(bad[0])
      elif api == "mask":
        from jaxreg import data
        from jaxreg.pipeline import register
        spec = data.PairSpec(str(args["--fixed"]), str(args["--moving"]),
                             fixed_mask=str(args.get("--fixed-mask") or "") or None,
                             moving_mask=str(args.get("--moving-mask") or "") or None)
        register.load_masks(spec, io.load(spec.fixed), io.load(spec.moving))
      else:
        io.load_labels(bad[0], like=io.load(files / "moving.nii.gz"))


def test_truncated_gzip_message_says_truncated_or_unreadable(files, capsys):
  bad = _truncated(files)
  with pytest.raises(InputError) as e:
    io.load(bad)
  assert "truncated" in str(e.value) or "not a readable NIfTI" in str(e.value)


@pytest.mark.parametrize("argv, expect", [
    (["train.py", "--config", "configs/test.py", "--workdir", "{tmp}/w",
      "--config.model.heads='pyramid'"], "train.py: error:"),
    (["train.py", "--config", "configs/nope.py", "--workdir", "{tmp}/w"], "train.py: error:"),
    (["evaluate.py", "--data", "{tmp}/none.csv", "--out", "{tmp}/w"], "evaluate.py: error:"),
    (["-m", "jaxreg.cli", "register", "--fixed", "{tmp}/x.nii.gz", "--moving", "{tmp}/x.nii.gz",
      "--out", "{tmp}/w"], "jaxreg register: error:"),
])
def test_entry_points_print_one_line_without_traceback(tmp_path, argv, expect):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, *[a.format(tmp=tmp_path) for a in argv]], cwd=root,
                       capture_output=True, text=True, timeout=300)
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert lines[-1].startswith(expect), lines
  assert not (tmp_path / "w").exists()


def test_a_non_finite_field_is_never_written(files, tmp_path, capsys, monkeypatch):
  """If optimisation diverges (here: forced to NaN), register stops with one line and no output."""
  from jaxreg.pipeline import register
  monkeypatch.setattr(register, "instance_optimise",
                      lambda disp, *a, **k: (disp * np.nan, np.zeros(1)))
  rc = cli.main(["register", "--fixed", str(files / "fixed.nii.gz"), "--moving",
                 str(files / "moving.nii.gz"), "--out", str(tmp_path / "out"), "--affine", "none",
                 "--io-steps", "2", "--no-refine"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and "non-finite field" in err[0], err
  assert not (tmp_path / "out").exists()


def test_a_diverging_refinement_is_one_line_and_writes_nothing(files, tmp_path, capsys,
                                                               monkeypatch):
  """A refinement level whose loss turns non-finite (forced here) stops register: exit 2."""
  import jax.numpy as jnp

  from jaxreg.pipeline import refine
  monkeypatch.setattr(refine, "_level_stage",
                      lambda base, *a, steps, **k: (base, jnp.full((steps,), jnp.nan)))
  rc = cli.main(["register", "--fixed", str(files / "fixed.nii.gz"), "--moving",
                 str(files / "moving.nii.gz"), "--out", str(tmp_path / "out"), "--affine", "none"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and "refinement diverged at level 0" in err[0], err
  assert not (tmp_path / "out").exists()
