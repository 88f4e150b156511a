"""Shared by the benchmarks: median timing, the warp paths, and PyTorch's pull-back warp
(grid_sample)."""

from __future__ import annotations

import statistics
import time


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
  """Median wall time of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
  return interleaved_medians([fn], repeats, warmup)[0]


def interleaved_medians(fns, repeats: int, warmup: int = 1) -> list[float]:
  """Median wall time of each of ``fns``, timed in turn within every repeat (after
  ``warmup`` untimed rounds: compilation, allocation), so a drift of the machine's speed
  hits every one alike and their ratios hold better than those of one-after-the-other
  medians."""
  for _ in range(warmup):
    for fn in fns:
      fn()
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, out in zip(fns, times):
      t0 = time.perf_counter()
      fn()
      out.append(time.perf_counter() - t0)
  return [statistics.median(t) for t in times]


def torch_warp(shape, padding: str = "zeros"):
  """``warp(image [N, C, X, Y, Z], disp [N, X, Y, Z, 3] voxels)`` with torch grid_sample,
  the same pull-back (``out(x) = image(x + disp(x))``) as ``jaxreg.ops.warp.warp``."""
  import torch
  import torch.nn.functional as tf
  base = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape],
                                    indexing="ij"), -1)
  scale = torch.tensor([2.0 / (n - 1) for n in shape])

  def warp(image, disp):
    # grid_sample wants normalised (-1..1) coordinates ordered (W, H, D) = (z, y, x).
    grid = ((base + disp) * scale - 1.0).flip(-1)
    return tf.grid_sample(image, grid, mode="bilinear", padding_mode=padding,
                          align_corners=True)

  return warp


def warp_paths() -> list[str]:
  """The warp paths this machine can run: ``"ffi"`` (the C++ kernel: a CPU backend, where it
  builds), ``"jax"``.

  Loads the kernel into this process (:func:`jaxreg.ops.warp_kernel.load`), so that
  ``implementation("ffi")`` can then run it."""
  import jax

  from jaxreg.ops import warp_kernel
  kernel = jax.default_backend() == "cpu" and warp_kernel.load()
  return (["ffi"] if kernel else []) + ["jax"]


def implementation(path: str) -> str | None:
  """A warp path's name (``auto``, ``ffi``, ``jax``: the values of ``$JAXREG_WARP``, which the
  benchmarks' flags and columns keep) as the library's ``implementation`` argument
  (``None``, ``"ffi"``, ``"xla"``; :data:`jaxreg.pipeline.environment.WARP_MODES`)."""
  from jaxreg.pipeline import environment
  return environment.WARP_MODES[path]


def compiled(fn, *args):
  """``jax.jit(fn)`` compiled for ``args``, as a no-argument callable that blocks on its
  result (bind the warp path into ``fn``: ``implementation=`` of the jaxreg calls)."""
  import jax
  exe = jax.jit(fn).lower(*args).compile()
  return lambda: jax.block_until_ready(exe(*args))


def smooth_field(shape, amplitude: float, seed: int, spacing: int = 8):
  """``[X, Y, Z, 3]`` float32 smooth random displacement (voxels), ``max |u| = amplitude``:
  noise on a grid every ``spacing`` voxels, cubic-interpolated."""
  import numpy as np
  from scipy import ndimage
  rng = np.random.default_rng(seed)
  coarse = rng.normal(size=tuple(max(2, n // spacing + 1) for n in shape) + (3,))
  zoom = [n / c for n, c in zip(shape, coarse.shape[:3])] + [1]
  u = ndimage.zoom(coarse, zoom, order=3)[: shape[0], : shape[1], : shape[2]]
  return (u * amplitude / np.abs(u).max()).astype(np.float32)


def torch_lncc(window: int):
  """torch LNCC of ``[1, 1, X, Y, Z]`` tensors with the statistics of
  ``jaxreg.ops.losses.local_ncc`` (over the in-volume part of each ``window**3`` box):
  separable box sums (three 1-D ``conv3d``), divided by the in-volume counts."""
  import torch
  import torch.nn.functional as tf
  r = window // 2
  kernels = [torch.ones((1, 1) + tuple(window if k == a else 1 for k in range(3)))
             for a in range(3)]
  pads = [tuple(r if k == a else 0 for k in range(3)) for a in range(3)]

  def box(x):
    for kernel, pad in zip(kernels, pads):
      x = tf.conv3d(x, kernel, padding=pad)
    return x

  def lncc(a, b):
    n = box(torch.ones_like(a))
    mean = lambda x: box(x) / n
    ma, mb = mean(a), mean(b)
    cross = mean(a * b) - ma * mb
    var_a, var_b = mean(a * a) - ma * ma, mean(b * b) - mb * mb
    return (cross * cross / (var_a * var_b + 1e-5)).mean()

  return lncc
