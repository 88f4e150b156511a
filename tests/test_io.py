"""NIfTI I/O: round trips, SimpleITK as the independent reader/resampler, bad files."""

import os

import nibabel as nib
import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage as ndi
import SimpleITK as sitk

from jaxreg import io
from jaxreg.ops import warp as W
from jaxreg.types import InputError, Volume

SHAPE = (20, 24, 16)


def oblique_affine():
  """Oblique, anisotropic, left-handed (LAS-like) voxel-to-world affine."""
  rot = scipy.linalg.expm(np.array([[0, -0.25, 0.1], [0.25, 0, -0.15], [-0.1, 0.15, 0]]))
  a = np.eye(4)
  a[:3, :3] = rot @ np.diag([-1.5, 0.8, 2.5])
  a[:3, 3] = [40.0, -25.5, -80.25]
  return a


def smooth(seed, shape=SHAPE, scale=1.0, sigma=2.5):
  rng = np.random.default_rng(seed)
  x = ndi.gaussian_filter(rng.normal(size=shape), sigma)
  return (scale * x / np.abs(x).max()).astype(np.float32)


def smooth_field(seed, amplitude):
  return np.stack([smooth(seed + i, scale=amplitude) for i in range(3)], -1)


def test_save_load_round_trip_keeps_array_and_affine(tmp_path):
  a = oblique_affine()
  arr = smooth(0, scale=500.0)
  io.save(tmp_path / "x.nii.gz", arr, a)
  vol = io.load(tmp_path / "x.nii.gz")
  np.testing.assert_array_equal(vol.array, arr)
  np.testing.assert_allclose(vol.affine, a, atol=1e-5)
  np.testing.assert_allclose(vol.spacing, [1.5, 0.8, 2.5], rtol=1e-6)


def test_simpleitk_reads_the_same_geometry(tmp_path):
  a = oblique_affine()
  io.save(tmp_path / "x.nii.gz", smooth(1), a)
  img = sitk.ReadImage(str(tmp_path / "x.nii.gz"))
  for idx in [(0, 0, 0), (3, 7, 11), (19, 23, 15)]:
    ras = nib.affines.apply_affine(a, idx)
    lps = img.TransformIndexToPhysicalPoint(idx)
    np.testing.assert_allclose(lps, ras * [-1, -1, 1], atol=1e-3)


def _sitk_resample(moving_path, field_path, interpolator):
  moving = sitk.ReadImage(str(moving_path))
  field = sitk.ReadImage(str(field_path), sitk.sitkVectorFloat64)
  tx = sitk.DisplacementFieldTransform(field)
  out = sitk.Resample(moving, moving, tx, interpolator, 0.0)
  return sitk.GetArrayFromImage(out).transpose(2, 1, 0)  # sitk arrays are [z, y, x]


def test_itk_displacement_reproduces_jaxreg_warp_in_simpleitk(tmp_path):
  a = oblique_affine()
  moving = smooth(2, scale=100.0)
  labels = np.digitize(smooth(5), [-0.3, 0.0, 0.3]).astype(np.int16)
  disp = smooth_field(10, 3.0)  # voxels, up to 3 voxels
  io.save(tmp_path / "moving.nii.gz", moving, a)
  io.save(tmp_path / "labels.nii.gz", labels, a)
  io.save_displacement(tmp_path / "disp.nii.gz", disp, a, convention="itk")

  # Images: compare where every trilinear corner lies inside the volume (ITK
  # treats the outer half voxel differently from per-corner padding).
  ours = np.asarray(W.warp(moving, disp))
  theirs = _sitk_resample(tmp_path / "moving.nii.gz", tmp_path / "disp.nii.gz", sitk.sitkLinear)
  pts = np.indices(SHAPE).transpose(1, 2, 3, 0) + disp
  inside = np.all((pts >= 0) & (pts <= np.array(SHAPE) - 1), axis=-1)
  assert inside.mean() > 0.5
  np.testing.assert_allclose(ours[inside], theirs[inside], atol=1e-3)

  ours_l = np.asarray(W.warp(labels, disp, order=0))
  theirs_l = _sitk_resample(tmp_path / "labels.nii.gz", tmp_path / "disp.nii.gz",
                            sitk.sitkNearestNeighbor)
  assert (ours_l == theirs_l).mean() >= 0.999
  assert (ours_l != labels).mean() > 0.05  # the field really moved the labels


@pytest.mark.parametrize("convention", io.CONVENTIONS)
def test_displacement_round_trip(tmp_path, convention):
  a = oblique_affine()
  disp = smooth_field(20, 4.0)
  io.save_displacement(tmp_path / "d.nii.gz", disp, a, convention=convention)
  back, affine = io.load_displacement(tmp_path / "d.nii.gz", convention=convention)
  np.testing.assert_allclose(back, disp, atol=1e-4)
  np.testing.assert_allclose(affine, a, atol=1e-5)


