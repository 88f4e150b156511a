"""Metrics against brute-force references."""

import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxreg import metrics as M


def test_dice_matches_set_based_reference():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 5, size=(9, 8, 7))
  b = np.where(rng.random(a.shape) < 0.3, rng.integers(0, 5, size=a.shape), a)
  got = M.dice(a, b, [1, 2, 3, 4, 9])
  for k in (1, 2, 3, 4):
    sa = {tuple(i) for i in np.argwhere(a == k)}
    sb = {tuple(i) for i in np.argwhere(b == k)}
    assert got[k] == pytest.approx(2 * len(sa & sb) / (len(sa) + len(sb)))
  assert np.isnan(got[9])
  with pytest.raises(ValueError, match="differ in shape"):
    M.dice(a, b[:-1], [1])
  with pytest.raises(ValueError, match="integer"):
    M.dice(a.astype(float), b, [1])


def _brute_hd95(a, b, spacing):
  """Pairwise distances between all surface voxels (surface: a 6-neighbour outside)."""
  def surface(m):
    padded = np.pad(m, 1)
    inner = np.ones_like(m)
    for axis in range(3):
      for shift in (-1, 1):
        inner &= np.roll(padded, shift, axis)[1:-1, 1:-1, 1:-1]
    return np.argwhere(m & ~inner) * np.asarray(spacing)
  pa, pb = surface(a), surface(b)
  d = np.linalg.norm(pa[:, None] - pb[None], axis=-1)
  return np.percentile(np.concatenate([d.min(1), d.min(0)]), 95)


def test_hd95_matches_brute_force_with_anisotropic_spacing():
  rng = np.random.default_rng(1)
  shape = (12, 10, 9)
  x, y, z = np.indices(shape)
  a = (((x - 5) / 4) ** 2 + ((y - 5) / 3) ** 2 + ((z - 4) / 3) ** 2 <= 1).astype(int)
  b = (((x - 6) / 4) ** 2 + ((y - 4) / 3.5) ** 2 + ((z - 4) / 2.5) ** 2 <= 1).astype(int) * 2
  b[a == 1] = np.where(rng.random((a == 1).sum()) < 0.1, 0, b[a == 1])
  spacing = (0.8, 1.5, 2.5)
  got = M.hd95(a + 0, np.where(b == 2, 1, 0), [1], spacing)[1]
  assert got == pytest.approx(_brute_hd95(a == 1, b == 2, spacing), rel=1e-9)
  assert got > 0
  assert M.hd95(a, a, [1], spacing)[1] == 0.0
  assert np.isnan(M.hd95(a, a, [7])[7])


def test_tre_of_a_known_translation_and_an_exact_field():
  rng = np.random.default_rng(2)
  pts = rng.uniform(2, 8, size=(20, 3))
  moved = pts + [1.0, -2.0, 0.5]
  zero = np.zeros((10, 10, 10, 3))
  spacing = (2.0, 1.0, 3.0)
  np.testing.assert_allclose(M.tre(pts, moved, zero, spacing),
                             np.linalg.norm(np.array([1.0, -2.0, 0.5]) * spacing))
  exact = np.broadcast_to([1.0, -2.0, 0.5], (10, 10, 10, 3))
  np.testing.assert_allclose(M.tre(pts, moved, exact, spacing), 0.0, atol=1e-12)


def test_sdlogj_and_folding_on_fields_with_known_jacobians():
  x = np.indices((16, 16, 16)).transpose(1, 2, 3, 0).astype(float)
  scale = (0.2 * x) @ np.diag([1.0, 0.5, -0.3])  # det = 1.2 * 1.1 * 0.94 everywhere
  np.testing.assert_allclose(M.jacobian_determinant(scale), 1.2 * 1.1 * 0.94, rtol=1e-6)
  assert M.sdlogj(scale) == pytest.approx(0.0, abs=1e-6)
  assert M.folding_fraction(scale) == 0.0
  # Half the volume stretched, half compressed along x: log det takes two values.
  u = np.zeros((16, 16, 16, 3))
  u[..., 0] = np.where(x[..., 2] < 8, 0.5, -0.5) * x[..., 0]
  det = M.jacobian_determinant(u)
  np.testing.assert_allclose(np.unique(det.round(5)), [0.5, 1.5])
  want = np.std(np.log(det[2:-2, 2:-2, 2:-2]))
  assert M.sdlogj(u) == pytest.approx(want) and want > 0.5
  mirror = -2.0 * x  # det = (-1)^3 = -1: every voxel folds
  assert M.folding_fraction(mirror) == 1.0


