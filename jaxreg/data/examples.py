"""Training examples, made in data worker processes with numpy and scipy only (no JAX):
``index -> dict of numpy arrays`` for the pairs of a manifest (:class:`FilePairs`) or for
synthetic pairs of the demo CT (:class:`SyntheticPairs`), and random augmentation
(:func:`augment`).

Each example holds ``fixed`` and ``moving`` (the model grid's shape, float32 in [0, 1]:
the HU window scaled) and, with a label lookup table, ``fixed_labels`` and
``moving_labels`` (int32 class indices: 0 background, k for the k-th label id). Arrays are
``[X, Y, Z]`` in the model grid's axis order (RAS+ axes, see
:func:`jaxreg.io.resample.model_grid`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxreg.data.demo_ct import demo_pair
from jaxreg.data.manifests import PairSpec, load_pair
from jaxreg.io import resample as _resample
from jaxreg.nn.inputs import to_classes

__all__ = ["FilePairs", "SyntheticPairs", "Augment", "augment"]


def _example(fixed, moving, fixed_labels, moving_labels, lut) -> dict[str, np.ndarray]:
  out = {"fixed": np.asarray(fixed, np.float32), "moving": np.asarray(moving, np.float32)}
  if lut is not None and fixed_labels is not None and moving_labels is not None:
    out["fixed_labels"] = to_classes(fixed_labels, lut)
    out["moving_labels"] = to_classes(moving_labels, lut)
  return out


class FilePairs:
  """The pairs of a manifest, each read from its files and put on its fixed image's model
  grid (:func:`jaxreg.io.resample.prepare_pair` with scipy: no JAX).

  Args:
    specs: the pairs (:func:`jaxreg.data.read_pairs_csv`, :func:`jaxreg.data.read_learn2reg`).
    spacing: model grid spacing, mm.
    divisor: model grid shape divisor (the network's stride).
    shape: the model grid's shape (None: each fixed image's own extent).
    hu_window: HU range scaled to [0, 1].
    lut: label value -> class index table (None: no labels in the examples).
  """

  def __init__(self, specs: Sequence[PairSpec], *, spacing: float, divisor: int,
               shape: tuple[int, int, int] | None, hu_window: tuple[float, float],
               lut: np.ndarray | None):
    self.specs = list(specs)
    self.spacing, self.divisor, self.shape = spacing, divisor, shape
    self.hu_window, self.lut = tuple(hu_window), lut

  def __len__(self) -> int:
    return len(self.specs)

  def describe(self, index: int) -> str:
    spec = self.specs[index]
    return f"pair {index} ({spec.fixed}, {spec.moving})"

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    spec = self.specs[index]
    fixed, moving, fl, ml = load_pair(spec, labels=self.lut is not None)
    pair = _resample.prepare_pair(fixed, moving, fl, ml, spacing=self.spacing,
                                  divisor=self.divisor, shape=self.shape,
                                  hu_window=self.hu_window, names=(spec.fixed, spec.moving),
                                  engine="numpy")
    return _example(pair.fixed, pair.moving, pair.fixed_labels, pair.moving_labels, self.lut)


class SyntheticPairs:
  """Synthetic pairs of the demo CT by index (:func:`jaxreg.data.demo_pair` with scipy).

  Args:
    split: ``"train"`` or ``"eval"`` (disjoint seeds).
    hu_window: HU range scaled to [0, 1].
    lut: label value -> class index table (None: no labels).
    **pair_kwargs: :func:`jaxreg.data.demo_pair`'s grid and deformation arguments.
  """

  def __init__(self, split: str, *, hu_window: tuple[float, float], lut: np.ndarray | None,
               **pair_kwargs):
    self.split, self.hu_window, self.lut, self.pair_kwargs = split, tuple(hu_window), lut, \
        pair_kwargs

  def describe(self, index: int) -> str:
    return f"synthetic {self.split} pair {index}"

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    pair = demo_pair(index, split=self.split, engine="numpy", **self.pair_kwargs)
    lo, hi = self.hu_window
    return _example(_resample.window(pair.fixed, lo, hi), _resample.window(pair.moving, lo, hi),
                    pair.fixed_labels, pair.moving_labels, self.lut)


@dataclasses.dataclass(frozen=True)
class Augment:
  """Random changes to a training example (each 0 turns one off).

  Attributes:
    swap: probability of exchanging fixed and moving (with their labels): registration
      is learnt in both directions.
    gamma: each image's intensities ``v -> v ** exp(g)``, ``g`` uniform in
      ``[-gamma, gamma]`` (contrast phases, scanners).
    noise: standard deviation of Gaussian noise added to each image (window units: 0.01 of
      a 2000 HU window is 20 HU).
  """
  swap: float = 0.0
  gamma: float = 0.0
  noise: float = 0.0

  @property
  def active(self) -> bool:
    return bool(self.swap or self.gamma or self.noise)


def augment(example: dict[str, np.ndarray], rng: np.random.Generator,
            options: Augment) -> dict[str, np.ndarray]:
  """``example`` changed at random by ``options`` (a new dict; the input is unchanged).

  The random numbers are drawn in a fixed order whatever is turned on, so an example's
  changes depend only on ``rng``'s seed.
  """
  out = dict(example)
  swap, gammas = rng.uniform() < options.swap, rng.uniform(-1, 1, 2) * options.gamma
  if swap:
    out["fixed"], out["moving"] = example["moving"], example["fixed"]
    if "fixed_labels" in example:
      out["fixed_labels"], out["moving_labels"] = example["moving_labels"], \
          example["fixed_labels"]
  for key, g in zip(("fixed", "moving"), gammas):
    image = out[key]
    if g:
      image = np.clip(image, 0.0, 1.0) ** np.float32(np.exp(g))
    if options.noise:
      image = image + rng.normal(scale=options.noise, size=image.shape).astype(np.float32)
    out[key] = np.asarray(image, np.float32)
  return out
