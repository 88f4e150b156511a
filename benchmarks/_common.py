"""Shared by the benchmarks: median timing, and PyTorch's pull-back warp (grid_sample)."""

from __future__ import annotations

import statistics
import time


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
  """Median wall time of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
  for _ in range(warmup):  # compilation, allocation
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def torch_warp(shape, padding: str = "zeros"):
  """``warp(image [N, C, X, Y, Z], disp [N, X, Y, Z, 3] voxels)`` with torch grid_sample,
  the same pull-back (``out(x) = image(x + disp(x))``) as ``jaxreg.warp.warp``."""
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
