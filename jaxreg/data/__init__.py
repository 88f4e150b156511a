"""Data: pair manifests, the embedded demo CT, synthetic pairs, the training data pipeline.

* :mod:`jaxreg.data.manifests`: :func:`read_learn2reg` and :func:`read_pairs_csv` turn a
  dataset layout into a list of :class:`PairSpec`; :func:`read_keypoints`.
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
"""

from jaxreg.data.demo_ct import EVAL_SEED_BASE as EVAL_SEED_BASE
from jaxreg.data.demo_ct import TRAIN_SEED_BASE as TRAIN_SEED_BASE
from jaxreg.data.demo_ct import Demo as Demo
from jaxreg.data.demo_ct import demo as demo
from jaxreg.data.demo_ct import demo_pair as demo_pair
from jaxreg.data.manifests import PairSpec as PairSpec
from jaxreg.data.manifests import read_keypoints as read_keypoints
from jaxreg.data.manifests import read_learn2reg as read_learn2reg
from jaxreg.data.manifests import read_pairs_csv as read_pairs_csv
from jaxreg.data.synthetic import SyntheticPair as SyntheticPair
from jaxreg.data.synthetic import breathing_field as breathing_field
from jaxreg.data.synthetic import random_smooth_field as random_smooth_field
from jaxreg.data.synthetic import rigid_field as rigid_field
from jaxreg.data.synthetic import synthetic_pair as synthetic_pair

__all__ = [
    "PairSpec",
    "read_learn2reg",
    "read_pairs_csv",
    "read_keypoints",
    "Demo",
    "demo",
    "demo_pair",
    "SyntheticPair",
    "random_smooth_field",
    "rigid_field",
    "breathing_field",
    "synthetic_pair",
    "TRAIN_SEED_BASE",
    "EVAL_SEED_BASE",
]
