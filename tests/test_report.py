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


def test_reports_draw_without_pyplot(tmp_path):
  import subprocess
  import sys
  code = (
      "import sys, numpy as np\n"
      "from jaxreg.pipeline import report\n"
      "assert 'matplotlib.figure' not in sys.modules\n"
      "a = np.linspace(-1000, 500, 12 * 10 * 8).reshape(12, 10, 8)\n"
      f"report.save_report({str(tmp_path / 'r.png')!r}, a, a, a, np.zeros(a.shape + (3,)),"
      " np.diag([2.0, 2.0, 3.0, 1.0]))\n"
      "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
      "assert 'matplotlib' not in sys.modules, 'a report needs no matplotlib'\n")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert res.returncode == 0, res.stderr[-2000:]
  assert matplotlib.image.imread(tmp_path / "r.png").shape[0] > 100


def _oblique_flipped():
  """An affine ~20 degrees off the axes, with permuted, flipped, anisotropic axes."""
  c, s = np.cos(np.radians(20.0)), np.sin(np.radians(20.0))
  rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
  out = np.eye(4)
  out[:3, :3] = rotation @ np.array([[0, 0, 3.0], [-2.0, 0, 0], [0, -1.5, 0]])
  out[:3, 3] = (5.0, 7.0, 1.0)
  return out


AFFINES = [LAS, OBLIQUE_PERMUTED, _oblique_flipped()]


def _field(shape, scale, seed=5):
  return np.random.default_rng(seed).normal(size=tuple(shape) + (3,)) * scale


