"""jaxreg: learned deformable CT registration in JAX (a TotalRegistrator reimplementation).

The operators are pure JAX functions at the top level, like optax's::

  import jaxreg
  warped = jaxreg.warp(moving, u)          # moving(x + u(x)), u in voxels [X, Y, Z, 3]
  total = jaxreg.compose(u, v)             # apply v, then u
  loss = -jaxreg.losses.local_ncc(fixed, warped) + jaxreg.losses.diffusion(u)

Subpackages, grouped by role (each imports only the ones below it):

* :mod:`jaxreg.ops` -- pure, differentiable operators: grid, warp (and its C++ kernel),
  fields, decompose, losses, points, optim, sharding.
* :mod:`jaxreg.nn` -- the network: model, conv formulations, inputs.
* :mod:`jaxreg.io` -- images in and out, atomic writes, resampling to one grid, weights.
* :mod:`jaxreg.data` -- manifests, the demo CT, synthetic pairs, the loader.
* :mod:`jaxreg.metrics` -- Dice, HD95, TRE, SDlogJ, folding.
* :mod:`jaxreg.pipeline` -- the register pipeline: affine, network, refinement, outputs.
* :mod:`jaxreg.eval` -- evaluating methods; the elastix and demons baselines.
* :mod:`jaxreg.training` -- train state, step, checkpoints, loop.
* :mod:`jaxreg.types` -- ``InputError``, ``Volume``, ``Grid``.

Every name here is imported on first use, so ``import jaxreg`` costs little more than
``import jax``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"

# name -> (module, attribute); attribute None: the module itself.
_LAZY = {
    "warp": ("jaxreg.ops.warp", "warp"),
    "warp_batch": ("jaxreg.ops.warp", "warp_batch"),
    "sample": ("jaxreg.ops.warp", "sample"),
    "compose": ("jaxreg.ops.fields", "compose"),
    "invert": ("jaxreg.ops.fields", "invert"),
    "integrate": ("jaxreg.ops.fields", "integrate"),
    "resize": ("jaxreg.ops.fields", "resize"),
    "jacobian_determinant": ("jaxreg.ops.fields", "jacobian_determinant"),
    "combine": ("jaxreg.ops.decompose", "combine"),
    "compose_all": ("jaxreg.ops.decompose", "compose_all"),
    "compose_all_svf": ("jaxreg.ops.decompose", "compose_all_svf"),
    "sum_all": ("jaxreg.ops.decompose", "sum_all"),
    "identity_grid": ("jaxreg.ops.grid", "identity_grid"),
    "transform_points": ("jaxreg.ops.points", "transform_points"),
    "apply": ("jaxreg.pipeline.apply", "apply"),
    "map_points": ("jaxreg.pipeline.apply", "map_points"),
    "load_kernel": ("jaxreg.ops.warp_kernel", "load"),
    "InputError": ("jaxreg.types", "InputError"),
    "Volume": ("jaxreg.types", "Volume"),
    "Grid": ("jaxreg.types", "Grid"),
    "losses": ("jaxreg.ops.losses", None),
    "ops": ("jaxreg.ops", None),
    "nn": ("jaxreg.nn", None),
    "io": ("jaxreg.io", None),
    "data": ("jaxreg.data", None),
    "metrics": ("jaxreg.metrics", None),
    "pipeline": ("jaxreg.pipeline", None),
    "eval": ("jaxreg.eval", None),
    "training": ("jaxreg.training", None),
    "types": ("jaxreg.types", None),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
  try:
    module, attribute = _LAZY[name]
  except KeyError:
    raise AttributeError(f"module 'jaxreg' has no attribute {name!r}") from None
  value = importlib.import_module(module)
  if attribute is not None:
    value = getattr(value, attribute)
  globals()[name] = value  # later look-ups skip __getattr__
  return value


def __dir__():
  return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # static tools (type checkers, IDEs) see the names directly
  from jaxreg import data, eval, io, metrics, nn, ops, pipeline, training, types  # noqa: F401
  from jaxreg.ops import losses  # noqa: F401
  from jaxreg.ops.decompose import combine, compose_all, compose_all_svf, sum_all  # noqa: F401
  from jaxreg.ops.fields import compose, integrate, invert, jacobian_determinant, resize  # noqa: F401
  from jaxreg.ops.grid import identity_grid  # noqa: F401
  from jaxreg.ops.points import transform_points  # noqa: F401
  from jaxreg.ops.warp import sample, warp, warp_batch  # noqa: F401
  from jaxreg.ops.warp_kernel import load as load_kernel  # noqa: F401
  from jaxreg.pipeline.apply import apply, map_points  # noqa: F401
  from jaxreg.types import Grid, InputError, Volume  # noqa: F401