def test_fields_are_stored_uncompressed_in_a_gzip_that_readers_read_back(tmp_path):
  """save_displacement's default gzip level 0: the same bytes nibabel writes to a plain
  .nii, inside a valid gzip stream; any level reads back to the same field."""
  import gzip

  a = oblique_affine()
  disp = smooth_field(20, 4.0)
  io.save_displacement(tmp_path / "plain.nii", disp, a)  # nibabel's own writer
  io.save_displacement(tmp_path / "d.nii.gz", disp, a)
  io.save_displacement(tmp_path / "d6.nii.gz", disp, a, compresslevel=6)
  with gzip.open(tmp_path / "d.nii.gz", "rb") as f:
    assert f.read() == (tmp_path / "plain.nii").read_bytes()
  raw = (tmp_path / "plain.nii").stat().st_size
  assert (tmp_path / "d.nii.gz").stat().st_size >= raw  # stored, not compressed
  assert (tmp_path / "d6.nii.gz").stat().st_size < raw
  ref = np.asarray(nib.load(tmp_path / "plain.nii").dataobj)
  for name in ("d.nii.gz", "d6.nii.gz"):
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / name).dataobj), ref)


def test_itk_file_layout(tmp_path):
  a = oblique_affine()
  disp = np.zeros(SHAPE + (3,), np.float32)
  disp[..., 0] = 1.0  # one voxel along array axis 0
  io.save_displacement(tmp_path / "d.nii.gz", disp, a)
  img = nib.load(tmp_path / "d.nii.gz")
  assert img.shape == SHAPE + (1, 3)
  assert img.header.get_intent()[0] == "vector"
  lps = np.asarray(img.dataobj)[0, 0, 0, 0]
  np.testing.assert_allclose(lps, a[:3, 0] * [-1, -1, 1], atol=1e-5)


def test_written_files_follow_the_umask(tmp_path):
  old = os.umask(0o022)
  try:
    io.save(tmp_path / "x.nii.gz", smooth(0), np.eye(4))
  finally:
    os.umask(old)
  assert (os.stat(tmp_path / "x.nii.gz").st_mode & 0o777) == 0o644


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
  def broken_save(img, path):
    with open(path, "wb") as f:
      f.write(b"half")
    raise OSError("disk full")
  monkeypatch.setattr(nib, "save", broken_save)
  with pytest.raises(OSError, match="disk full"):
    io.save(tmp_path / "x.nii.gz", smooth(0), np.eye(4))
  assert os.listdir(tmp_path) == []


def test_existing_file_is_replaced_only_when_complete(tmp_path, monkeypatch):
  io.save(tmp_path / "x.nii.gz", np.ones(SHAPE, np.float32), np.eye(4))
  monkeypatch.setattr(nib, "save", lambda img, path: (_ for _ in ()).throw(OSError("boom")))
  with pytest.raises(OSError):
    io.save(tmp_path / "x.nii.gz", np.zeros(SHAPE, np.float32), np.eye(4))
  np.testing.assert_array_equal(io.load(tmp_path / "x.nii.gz").array, 1.0)
  assert os.listdir(tmp_path) == ["x.nii.gz"]


# ---- bad input: each raises InputError naming the file and the problem ----

def _write_nifti(path, array, affine=np.eye(4), header=None):
  nib.save(nib.Nifti1Image(array, affine, header), str(path))
  return path


def _truncated(tmp_path):
  p = _write_nifti(tmp_path / "t.nii.gz", smooth(0, (32, 32, 32)))
  data = open(p, "rb").read()
  open(p, "wb").write(data[: len(data) // 2])
  return p


def _bad_spacing(value):
  """A .nii whose stored pixdim[2] is `value` (nibabel would 'fix' it on save)."""
  def make(tmp_path):
    path = tmp_path / "z.nii"
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(SHAPE)
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), None, hdr), str(path))
    raw = bytearray(path.read_bytes())
    raw[76 + 2 * 4: 76 + 3 * 4] = np.float32(value).tobytes()  # pixdim[2]
    path.write_bytes(bytes(raw))
    return path
  return make


