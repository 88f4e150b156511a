"""NRRD, MetaImage and DICOM in: the same array and RAS affine as the NIfTI of that image.

The references are independent of jaxreg's LPS->RAS code: nibabel writes a NIfTI, and
SimpleITK's own NIfTI reader converts it to NRRD / MetaImage; DICOM series are written
slice by slice with SimpleITK's DICOM writer (tests/conftest.py). Geometry is drawn by
hypothesis: oblique and flipped orientations, anisotropic spacing 0.5-5 mm, any origin.
"""

import os
import tempfile

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import write_dicom_series
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from jaxreg import io
from jaxreg.data import PairSpec
from jaxreg.io import itk as itkio
from jaxreg.pipeline import register
from jaxreg.types import InputError

EXAMPLES = 100


@st.composite
def geometries(draw):
  """(shape, RAS affine): a random rotation, optional axis flips, spacing 0.5-5 mm."""
  quat = draw(st.lists(st.floats(-1, 1), min_size=4, max_size=4).filter(
      lambda q: np.linalg.norm(q) > 0.1))
  rot = Rotation.from_quat(quat).as_matrix()
  flips = np.diag([draw(st.sampled_from([-1.0, 1.0])) for _ in range(3)])
  spacing = np.array([draw(st.floats(0.5, 5.0)) for _ in range(3)])
  affine = np.eye(4)
  affine[:3, :3] = rot @ flips @ np.diag(spacing)
  affine[:3, 3] = [draw(st.floats(-300, 300)) for _ in range(3)]
  shape = tuple(draw(st.integers(2, 7)) for _ in range(3))
  return shape, affine


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geometry=geometries(), suffix=st.sampled_from([".nrrd", ".mha", ".mhd", ".nhdr"]))
def test_itk_formats_read_as_the_nifti_they_were_converted_from(tmp_path, geometry, suffix):
  shape, affine = geometry
  array = np.random.default_rng(0).integers(-1000, 1000, shape).astype(np.int16)
  nifti = tmp_path / "ref.nii.gz"
  nib.save(nib.Nifti1Image(array, affine), str(nifti))
  other = tmp_path / f"img{suffix}"
  sitk.WriteImage(sitk.ReadImage(str(nifti)), str(other))  # ITK's own conversion
  got = io.load(other)
  ref = io.load(nifti)
  np.testing.assert_array_equal(got.array, ref.array)
  np.testing.assert_allclose(got.affine, ref.affine, atol=1e-4)
  # and jaxreg's writer is read back by ITK at the same physical points (LPS = diag(-1,-1,1) RAS)
  itkio.write(tmp_path / f"back{suffix}", array, affine)
  back = sitk.ReadImage(str(tmp_path / f"back{suffix}"))
  index = [int(n) - 1 for n in shape]
  lps = np.asarray(back.TransformIndexToPhysicalPoint(index))
  np.testing.assert_allclose(np.diag([-1, -1, 1]) @ lps, (affine @ [*index, 1])[:3], atol=1e-4)
  assert back[index] == array[tuple(index)]


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geometry=geometries())
def test_a_dicom_series_reads_in_hu_on_its_patient_geometry(tmp_path, geometry):
  shape, affine = geometry
  hu = np.random.default_rng(1).integers(-1000, 1500, shape).astype(np.int16)
  folder = write_dicom_series(tempfile.mkdtemp(dir=tmp_path), hu, affine)  # fresh per example
  first = sorted(os.listdir(folder))[0]
  reader = sitk.ImageFileReader()
  reader.SetFileName(os.path.join(folder, first))
  reader.ReadImageInformation()
  assert float(reader.GetMetaData("0028|1052")) == -1024  # stored values are not HU
  got = io.load(folder)
  # DICOM readers stack slices along row x column; a left-handed volume comes back with its
  # k axis reversed. Compare in world space: every voxel lands on a voxel of the original.
  idx = np.indices(got.shape).reshape(3, -1)
  world = got.affine[:3, :3] @ idx + got.affine[:3, 3:]
  src = np.linalg.solve(affine[:3, :3], world - affine[:3, 3:])
  np.testing.assert_allclose(src, np.round(src), atol=1e-3)
  src = np.round(src).astype(int)
  np.testing.assert_array_equal(got.array.reshape(-1), hu[tuple(src)].astype(np.float32))
  np.testing.assert_allclose(np.abs(np.linalg.det(got.affine)), np.abs(np.linalg.det(affine)),
                             rtol=1e-5)


