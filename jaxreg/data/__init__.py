"""Data: pair manifests, the embedded demo CT, synthetic pairs, the training data pipeline.

* :mod:`jaxreg.data.manifests`: :func:`read_learn2reg` and :func:`read_pairs_csv` turn a
  dataset layout into a list of :class:`PairSpec`; :func:`read_keypoints`; :func:`load_pair` reads a pair's images and label maps.
* :mod:`jaxreg.data.demo_ct`: :func:`demo` (the embedded chest/abdomen CT with its organ
  labels) and :func:`demo_pair` (a synthetic pair made from it by seed).
* :mod:`jaxreg.data.synthetic`: :func:`synthetic_pair` deforms one CT with a known smooth
  field (exact ground truth for training and evaluation).
* :mod:`jaxreg.data.examples`: training examples made with numpy and scipy only
  (:class:`~jaxreg.data.examples.FilePairs`, :class:`~jaxreg.data.examples.SyntheticPairs`),
  random augmentation.
* :mod:`jaxreg.data.pipeline`: :func:`~jaxreg.data.pipeline.batches`, the Grain pipeline:
  a seeded order, examples prepared in worker processes, unreadable pairs skipped, a position
  saved with the checkpoints.

Every name is imported on first use: ``jaxreg register`` reads a manifest without loading the
synthetic pairs' modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_LAZY = {
    "PairSpec": "jaxreg.data.manifests",
    "read_learn2reg": "jaxreg.data.manifests",
    "read_pairs_csv": "jaxreg.data.manifests",
    "read_keypoints": "jaxreg.data.manifests",
    "load_pair": "jaxreg.data.manifests",
    "Demo": "jaxreg.data.demo_ct",
    "demo": "jaxreg.data.demo_ct",
    "demo_pair": "jaxreg.data.demo_ct",
    "TRAIN_SEED_BASE": "jaxreg.data.demo_ct",
    "EVAL_SEED_BASE": "jaxreg.data.demo_ct",
    "SyntheticPair": "jaxreg.data.synthetic",
    "random_smooth_field": "jaxreg.data.synthetic",
    "rigid_field": "jaxreg.data.synthetic",
    "breathing_field": "jaxreg.data.synthetic",
    "synthetic_pair": "jaxreg.data.synthetic",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
  if name not in _LAZY:
    raise AttributeError(f"module 'jaxreg.data' has no attribute {name!r}")
  value = getattr(importlib.import_module(_LAZY[name]), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # static tools see the names directly
  from jaxreg.data.demo_ct import (  # noqa: F401
    EVAL_SEED_BASE,
    TRAIN_SEED_BASE,
    Demo,
    demo,
    demo_pair,
  )
  from jaxreg.data.manifests import (  # noqa: F401
    PairSpec,
    load_pair,
    read_keypoints,
    read_learn2reg,
    read_pairs_csv,
  )
  from jaxreg.data.synthetic import (  # noqa: F401
    SyntheticPair,
    breathing_field,
    random_smooth_field,
    rigid_field,
    synthetic_pair,
  )
