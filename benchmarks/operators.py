"""compose, scaling-and-squaring and LNCC: jaxreg vs the same operation in PyTorch.

Run: ``python benchmarks/operators.py [--sizes 64 128] [--repeats 5]`` (torch from the
``bench`` extra). Each figure is the median of ``--repeats`` calls after a warm-up,
on the same random data, measured in one run; the ratio is torch's time / jaxreg's.

* compose ``v + u(x + v)`` with border padding (torch: ``grid_sample(border)``),
  forward and gradient w.r.t. both fields; smooth random fields, ``|u| <= 3`` voxels.
* scaling and squaring, 7 steps (torch: the same loop on ``grid_sample``),
  forward and gradient w.r.t. the velocity.
* LNCC, 9³ windows (jaxreg: ``losses.local_ncc``, statistics over the in-volume part of
  each window; torch: separable box sums by ``conv3d``, the same statistics),
  forward and gradient w.r.t. the warped image.

Columns: each jaxreg warp path (``ffi``: the C++ kernel of ``jaxreg.ops.warp_kernel``,
``implementation="ffi"``; ``jax``: the pure-JAX warp, ``implementation="xla"``, each passed
to the timed calls) beside torch.
"""

from __future__ import annotations

import argparse
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
from _common import (compiled, implementation, median_seconds, smooth_field, torch_lncc,
                     torch_warp, warp_paths)

from jaxreg.ops import fields
from jaxreg.ops import losses

WINDOW = 9
STEPS = 7


def _jax_cases(u, v, f, m, path):
  """Compiled callables per operation and pass, with the warp path ``path`` (``ffi``/``jax``)."""
  impl = implementation(path)
  compose = lambda a, b: fields.compose(a, b, implementation=impl)
  integrate = lambda a: fields.integrate(a, STEPS, implementation=impl)
  compose_loss = lambda a, b: jnp.sum(compose(a, b) ** 2)
  svf_loss = lambda a: jnp.sum(integrate(a) ** 2)
  lncc = lambda a, b: losses.local_ncc(a, b, window=WINDOW)
  return {
      "compose": {"fwd": compiled(compose, u, v),
                  "fwd+bwd": compiled(jax.grad(compose_loss, argnums=(0, 1)), u, v)},
      "scaling and squaring": {"fwd": compiled(integrate, v),
                               "fwd+bwd": compiled(jax.grad(svf_loss), v)},
      "LNCC": {"fwd": compiled(lncc, f, m), "fwd+bwd": compiled(jax.grad(lncc, argnums=1), f, m)},
  }


def _torch_cases(u_np, v_np, f_np, m_np, threads):
  try:
    import torch
  except ImportError:
    return None
  torch.set_num_threads(threads)
  warp = torch_warp(f_np.shape, padding="border")
  channels_first = lambda a: a.permute(0, 4, 1, 2, 3)  # [1, X, Y, Z, 3] -> [1, 3, X, Y, Z]

  def compose(a, b):  # a, b: [1, X, Y, Z, 3]
    return b + warp(channels_first(a), b).permute(0, 2, 3, 4, 1)

  def integrate(a):
    a = a / 2 ** STEPS
    for _ in range(STEPS):
      a = compose(a, a)
    return a

  lncc = torch_lncc(WINDOW)  # [1, 1, X, Y, Z]

  t = lambda a, grad=False: torch.from_numpy(a).clone().requires_grad_(grad)
  u, v, f, m = (torch.from_numpy(a)[None] for a in (u_np, v_np, f_np, m_np))
  f, m = f[None], m[None]

  def no_grad(fn, *a):
    def call():
      with torch.no_grad():
        fn(*a)
    return call

  def grad(fn, *arrays):
    def call():
      inputs = [t(a[None], True) for a in arrays]
      fn(*inputs).backward()
    return call

  def grad_lncc():
    b = t(m_np[None, None], True)
    lncc(f, b).backward()

  return {
      "compose": {"fwd": no_grad(compose, u, v),
                  "fwd+bwd": grad(lambda a, b: (compose(a, b) ** 2).sum(), u_np, v_np)},
      "scaling and squaring": {"fwd": no_grad(integrate, v),
                               "fwd+bwd": grad(lambda a: (integrate(a) ** 2).sum(), v_np)},
      "LNCC": {"fwd": no_grad(lncc, f, m), "fwd+bwd": grad_lncc},
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--torch-threads", type=int, default=None)
  parser.add_argument("--paths", nargs="+", default=None, choices=("ffi", "jax"),
                      help="jaxreg warp paths (default: every one that runs here)")
  args = parser.parse_args()
  threads = args.torch_threads or os.cpu_count()
  found = warp_paths()  # loads the kernel where it builds
  paths = args.paths or found
  print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch threads {threads}")
  head = " | ".join(f"jaxreg {p} (ms)" for p in paths)
  ratio = " | ".join(f"torch / {p}" for p in paths)
  print(f"| size | operation | pass | {head} | torch (ms) | {ratio} |")
  print("| --- | --- | --- |" + " ---: |" * (2 * len(paths) + 1))
  for n in args.sizes:
    rng = np.random.default_rng(n)
    u, v = (smooth_field((n, n, n), 3.0, seed=n + k) for k in range(2))
    f, m = (rng.normal(size=(n, n, n)).astype(np.float32) for _ in range(2))
    ours = {p: _jax_cases(*(jnp.asarray(a) for a in (u, v, f, m)), path=p) for p in paths}
    theirs = _torch_cases(u, v, f, m, threads)
    for op, passes in ours[paths[0]].items():
      for name in passes:
        times = [median_seconds(ours[p][op][name], args.repeats) for p in paths]
        cells = " | ".join(f"{t * 1e3:.1f}" for t in times)
        if theirs is None:
          print(f"| {n}³ | {op} | {name} | {cells} | (no torch) |" + " |" * len(paths),
                flush=True)
          continue
        b = median_seconds(theirs[op][name], args.repeats)
        ratios = " | ".join(f"{b / t:.2f}" for t in times)
        print(f"| {n}³ | {op} | {name} | {cells} | {b * 1e3:.1f} | {ratios} |", flush=True)


if __name__ == "__main__":
  main()
