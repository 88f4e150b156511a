"""A seeded, prefetched batch loader with a restorable position."""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np


class Loader:
  """Batches of ``source(i)`` in a seeded order, prefetched, with a restorable position.

  ``source`` maps an integer index to one example (a dict of numpy arrays).
  For ``num_examples=None`` (an infinite source, e.g. synthetic pairs by seed)
  the indices are ``0, 1, 2, ...``; otherwise each epoch is a permutation of
  ``range(num_examples)`` drawn from ``(seed, epoch)``. Batches stack examples
  on a new leading axis. The order depends only on ``seed`` and the position,
  so ``restore(state())`` continues exactly where a run stopped, whatever the
  prefetch depth or thread count.

  Args:
    source: ``index -> dict[str, np.ndarray]``.
    batch_size: examples per batch.
    num_examples: size of a finite source, or None for an infinite one.
    seed: shuffling seed.
    shuffle: permute each epoch (finite sources only).
    prefetch: batches prepared ahead on ``workers`` threads.
    workers: threads that build examples.
    shard: ``(index, count)``: this process reads only batch positions
      ``b * count + index`` (multi-process data parallelism).
    guard: a context manager (e.g. a ``threading.Lock``) held while a worker builds
      one example, so a caller can keep the workers' JAX work off the devices while
      it runs a step (``jaxreg.training`` does on a multi-device CPU mesh).
  """

  def __init__(self, source: Callable[[int], dict[str, Any]], batch_size: int, *,
               num_examples: int | None = None, seed: int = 0, shuffle: bool = True,
               prefetch: int = 2, workers: int = 2, shard: tuple[int, int] = (0, 1),
               guard: contextlib.AbstractContextManager | None = None):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_examples is not None and num_examples < batch_size:
      raise ValueError(f"num_examples={num_examples} is smaller than batch_size={batch_size}")
    if not 0 <= shard[0] < shard[1]:
      raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
    self._source = source
    self._batch_size = batch_size
    self._num = num_examples
    self._seed = seed
    self._shuffle = shuffle
    self._prefetch = max(0, prefetch)
    self._shard = shard
    self._position = 0  # batches handed out by this loader
    self._pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))
    self._pending: dict[int, concurrent.futures.Future] = {}
    self._guard = contextlib.nullcontext() if guard is None else guard

  def state(self) -> dict[str, int]:
    """The position to save with a checkpoint (JSON-serialisable)."""
    return {"position": self._position, "seed": self._seed}

  def restore(self, state: dict[str, int]) -> None:
    """Continue from a position returned by :meth:`state`."""
    if int(state["seed"]) != self._seed:
      raise ValueError(f"loader state has seed {state['seed']}, this loader uses {self._seed}")
    self._cancel()
    self._position = int(state["position"])

  def indices(self, position: int) -> list[int]:
    """Example indices of the batch at ``position`` (this process's shard)."""
    global_batch = position * self._shard[1] + self._shard[0]
    start = global_batch * self._batch_size
    if self._num is None:
      return list(range(start, start + self._batch_size))
    per_epoch = self._num // self._batch_size  # drop the remainder each epoch
    epoch, offset = divmod(global_batch, per_epoch)
    order = self._order(epoch)
    return [int(i) for i in order[offset * self._batch_size:(offset + 1) * self._batch_size]]

  def _order(self, epoch: int) -> np.ndarray:
    if not self._shuffle:
      return np.arange(self._num)
    return np.random.default_rng([self._seed, epoch]).permutation(self._num)

  def _example(self, index: int) -> dict[str, Any]:
    with self._guard:
      return self._source(index)

  def _make(self, position: int) -> dict[str, np.ndarray]:
    examples = [self._example(i) for i in self.indices(position)]
    keys = examples[0].keys()
    return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in keys}

  def _submit(self, position: int) -> None:
    if position not in self._pending:
      self._pending[position] = self._pool.submit(self._make, position)

  def _cancel(self) -> None:
    for f in self._pending.values():
      f.cancel()
    self._pending.clear()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    for p in range(self._position, self._position + self._prefetch + 1):
      self._submit(p)
    batch = self._pending.pop(self._position).result()
    self._position += 1
    return batch

  def close(self) -> None:
    self._cancel()
    self._pool.shutdown(wait=False)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
