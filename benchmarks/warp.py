"""Trilinear warp: jaxreg's C++ kernel and pure-JAX paths vs torch grid_sample, with real cotangents.

Run: ``python benchmarks/warp.py [--sizes 96 128] [--repeats 10]``. torch is
optional (``pip install -e '.[bench]'``). Every figure is measured in the same
run, on the same random image, fixed image and smooth displacement (1 channel,
float32, ``|u| <= 4`` voxels, zero padding). Reports the median wall time of
``--repeats`` calls after a warm-up call, every path and torch timed in turn
within each repeat (a drift of the machine's speed hits all alike), and torch's
time divided by each jaxreg path's (``> 1``: jaxreg faster).

Passes: ``fwd`` (the warp alone), ``field`` (gradient with respect to the
displacement, what a network's training step needs) and ``both`` (image and
displacement). Cotangents (``loss``): ``sum(w * warped)`` with a constant
``w`` (cheap, and unrepresentative: a real loss's cotangent depends on the
warped image), ``mse`` ``mean((fixed - warped)^2)`` and ``lncc`` (9³ windows,
``jaxreg.ops.losses.local_ncc``; torch: ``avg_pool3d`` with the same statistics).
torch builds its sampling grid inside every timed call, as a step must.

Paths: ``ffi`` is the C++ kernel of ``jaxreg.ops.warp_kernel`` (when it builds;
``implementation="ffi"``), ``jax`` the pure-JAX warp (``implementation="xla"``), each
passed explicitly to the timed calls. ``--kernel-threads 1`` runs the kernel on one
thread (its ``threads`` argument; default: XLA's pool, one per core).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

from _common import (compiled, implementation, interleaved_medians, smooth_field, torch_lncc,
                     torch_warp, warp_paths)

from jaxreg.ops import losses
from jaxreg.ops import warp as W

WINDOW = 9
LOSSES = ("sum(w*warped)", "mse", "lncc")
PASSES = ("fwd", "field", "both")


# (fixed, weights, warped) -> scalar; fixed and weights are arguments, not constants
# folded into the compiled code.
JAX_LOSSES = {"sum(w*warped)": lambda f, w, x: jnp.sum(x * w),
              "mse": lambda f, w, x: jnp.mean((f - x) ** 2),
              "lncc": lambda f, w, x: -losses.local_ncc(f, x, window=WINDOW)}


def _jax_cases(img, disp, fixed, weights, path, threads=None):
  """Compiled callables per (pass, loss), with the warp path ``path`` (``ffi``/``jax``)."""
  warp = functools.partial(W.warp, implementation=implementation(path), threads=threads)
  cases = {("fwd", "-"): compiled(warp, img, disp)}
  for name, loss in JAX_LOSSES.items():
    total = lambda i, d, f, w, loss=loss: loss(f, w, warp(i, d))
    for key, argnums in (("field", 1), ("both", (0, 1))):
      cases[(key, name)] = compiled(jax.grad(total, argnums=argnums), img, disp, fixed,
                                    weights)
  return cases


def _torch_cases(img_np, disp_np, fixed_np, weights_np, threads):
  try:
    import torch
  except ImportError:
    return None
  torch.set_num_threads(threads)
  as_t = lambda a: torch.from_numpy(a)[None, None]
  img, fixed, weights = as_t(img_np), as_t(fixed_np), as_t(weights_np)
  warp = torch_warp(img_np.shape)
  lncc = torch_lncc(WINDOW)
  loss_fns = {"sum(w*warped)": lambda w: (w * weights).sum(),
              "mse": lambda w: ((fixed - w) ** 2).mean(),
              "lncc": lambda w: -lncc(fixed, w)}

  def fwd():
    with torch.no_grad():
      warp(img, torch.from_numpy(disp_np)[None])

  def bwd(loss, image_grad):
    def call():
      i = img.clone().requires_grad_(image_grad)
      d = torch.from_numpy(disp_np).clone()[None].requires_grad_(True)
      loss(warp(i, d)).backward()
    return call

  cases = {("fwd", "-"): fwd}
  for name, loss in loss_fns.items():
    cases[("field", name)] = bwd(loss, False)
    cases[("both", name)] = bwd(loss, True)
  return cases


def stored_vs_recomputed(sizes, repeats, threads=None):
  """The kernel's field gradient (MSE and LNCC cotangents) with the samples' derivatives
  kept from the forward pass (``jaxreg.ops.warp_kernel._STORED_CHANNELS = 1``, the default) and
  recomputed in the backward pass (``0``), timed in turn in one process."""
  from jaxreg.ops import warp_kernel
  warp_kernel.load(required=True)
  warp = functools.partial(W.warp, implementation="ffi", threads=threads)
  print("| size | loss | derivatives kept (ms) | recomputed (ms) | recomputed / kept |")
  print("| --- | --- | ---: | ---: | ---: |")
  default = warp_kernel._STORED_CHANNELS
  for n in sizes:
    rng = np.random.default_rng(n)
    img, fixed = (jnp.asarray(rng.normal(size=(n, n, n)).astype(np.float32)) for _ in "ab")
    disp = jnp.asarray(smooth_field((n, n, n), 4.0, seed=n))
    for name in ("mse", "lncc"):
      loss = JAX_LOSSES[name]
      fns = []
      for stored in (1, 0):  # traced (inside compiled) with the setting in force
        warp_kernel._STORED_CHANNELS = stored
        fns.append(compiled(jax.grad(lambda i, d, f, loss=loss: loss(f, None, warp(i, d)),
                                     argnums=1), img, disp, fixed))
      warp_kernel._STORED_CHANNELS = default
      kept, again = interleaved_medians(fns, repeats)
      print(f"| {n}³ | {name} | {kept * 1e3:.1f} | {again * 1e3:.1f} | {again / kept:.2f} |",
            flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[96, 128])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--torch-threads", type=int, default=None,
                      help="torch intra-op threads (default: all cores, as JAX)")
  parser.add_argument("--paths", nargs="+", default=None, choices=("ffi", "jax"),
                      help="jaxreg warp paths (default: every one that runs here)")
  parser.add_argument("--kernel-threads", type=int, default=None,
                      help="the C++ kernel's threads (default: all, XLA's pool)")
  parser.add_argument("--stored", action="store_true",
                      help="only the kernel's field gradient with the derivatives kept from "
                           "the forward pass vs recomputed (in turn, one process)")
  args = parser.parse_args()
  if args.stored:
    return stored_vs_recomputed(args.sizes, args.repeats, args.kernel_threads)
  threads = args.torch_threads or os.cpu_count()
  found = warp_paths()  # loads the kernel where it builds
  paths = args.paths or found
  print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch threads {threads}, "
        f"kernel threads {args.kernel_threads or 'all'}")
  head = " | ".join(f"jaxreg {p} (ms)" for p in paths)
  ratio = " | ".join(f"torch / {p}" for p in paths)
  print(f"| size | pass | loss | {head} | torch (ms) | {ratio} |")
  print("| --- | --- | --- |" + " ---: |" * (2 * len(paths) + 1))
  for n in args.sizes:
    rng = np.random.default_rng(n)
    shape = (n, n, n)
    img = rng.normal(size=shape).astype(np.float32)
    fixed = rng.normal(size=shape).astype(np.float32)
    weights = rng.normal(size=shape).astype(np.float32)
    disp = smooth_field(shape, 4.0, seed=n)
    arrays = [jnp.asarray(a) for a in (img, disp, fixed, weights)]
    ours = {p: _jax_cases(*arrays, path=p, threads=args.kernel_threads) for p in paths}
    theirs = _torch_cases(img, disp, fixed, weights, threads)
    for key in ours[paths[0]]:
      fns = [ours[p][key] for p in paths] + ([] if theirs is None else [theirs[key]])
      times = interleaved_medians(fns, args.repeats)
      if theirs is None:
        cells = " | ".join(f"{t * 1e3:.1f}" for t in times)
        print(f"| {n}³ | {key[0]} | {key[1]} | {cells} | (no torch) |" + " |" * len(paths),
              flush=True)
        continue
      *times, b = times
      cells = " | ".join(f"{t * 1e3:.1f}" for t in times)
      ratios = " | ".join(f"{b / t:.2f}" for t in times)
      print(f"| {n}³ | {key[0]} | {key[1]} | {cells} | {b * 1e3:.1f} | {ratios} |", flush=True)


if __name__ == "__main__":
  main()
