"""Operations on dense displacement fields.

A field is ``[X, Y, Z, 3]``, in **voxels** of its own grid, component ``i``
along array axis ``i``. It stands for the point map ``x -> x + u(x)`` and warps
images by pull-back (see :mod:`jaxreg.ops.warp`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg.ops import warp as _warp

__all__ = [
    "compose",
    "compose_batch",
    "integrate",
    "integrate_batch",
    "invert",
    "resize",
    "jacobian_determinant",
    "jacobian_determinant_batch",
]


def check_field(u, name: str = "disp") -> None:
  """Raise ``ValueError`` unless ``u`` has shape ``[X, Y, Z, 3]``."""
  if np.ndim(u) != 4 or np.shape(u)[-1] != 3:
    raise ValueError(f"{name} must be a [X, Y, Z, 3] displacement field, got shape {np.shape(u)}")


def compose(u: jax.Array, v: jax.Array, *, padding: str = "border",
            implementation: str | None = None) -> jax.Array:
  """Displacement of "apply ``v``, then ``u``": ``w(x) = v(x) + u(x + v(x))``.

  The point map is ``(id + u) o (id + v)``, so warping an image with ``w``
  equals warping it with ``u`` and then warping the result with ``v``:
  ``warp(warp(img, u), v) == warp(img, compose(u, v))`` (pull-back).

  Args:
    u: ``[X, Y, Z, 3]`` displacement in voxels, applied second (sampled at the
      displaced points ``x + v(x)``).
    v: ``[X, Y, Z, 3]`` displacement in voxels, applied first.
    padding: how ``u`` is extended outside its grid; ``"border"`` (default)
      repeats the edge displacement, ``"constant"`` uses zero.
    implementation: the warp's (``None``, ``"xla"``, ``"ffi"``; see :mod:`jaxreg.ops.warp`).

  Returns:
    ``[X, Y, Z, 3]`` composed displacement in voxels.
  """
  check_field(u, "u")
  check_field(v, "v")
  if np.shape(u) != np.shape(v):
    raise ValueError(f"u and v must share a grid, got u {np.shape(u)} and v {np.shape(v)}")
  return v + _warp.warp(u, v, order=1, padding=padding, implementation=implementation)


def compose_batch(u: jax.Array, v: jax.Array, *, padding: str = "border",
                  implementation: str | None = None) -> jax.Array:
  """:func:`compose` over a leading batch axis: ``[B, X, Y, Z, 3]`` each."""
  if np.ndim(u) != 5 or np.ndim(v) != 5:
    raise ValueError(f"compose_batch needs [B, X, Y, Z, 3] fields, got {np.shape(u)} and {np.shape(v)}")
  return jax.vmap(functools.partial(compose, padding=padding, implementation=implementation))(u, v)


def integrate(velocity: jax.Array, steps: int = 7, *,
              implementation: str | None = None) -> jax.Array:
  """Scaling and squaring: the displacement of ``exp(velocity)``.

  ``u_0 = velocity / 2**steps`` and ``u_{k+1} = compose(u_k, u_k)``, run as a
  ``lax.scan`` whose body is rematerialised (``jax.checkpoint``), so the
  backward pass stores one field per step instead of every intermediate.

  Args:
    velocity: ``[X, Y, Z, 3]`` stationary velocity field in voxels.
    steps: number of squarings (>= 0).
    implementation: the warp's (``None``, ``"xla"``, ``"ffi"``; see :mod:`jaxreg.ops.warp`).

  Returns:
    ``[X, Y, Z, 3]`` displacement in voxels.

  References:
    Arsigny et al., `A Log-Euclidean Framework for Statistics on
    Diffeomorphisms <https://doi.org/10.1007/11866565_113>`_, MICCAI 2006.
  """
  check_field(velocity, "velocity")
  if not isinstance(steps, (int, np.integer)) or steps < 0:
    raise ValueError(f"steps must be a non-negative int, got {steps!r}")
  u = velocity / (2.0 ** steps)

  @jax.checkpoint
  def square(u, _):
    return compose(u, u, implementation=implementation), None

  u, _ = jax.lax.scan(square, u, None, length=int(steps))
  return u


def integrate_batch(velocity: jax.Array, steps: int = 7, *,
                    implementation: str | None = None) -> jax.Array:
  """:func:`integrate` over a leading batch axis: ``[B, X, Y, Z, 3]``."""
  if np.ndim(velocity) != 5:
    raise ValueError(f"integrate_batch needs [B, X, Y, Z, 3], got {np.shape(velocity)}")
  return jax.vmap(functools.partial(integrate, steps=steps, implementation=implementation))(velocity)


def _max_norm(r):
  return jnp.max(jnp.linalg.norm(r, axis=-1))


@functools.partial(jax.jit, static_argnames=("iterations", "implementation"))
def _invert(u, iterations, tol, implementation):
  def residual(v):  # v(x) + u(x + v(x)): zero for the exact inverse
    return compose(u, v, implementation=implementation)

  def cond(state):
    k, _, r = state
    return (k < iterations) & (_max_norm(r) > tol)

  def body(state):
    k, v, r = state
    v = v - r  # = -u(x + v(x)), the fixed-point update
    return k + 1, v, residual(v)

  v0 = -u
  k, v, r = jax.lax.while_loop(cond, body, (jnp.int32(0), v0, residual(v0)))
  err = _max_norm(r)
  return v, err, k


def invert(disp: jax.Array, *, iterations: int = 100, tol: float = 1e-3,
           return_info: bool = False, implementation: str | None = None):
  """Inverse of a displacement field by fixed-point iteration.

  Finds ``v`` with ``x + v(x) = y`` where ``y + u(y) = x``, i.e. ``compose(u, v)
  = v(x) + u(x + v(x)) = 0``, by iterating ``v <- -u(x + v(x))`` from
  ``v = -u``. The iteration is a contraction (and converges) where ``u`` is
  smooth enough that ``|grad u| < 1``, i.e. the map is diffeomorphic with
  moderate strain; near folds it does not converge.

  Convergence criterion: it stops when the largest inverse-consistency residual
  ``max_x |compose(u, v)(x)|`` falls below ``tol`` voxels, or after
  ``iterations`` updates (check ``return_info`` to know which). ``u`` is
  extended beyond its grid by its border values, so near borders where ``x + v(x)``
  leaves the grid the inverse is that of the border-extended field.

  Args:
    disp: ``[X, Y, Z, 3]`` displacement ``u`` in voxels.
    iterations: most fixed-point updates (a ``lax.while_loop``; jit-able, not
      reverse-mode differentiable).
    tol: residual bound, voxels.
    return_info: also return ``(max residual in voxels, iterations run)``.
    implementation: the warp's (``None``, ``"xla"``, ``"ffi"``; see :mod:`jaxreg.ops.warp`).

  Returns:
    ``[X, Y, Z, 3]`` inverse displacement ``v`` in voxels (same grid), or
    ``(v, residual, iterations)`` with ``return_info``.

  Examples:
    >>> import numpy as np
    >>> u = np.full((4, 4, 4, 3), 0.5, np.float32)  # a translation
    >>> float(invert(u)[1, 2, 1, 0])
    -0.5
  """
  check_field(disp)
  v, err, k = _invert(jnp.asarray(disp), int(iterations), float(tol), implementation)
  return (v, err, k) if return_info else v


def _linear_axis(x: jax.Array, axis: int, n_new: int, align_corners: bool) -> jax.Array:
  """Linear interpolation of ``x`` along ``axis`` to ``n_new`` samples."""
  n_old = x.shape[axis]
  if n_old == n_new:
    return x
  i = jnp.arange(n_new, dtype=jnp.float32)
  if align_corners:
    pos = i * ((n_old - 1) / (n_new - 1)) if n_new > 1 else jnp.zeros_like(i)
  else:
    pos = (i + 0.5) * (n_old / n_new) - 0.5
  pos = jnp.clip(pos, 0.0, n_old - 1)
  lo = jnp.floor(pos).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, n_old - 1)
  t = (pos - lo).astype(x.dtype)
  bshape = [1] * x.ndim
  bshape[axis] = n_new
  t = t.reshape(bshape)
  return jnp.take(x, lo, axis=axis) * (1 - t) + jnp.take(x, hi, axis=axis) * t


def resize(disp: jax.Array, shape: Sequence[int], *, align_corners: bool = True) -> jax.Array:
  """Resample a displacement field to another grid over the same extent.

  Values are interpolated linearly (separably, per axis) and each component is
  rescaled to voxels of the new grid, so the physical displacement is kept.

  * ``align_corners=True`` (default): the first and last voxel centres of
    both grids coincide; new voxel ``i`` sits at old position
    ``i * (n_old - 1) / (n_new - 1)`` and component ``d`` is multiplied by
    ``(n_new_d - 1) / (n_old_d - 1)``. An affine field stays exactly affine.
  * ``align_corners=False``: the grids' outer voxel faces coincide (voxel
    centres at ``(i + 0.5) * n_old / n_new - 0.5``, clamped at the border),
    components scale by ``n_new / n_old``. This is ``jax.image.resize``'s
    geometry, without anti-aliasing.

  Args:
    disp: ``[X, Y, Z, 3]`` displacement in voxels of its grid.
    shape: target grid ``(X', Y', Z')``.
    align_corners: grid alignment rule (above).

  Returns:
    ``[X', Y', Z', 3]`` displacement in voxels of the target grid.
  """
  check_field(disp)
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"shape must be 3 positive ints, got {shape}")
  old = disp.shape[:3]
  out = disp
  for axis, n in enumerate(shape):
    out = _linear_axis(out, axis, n, align_corners)
  if align_corners:
    scale = [(n - 1) / (o - 1) if o > 1 and n > 1 else n / o for n, o in zip(shape, old)]
  else:
    scale = [n / o for n, o in zip(shape, old)]
  return out * jnp.asarray(scale, dtype=out.dtype)


def jacobian_determinant(disp: jax.Array) -> jax.Array:
  """Determinant of the Jacobian of the map ``x -> x + u(x)``.

  ``det(I + grad u)`` with derivatives by finite differences in voxels:
  second-order central differences in the interior, first-order one-sided
  differences on the border voxels (``numpy.gradient``'s rule). An axis of
  size 1 contributes a zero derivative. The determinant is unitless and equals
  that of the world-space map for any voxel-to-world affine.

  Args:
    disp: ``[X, Y, Z, 3]`` displacement in voxels.

  Returns:
    ``[X, Y, Z]`` determinants; ``<= 0`` marks folding.
  """
  check_field(disp)
  rows = []
  for i in range(3):  # component u_i
    row = []
    for j in range(3):  # derivative along axis j
      if disp.shape[j] > 1:
        d = jnp.gradient(disp[..., i], axis=j)
      else:
        d = jnp.zeros(disp.shape[:3], disp.dtype)
      row.append(d + (1.0 if i == j else 0.0))
    rows.append(row)
  (a, b, c), (d, e, f), (g, h, k) = rows
  return a * (e * k - f * h) - b * (d * k - f * g) + c * (d * h - e * g)


def jacobian_determinant_batch(disp: jax.Array) -> jax.Array:
  """:func:`jacobian_determinant` over a leading batch axis: ``[B, X, Y, Z, 3] -> [B, X, Y, Z]``."""
  if np.ndim(disp) != 5:
    raise ValueError(f"jacobian_determinant_batch needs [B, X, Y, Z, 3], got {np.shape(disp)}")
  return jax.vmap(jacobian_determinant)(disp)
