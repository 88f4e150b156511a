"""The network's optional label inputs: organ ids -> class indices -> one-hot channels.

Used by inference (:mod:`jaxreg.pipeline.register`) and training alike. Class indices
are int32: 0 is background (or any id not listed), ``k`` the k-th id of
``config.data.label_ids``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["class_lut", "to_classes", "num_classes", "label_channels"]


def class_lut(label_ids) -> np.ndarray:
  """Lookup table: TotalSegmentator/dataset label id -> class index (0 = other/background)."""
  ids = [int(i) for i in label_ids]
  lut = np.zeros(max(ids, default=0) + 1, np.int32)
  lut[ids] = np.arange(1, len(ids) + 1)
  return lut


def to_classes(labels, lut) -> np.ndarray:
  """Label ids -> int32 class indices through ``lut`` (ids outside it become 0)."""
  labels = np.asarray(labels)
  return np.where(labels < len(lut), lut[np.minimum(labels, len(lut) - 1)], 0).astype(np.int32)


def num_classes(config) -> int:
  """Label classes including background (0 when labels are not used)."""
  ids = config.data.get("label_ids", ()) or ()
  return len(ids) + 1 if ids else 0


def label_channels(config, fixed_labels, moving_labels):
  """Extra network inputs when ``config.model.label_inputs``: one-hot organ masks of both
  label maps (class indices, ``[B, X, Y, Z]``) -> ``[B, X, Y, Z, 2C]``; else None."""
  if not config.model.get("label_inputs", False):
    return None
  c = num_classes(config)
  one_hot = lambda x: jax.nn.one_hot(x, c)[..., 1:]
  return jnp.concatenate([one_hot(fixed_labels), one_hot(moving_labels)], axis=-1)
