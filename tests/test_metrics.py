"""Metrics against brute-force references."""

import numpy as np
import pytest

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
  np.testing.assert_allclose(M.jacobian_determinant(scale), 1.2 * 1.1 * 0.94)
  assert M.sdlogj(scale) == pytest.approx(0.0, abs=1e-12)
  assert M.folding_fraction(scale) == 0.0
  # Half the volume stretched, half compressed along x: log det takes two values.
  u = np.zeros((16, 16, 16, 3))
  u[..., 0] = np.where(x[..., 2] < 8, 0.5, -0.5) * x[..., 0]
  det = M.jacobian_determinant(u)
  np.testing.assert_allclose(np.unique(det.round(12)), [0.5, 1.5])
  want = np.std(np.log(det[2:-2, 2:-2, 2:-2]))
  assert M.sdlogj(u) == pytest.approx(want) and want > 0.5
  mirror = -2.0 * x  # det = (-1)^3 = -1: every voxel folds
  assert M.folding_fraction(mirror) == 1.0