def test_dicom_series_choice_and_refusals(tmp_path):
  affine = np.diag([0.8, 0.8, 2.5, 1.0])
  hu = np.random.default_rng(2).integers(-1000, 1000, (6, 5, 4)).astype(np.int16)
  mixed = tmp_path / "mixed"
  write_dicom_series(mixed, hu, affine, uid="1.2.3.4.1")
  write_dicom_series(mixed, hu[::-1], affine, uid="1.2.3.4.2", prefix="other")
  with pytest.raises(InputError, match=r"2 DICOM series here; pick one with --series UID: "
                                       r"1.2.3.4.1 \(4 files\), 1.2.3.4.2"):
    io.load(mixed)
  np.testing.assert_array_equal(io.load(mixed, series="1.2.3.4.2").array, hu[::-1])
  with pytest.raises(InputError, match="no series 9.9 here"):
    io.load(mixed, series="9.9")
  (tmp_path / "empty").mkdir()
  with pytest.raises(InputError, match="no DICOM series in this folder"):
    io.load(tmp_path / "empty")
  with pytest.raises(InputError, match="gantry tilt of"):
    io.load(write_dicom_series(tmp_path / "tilt", hu, affine, tilt_mm=0.5))
  with pytest.raises(InputError, match="non-uniform slice spacing"):
    io.load(write_dicom_series(tmp_path / "gaps", hu, affine, gaps_mm=[2.5, 2.5, 5.0, 2.5]))


def test_a_pair_in_other_formats_loads_as_its_nifti(tmp_path):
  """What `jaxreg register` reads: a NRRD fixed image and a DICOM moving one."""
  from jaxreg import data
  pair = data.demo_pair(0, split="eval")
  hu = np.round(pair.fixed).astype(np.int16)
  io.save(tmp_path / "fixed.nii.gz", hu, pair.affine)
  io.save(tmp_path / "moving.nii.gz", np.round(pair.moving).astype(np.int16), pair.affine)
  io.save(tmp_path / "labels.nii.gz", pair.moving_labels.astype(np.uint8), pair.affine)
  sitk.WriteImage(sitk.ReadImage(str(tmp_path / "fixed.nii.gz")), str(tmp_path / "fixed.nrrd"))
  sitk.WriteImage(sitk.ReadImage(str(tmp_path / "labels.nii.gz")), str(tmp_path / "labels.mha"))
  write_dicom_series(tmp_path / "moving_dicom", np.round(pair.moving).astype(np.int16),
                     pair.affine)
  ours = register.load_pair(PairSpec(str(tmp_path / "fixed.nrrd"), str(tmp_path / "moving_dicom"),
                                     None, str(tmp_path / "labels.mha")))
  ref = register.load_pair(PairSpec(str(tmp_path / "fixed.nii.gz"),
                                    str(tmp_path / "moving.nii.gz"), None,
                                    str(tmp_path / "labels.nii.gz")))
  for a, b in zip(ours, ref):
    if b is None:
      assert a is None
      continue
    same = io.reindexed(a, b)  # the DICOM came back stacked the other way: the same voxels
    assert same is not None
    np.testing.assert_array_equal(same.array, b.array)
  # the labels (on the NIfTI's axis order) were put on the DICOM image's grid
  np.testing.assert_allclose(ours[3].affine, ours[1].affine)


def test_without_simpleitk_the_error_names_the_extra(tmp_path, monkeypatch):
  import builtins
  real = builtins.__import__

  def no_sitk(name, *args, **kwargs):
    if name == "SimpleITK":
      raise ImportError("No module named 'SimpleITK'")
    return real(name, *args, **kwargs)
  monkeypatch.setattr(builtins, "__import__", no_sitk)
  (tmp_path / "x.nrrd").write_text("NRRD0004\n")
  with pytest.raises(InputError, match=r"x.nrrd: reading NRRD, MetaImage and DICOM needs "
                                       r"SimpleITK: pip install 'jaxreg\[itk\]'"):
    io.load(tmp_path / "x.nrrd")


