"""Training batches on Grain: a seeded order of examples, prepared in worker processes,
unreadable pairs skipped, and a position Orbax saves beside the train state.

The stages, in order (:func:`batches`)::

  example ids (each epoch a permutation of (seed, epoch); this host's block of every
  global batch) -> prepare (``source(id)`` and random augmentation, in ``workers``
  processes: numpy only, no JAX)
  -> skip (in this process: a pair that could not be read, one warning per file)
  -> batch (stack on a new leading axis)

``source`` is any picklable callable ``index -> dict of numpy arrays`` (the training
sources of :mod:`jaxreg.training.sources`: files read with nibabel and resampled with scipy,
or synthetic pairs warped with scipy). The order depends only on ``seed`` and the position,
so a run restored from :meth:`Batches.get_state` continues exactly, whatever the worker
count; a host of a multi-process run reads its own block of each global batch, so the
global batch equals a one-process run's.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from jaxreg.data.examples import Augment, augment
from jaxreg.types import InputError, one_line

__all__ = ["Skipped", "SkipBad", "Batches", "batches", "host_order", "prepare"]


@dataclasses.dataclass(frozen=True)
class Skipped:
  """An example that could not be prepared (a missing, truncated or non-CT file).

  Attributes:
    index: the example's index in its manifest.
    name: what it is (the pair's files).
    reason: the error, one line.
  """
  index: int
  name: str
  reason: str


class _Pick:
  """Host example ``j`` -> example id: block ``index`` of each global batch of ``count``
  blocks of ``per_host`` (picklable, for the worker processes)."""

  def __init__(self, order: grain.MapDataset, per_host: int, shard: tuple[int, int]):
    self.order, self.per_host, self.shard = order, per_host, shard

  def __call__(self, j: int) -> tuple[int, int]:
    """``(global position, example id)``."""
    batch, k = divmod(int(j), self.per_host)
    index, count = self.shard
    position = (batch * count + index) * self.per_host + k
    return position, int(self.order[position])


def host_order(num_examples: int | None, per_host: int, *, seed: int = 0,
               shuffle: bool = True, shard: tuple[int, int] = (0, 1)) -> grain.MapDataset:
  """The ``(global position, example id)`` this host reads, in order (an endless
  :class:`grain.MapDataset`).

  Global position ``g`` holds id ``g`` for an endless source (``num_examples=None``:
  synthetic pairs by seed); else epoch ``g // num_examples`` is a permutation of
  ``range(num_examples)`` (Grain's index shuffle of ``seed + epoch``; identity without
  ``shuffle``). Global batch ``b`` is positions ``[b B, (b + 1) B)`` with ``B = per_host *
  count``; host ``index`` reads its block ``index`` of each.
  """
  if per_host < 1:
    raise ValueError(f"batch size per host must be >= 1, got {per_host}")
  if not 0 <= shard[0] < shard[1]:
    raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
  if num_examples is None:
    order = grain.MapDataset.range(sys.maxsize)
  else:
    order = grain.MapDataset.range(num_examples)
    if shuffle:
      order = order.shuffle(seed=seed)
    order = order.repeat(None)
  return grain.MapDataset.range(sys.maxsize // shard[1]).map(_Pick(order, per_host, shard))


class _Prepare:
  """``(position, index) -> source(index)``, augmented with the random numbers of ``(seed,
  position)``, or :class:`Skipped` with the error (runs in the workers)."""

  def __init__(self, source: Callable[[int], dict], augment: Augment | None, seed: int):
    self.source, self.augment, self.seed = source, augment, seed

  def __call__(self, item: tuple[int, int]):
    position, index = item
    try:
      example = self.source(index)
    except Exception as e:  # an unreadable file: the main process decides (SkipBad)
      name = getattr(self.source, "describe", lambda i: f"example {i}")(index)
      return Skipped(int(index), name, one_line(e))
    if self.augment is not None and self.augment.active:
      example = augment(example, np.random.default_rng([self.seed, position]), self.augment)
    return example


def prepare(source: Callable[[int], dict], index: int):
  """``source(index)``, or :class:`Skipped` naming what could not be read (in this process:
  what the training workers do for each example, for the validation pairs)."""
  return _Prepare(source, None, 0)((0, index))


class SkipBad:
  """The main process's filter: drops :class:`Skipped` examples with one warning per
  example, and stops the run once more than ``max_fraction`` of the ``total`` examples (or
  all of them) failed (``max_fraction=None``: never).

  Attributes:
    skipped: ``{index: Skipped}`` seen so far (each warned about once).
  """

  def __init__(self, total: int | None, max_fraction: float | None, manifest: str,
               log: Callable[[str], None] = print):
    self.total, self.max_fraction, self.manifest, self.log = total, max_fraction, manifest, log
    self.skipped: dict[int, Skipped] = {}

  def __call__(self, example) -> bool:
    if not isinstance(example, Skipped):
      return True
    if example.index not in self.skipped:
      self.skipped[example.index] = example
      self.log(f"warning: skipping {example.name}: {example.reason}")
      self.check()
    return False

  def check(self) -> None:
    """Raise :class:`InputError` when too many examples failed."""
    bad = len(self.skipped)
    total = self.total
    if total is None or self.max_fraction is None or (bad <= self.max_fraction * total
                                                       and bad < total):
      return
    first = next(iter(self.skipped.values()))
    raise InputError(f"{self.manifest}: {bad} of {total} pairs could not be read, more than "
                     f"data.max_bad_fraction={self.max_fraction} (first: {first.name}: "
                     f"{first.reason})")


def _stack(examples) -> dict[str, np.ndarray]:
  keys = examples[0].keys()
  for e in examples[1:]:
    if e.keys() != keys:
      raise InputError(f"examples of one batch hold different arrays ({sorted(keys)} and "
                       f"{sorted(e.keys())}): give every pair the same optional files")
  return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in keys}


class Batches:
  """An iterator of batches (dicts of ``[batch, ...]`` numpy arrays) whose position
  :meth:`get_state` / :meth:`set_state` save and restore (``grain.checkpoint`` saves it in
  an Orbax checkpoint); :attr:`skipped` the examples dropped so far.
  """

  def __init__(self, iterator, skip: SkipBad, workers: int = 0):
    self._it, self._skip, self._workers = iterator, skip, workers

  @property
  def skipped(self) -> dict[int, Skipped]:
    return self._skip.skipped

  @property
  def iterator(self) -> grain.DatasetIterator:
    """The Grain iterator (what ``grain.checkpoint.CheckpointSave`` takes)."""
    return self._it

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    """The next batch.

    Raises:
      InputError: too many unreadable examples, or a worker process that could not start or
        died (the message names ``data.workers``).
    """
    try:
      return next(self._it)
    except (InputError, StopIteration):
      raise
    except Exception as e:
      if not self._workers:
        raise
      raise InputError(f"data.workers={self._workers}: a data worker process could not start "
                       f"or died ({one_line(e)}); try fewer workers, or 0") from e

  def get_state(self) -> dict[str, Any]:
    return self._it.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._it.set_state(state)

  def close(self) -> None:
    """Stop the workers and free what the pipeline holds (also its iterators' threads, now
    rather than at interpreter exit, when Grain's clean-up finds its modules gone)."""
    close = getattr(self._it, "close", None)
    if close is not None:
      close()
      import gc
      self._it = iter(())
      gc.collect()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class _DieWithParent:
  """A worker's start (Grain's ``worker_init_fn``): on Linux the kernel kills the worker
  when the training process dies, even by SIGKILL, so no worker outlives a killed run
  (they would block on a full queue forever, holding their memory)."""

  def __init__(self, parent: int):
    self.parent = parent

  def __call__(self, *_) -> None:
    import os
    import signal
    if not sys.platform.startswith("linux"):
      return
    import ctypes
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != self.parent:  # the parent died before the request took effect
      os._exit(1)


def _quiet_resource_tracker() -> None:
  """Grain moves examples through shared memory and, when a pipeline stops, leaves the blocks
  of the examples still in flight to Python's resource tracker, which unlinks them at exit
  and warns of "leaked shared_memory objects" (nothing outlives the run). The tracker is a
  process started with this interpreter's warning options (``sys.warnoptions``) when the
  first worker starts: give it one that keeps that notice out of a user's terminal."""
  option = "ignore:resource_tracker:UserWarning"
  if option not in sys.warnoptions:
    sys.warnoptions.append(option)


def _absl_flags_parsed() -> None:
  """Grain 0.2.18's worker start reads an absl flag directly, which raises
  ``UnparsedFlagAccessError`` in a program that never parsed absl flags (any but an absl
  app): mark them parsed, at their defaults, unless the program parsed them itself."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def batches(source: Callable[[int], dict], batch_size: int, *, num_examples: int | None,
            seed: int = 0, shuffle: bool = True, workers: int = 0, buffer: int = 2,
            shard: tuple[int, int] = (0, 1), augment: Augment | None = None,
            max_bad_fraction: float = 0.1,
            manifest: str = "the training data", log: Callable[[str], None] = print
            ) -> Batches:
  """Endless batches of ``source``'s examples (see the module docstring).

  Args:
    source: a picklable ``index -> dict[str, np.ndarray]`` (numpy only when ``workers``);
      may have ``describe(index) -> str`` naming the example's files for warnings.
    batch_size: examples per batch of this host.
    num_examples: size of a finite source, or None for an endless one.
    seed: the order's seed.
    shuffle: a new permutation each epoch (finite sources).
    workers: processes preparing examples (0: in this process, when a batch is asked for).
    buffer: examples each worker prepares ahead.
    shard: ``(index, count)`` of this host in a multi-process run.
    augment: random changes to each example (:func:`jaxreg.data.examples.augment`), drawn
      from ``(seed, global position)``: the same on a resumed run.
    max_bad_fraction: stop (``InputError``) once more than this fraction of the
      ``num_examples`` could not be read.
    manifest: how to name the data in messages (e.g. the CSV file).
    log: where the warnings go.

  Raises:
    ValueError: a bad ``batch_size``, ``shard`` or ``workers``.
  """
  if workers < 0:
    raise ValueError(f"data.workers must be >= 0, got {workers}")
  if num_examples is not None and num_examples < batch_size:
    raise ValueError(f"num_examples={num_examples} is smaller than batch_size={batch_size}")
  ds = host_order(num_examples, batch_size, seed=seed, shuffle=shuffle, shard=shard)
  # One reading thread per worker process (none without workers: an example is prepared
  # when a batch is asked for); Grain's default, 16 threads and 500 elements ahead, suits
  # small records, not 100 MB CT pairs.
  read = grain.ReadOptions(num_threads=1 if workers else 0, prefetch_buffer_size=max(1, buffer))
  ds = ds.map(_Prepare(source, augment, seed)).to_iter_dataset(read)
  if workers:
    _absl_flags_parsed()
    _quiet_resource_tracker()
    import os
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=max(1, buffer)),
                        worker_init_fn=_DieWithParent(os.getpid()))
  skip = SkipBad(num_examples, max_bad_fraction, manifest, log)
  ds = ds.filter(skip).batch(batch_size, batch_fn=_stack)
  return Batches(iter(ds), skip, workers)
