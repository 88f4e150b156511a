"""report: display orientation against nibabel and a closed-form marker, PNGs that open."""

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from jaxreg.pipeline import report as R

SHAPE = (12, 10, 8)
LAS = np.diag([-2.0, 1.5, 3.0, 1.0])
OBLIQUE_PERMUTED = np.array([[0, 0, 3.0, 5], [-2.0, 0, 0, 7], [0, -1.5, 0, 1], [0, 0, 0, 1]])


@pytest.mark.parametrize("affine", [LAS, OBLIQUE_PERMUTED])
def test_to_ras_equals_nibabel_closest_canonical(affine):
  a = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
  got, spacing = R.to_ras(a, affine)
  want = nib.as_closest_canonical(nib.Nifti1Image(a, affine))
  np.testing.assert_array_equal(got, np.asarray(want.dataobj))
  np.testing.assert_allclose(spacing, want.header.get_zooms()[:3])


@pytest.mark.parametrize("affine", [LAS, OBLIQUE_PERMUTED])
def test_a_right_anterior_superior_marker_shows_top_left(affine):
  # the voxel nearest the patient's right-anterior-superior corner, whatever the affine
  corners = np.indices(SHAPE).reshape(3, -1).T
  world = corners @ affine[:3, :3].T + affine[:3, 3]
  ras = corners[np.argmax(world @ [1.0, 1.0, 1.0])]
  a = np.zeros(SHAPE)
  a[tuple(ras)] = 1.0
  slices = R.plane_slices(*R.to_ras(a, affine), index=np.array(R.to_ras(a, affine)[0].shape) - 1)
  # axial: anterior on top, patient right on the viewer's left; coronal: superior on top,
  # right on the left; sagittal: superior on top, anterior on the left.
  for plane in ("axial", "coronal", "sagittal"):
    image = slices[plane][0]
    assert image[0, 0] == 1.0, plane


def test_plane_aspects_follow_the_voxel_size():
  slices = R.plane_slices(*R.to_ras(np.zeros(SHAPE), LAS))
  assert slices["axial"][1] == pytest.approx(1.5 / 2.0)
  assert slices["coronal"][1] == pytest.approx(3.0 / 2.0)
  assert slices["sagittal"][1] == pytest.approx(3.0 / 1.5)


def test_checkerboard_alternates_tiles():
  a, b = np.zeros((8, 8)), np.ones((8, 8))
  got = R.checkerboard(a, b, tiles=4)
  want = np.kron((np.add.outer(np.arange(4), np.arange(4)) % 2).astype(float), np.ones((2, 2)))
  np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match="shape"):
    R.checkerboard(a, np.ones((8, 7)))


def test_save_report_and_box_plot_write_pngs(tmp_path):
  rng = np.random.default_rng(1)
  fixed = rng.normal(size=SHAPE) * 300
  disp = rng.normal(size=SHAPE + (3,)) * 0.3
  path = tmp_path / "report.png"
  R.save_report(str(path), fixed, fixed + 10, fixed - 10, disp, LAS, title="t")
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[1] > image.shape[0] > 300  # 3 rows x 7 columns
  assert image[..., :3].std() > 0.05
  R.save_box_plot(str(tmp_path / "box.png"), {"a": [1.0, 2.0, np.nan], "b": [3.0]},
                  metric="dice")
  assert matplotlib.image.imread(tmp_path / "box.png").shape[0] > 100
  assert sorted(p.name for p in tmp_path.iterdir()) == ["box.png", "report.png"]
  labels = np.zeros(SHAPE, np.int32)
  labels[2:-2, 2:-2, 2:-2] = 3
  R.save_report(str(tmp_path / "labelled.png"), fixed, fixed + 10, fixed - 10, disp, LAS,
                fixed_labels=labels)
  labelled = matplotlib.image.imread(tmp_path / "labelled.png")
  assert labelled.shape[0] == image.shape[0]  # one more column: the label contours
  assert 1.08 < labelled.shape[1] / image.shape[1] < 1.2
  with pytest.raises(ValueError, match="warped"):
    R.save_report(str(path), fixed, fixed, fixed[:-1], disp, LAS)
  with pytest.raises(ValueError, match="fixed_labels"):
    R.save_report(str(path), fixed, fixed, fixed, disp, LAS, fixed_labels=labels[:-1])


def test_label_edges_outline_each_label_against_a_per_pixel_loop():
  rng = np.random.default_rng(4)
  lab = np.zeros((9, 11), np.int32)
  lab[2:6, 1:5] = 3
  lab[4:8, 4:10] = 7
  lab[0, 0] = 2  # touches the border
  lab = np.where(rng.random(lab.shape) < 0.1, 5, lab)
  want = np.zeros(lab.shape, bool)
  for i, j in np.ndindex(*lab.shape):
    if lab[i, j] == 0:
      continue
    for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
      a, b = i + di, j + dj
      other = lab[a, b] if 0 <= a < lab.shape[0] and 0 <= b < lab.shape[1] else 0
      want[i, j] |= other != lab[i, j]
  np.testing.assert_array_equal(R.label_edges(lab), want)
  assert R.label_edges(np.zeros((4, 4), np.int32)).sum() == 0


def test_reports_draw_without_pyplot_after_a_background_import(tmp_path):
  import subprocess
  import sys
  code = (
      "import sys, numpy as np\n"
      "from jaxreg.pipeline import report\n"
      "assert 'matplotlib.figure' not in sys.modules\n"
      "report.import_in_background().join()\n"
      "assert 'matplotlib.figure' in sys.modules\n"
      "a = np.linspace(-1000, 500, 12 * 10 * 8).reshape(12, 10, 8)\n"
      f"report.save_report({str(tmp_path / 'r.png')!r}, a, a, a, np.zeros(a.shape + (3,)),"
      " np.diag([2.0, 2.0, 3.0, 1.0]))\n"
      "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert res.returncode == 0, res.stderr[-2000:]
  assert matplotlib.image.imread(tmp_path / "r.png").shape[0] > 100
