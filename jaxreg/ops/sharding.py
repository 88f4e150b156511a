"""The device mesh: ``data`` (the batch) x ``space`` (the first spatial axis X).

Volumes are ``[B, X, Y, Z, ...]``. On a mesh ``{"data": D, "space": S}`` the
batch is split over D groups of devices and, inside each group, X is split
over S devices, so one volume too large for a device is spread over S of them.
Parameters and optimiser state are replicated. XLA's SPMD partitioner splits
the convolutions along X and inserts the halo exchanges itself; the warp
gathers what it needs of the moving image; every loss is a global reduction,
so values do not depend on the mesh (up to float32 summation order).

Code that builds arrays inside ``jit`` calls :func:`spatial` on the large
intermediates (each UNet level, the composed field): a no-op without a mesh
in context or with ``space = 1``, a sharding constraint otherwise.
:func:`on_mesh` runs a function with the mesh in context.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxreg.types import InputError

__all__ = ["AXES", "make_mesh", "parse_mesh", "check_space", "space_size", "spatial",
           "on_mesh", "volume_sharding", "replicated", "put_volume", "mesh_config", "vmap", "inference_mesh", "context"]

AXES = ("data", "space")


def make_mesh(devices: Sequence | None = None, *, data: int = 0, space: int = 1) -> Mesh:
  """A ``("data", "space")`` mesh over ``devices`` (default: all devices of all processes).

  Args:
    devices: the devices to use.
    data: devices on the batch axis; 0 means all that ``space`` leaves
      (``len(devices) // space``).
    space: devices each volume's X axis is split over (consecutive devices, so
      a group stays inside one process when ``space`` <= local devices).

  Raises:
    InputError: the axes do not multiply to the device count, or are not positive.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  data, space = int(data), int(space)
  if space < 1 or data < 0:
    raise InputError(f"mesh: space must be >= 1 and data >= 0, got data={data}, space={space}")
  if data == 0:
    if n % space:
      raise InputError(f"mesh: space={space} does not divide the {n} device(s)")
    data = n // space
  if data * space != n:
    raise InputError(f"mesh: data={data} x space={space} = {data * space} devices, but "
                     f"{n} device(s) are in use; the axes must multiply to the device count")
  grid = np.asarray(devices, dtype=object).reshape(data, space)
  return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def parse_mesh(text: str) -> dict[str, int]:
  """``"data=2,space=4"`` or ``"2,4"`` -> ``{"data": 2, "space": 4}`` (a CLI flag's value).

  Raises:
    InputError: anything else.
  """
  parts = [p.strip() for p in str(text).split(",") if p.strip()]
  out = {"data": 0, "space": 1}
  pairs = [[s.strip() for s in p.split("=", 1)] for p in parts if "=" in p]
  for key, _ in pairs:
    if key not in AXES:
      raise InputError(f"mesh: unknown axis {key!r}; the axes are {', '.join(AXES)}")
  try:
    if parts and len(pairs) == len(parts):
      for key, value in pairs:
        out[key] = int(value)
    elif len(parts) == 2:
      out = {"data": int(parts[0]), "space": int(parts[1])}
    else:
      raise ValueError
  except ValueError:
    raise InputError(f"mesh: expected 'data=D,space=S' or 'D,S', got {text!r}") from None
  return out


def check_space(shape: Sequence[int], space: int, what: str = "the volume") -> None:
  """Raise ``InputError`` unless ``space`` divides the first spatial axis of ``shape``."""
  if space > 1 and int(shape[0]) % space:
    raise InputError(f"mesh: space={space} does not divide the first axis of {what} "
                     f"{tuple(int(s) for s in shape)}; use a shape whose X is a multiple "
                     f"of {space}")


def space_size(mesh: Mesh | None = None) -> int:
  """Devices on the ``space`` axis of ``mesh`` (default: the mesh in context; 1 if none)."""
  m = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if m is None or m.empty or "space" not in m.axis_names:
    return 1
  return int(dict(zip(m.axis_names, m.axis_sizes))["space"])


