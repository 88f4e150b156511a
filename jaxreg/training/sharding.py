"""The training mesh and how arrays are laid out on it (:mod:`jaxreg.ops.sharding`).

The batch ``[B, X, Y, Z]`` is split over ``data`` (examples) and ``space`` (X);
the train state is replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxreg.ops import sharding as _mesh
from jaxreg.ops.sharding import replicated

__all__ = ["make_mesh", "batch_sharding", "replicated", "check_batch_size", "global_batch"]


def make_mesh(devices=None, *, data: int = 0, space: int = 1) -> Mesh:
  """A ``("data", "space")`` mesh over ``devices`` (default: all devices of all processes,
  all on ``data``); see :func:`jaxreg.ops.sharding.make_mesh`."""
  return _mesh.make_mesh(devices, data=data, space=space)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch axis split over ``data``, the first spatial axis over ``space``, the rest whole."""
  return _mesh.volume_sharding(mesh)


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """Raise ``ValueError`` unless the global batch splits evenly over ``data``."""
  n = int(mesh.shape["data"])
  if batch_size % n:
    raise ValueError(
        f"batch size {batch_size} is not divisible by the {n} devices of the mesh's data "
        f"axis; use a multiple of {n} (config.train.batch_size)")


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble the global batch from this process's examples.

  With one process, ``local`` is the whole batch. With several, each process
  passes its own consecutive share of examples, whole in space (each ``space``
  group lies inside one process), and the result is one global array per key
  (``jax.make_array_from_process_local_data``).
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}