@pytest.mark.parametrize("fmt", ["nrrd", "mha"])
def test_register_writes_nrrd_or_mha_that_simpleitk_applies(tmp_path, capsys, fmt):
  from jaxreg import cli
  shape, affine = (32, 32, 32), np.array([[-4.0, 0, 0, 60], [0, 4.0, 0, -50], [0, 0, 4.0, 10],
                                           [0, 0, 0, 1]])
  grid = np.indices(shape)
  labels = {}
  for name, c in (("fixed", (15.5, 15.5, 15.5)), ("moving", (17.0, 14.5, 16.0))):
    r = np.linalg.norm(grid - np.asarray(c)[:, None, None, None], axis=0)
    labels[name] = ((r < 11).astype(np.uint8) + (r < 5)).astype(np.uint8)
    ct = np.where(r < 11, 40.0, -1000.0) + np.where(r < 5, 300.0, 0.0)
    nib.save(nib.Nifti1Image(ct.astype(np.int16), affine), str(tmp_path / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(labels[name], affine), str(tmp_path / f"{name}_labels.nii.gz"))
  out = tmp_path / "out"
  rc = cli.main(["register", "--fixed", str(tmp_path / "fixed.nii.gz"), "--moving",
                 str(tmp_path / "moving.nii.gz"), "--moving-labels",
                 str(tmp_path / "moving_labels.nii.gz"), "--out", str(out), "--no-refine",
                 "--output-format", fmt, "--learn2reg"])
  assert rc == 0, capsys.readouterr().err
  ext = "." + fmt
  assert {f"warped{ext}", f"warped_labels{ext}", f"displacement{ext}",
          "displacement_voxel.nii.gz"} <= set(os.listdir(out))
  warped = io.load(out / f"warped{ext}")
  np.testing.assert_allclose(warped.affine, affine, atol=1e-5)
  ref = sitk.ReadImage(str(tmp_path / "fixed.nii.gz"))
  field = sitk.ReadImage(str(out / f"displacement{ext}"), sitk.sitkVectorFloat64)
  moving = sitk.ReadImage(str(tmp_path / "moving_labels.nii.gz"))
  theirs = sitk.GetArrayFromImage(sitk.Resample(
      moving, ref, sitk.DisplacementFieldTransform(field), sitk.sitkNearestNeighbor, 0))
  ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"warped_labels{ext}")))
  assert (theirs == ours).mean() >= 0.999
  d_vox, _ = io.load_displacement(out / "displacement_voxel.nii.gz", convention="voxel")
  field = sitk.ReadImage(str(out / f"displacement{ext}"))  # the transform took the first copy
  lps = np.transpose(sitk.GetArrayFromImage(field), (2, 1, 0, 3))
  ras_mm = lps * [-1, -1, 1]
  np.testing.assert_allclose(ras_mm, d_vox @ affine[:3, :3].T, atol=1e-4)
  # jaxreg apply reads the folder's NRRD / MetaImage field and reproduces the warped labels
  rc = cli.main(["apply", "--registration", str(out), "--moving",
                 str(tmp_path / "moving_labels.nii.gz"), "--labels", "--out",
                 str(tmp_path / "applied.nii.gz")])
  assert rc == 0
  applied = io.load_labels(tmp_path / "applied.nii.gz").array
  assert (applied == io.load_labels(out / f"warped_labels{ext}").array).mean() >= 0.999


def test_reading_dicom_leaves_the_process_locale_alone(tmp_path):
  """ITK's GDCM resets the C locale to "C"; after that open() would default to ASCII."""
  import locale
  before = (locale.setlocale(locale.LC_ALL), locale.getpreferredencoding(False))
  folder = write_dicom_series(tmp_path / "ct", np.zeros((4, 4, 3), np.int16), np.eye(4))
  io.load(folder)
  itkio.write(tmp_path / "x.nrrd", np.zeros((3, 3, 3), np.int16), np.eye(4))
  assert (locale.setlocale(locale.LC_ALL), locale.getpreferredencoding(False)) == before