def _full_volume_hd95(a, b, labels, spacing):
  """HD95 with full-volume EDTs (the definition before the bounding-box crop)."""
  six = ndi.generate_binary_structure(3, 1)
  surface = lambda m: m & ~ndi.binary_erosion(m, structure=six, border_value=0)
  out = {}
  for k in labels:
    ma, mb = a == k, b == k
    if not ma.any() or not mb.any():
      out[k] = float("nan")
      continue
    sa, sb = surface(ma), surface(mb)
    d = np.concatenate([ndi.distance_transform_edt(~sb, sampling=spacing)[sa],
                        ndi.distance_transform_edt(~sa, sampling=spacing)[sb]])
    out[k] = float(np.percentile(d, 95))
  return out


def _blob_labels(rng, shape, n_labels):
  """Random smooth blobs: label k wherever blob k is the strongest and above a threshold."""
  fields = np.stack([ndi.gaussian_filter(rng.normal(size=shape), 2.0) for _ in range(n_labels)])
  labels = np.argmax(fields, 0) + 1
  return np.where(fields.max(0) > np.percentile(fields.max(0), 30), labels, 0)


def test_hd95_on_bounding_boxes_equals_full_volume_reference():
  rng = np.random.default_rng(3)
  shape = (30, 26, 22)
  a = _blob_labels(rng, shape, 6)
  b = np.where(rng.random(shape) < 0.05, 0, _blob_labels(rng, shape, 6))
  a[0, :8, :5] = 7  # touches three volume faces; label 7 only in a
  b[-6:, -1, -4:] = 8  # label 8 only in b
  a[:, :, -1] = np.where(a[:, :, -1] > 0, 3, 0)  # label 3 covers a's last z face
  b[10:14, 0:3, 0:3] = 9
  a[12:17, 0:2, 0:4] = 9  # small label in an edge of both maps
  a[8:12, 8:12, 8:12] = 10
  b[9:13, 8:11, 9:14] = 10  # interior label: the margin does not reach the border
  on_border = lambda m: any(np.take(m, [0, -1], axis).any() for axis in range(3))
  assert all(on_border(m == k) for m in (a, b) for k in (1, 2, 3, 4, 5, 6, 9))
  assert not on_border(a == 10) and not on_border(b == 10)
  labels = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
  for spacing in [(1.0, 1.0, 1.0), (0.7, 1.3, 2.5)]:
    got = M.hd95(a, b, labels, spacing)
    want = _full_volume_hd95(a, b, labels, spacing)
    assert list(got) == labels
    for k in labels:
      if k in (7, 8, 11):
        assert np.isnan(got[k]) and np.isnan(want[k])
      else:
        assert got[k] == want[k], (k, spacing, got[k], want[k])
        assert got[k] > 0
  # Labels the box pass cannot take from find_objects (background 0, negative ids, float
  # maps) go through their own masks, with the same result.
  ca, cb = np.where(a == 2, -1, a).astype(float), np.where(b == 2, -1, b)
  got = M.hd95(ca, cb, [0, -1, 4], (0.7, 1.3, 2.5))
  assert got == _full_volume_hd95(ca, cb, [0, -1, 4], (0.7, 1.3, 2.5))
  assert all(np.isfinite(v) and v > 0 for v in got.values())


def _brute_hd95_labels(a, b, labels, spacing):
  """Per label: surface voxels by an explicit 6-neighbour check, the distances from each to
  every surface voxel of the other map (in mm), the 95th percentile of the pooled minima."""
  def surface(m):
    padded = np.pad(m, 1)  # outside the volume counts as outside the label
    inner = np.ones_like(m)
    for axis in range(3):
      for shift in (-1, 1):
        inner &= np.roll(padded, shift, axis)[1:-1, 1:-1, 1:-1]
    return np.argwhere(m & ~inner) * np.asarray(spacing)

  def one_way(p, q):
    return np.concatenate([np.linalg.norm(p[i:i + 256, None] - q[None], axis=-1).min(1)
                           for i in range(0, len(p), 256)])

  out = {}
  for k in labels:
    pa, pb = surface(a == k), surface(b == k)
    out[k] = (float(np.percentile(np.concatenate([one_way(pa, pb), one_way(pb, pa)]), 95))
              if len(pa) and len(pb) else float("nan"))
  return out