@pytest.mark.parametrize("shape", [SHAPE, (11, 9, 7)])
def test_jacobian_slice_equals_the_whole_field_determinant_at_that_slice(shape):
  from jaxreg import metrics
  disp = _field(shape, 0.6)  # folds in places: det J of both signs
  want = metrics.jacobian_determinant(disp)
  assert (want <= 0).any() and (want > 1).any()
  for axis in range(3):
    n = shape[axis]
    for index in sorted({0, 1, n // 2, n - 2, n - 1}):  # one-sided at both borders
      got = R._jacobian_slice(disp, axis, index)
      assert got.dtype == np.float32
      np.testing.assert_allclose(got, np.take(want, index, axis), rtol=1e-5, atol=1e-5,
                                 err_msg=f"axis {axis} index {index}")


@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("shape", [SHAPE, (11, 9, 7)])
def test_report_slices_are_the_central_display_slices_of_the_whole_volumes(affine, shape):
  """Slicing first then orienting equals plane_slices of the whole oriented volumes,
  det J included, on permuted / flipped / oblique anisotropic grids (odd sizes: the
  central RAS slice of a flipped axis is n - 1 - n // 2 in the array)."""
  from jaxreg import metrics
  rng = np.random.default_rng(2)
  fixed = rng.normal(size=shape) * 300
  warped = rng.normal(size=shape) * 300
  labels = rng.integers(0, 30, size=shape)
  disp = _field(shape, 0.6)
  views = R._plane_images(fixed, fixed + 1, warped, disp, affine, labels)
  whole = {name: R.plane_slices(*R.to_ras(a, affine))
           for name, a in (("fixed", fixed), ("warped", warped), ("labels", labels),
                           ("det", metrics.jacobian_determinant(disp)),
                           ("index", np.moveaxis(np.indices(shape), 0, -1)))}
  for plane in R.PLANES:
    v = views[plane]
    np.testing.assert_array_equal(v["fixed"], whole["fixed"][plane][0])
    np.testing.assert_array_equal(v["warped"], whole["warped"][plane][0])
    np.testing.assert_array_equal(v["labels"], whole["labels"][plane][0])
    np.testing.assert_array_equal(v["diff"], whole["fixed"][plane][0] - whole["warped"][plane][0])
    np.testing.assert_allclose(v["det"], whole["det"][plane][0], rtol=1e-5, atol=1e-5)
    # phi: the two in-plane deformed coordinates (index + displacement) of those pixels
    index = whole["index"][plane][0]
    normal = [c for c in range(3) if np.ptp(index[..., c]) == 0]
    assert len(normal) == 1
    in_plane = [c for c in range(3) if c != normal[0]]
    shown_disp = R.plane_slices(*R.to_ras(disp, affine))[plane][0]
    want_phi = index[..., in_plane] + shown_disp[..., in_plane]
    np.testing.assert_allclose(v["phi"], want_phi, rtol=0, atol=1e-12)


@pytest.mark.parametrize("affine", [LAS, _oblique_flipped()])
def test_fixed_panel_pixels_are_the_gray_colormap_of_the_windowed_fixed_slice(tmp_path, affine):
  import matplotlib
  rng = np.random.default_rng(3)
  fixed = rng.uniform(-1200, 800, size=SHAPE)
  disp = _field(SHAPE, 0.3)
  window = (-1000.0, 600.0)
  path = tmp_path / "r.png"
  R.save_report(str(path), fixed, fixed, fixed - 50, disp, affine, window=window)
  png = np.round(matplotlib.image.imread(path)[..., :3] * 255).astype(np.uint8)
  columns = ("fixed", "moving", "warped", "fixed - warped", "checkerboard",
             "deformation grid", "det J")
  raster, layout = R._render(R._plane_images(fixed, fixed, fixed - 50, disp, affine), columns,
                             window=window, grid_every=6, diff_range=400.0)
  assert png.shape == raster.shape[:2] + (3,)
  gray = matplotlib.colormaps["gray"]
  for plane, (image, aspect) in R.plane_slices(*R.to_ras(fixed, affine)).items():
    top, left, height, width = layout["panels"][plane, "fixed"]
    # square display pixels: the panel's shape follows the slice's size in mm
    assert abs(height - width * aspect * image.shape[0] / image.shape[1]) <= 1.0
    # nearest neighbour: display pixel y shows the voxel row floor((y + 0.5) * rows / height)
    rows = ((np.arange(height) + 0.5) * image.shape[0] / height).astype(int)
    cols = ((np.arange(width) + 0.5) * image.shape[1] / width).astype(int)
    voxels = image[rows[:, None], cols[None, :]]
    want = gray(np.clip((voxels - window[0]) / (window[1] - window[0]), 0, 1), bytes=True)
    panel = np.s_[top:top + height, left:left + width]
    np.testing.assert_array_equal(raster[panel][..., :3], want[..., :3])
    np.testing.assert_array_equal(png[panel], want[..., :3])  # drawn 1:1 in the PNG
    assert height > 100 and width > 100


@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("zoom", [1, 2])
def test_grid_lines_of_a_zero_field_are_where_the_index_crosses_multiples(affine, zoom):
  every = 3
  views = R._plane_images(np.zeros(SHAPE), np.zeros(SHAPE), np.zeros(SHAPE),
                          np.zeros(SHAPE + (3,)), affine)
  whole = R.plane_slices(*R.to_ras(np.moveaxis(np.indices(SHAPE), 0, -1).astype(float), affine))
  for plane in R.PLANES:
    index = whole[plane][0]  # [rows, cols, 3] array index of each displayed voxel
    rows, cols = index.shape[:2]
    size = (rows * zoom, cols * zoom)
    # the index at the display pixel centres: linear in the pixel position, clamped at
    # the ends (at zoom 2: (y + 0.5) / 2 - 0.5 voxels, never a whole number)
    sy = np.clip((np.arange(size[0]) + 0.5) / zoom - 0.5, 0, rows - 1)[:, None, None]
    sx = np.clip((np.arange(size[1]) + 0.5) / zoom - 0.5, 0, cols - 1)[None, :, None]
    coords = index[0, 0] + (index[1, 0] - index[0, 0]) * sy + (index[0, 1] - index[0, 0]) * sx
    q = np.floor(coords / every)
    want = np.zeros(size, bool)  # the pixel on the larger side of each change of q
    want[1:] |= (q[1:] > q[:-1]).any(-1)
    want[:-1] |= (q[:-1] > q[1:]).any(-1)
    want[:, 1:] |= (q[:, 1:] > q[:, :-1]).any(-1)
    want[:, :-1] |= (q[:, :-1] > q[:, 1:]).any(-1)
    got = R._grid_lines(R._bilinear(views[plane]["phi"], size), every)
    np.testing.assert_array_equal(got, want, err_msg=plane)
    if zoom == 1:  # the voxels whose in-plane index is a positive multiple of `every`
      moves = [c for c in range(3) if np.ptp(index[..., c]) > 0]
      on = (index[..., moves] % every == 0) & (index[..., moves] > 0)
      np.testing.assert_array_equal(got, on.any(-1), err_msg=plane)


@pytest.mark.parametrize("name", ["gray", "RdBu_r"])
def test_colour_tables_are_matplotlibs(name):
  """The report's own tables against matplotlib's maps (what it drew with before), on a
  dense ramp including the ends: gray exactly, RdBu_r within one level (rounding)."""
  import matplotlib
  x = np.concatenate([np.linspace(0, 1, 4099), [0.0, 1.0, 0.5, 1 / 256, 255 / 256]])
  want = matplotlib.colormaps[name](x, bytes=True)[..., :3].astype(int)
  got = R._colour(x, name, 0.0, 1.0).astype(int)
  assert np.abs(got - want).max() <= (0 if name == "gray" else 1)
  tab20 = matplotlib.colormaps["tab20"](np.arange(20), bytes=True)[:, :3]
  np.testing.assert_array_equal(R.TAB20, tab20)
