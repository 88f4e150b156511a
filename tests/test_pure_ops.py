"""Every public operator of warp, fields, decompose and losses is a pure function of arrays.

One table lists each op with small inputs; each is run eagerly and under ``jax.jit``,
``jax.vmap`` (against a Python loop over the samples), ``jax.checkpoint`` (value and
gradient against the plain op), ``jax.grad`` (against central finite differences in
float64) and, where meaningful, with bfloat16 inputs (against the float32 op on the same
rounded inputs). A coverage test fails when a module exports an op the table lacks.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxreg.ops import decompose
from jaxreg.ops import fields
from jaxreg.ops import losses
from jaxreg.ops import warp

S = (6, 5, 4)  # one small grid for every op: compilation, not arithmetic, is the cost here


class Op(NamedTuple):
  name: str
  fn: Callable  # positional array arguments -> an array or a pytree of arrays
  inputs: Callable[[np.random.Generator], tuple]
  grad_args: tuple = (0,)  # arguments to differentiate; () when the op is not differentiable
  bf16_args: tuple = (0,)  # arguments that may be bfloat16; () when that is not meaningful


def img(rng, shape=S):
  return rng.random(shape).astype(np.float32)


def off_grid(rng, shape=S):
  """A field whose sample points lie between voxel centres (trilinear is smooth there)."""
  return rng.uniform(0.2, 0.8, shape + (3,)).astype(np.float32)


def small(rng, shape=S, scale=0.3):
  return (scale * rng.standard_normal(shape + (3,))).astype(np.float32)


def probs(rng, shape=S, classes=3):
  p = rng.random(shape + (classes,)).astype(np.float32) + 0.1
  return p / p.sum(-1, keepdims=True)


OPS = [
    # warp
    Op("warp.sample", lambda im, c: warp.sample(im, c),
       lambda r: (img(r), (np.indices(S).transpose(1, 2, 3, 0)[:3] + off_grid(r)[:3]).astype(
           np.float32)), grad_args=(0, 1)),
    Op("warp.warp", lambda im, u: warp.warp(im, u), lambda r: (img(r), off_grid(r)),
       grad_args=(0, 1)),
    Op("warp.warp[border,channels]", lambda im, u: warp.warp(im, u, padding="border"),
       lambda r: (probs(r), off_grid(r)), grad_args=(0, 1)),
    Op("warp.warp[nearest]", lambda lab, u: warp.warp(lab, u, order=0),
       lambda r: (r.integers(0, 4, S).astype(np.int32), off_grid(r)), grad_args=(), bf16_args=()),
    Op("warp.warp_batch", lambda im, u: warp.warp_batch(im, u),
       lambda r: (img(r, (2,) + S), off_grid(r, (2,) + S)), grad_args=(0, 1)),
    # fields
    Op("fields.compose", lambda u, v: fields.compose(u, v),
       lambda r: (small(r), off_grid(r)), grad_args=(0, 1), bf16_args=(0,)),
    Op("fields.compose_batch", lambda u, v: fields.compose_batch(u, v),
       lambda r: (small(r, (2,) + S), off_grid(r, (2,) + S)), grad_args=(0, 1), bf16_args=(0,)),
    Op("fields.integrate", lambda v: fields.integrate(v, steps=4), lambda r: (small(r),)),
    Op("fields.integrate_batch", lambda v: fields.integrate_batch(v, steps=4),
       lambda r: (small(r, (2,) + S),)),
    Op("fields.invert", lambda u: fields.invert(u, iterations=20),
       lambda r: (small(r, scale=0.1),), grad_args=()),  # a while_loop: not reverse-mode
    Op("fields.resize", lambda u: fields.resize(u, (9, 7, 5)), lambda r: (small(r),)),
    Op("fields.jacobian_determinant", fields.jacobian_determinant, lambda r: (small(r),)),
    Op("fields.jacobian_determinant_batch", fields.jacobian_determinant_batch,
       lambda r: (small(r, (2,) + S),)),
    # decompose
    Op("decompose.compose_all", lambda a, b: decompose.compose_all([a, b]),
       lambda r: (small(r, (3, 3, 2)), small(r)), grad_args=(0, 1), bf16_args=(0,)),
    Op("decompose.sum_all", lambda a, b: decompose.sum_all([a, b]),
       lambda r: (small(r, (3, 3, 2)), small(r)), grad_args=(0, 1), bf16_args=(0, 1)),
    Op("decompose.compose_all_svf", lambda a, b: decompose.compose_all_svf([a, b], steps=3),
       lambda r: (small(r, (3, 3, 2)), small(r)), grad_args=(0, 1)),
    Op("decompose.combine", lambda a, b: decompose.combine([a, b], "compose"),
       lambda r: (small(r, (3, 3, 2)), small(r)), grad_args=(0, 1)),
    Op("decompose.combine_batch", lambda a, b: decompose.combine_batch([a, b], "svf", steps=3),
       lambda r: (small(r, (2, 3, 3, 2)), small(r, (2,) + S)), grad_args=(0, 1)),
    # losses
    Op("losses.box_sum", lambda x: losses.box_sum(x, 3), lambda r: (img(r),)),
    Op("losses.local_ncc", lambda f, w: losses.local_ncc(f, w, window=3),
       lambda r: (img(r), img(r)), grad_args=(0, 1), bf16_args=(0, 1)),
    Op("losses.local_ncc_map", lambda f, w: losses.local_ncc_map(f, w, window=3),
       lambda r: (img(r), img(r)), grad_args=(1,), bf16_args=(0, 1)),
    Op("losses.fixed_box_stats", lambda f: losses.fixed_box_stats(f, 3), lambda r: (img(r),)),
    Op("losses.global_ncc", losses.global_ncc, lambda r: (img(r), img(r)), grad_args=(0, 1),
       bf16_args=(0, 1)),
    Op("losses.mse", losses.mse, lambda r: (img(r), img(r)), grad_args=(0, 1), bf16_args=(0, 1)),
    Op("losses.diffusion", losses.diffusion, lambda r: (small(r),)),
    Op("losses.diffusion_gradient", losses.diffusion_gradient, lambda r: (small(r),)),
    Op("losses.bending_energy", losses.bending_energy, lambda r: (small(r),)),
    Op("losses.soft_dice", losses.soft_dice, lambda r: (probs(r), probs(r)), grad_args=(0, 1),
       bf16_args=(0, 1)),
    Op("losses.folding", lambda u: losses.folding(u, margin=1.0), lambda r: (small(r),)),
    Op("losses.mind_ssc", lambda x: losses.mind_ssc(x, dilation=1), lambda r: (img(r),)),
    Op("losses.mind_ssd", losses.mind_ssd, lambda r: (probs(r), probs(r)), grad_args=(0, 1),
       bf16_args=(0, 1)),
]
BY_NAME = {op.name: op for op in OPS}

# Exported names that are not array operators, and why.
NOT_OPS = {
    "warp.PADDINGS": "a tuple of names", "decompose.METHODS": "a tuple of names",
    "warp.IMPLEMENTATIONS": "a tuple of names",
    "losses.box_counts": "takes a shape, not arrays (a constant of the grid)",
    **{f"losses.{n}": "the loss registry" for n in (
        "register_similarity", "register_regulariser", "get_similarity", "get_regulariser",
        "similarity_names", "regulariser_names")},
}


def _inputs(op, seed=0):
  return op.inputs(np.random.default_rng(seed))


def _close(a, b, rtol=1e-5, atol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float64),
                                                      np.asarray(y, np.float64),
                                                      rtol=rtol, atol=atol), a, b)


def _scalarise(fn):
  """``sum(fn(...) * w)`` with fixed random weights per output leaf: every output counts."""
  def scalar(*args):
    out = fn(*args)
    leaves = jax.tree.leaves(out)
    rng = np.random.default_rng(7)
    return sum(jnp.sum(leaf * rng.standard_normal(leaf.shape).astype(leaf.dtype))
               for leaf in leaves)
  return scalar


def test_every_exported_op_is_in_the_table():
  exported = {f"{m.__name__.split('.')[-1]}.{n}" for m in (warp, fields, decompose, losses)
              for n in m.__all__}
  covered = {name.split("[")[0] for name in BY_NAME} | set(NOT_OPS)
  assert exported <= covered, f"add these to OPS in {__file__}: {sorted(exported - covered)}"
  assert covered - set(NOT_OPS) <= exported  # and the table names no op that is gone


@pytest.mark.parametrize("name", list(BY_NAME))
def test_jit_equals_eager(name):
  op = BY_NAME[name]
  args = _inputs(op)
  _close(jax.jit(op.fn)(*args), op.fn(*args))


@pytest.mark.parametrize("name", list(BY_NAME))
def test_vmap_equals_a_loop_over_samples(name):
  op = BY_NAME[name]
  a, b = _inputs(op, 0), _inputs(op, 1)
  stacked = [np.stack([x, y]) for x, y in zip(a, b)]
  out = jax.vmap(op.fn)(*stacked)
  _close(jax.tree.map(lambda leaf: leaf[0], out), op.fn(*a))
  _close(jax.tree.map(lambda leaf: leaf[1], out), op.fn(*b))


@pytest.mark.parametrize("name", list(BY_NAME))
def test_checkpoint_keeps_value_and_gradient(name):
  op = BY_NAME[name]
  args = _inputs(op)
  _close(jax.checkpoint(op.fn)(*args), op.fn(*args))
  if op.grad_args:
    scalar = _scalarise(op.fn)
    grads = jax.grad(jax.checkpoint(scalar), argnums=op.grad_args)(*args)
    _close(grads, jax.grad(scalar, argnums=op.grad_args)(*args), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", [op.name for op in OPS if op.grad_args])
def test_gradient_matches_finite_differences(name):
  op = BY_NAME[name]
  args = _inputs(op)
  with jax.enable_x64(True):
    args64 = [jnp.asarray(x, jnp.float64) for x in args]
    for i in op.grad_args:
      def of_one(x, i=i):
        return _scalarise(op.fn)(*[x if j == i else a for j, a in enumerate(args64)])
      check_grads(of_one, (args64[i],), order=1, modes=["rev"], eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", [op.name for op in OPS if op.bf16_args])
def test_bfloat16_inputs_run_and_agree_with_float32(name):
  op = BY_NAME[name]
  args = _inputs(op)
  low = [jnp.asarray(x, jnp.bfloat16) if i in op.bf16_args else x for i, x in enumerate(args)]
  rounded = [np.asarray(x, np.float32) for x in low]  # the same values, in float32
  out, ref = jax.jit(op.fn)(*low), op.fn(*rounded)
  for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    assert jnp.issubdtype(o.dtype, jnp.floating) and np.all(np.isfinite(np.asarray(o, np.float32)))
    scale = max(float(np.max(np.abs(np.asarray(r)))), 1e-3)
    np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(r), atol=0.03 * scale)
  if op.grad_args:  # and the gradient with respect to the bfloat16 inputs exists, finite
    grads = jax.grad(_scalarise(op.fn), argnums=op.bf16_args)(*low)
    assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)