@pytest.mark.parametrize("mode", ["default", "trees", "all_pairs"])
def test_hd95_matches_brute_force_on_random_label_maps(monkeypatch, mode):
  """Against all pairwise surface distances, through each way of finding the nearest voxel:
  the offset search with its fallbacks (default), k-d trees only, all pairs only."""
  if mode == "trees":
    monkeypatch.setattr(M, "_SEARCH_RADIUS", 0.0)  # only the zero offset
    monkeypatch.setattr(M, "_MAX_PAIRS", 0)
  elif mode == "all_pairs":
    monkeypatch.setattr(M, "_SEARCH_RADIUS", 1.0)
    monkeypatch.setattr(M, "_MAX_PAIRS", 1 << 40)
  rng = np.random.default_rng(7)
  shape = (26, 22, 18)
  a = _blob_labels(rng, shape, 5)
  b = np.where(rng.random(shape) < 0.05, 0, _blob_labels(rng, shape, 5))
  b = np.where((b == 0) & (np.roll(a, 2, 0) > 0), 3, b)  # label 3 spills over in b
  a[18:25, 15:22, 11:18] = 6
  b[0:6, 0:5, 0:4] = 6  # far apart: beyond the offset search, on opposite volume corners
  a[9:11, 3:5, 8:10] = 7
  b[11:14, 3:5, 8:11] = 7  # small interior label
  a[0, 10:13, 5:9] = 8  # label 8 only in a
  labels = [1, 2, 3, 4, 5, 6, 7, 8, 9]
  on_border = lambda m: any(np.take(m, [0, -1], axis).any() for axis in range(3))
  assert all(on_border(a == k) and on_border(b == k) for k in (1, 2, 3, 4, 5, 6))
  for spacing in [(0.7, 1.3, 2.5), (1.0, 1.0, 1.0)]:
    got = M.hd95(a, b, labels, spacing)
    want = _brute_hd95_labels(a, b, labels, spacing)
    assert list(got) == labels
    for k in labels:
      if k in (8, 9):
        assert np.isnan(got[k]) and np.isnan(want[k])
      else:
        assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-9), (k, spacing)
        assert got[k] > 0
    assert got[6] > 10 * min(spacing)
    # Memory order does not matter (a Fortran-ordered map is read transposed).
    fortran = M.hd95(np.asfortranarray(a), b, labels, spacing)
    assert [fortran[k] for k in labels] == pytest.approx([got[k] for k in labels], nan_ok=True)


def test_hd95_of_a_label_matching_several_values_uses_its_own_masks():
  """A float label equal to two int64 values (2**53 and 2**53 + 1 both round to it): one
  label over both, as ``m == k`` has it, not two."""
  rng = np.random.default_rng(8)
  shape = (14, 12, 10)
  a = _blob_labels(rng, shape, 3).astype(np.int64)
  b = _blob_labels(rng, shape, 3).astype(np.int64)
  a[a == 2], b[b == 2] = 2 ** 53, 2 ** 53
  a[:7][a[:7] == 2 ** 53] = 2 ** 53 + 1
  b[:, :6][b[:, :6] == 2 ** 53] = 2 ** 53 + 1
  labels, spacing = [1, 2.0 ** 53, 3], (0.9, 1.1, 1.7)
  got = M.hd95(a, b, labels, spacing)
  want = _full_volume_hd95(a, b, labels, spacing)
  assert list(got) == [1, 2 ** 53, 3]
  for k in labels:
    assert got[int(k)] == pytest.approx(want[k], rel=1e-9), k
  one_value = M.hd95(a, b, [2 ** 53], spacing)[2 ** 53]  # the int matches one value
  assert one_value == pytest.approx(_full_volume_hd95(a, b, [2 ** 53], spacing)[2 ** 53])
  assert np.isfinite(one_value) and one_value != got[2 ** 53]
  # Both in one call (equal as dict keys): each label by its own matches, the last one kept.
  assert M.hd95(a, b, [2 ** 53, 2.0 ** 53], spacing) == {2 ** 53: got[2 ** 53]}


def test_field_quality_equals_folding_fraction_and_sdlogj():
  """The jitted, bucket-padded Jacobian gives numpy's values (odd shapes, folds included)."""
  rng = np.random.default_rng(3)
  coarse = rng.normal(size=(4, 4, 4, 3))
  disp = np.stack([ndi.zoom(coarse[..., k], (19 / 4, 13 / 4, 22 / 4), order=3)
                   for k in range(3)], -1) * 2.5  # folds in places
  quality = M.field_quality(disp)
  assert 0 < M.folding_fraction(disp) < 0.5
  assert quality["folding_fraction"] == pytest.approx(M.folding_fraction(disp), abs=1e-4)
  assert quality["sdlogj"] == pytest.approx(M.sdlogj(disp), rel=1e-3)


def _numpy_determinant(disp):
  """det(I + grad u) with numpy.gradient (central inside, one-sided at the border)."""
  disp = np.asarray(disp, np.float64)
  jac = np.stack([np.stack(np.gradient(disp[..., i]), -1) for i in range(3)], -2) + np.eye(3)
  return np.linalg.det(jac)


def test_jacobian_determinant_equals_numpy_gradient_on_a_bucket_padded_field():
  rng = np.random.default_rng(4)
  disp = ndi.gaussian_filter(rng.normal(size=(21, 17, 12, 3)), (2, 2, 2, 0)) * 3
  np.testing.assert_allclose(M.jacobian_determinant(disp), _numpy_determinant(disp), atol=1e-5)
