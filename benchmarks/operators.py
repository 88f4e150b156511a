"""compose, scaling-and-squaring and LNCC: jaxreg vs the same operation in PyTorch.

Run: ``python benchmarks/operators.py [--sizes 64 128] [--repeats 5]`` (torch from the
``bench`` extra). Each figure is the median of ``--repeats`` calls after a warm-up,
on the same random data, measured in one run; the ratio is torch's time / jaxreg's.

* compose ``v + u(x + v)`` with border padding (torch: ``grid_sample(border)``),
  forward and gradient w.r.t. both fields.
* scaling and squaring, 7 steps (torch: the same loop on ``grid_sample``),
  forward and gradient w.r.t. the velocity.
* LNCC, 9³ windows (jaxreg: ``losses.local_ncc``, statistics over the in-volume part of
  each window; torch: ``avg_pool3d(count_include_pad=False)``, the same statistics),
  forward and gradient w.r.t. the warped image.
"""

from __future__ import annotations

import argparse
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
from _common import median_seconds, torch_warp

from jaxreg import fields, losses

WINDOW = 9
STEPS = 7


def _jax_cases(u, v, f, m):
  compose_loss = lambda a, b: jnp.sum(fields.compose(a, b) ** 2)
  svf_loss = lambda a: jnp.sum(fields.integrate(a, STEPS) ** 2)
  lncc = lambda a, b: losses.local_ncc(a, b, window=WINDOW)
  run = lambda fn, *a: (lambda: jax.block_until_ready(fn(*a)))
  return {
      "compose": {"fwd": run(jax.jit(fields.compose), u, v),
                  "fwd+bwd": run(jax.jit(jax.grad(compose_loss, argnums=(0, 1))), u, v)},
      "scaling and squaring": {"fwd": run(jax.jit(lambda a: fields.integrate(a, STEPS)), v),
                               "fwd+bwd": run(jax.jit(jax.grad(svf_loss)), v)},
      "LNCC": {"fwd": run(jax.jit(lncc), f, m),
               "fwd+bwd": run(jax.jit(jax.grad(lncc, argnums=1)), f, m)},
  }


def _torch_cases(u_np, v_np, f_np, m_np, threads):
  try:
    import torch
    import torch.nn.functional as tf
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

  def lncc(a, b):  # [1, 1, X, Y, Z]
    mean = lambda x: tf.avg_pool3d(x, WINDOW, stride=1, padding=WINDOW // 2,
                                   count_include_pad=False)
    ma, mb = mean(a), mean(b)
    cross = mean(a * b) - ma * mb
    var_a, var_b = mean(a * a) - ma * ma, mean(b * b) - mb * mb
    return (cross * cross / (var_a * var_b + 1e-5)).mean()

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
  args = parser.parse_args()
  threads = args.torch_threads or os.cpu_count()
  print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}")
  print("| size | operation | pass | jaxreg (ms) | torch (ms) | torch / jaxreg |")
  print("| --- | --- | --- | ---: | ---: | ---: |")
  for n in args.sizes:
    rng = np.random.default_rng(n)
    u, v = (rng.uniform(-3, 3, size=(n, n, n, 3)).astype(np.float32) for _ in range(2))
    f, m = (rng.normal(size=(n, n, n)).astype(np.float32) for _ in range(2))
    ours = _jax_cases(*(jnp.asarray(a) for a in (u, v, f, m)))
    theirs = _torch_cases(u, v, f, m, threads)
    for op, passes in ours.items():
      for name, fn in passes.items():
        a = median_seconds(fn, args.repeats)
        if theirs is None:
          print(f"| {n}³ | {op} | {name} | {a * 1e3:.1f} | (no torch) | |", flush=True)
          continue
        b = median_seconds(theirs[op][name], args.repeats)
        print(f"| {n}³ | {op} | {name} | {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.2f} |",
              flush=True)


if __name__ == "__main__":
  main()
