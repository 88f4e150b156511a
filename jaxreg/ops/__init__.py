"""Pure, differentiable operators: no IO, no ambient state (the bottom of jaxreg).

* :mod:`jaxreg.ops.grid` -- identity grids, voxel <-> world maps, field units, RAS/LPS.
* :mod:`jaxreg.ops.warp` -- the pull-back warp and sampling (``implementation=`` picks XLA
  or the C++ kernel of :mod:`jaxreg.ops.warp_kernel`); :mod:`jaxreg.ops.trilinear` is its
  pure-JAX core.
* :mod:`jaxreg.ops.fields` -- compose, integrate (scaling and squaring), invert, resize,
  Jacobian determinant.
* :mod:`jaxreg.ops.decompose` -- K sub-fields combined into one displacement.
* :mod:`jaxreg.ops.losses` -- similarities and regularisers, and their name registry.
* :mod:`jaxreg.ops.points` -- landmarks through a field.
* :mod:`jaxreg.ops.optim` -- an optax loop as one ``lax.scan``.
* :mod:`jaxreg.ops.sharding` -- the device mesh axes the operators respect.

Displacements are ``[X, Y, Z, 3]`` in voxels, component ``i`` along array axis ``i``.
The most used names are also at the top level: ``jaxreg.warp``, ``jaxreg.compose``, ...
"""
