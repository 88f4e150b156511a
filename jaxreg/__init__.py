"""jaxreg: learned deformable CT registration in JAX (a TotalRegistrator reimplementation).

Modules, each one idea:

* :mod:`jaxreg.grid` -- identity grids, voxel <-> world maps, field units.
* :mod:`jaxreg.warp` -- the differentiable pull-back warp (``jaxreg.warp.warp``;
  the top-level name ``warp`` is this module).
* :mod:`jaxreg.fields` -- compose, integrate (scaling and squaring), resize,
  Jacobian determinant.
* :mod:`jaxreg.decompose` -- combine K sub-fields into one displacement.
* :mod:`jaxreg.io` -- NIfTI in/out, atomic writes, ITK displacement fields.
* :mod:`jaxreg.preprocess` -- the model grid, resampling, mapping back.
* :mod:`jaxreg.data` -- manifests, demo CT, synthetic pairs, the loader.
* :mod:`jaxreg.metrics` -- evaluation metrics.
* :mod:`jaxreg.points` -- map landmarks through a field (``transform_points``).
* :mod:`jaxreg.affine`, :mod:`jaxreg.refine` -- the affine stage; multi-resolution
  instance optimisation up to the image's resolution.
* :mod:`jaxreg.register`, :mod:`jaxreg.outputs`, :mod:`jaxreg.evaluation`,
  :mod:`jaxreg.report` -- the registration pipeline as stages, what it writes,
  evaluating methods, pictures (imported on demand).
* :mod:`jaxreg.elastix`, :mod:`jaxreg.demons` -- classical baselines.
* :mod:`jaxreg.compilation` -- the persistent compilation cache, counting compilations.
"""

__version__ = "0.1.0"

from jaxreg import data as data
from jaxreg import decompose as decompose
from jaxreg import fields as fields
from jaxreg import grid as grid
from jaxreg import io as io
from jaxreg import metrics as metrics
from jaxreg import points as points
from jaxreg import preprocess as preprocess
from jaxreg import warp as warp
from jaxreg.decompose import combine as combine
from jaxreg.decompose import compose_all as compose_all
from jaxreg.decompose import compose_all_svf as compose_all_svf
from jaxreg.decompose import sum_all as sum_all
from jaxreg.fields import compose as compose
from jaxreg.fields import integrate as integrate
from jaxreg.fields import jacobian_determinant as jacobian_determinant
from jaxreg.fields import resize as resize
from jaxreg.grid import identity_grid as identity_grid
from jaxreg.points import transform_points as transform_points
from jaxreg.warp import warp_batch as warp_batch

__all__ = [
    "__version__",
    "combine",
    "compose",
    "compose_all",
    "compose_all_svf",
    "data",
    "decompose",
    "fields",
    "grid",
    "identity_grid",
    "integrate",
    "io",
    "jacobian_determinant",
    "metrics",
    "points",
    "preprocess",
    "resize",
    "sum_all",
    "transform_points",
    "warp",
    "warp_batch",
]
