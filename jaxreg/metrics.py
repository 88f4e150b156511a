"""Evaluation metrics (numpy): label overlap so far; distances and field quality follow."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["dice"]


def dice(a: np.ndarray, b: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
  """Dice overlap ``2 |A ∩ B| / (|A| + |B|)`` of each label between two label maps.

  Args:
    a, b: integer label maps of the same shape.
    labels: label ids to score.

  Returns:
    ``{label: dice}``; a label absent from both maps scores ``nan``.

  Examples:
    >>> import numpy as np
    >>> dice(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), [1, 2])
    {1: 0.6666666666666666, 2: 0.6666666666666666}
  """
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape:
    raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
  if np.issubdtype(a.dtype, np.floating) or np.issubdtype(b.dtype, np.floating):
    raise ValueError(f"label maps must be integer, got {a.dtype} and {b.dtype}")
  n = int(max(a.max(initial=0), b.max(initial=0), max(labels, default=0))) + 1
  both = np.bincount(a[a == b].ravel(), minlength=n)
  count_a = np.bincount(a.ravel(), minlength=n)
  count_b = np.bincount(b.ravel(), minlength=n)
  out = {}
  for k in labels:
    denom = count_a[k] + count_b[k]
    out[int(k)] = float(2 * both[k] / denom) if denom else float("nan")
  return out
