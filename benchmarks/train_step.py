"""Train step: jaxreg vs the same UNet + loss in PyTorch, and how jaxreg's cost grows with size.

Run: ``python benchmarks/train_step.py [--sizes 64 128] [--native] [--grow 32 64 128 192x160x224]
[--plot growth.png] [--warp-compare 48 96] [--warp-ceiling 48 64]``
(``pip install -e '.[bench]'`` for the PyTorch column).

Both sides: the demo network (UNet widths 16-32-32-32, stride-2 encoder,
nearest-neighbour upsampling, LeakyReLU(0.2), K=3 sub-field heads on the three
finest decoder levels, small-init heads), sub-fields upsampled and composed
coarse first, the moving image warped trilinearly, loss = -LNCC(9) + 0.5 *
(diffusion of the sub-fields + of the total field), one Adam step, batch 1,
float32. Time: median of ``--repeats`` steps after two warm-up steps. Peak
memory: the process's peak resident set (``ru_maxrss``) grows monotonically, so
each size is run in a fresh subprocess.

Warp: each subprocess reads ``JAXREG_WARP`` once, as the command line does
(:func:`jaxreg.pipeline.environment.configure`, without the compilation cache: ``auto``
loads the C++ kernel, used on a CPU), and passes it to the step as the warp's
``implementation``; ``--warp-compare`` starts them with ``JAXREG_WARP=ffi`` and ``=jax``.
``--warp-ceiling`` passes ``implementation="ffi"`` and ``"xla"`` in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys

import numpy as np
from _common import median_seconds

WIDTHS = (16, 32, 32, 32)
IMPL_NAMES = {"jax:folded": "jaxreg (folded conv)", "jax:native": "jaxreg (native conv)",
              "torch": "PyTorch"}
K = 3


def _shape(size: str) -> tuple[int, int, int]:
  """``"64"`` -> (64, 64, 64); ``"192x160x224"`` -> (192, 160, 224)."""
  parts = [int(p) for p in str(size).split("x")]
  return tuple(parts * 3) if len(parts) == 1 else tuple(parts)


def jaxreg_step(n, conv: str, infer: bool = False, network_only: bool = False,
                implementation: str | None = None):
  """One jitted Adam step (or, with ``infer``, one forward pass + warp) on random volumes.

  ``network_only``: the step without composition, warp and LNCC, the loss being the
  sub-fields' diffusion and squares: the floor that any speed-up of the warp, the
  composition or the similarity leaves. ``implementation``: the warp's, in the composition
  and the warp (``None``, ``"xla"``, ``"ffi"``; :mod:`jaxreg.ops.warp`)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  import optax

  from jaxreg.ops import losses
  from jaxreg.nn import model
  from jaxreg.ops import warp

  net = model.RegistrationNet(widths=WIDTHS, num_subfields=K, conv=conv, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(net)
  tx = optax.adam(1e-4)
  opt = tx.init(params)
  rng = np.random.default_rng(0)
  f, m = (jnp.asarray(rng.random((1, *_shape(n))), jnp.float32) for _ in range(2))

  def loss_fn(params):
    if network_only:
      subs = nnx.merge(graphdef, params)(f, m)
      return sum(jnp.mean(jax.vmap(losses.diffusion)(u)) + jnp.mean(u ** 2) for u in subs)
    disp, subs = model.predict_displacement(nnx.merge(graphdef, params), f, m,
                                            implementation=implementation)
    warped = warp.warp_batch(m, disp, implementation=implementation)
    sim = -jnp.mean(jax.vmap(losses.local_ncc)(f, warped))
    reg = sum(jnp.mean(jax.vmap(losses.diffusion)(u)) for u in subs) / K
    return sim + 0.5 * reg + 0.5 * jnp.mean(jax.vmap(losses.diffusion)(disp))

  if infer:
    @jax.jit
    def predict(params):
      disp, _ = model.predict_displacement(nnx.merge(graphdef, params), f, m,
                                           implementation=implementation)
      return warp.warp_batch(m, disp, implementation=implementation)
    return lambda: predict(params).block_until_ready()

  @jax.jit
  def step(params, opt):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  state = [params, opt]

  def run():
    state[0], state[1], loss = step(*state)
    loss.block_until_ready()
  return run


def torch_step(n: int, threads: int, infer: bool = False):
  """The same step (or forward pass + warp) in PyTorch."""
  import torch
  import torch.nn as nn
  import torch.nn.functional as tf

  torch.set_num_threads(threads)
  torch.manual_seed(0)

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      cin, self.enc = 2, nn.ModuleList()
      for i, w in enumerate(WIDTHS):
        self.enc.append(nn.Conv3d(cin, w, 3, stride=1 if i == 0 else 2, padding=1))
        cin = w
      self.dec = nn.ModuleList()
      for i in range(len(WIDTHS) - 2, -1, -1):
        self.dec.append(nn.Conv3d(cin + WIDTHS[i], WIDTHS[i], 3, padding=1))
        cin = WIDTHS[i]
      self.heads = nn.ModuleList(nn.Conv3d(WIDTHS[k], 3, 3, padding=1) for k in range(K - 1, -1, -1))
      for h in self.heads:
        nn.init.normal_(h.weight, std=1e-5)
        nn.init.zeros_(h.bias)

    def forward(self, x):
      skips = []
      for conv in self.enc:
        x = tf.leaky_relu(conv(x), 0.2)
        skips.append(x)
      outs = [x]
      for conv, skip in zip(self.dec, reversed(skips[:-1])):
        x = torch.cat([tf.interpolate(x, scale_factor=2, mode="nearest"), skip], 1)
        x = tf.leaky_relu(conv(x), 0.2)
        outs.append(x)
      return [h(o) for h, o in zip(self.heads, outs[-K:])]

  base = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32)] * 3,
                                    indexing="ij"), 0)[None]  # (1, 3, n, n, n) voxels

  def sample(img, disp, padding):  # img (1, C, n, n, n), disp (1, 3, n, n, n) voxels
    grid = ((base + disp) * (2.0 / (n - 1)) - 1.0).permute(0, 2, 3, 4, 1).flip(-1)
    return tf.grid_sample(img, grid, mode="bilinear", padding_mode=padding, align_corners=True)

  def upsample(u):  # resize with align_corners and magnitude scaling, as jaxreg.ops.fields.resize
    return tf.interpolate(u, size=(n, n, n), mode="trilinear", align_corners=True) * (
        (n - 1) / (u.shape[2] - 1))

  def box(x, w=9):
    return tf.avg_pool3d(x, w, stride=1, padding=w // 2, count_include_pad=True) * w ** 3

  def lncc(f, w, win=9, eps=1e-5):
    ones = torch.ones_like(f)
    cnt = box(ones, win)
    sf, sw = box(f, win), box(w, win)
    cross = box(f * w, win) - sf * sw / cnt
    vf = (box(f * f, win) - sf * sf / cnt).clamp_min(0)
    vw = (box(w * w, win) - sw * sw / cnt).clamp_min(0)
    return (cross * cross / (vf * vw + eps)).mean()

  def diffusion(u):
    return sum(((u.diff(dim=d)) ** 2).sum(1).mean() for d in (2, 3, 4)) / 3

  net = Net()
  opt = torch.optim.Adam(net.parameters(), lr=1e-4)
  rng = np.random.default_rng(0)
  f, m = (torch.from_numpy(rng.random((1, 1, n, n, n)).astype(np.float32)) for _ in range(2))

  def forward():
    subs = net(torch.cat([f, m], 1))
    ups = [upsample(u) if u.shape[2] != n else u for u in subs]
    total = ups[-1]
    for u in reversed(ups[:-1]):
      total = total + sample(u, total, "border")
    return subs, total, sample(m, total, "zeros")

  if infer:
    def predict():
      with torch.no_grad():
        forward()
    return predict

  def run():
    opt.zero_grad()
    subs, total, warped = forward()
    loss = -lncc(f, warped) + 0.5 * sum(diffusion(u) for u in subs) / K + 0.5 * diffusion(total)
    loss.backward()
    opt.step()
  return run


def warp_ceiling(sizes, repeats: int) -> None:
  """The step with the kernel, with the pure-JAX warp and without any warp, timed in turn
  in one process: how much faster the warp could still make the step."""
  from _common import implementation, interleaved_medians

  from jaxreg.ops import warp_kernel
  warp_kernel.load(required=True)
  print("\n| size | step, warp kernel | step, pure-JAX warp | network only | pure-JAX / kernel | "
        "ceiling: pure-JAX / network only |\n| --- | ---: | ---: | ---: | ---: | ---: |")
  for size in sizes:
    fns = []
    for path in ("ffi", "jax"):
      fns.append(jaxreg_step(size, "auto", implementation=implementation(path)))
      fns[-1]()
    fns.append(jaxreg_step(size, "auto", network_only=True))
    t = interleaved_medians(fns, repeats, warmup=2)
    print(f"| {size}³ | {t[0]:.3f} s | {t[1]:.3f} s | {t[2]:.3f} s | {t[1] / t[0]:.2f}x | "
          f"{t[1] / t[2]:.2f}x |", flush=True)


def _child(args):
  infer = args.impl.endswith("+infer")
  impl = args.impl.removesuffix("+infer")
  if impl == "torch":
    run = torch_step(int(args.size), args.threads, infer)
  else:
    from jaxreg.pipeline import environment
    # $JAXREG_WARP (set by --warp-compare) read once, the kernel loaded unless "jax";
    # no compilation cache ("off"), as ever
    settings = environment.configure("off", quiet=True)
    run = jaxreg_step(args.size, impl.split(":")[1], infer,  # a size string: N or XxYxZ
                      implementation=settings.implementation)
  seconds = median_seconds(run, args.repeats, warmup=2)
  print(json.dumps({"seconds": seconds,
                    "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _plot(path, voxels, seconds, gib):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.loglog(voxels, seconds, "o-", label="train step (s)")
  ax.loglog(voxels, gib, "s--", label="peak memory (GiB)")
  paper = 192 * 160 * 224
  ax.axvline(paper, color="gray", lw=0.8)
  ax.text(paper, ax.get_ylim()[0] * 1.5, " paper scale\n 192x160x224", fontsize=8)
  ax.set_xlabel("voxels per volume")
  ax.set_title("jaxreg train step on CPU (batch 1, demo UNet)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  print(f"# wrote {path}")


def _measure(impl, size, repeats, threads, warp=None):
  env = dict(os.environ, **({"JAXREG_WARP": warp} if warp else {}))
  out = subprocess.run([sys.executable, __file__, "--child", "--impl", impl, "--size", str(size),
                        "--repeats", str(repeats), "--threads", str(threads)],
                       capture_output=True, text=True, env=env)
  if out.returncode:
    return None, out.stderr.strip().splitlines()[-1] if out.stderr else "failed"
  return json.loads(out.stdout.strip().splitlines()[-1]), None


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", type=int, nargs="*", default=[64, 128])
  parser.add_argument("--grow", nargs="*", default=["32", "48", "64", "96", "128"],
                      help="sizes (N or XxYxZ) for the jaxreg-only cost-growth table")
  parser.add_argument("--native", action="store_true",
                      help="also time XLA's native 3-D convolution (slow on CPU)")
  parser.add_argument("--plot", help="write the growth as a log-log PNG here")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--warp-compare", nargs="*", default=[],
                      help="sizes at which to time jaxreg's train step with the warp's C++ "
                           "kernel (JAXREG_WARP=ffi) against the pure-JAX warp (=jax)")
  parser.add_argument("--warp-ceiling", type=int, nargs="*", default=[],
                      help="sizes at which to time the step with the kernel, with the pure-JAX "
                           "warp and without warps (network only), in turn in this process")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--impl", help=argparse.SUPPRESS)
  parser.add_argument("--size", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return _child(args)
  if args.warp_ceiling:
    return warp_ceiling(args.warp_ceiling, max(args.repeats, 7))

  import jax
  print(f"# {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} on "
        f"{jax.devices()[0].platform}; torch threads {args.threads}")
  impls = ["jax:folded"] + (["jax:native"] if args.native else []) + ["torch"]
  print("| size | pass | " + " | ".join(IMPL_NAMES[i] for i in impls) + " | torch / jaxreg |")
  print("| --- | --- |" + " ---: |" * (len(impls) + 1))
  for n in args.sizes:
    for mode, suffix in (("train step", ""), ("forward + warp", "+infer")):
      res = {impl: _measure(impl + suffix, n, args.repeats, args.threads)[0] for impl in impls}
      cells = [f"{r['seconds']:.3f} s, {r['peak_mib']:.0f} MiB" if r else "failed"
               for r in res.values()]
      ours, ref = res["jax:folded"], res["torch"]
      ratio = f"{ref['seconds'] / ours['seconds']:.2f}x" if ours and ref else "n/a"
      print(f"| {n}³ | {mode} | " + " | ".join(cells) + f" | {ratio} |", flush=True)
  if args.grow:
    print("\n# jaxreg (folded conv) cost vs size")
    grown = []
    for size in args.grow:
      r, err = _measure("jax:folded", size, max(2, args.repeats // 2), args.threads)
      voxels = int(np.prod(_shape(size)))
      print(f"{size:>12s} ({voxels / 1e6:5.2f} M voxels)  " +
            (f"{r['seconds']:7.3f} s  {r['peak_mib']:7.0f} MiB" if r else err), flush=True)
      if r:
        grown.append((voxels, r["seconds"], r["peak_mib"] / 1024))
    if len(grown) >= 2:
      v, s, g = (np.array(c, np.float64) for c in zip(*grown))
      ts, ms = np.polyfit(np.log(v), np.log(s), 1)[0], np.polyfit(np.log(v), np.log(g), 1)[0]
      print(f"# log-log slopes: time ~ voxels^{ts:.2f}, peak memory ~ voxels^{ms:.2f}")
      if args.plot:
        _plot(args.plot, v, s, g)
  print("# ratio = torch time / jaxreg time (> 1: jaxreg faster)")
  if args.warp_compare:
    print("\n| size | pass | jaxreg, warp kernel | jaxreg, pure-JAX warp | pure-JAX / kernel |")
    print("| --- | --- | ---: | ---: | ---: |")
    for size in args.warp_compare:
      for mode, suffix in (("train step", ""), ("forward + warp", "+infer")):
        res = [_measure("jax:folded" + suffix, size, args.repeats, args.threads, warp=w)[0]
               for w in ("ffi", "jax")]
        cells = [f"{r['seconds']:.3f} s, {r['peak_mib']:.0f} MiB" if r else "failed" for r in res]
        ratio = f"{res[1]['seconds'] / res[0]['seconds']:.2f}x" if all(res) else "n/a"
        print(f"| {size} | {mode} | {cells[0]} | {cells[1]} | {ratio} |", flush=True)


if __name__ == "__main__":
  main()