BAD_FILES = {
    "missing": (lambda t: t / "nope.nii.gz", "no such file"),
    "empty": (lambda t: (t / "e.nii.gz").write_bytes(b"") and None or t / "e.nii.gz",
              "file is empty"),
    "not nifti": (lambda t: (t / "n.nii.gz").write_text("hello") and None or t / "n.nii.gz",
                  "not a readable NIfTI"),
    "truncated": (_truncated, "truncated"),
    "2d": (lambda t: _write_nifti(t / "2d.nii.gz", np.zeros((8, 8), np.float32)),
           "expected a 3-D image"),
    "5d": (lambda t: _write_nifti(t / "5d.nii.gz", np.zeros((8, 8, 8, 2, 3), np.float32)),
           "expected a 3-D image"),
    "nan": (lambda t: _write_nifti(t / "nan.nii.gz", np.where(smooth(0) > 0.5, np.nan, 0.0)
                                   .astype(np.float32)), "NaN or infinite"),
    "inf": (lambda t: _write_nifti(t / "inf.nii.gz", np.full(SHAPE, np.inf, np.float32)),
            "NaN or infinite"),
    "zero spacing": (_bad_spacing(0.0), "spacing must be positive"),
    "negative spacing": (_bad_spacing(-2.0), "spacing must be positive"),
    "singular affine": (lambda t: _write_nifti(t / "s.nii.gz", np.zeros(SHAPE, np.float32),
                                               np.diag([1.0, 1.0, 1e-9, 1.0])),
                        "singular"),
    "directory": (lambda t: t, "no DICOM series in this folder"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_image_files_raise_input_error(tmp_path, case):
  make, message = BAD_FILES[case]
  path = make(tmp_path)
  with pytest.raises(InputError, match=message) as err:
    io.load(path)
  assert str(path) in str(err.value)


def test_bad_label_maps(tmp_path):
  a = oblique_affine()
  io.save(tmp_path / "img.nii.gz", smooth(0), a)
  img = io.load(tmp_path / "img.nii.gz")
  io.save(tmp_path / "other_grid.nii.gz", np.ones(SHAPE, np.uint8), np.eye(4))
  with pytest.raises(InputError, match="affine differs from img.nii.gz"):
    io.load_labels(tmp_path / "other_grid.nii.gz", like=img, like_path="img.nii.gz")
  io.save(tmp_path / "small.nii.gz", np.ones((8, 8, 8), np.uint8), a)
  with pytest.raises(InputError, match=r"grid \(8, 8, 8\) differs"):
    io.load_labels(tmp_path / "small.nii.gz", like=img)
  io.save(tmp_path / "empty.nii.gz", np.zeros(SHAPE, np.uint8), a)
  with pytest.raises(InputError, match="empty"):
    io.load_labels(tmp_path / "empty.nii.gz")
  io.save(tmp_path / "float.nii.gz", smooth(3), a)
  with pytest.raises(InputError, match="non-integer"):
    io.load_labels(tmp_path / "float.nii.gz")
  io.save(tmp_path / "ok.nii.gz", (smooth(4) > 0).astype(np.uint8) * 5, a)
  labels = io.load_labels(tmp_path / "ok.nii.gz", like=img)
  assert labels.array.dtype == np.int32 and set(np.unique(labels.array)) == {0, 5}


def test_bad_output_paths(tmp_path):
  with pytest.raises(InputError, match="must end in .nii"):
    io.save(tmp_path / "x.png", smooth(0), np.eye(4))
  with pytest.raises(InputError, match="does not exist"):
    io.save(tmp_path / "no" / "x.nii.gz", smooth(0), np.eye(4))
  with pytest.raises(ValueError, match="NaN"):
    io.save_displacement(tmp_path / "d.nii.gz", np.full(SHAPE + (3,), np.nan), np.eye(4))
  assert os.listdir(tmp_path) == []


def test_atomic_dir_replaces_only_on_success(tmp_path):
  out = tmp_path / "out"
  with io.atomic_dir(out) as d:
    assert not out.exists()
    open(os.path.join(d, "a.txt"), "w").write("1")
  assert (out / "a.txt").read_text() == "1"
  with pytest.raises(RuntimeError):
    with io.atomic_dir(out) as d:
      open(os.path.join(d, "b.txt"), "w").write("2")
      raise RuntimeError("interrupted")
  assert sorted(os.listdir(out)) == ["a.txt"]  # old result intact
  assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp folder left
  with io.atomic_dir(out) as d:
    open(os.path.join(d, "c.txt"), "w").write("3")
  assert sorted(os.listdir(out)) == ["c.txt"] and sorted(os.listdir(tmp_path)) == ["out"]
  (tmp_path / "file").write_text("x")
  with pytest.raises(InputError, match="exists and is not a folder"):
    with io.atomic_dir(tmp_path / "file"):
      pass


def test_labels_in_another_axis_order_are_reindexed_onto_the_image_grid():
  rng = np.random.default_rng(0)
  image = Volume(rng.random((4, 5, 6)).astype(np.float32),
                    np.array([[0, 0, 2.5, 10], [-0.8, 0, 0, 20], [0, 0.7, 0, -5], [0, 0, 0, 1]]))
  labels = rng.integers(0, 5, (4, 5, 6))
  # the same voxels stored with axes permuted (2, 0, 1) and axis 1 of the result reversed
  stored = np.flip(np.transpose(labels, (2, 0, 1)), axis=1)
  idx = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]], float)  # (flipped) stored -> image
  perm = np.eye(4)
  perm[:3] = idx
  flip = np.eye(4)
  flip[1, 1], flip[1, 3] = -1, stored.shape[1] - 1
  affine = image.affine @ perm @ flip
  # independent check of the construction: each stored voxel lands on the image voxel
  v = (2, 3, 1)
  lv = (affine @ [*v, 1])[:3]
  li = np.round(np.linalg.solve(image.affine[:3, :3], lv - image.affine[:3, 3])).astype(int)
  assert stored[v] == labels[tuple(li)]
  got = io.reindexed(Volume(stored, affine), image)
  np.testing.assert_array_equal(got.array, labels)
  np.testing.assert_allclose(got.affine, image.affine)
  shifted = affine.copy()
  shifted[:3, 3] += [1.0, 0, 0]  # a 1 mm shift: not the same voxels, not reindexed
  assert io.reindexed(Volume(stored, shifted), image) is None
