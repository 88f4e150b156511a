"""Field decomposition: combine K sub-fields into one displacement.

The registration network predicts sub-fields ``u_1 .. u_K`` (coarse to fine,
possibly at coarser grids). The total transform is their sequential
composition

    phi = (id + u_1) o (id + u_2) o ... o (id + u_K),

so warping the moving image with ``u_1``, then warping the result with
``u_2``, ..., with ``u_K`` equals one warp with ``phi`` -- the image is deformed
little by little, coarse first. ``sum_all`` (plain sum, an ablation) and
``compose_all_svf`` (each sub-field a stationary velocity field, integrated by
scaling and squaring before composing) are the alternatives.

All operators are jitted pure functions of arrays in **voxels**; sub-fields on
coarser grids are first brought to the target grid with
:func:`jaxreg.ops.fields.resize` (which rescales their magnitudes).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np

from jaxreg.ops import fields as _fields
from jaxreg.ops import sharding as _mesh

__all__ = ["compose_all", "sum_all", "compose_all_svf", "combine", "combine_batch", "METHODS"]

METHODS = ("compose", "sum", "svf")


def _validate(fields: Sequence[jax.Array]) -> list[jax.Array]:
  if isinstance(fields, jax.Array | np.ndarray):
    raise ValueError(
        "fields must be a sequence of [X, Y, Z, 3] arrays (one per sub-field), "
        f"got a single array of shape {np.shape(fields)}")
  fields = list(fields)
  if not fields:
    raise ValueError("fields is empty: need at least one [X, Y, Z, 3] sub-field")
  for k, u in enumerate(fields):
    _fields.check_field(u, f"fields[{k}]")
  return fields


def _on_grid(fields: list[jax.Array], shape) -> list[jax.Array]:
  """Resize every field to ``shape`` (default: the largest grid among them)."""
  if shape is None:
    shape = max((tuple(u.shape[:3]) for u in fields), key=np.prod)
  shape = tuple(int(s) for s in shape)
  return [u if u.shape[:3] == shape else _mesh.spatial(_fields.resize(u, shape), batched=False)
          for u in fields]


def _compose_chain(fields: list[jax.Array], implementation: str | None) -> jax.Array:
  # Fold from the finest (last, applied first) field outwards, so that every
  # sub-field is interpolated exactly once, at exact points:
  # total <- compose(u_k, total) for k = K-1 .. 1.
  total = fields[-1]
  for u in reversed(fields[:-1]):
    total = _fields.compose(u, total, implementation=implementation)
  return total


@functools.partial(jax.jit, static_argnames=("shape", "implementation"))
def compose_all(fields: Sequence[jax.Array], shape: tuple[int, int, int] | None = None, *,
                implementation: str | None = None) -> jax.Array:
  """Sequential composition of sub-fields, coarse first.

  Args:
    fields: K arrays ``[X_k, Y_k, Z_k, 3]``, displacements in voxels of their
      own grids, ordered coarse to fine (``fields[0]`` is ``u_1``).
    shape: target grid ``(X, Y, Z)``; defaults to the largest sub-field grid.
    implementation: the warp's (``None``, ``"xla"``, ``"ffi"``; see :mod:`jaxreg.ops.warp`).

  Returns:
    ``[X, Y, Z, 3]`` displacement (voxels) of
    ``(id + u_1) o ... o (id + u_K)``: ``warp(img, result)`` equals warping
    ``img`` with ``u_1``, then with ``u_2``, ..., then with ``u_K``.
  """
  fields = _on_grid(_validate(fields), shape)
  return _compose_chain(fields, implementation)


@functools.partial(jax.jit, static_argnames=("shape",))
def sum_all(fields: Sequence[jax.Array], shape: tuple[int, int, int] | None = None) -> jax.Array:
  """Sum of sub-fields (the "no composition" ablation).

  Args:
    fields: K arrays ``[X_k, Y_k, Z_k, 3]`` in voxels of their own grids.
    shape: target grid; defaults to the largest sub-field grid.

  Returns:
    ``[X, Y, Z, 3]`` displacement in voxels, ``sum_k resize(u_k)``.
  """
  fields = _on_grid(_validate(fields), shape)
  return sum(fields[1:], fields[0])


@functools.partial(jax.jit, static_argnames=("shape", "steps", "implementation"))
def compose_all_svf(fields: Sequence[jax.Array], shape: tuple[int, int, int] | None = None,
                    steps: int = 7, *, implementation: str | None = None) -> jax.Array:
  """Diffeomorphic variant: integrate each sub-field, then compose, coarse first.

  Each velocity is integrated by scaling and squaring on its own grid (cheap
  for coarse sub-fields), then resized to the target grid and composed as in
  :func:`compose_all`.

  Args:
    fields: K stationary velocity fields ``[X_k, Y_k, Z_k, 3]`` in voxels.
    shape: target grid; defaults to the largest sub-field grid.
    steps: scaling-and-squaring steps per sub-field.
    implementation: the warp's (``None``, ``"xla"``, ``"ffi"``; see :mod:`jaxreg.ops.warp`).

  Returns:
    ``[X, Y, Z, 3]`` displacement in voxels of
    ``exp(v_1) o ... o exp(v_K)``.
  """
  displacements = [_fields.integrate(v, steps, implementation=implementation)
                   for v in _validate(fields)]
  return _compose_chain(_on_grid(displacements, shape), implementation)


def combine(fields: Sequence[jax.Array], method: str = "compose",
            shape: tuple[int, int, int] | None = None, steps: int = 7, *,
            implementation: str | None = None) -> jax.Array:
  """Dispatch on ``method`` in :data:`METHODS` (``compose``, ``sum``, ``svf``).

  This is what a config's ``decomposition`` field selects; arguments as in
  :func:`compose_all` (``steps`` is used by ``svf`` only; ``implementation`` is the
  warp's).
  """
  if method == "compose":
    return compose_all(fields, shape, implementation=implementation)
  if method == "sum":
    return sum_all(fields, shape)
  if method == "svf":
    return compose_all_svf(fields, shape, steps, implementation=implementation)
  raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def combine_batch(fields: Sequence[jax.Array], method: str = "compose",
                  shape: tuple[int, int, int] | None = None, steps: int = 7, *,
                  implementation: str | None = None) -> jax.Array:
  """:func:`combine` over a leading batch axis.

  Args:
    fields: K arrays ``[B, X_k, Y_k, Z_k, 3]`` in voxels.
    method: as in :func:`combine`.
    shape: as in :func:`combine`.
    steps: as in :func:`combine`.
    implementation: as in :func:`combine`.

  Returns:
    ``[B, X, Y, Z, 3]`` displacements in voxels.
  """
  fields = list(fields)
  if not fields or any(np.ndim(u) != 5 for u in fields):
    raise ValueError(
        "combine_batch needs K >= 1 fields of shape [B, X, Y, Z, 3], got "
        f"{[np.shape(u) for u in fields]}")
  if len({np.shape(u)[0] for u in fields}) != 1:
    raise ValueError(f"batch sizes differ: {[np.shape(u) for u in fields]}")
  one = lambda fs: combine(fs, method, shape, steps, implementation=implementation)
  return _mesh.vmap(one, np.shape(fields[0])[0])(fields)
