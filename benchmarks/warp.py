"""Trilinear warp: jaxreg vs jax.scipy.ndimage.map_coordinates vs torch grid_sample.

Run: ``python benchmarks/warp.py [--sizes 64 128] [--repeats 10]``. torch is
optional (``pip install -e '.[bench]'``). Every figure is measured in the same
run, on the same random image and displacement (1 channel, float32, |u| <= 4
voxels, zero padding). Reports the median wall time of ``--repeats`` calls
after a warm-up call, and each reference's time divided by jaxreg's.

"fwd+bwd" is the gradient of ``sum(warped * w)`` with respect to the
displacement (what a registration network's training step needs); "fwd+bwd
(both)" adds the gradient with respect to the image.
"""

from __future__ import annotations

import argparse
import platform

import jax
import jax.numpy as jnp
import numpy as np

from _common import median_seconds, torch_warp

from jaxreg import warp as W


def _jax_cases(img, disp, weights):
  shape = img.shape

  def warp_jaxreg(i, d):
    return W.warp(i, d)

  def warp_map_coordinates(i, d):
    grid = jnp.meshgrid(*[jnp.arange(n, dtype=d.dtype) for n in shape], indexing="ij")
    coords = [g + d[..., k] for k, g in enumerate(grid)]
    return jax.scipy.ndimage.map_coordinates(i, coords, order=1, mode="constant")

  cases = {}
  for name, fn in (("jaxreg", warp_jaxreg), ("map_coordinates", warp_map_coordinates)):
    fwd = jax.jit(fn)
    loss = lambda i, d, fn=fn: jnp.sum(fn(i, d) * weights)
    bwd = jax.jit(jax.grad(loss, argnums=1))
    both = jax.jit(jax.grad(loss, argnums=(0, 1)))
    cases[name] = {
        "fwd": lambda f=fwd: f(img, disp).block_until_ready(),
        "fwd+bwd": lambda f=bwd: f(img, disp).block_until_ready(),
        "fwd+bwd (both)": lambda f=both: jax.block_until_ready(f(img, disp)),
    }
  return cases


def _torch_cases(img_np, disp_np, weights_np, threads):
  try:
    import torch
  except ImportError:
    return None
  torch.set_num_threads(threads)
  img = torch.from_numpy(img_np)[None, None]  # (1, 1, X, Y, Z) = (N, C, D, H, W)
  weights = torch.from_numpy(weights_np)[None, None]
  warp = torch_warp(img_np.shape)
  warped = lambda i, d: warp(i, d[None])

  def fwd():
    with torch.no_grad():
      warped(img, torch.from_numpy(disp_np))

  def bwd(image_grad):
    i = img.clone().requires_grad_(image_grad)
    d = torch.from_numpy(disp_np).clone().requires_grad_(True)
    (warped(i, d) * weights).sum().backward()

  return {"fwd": fwd, "fwd+bwd": lambda: bwd(False), "fwd+bwd (both)": lambda: bwd(True)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--torch-threads", type=int, default=None,
                      help="torch intra-op threads (default: all cores, as JAX)")
  args = parser.parse_args()
  import os
  threads = args.torch_threads or os.cpu_count()
  print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}")
  rows = []
  for n in args.sizes:
    rng = np.random.default_rng(n)
    img = rng.normal(size=(n, n, n)).astype(np.float32)
    disp = rng.uniform(-4, 4, size=(n, n, n, 3)).astype(np.float32)
    weights = rng.normal(size=(n, n, n)).astype(np.float32)
    impls = _jax_cases(jnp.asarray(img), jnp.asarray(disp), jnp.asarray(weights))
    torch_cases = _torch_cases(img, disp, weights, threads)
    if torch_cases is None:
      print("# torch not installed: grid_sample column skipped (pip install -e '.[bench]')")
    else:
      impls["torch grid_sample"] = torch_cases
    for mode in ("fwd", "fwd+bwd", "fwd+bwd (both)"):
      times = {name: median_seconds(c[mode], args.repeats) for name, c in impls.items()}
      ours = times["jaxreg"]
      ratios = "  ".join(f"{name} {t * 1e3:7.1f} ms ({t / ours:4.1f}x)"
                         for name, t in times.items() if name != "jaxreg")
      rows.append(f"{n}^3 {mode:15s} jaxreg {ours * 1e3:7.1f} ms | {ratios}")
      print(rows[-1], flush=True)
  print("# ratio = reference time / jaxreg time (> 1: jaxreg faster)")


if __name__ == "__main__":
  main()