def spatial(x: jax.Array, *, batched: bool = True) -> jax.Array:
  """``x`` constrained to be split along X over ``space`` (and its batch over ``data``).

  ``x``: ``[B, X, ...]`` (``batched``) or ``[X, ...]``. A no-op outside a mesh
  context, with ``space = 1``, or when X (or B) does not divide evenly (the
  coarsest UNet levels: small, left to XLA).
  """
  m = jax.sharding.get_abstract_mesh()
  if m is None or m.empty or "space" not in m.axis_names:
    return x
  sizes = dict(zip(m.axis_names, m.axis_sizes))
  if sizes["space"] == 1 or x.shape[int(batched)] % sizes["space"]:
    return x
  if not batched:
    return jax.lax.with_sharding_constraint(x, P("space"))
  data = "data" if x.shape[0] % sizes.get("data", 1) == 0 else None
  return jax.lax.with_sharding_constraint(x, P(data, "space"))


def vmap(fn: Callable, batch_size: int) -> Callable:
  """``jax.vmap(fn)`` whose batch axis stays split over ``data`` inside, so that
  :func:`spatial` constraints in ``fn`` (on unbatched ``[X, ...]`` arrays) do not
  gather the batch. Plain ``jax.vmap`` outside a spatially sharded mesh."""
  m = jax.sharding.get_abstract_mesh()
  axis = None
  if space_size() > 1 and "data" in m.axis_names:
    data = int(dict(zip(m.axis_names, m.axis_sizes))["data"])
    axis = "data" if data > 1 and batch_size % data == 0 else None
  return jax.vmap(fn, spmd_axis_name=axis) if axis else jax.vmap(fn)


def on_mesh(fn: Callable, mesh: Mesh | None) -> Callable:
  """``fn`` traced with ``mesh`` in context (so :func:`spatial` applies); ``fn`` if None."""
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return wrapped


def volume_sharding(mesh: Mesh, batched: bool = True) -> NamedSharding:
  """``[B, X, ...]`` split over ``data`` and ``space`` (``[X, ...]`` over ``space``)."""
  return NamedSharding(mesh, P("data", "space") if batched else P("space"))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device (params, optimiser state, metrics)."""
  return NamedSharding(mesh, P())


def put_volume(x, mesh: Mesh | None, batched: bool = False) -> jax.Array:
  """``x`` on ``mesh``, split along X when ``space`` divides it, else replicated."""
  if mesh is None:
    return jax.device_put(x)  # (jnp.asarray of a numpy array compiles a copy program)
  space = space_size(mesh)
  axis = int(batched)
  if space > 1 and np.shape(x)[axis] % space == 0:
    return jax.device_put(x, volume_sharding(mesh, batched) if batched
                          else NamedSharding(mesh, P("space")))
  return jax.device_put(x, replicated(mesh))


def mesh_config(cfg: Mapping | None) -> dict[str, int]:
  """``config.mesh`` (or None) as ``{"data": D, "space": S}`` with the defaults filled in."""
  cfg = dict(cfg or {})
  unknown = set(cfg) - set(AXES)
  if unknown:
    raise InputError(f"mesh: unknown axis {sorted(unknown)[0]!r}; the axes are {', '.join(AXES)}")
  return {"data": int(cfg.get("data", 0)), "space": int(cfg.get("space", 1))}


def inference_mesh(text_or_axes, devices: Sequence | None = None) -> Mesh | None:
  """The mesh one registration runs on: ``"space=S"`` (or ``{"space": S}``) over the first
  ``S`` local devices; None (one device) for ``None`` / ``space=1``.

  Raises:
    InputError: a ``data`` axis other than 1 (one pair has no batch to split), or
      more devices than there are.
  """
  if text_or_axes is None:
    return None
  axes = parse_mesh(text_or_axes) if isinstance(text_or_axes, str) else mesh_config(text_or_axes)
  devices = list(jax.local_devices() if devices is None else devices)
  space = axes["space"]
  if axes["data"] not in (0, 1):
    raise InputError(f"mesh: one registration has no batch to split: use --mesh space=S "
                     f"(got data={axes['data']})")
  if space < 1 or space > len(devices):
    raise InputError(f"mesh: space={space} but {len(devices)} local device(s) exist")
  if space == 1:
    return None
  return make_mesh(devices[:space], data=1, space=space)


def context(mesh: Mesh | None):
  """``with context(mesh):`` jitted calls inside are traced and run on ``mesh`` (a no-op
  for None)."""
  import contextlib
  return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)
