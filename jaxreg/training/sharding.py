"""The device mesh and how arrays are laid out on it (data parallel over ``data``)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["make_mesh", "batch_sharding", "replicated", "check_batch_size", "global_batch"]


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh with axis ``data`` over ``devices`` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``data``, the rest whole."""
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device (params, optimiser state, metrics)."""
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """Raise ``ValueError`` unless the global batch splits evenly over the mesh."""
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(
        f"batch size {batch_size} is not divisible by the {n} devices of the mesh; use a "
        f"multiple of {n} (config.train.batch_size)")


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble the global batch from this process's examples.

  With one process, ``local`` is the whole batch. With several, each process
  passes its own consecutive share and the result is one global array per key
  (``jax.make_array_from_process_local_data``), sharded over ``data``.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}
