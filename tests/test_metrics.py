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
