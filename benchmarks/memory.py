"""Device memory of the compiled train step, from XLA's own analysis (no accelerator needed).

    python benchmarks/memory.py                       # configs/default.py (2 mm whole body)
    python benchmarks/memory.py --space 1,8 --shape 96,80,128 --json out.json

Compiles the train step of a config without running it, for one device and spatially
sharded over ``space`` = 2, 4, 8 devices (``config.mesh``; fake CPU devices are made when
there are too few), in float32 and with bfloat16 compute (``train.compute_dtype``), with and
without rematerialisation (``model.remat``: the UNet levels; ``train.remat_loss``: the
composition, warps and losses), and prints ``compiled.memory_analysis()`` **per device**:
arguments (parameters, optimiser state, this device's share of the batch), outputs and
temporaries (activations kept for the backward pass and scratch), in GiB. The reference is
the paper's 11 GB for a 2 mm whole-body batch of 1. Each row is compiled with the C++ warp
kernel where it runs (one CPU device: ``warp = kernel``) and with the pure-JAX warp that
accelerators and meshes run (``warp = jax``; ``--warp jax`` for those rows only); ``--plot``
draws GiB per device against ``space``. Convolutions are compiled ``native``
(what ``model.conv = "auto"`` chooses on GPU/TPU). The figures are XLA:CPU's: it computes
bfloat16 convolutions in float32 (converted copies of each activation) and transposes
layouts around them, so an accelerator's compiler needs less; run it there
(benchmarks/accelerator.sh) for that machine's own figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):  # fake CPU devices for the sharded rows (ignored by GPU/TPU backends)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GIB = 2.0 ** 30


def analyse(config, space: int = 1, implementation: str | None = None) -> dict[str, float]:
  """Compile one train step (abstract inputs, nothing allocated) and read its memory per device.

  ``implementation``: the warp's (``None``, ``"xla"``, ``"ffi"``; :mod:`jaxreg.ops.warp`)."""
  import jax
  import jax.numpy as jnp

  from jaxreg.training import sharding, state as state_lib, step as step_lib
  graphdef, template, state = state_lib.init_state(config)
  mesh = sharding.make_mesh(jax.devices()[:space], data=1, space=space)
  tx = state_lib.make_optimizer(config)
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(graphdef, template, config, tx, implementation=implementation),
      mesh, state)
  shape = (config.train.batch_size,) + tuple(config.data.shape)
  batch = {"fixed": jax.ShapeDtypeStruct(shape, jnp.float32),
           "moving": jax.ShapeDtypeStruct(shape, jnp.float32)}
  if config.data.label_ids:
    batch.update(fixed_labels=jax.ShapeDtypeStruct(shape, jnp.int32),
                 moving_labels=jax.ShapeDtypeStruct(shape, jnp.int32))
  t0 = time.time()
  compiled = train_step.lower(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                           state), batch).compile()
  m = compiled.memory_analysis()
  return {"arguments": m.argument_size_in_bytes / GIB, "outputs": m.output_size_in_bytes / GIB,
          "temporaries": m.temp_size_in_bytes / GIB,
          "total": (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                    - m.alias_size_in_bytes) / GIB,
          "compile_seconds": time.time() - t0}


def _warp_label(space: int, implementation: str | None) -> str:
  """The warp that a step compiled with ``implementation`` on ``space`` devices runs:
  ``kernel`` (the C++ kernel, when loaded: CPU, one device) or ``jax`` (accelerators, meshes)."""
  import jax

  from jaxreg.ops import warp_kernel
  kernel = implementation != "xla" and warp_kernel.loaded() and jax.default_backend() == "cpu"
  return "kernel" if space == 1 and kernel else "jax"


def rows(base, spaces, dtypes=("float32", "bfloat16"), remats=(False, True),
         warps=("auto", "jax"), log=print):
  """Analyse every (space, remat, dtype, warp path) combination; log one markdown row each.

  ``warps``: ``JAXREG_WARP``'s values (``auto``, ``ffi``, ``jax``), each passed to the step as
  the warp's ``implementation`` (:data:`jaxreg.pipeline.environment.WARP_MODES`); one that runs
  the same path as an earlier one on ``space`` devices (the kernel never runs on a mesh or an
  accelerator) is left out. Loads the C++ kernel into this process unless only ``jax``."""
  import jax

  from jaxreg import training
  from jaxreg.ops import warp_kernel
  from jaxreg.pipeline import environment
  if any(environment.WARP_MODES[m] != "xla" for m in warps) and jax.default_backend() == "cpu":
    warp_kernel.load(required="ffi" in warps)
  out = []
  for space in spaces:
    paths = {}  # the warp each mode runs here -> the first mode that runs it
    for mode in warps:
      paths.setdefault(_warp_label(space, environment.WARP_MODES[mode]), mode)
    for remat in remats:
      for dtype in dtypes:
        for warp, mode in paths.items():
          config = training.override(base, [
              f"train.compute_dtype='{dtype}'", f"train.devices={space}", "mesh.data=1",
              f"mesh.space={space}", f"model.remat={remat}", f"train.remat_loss={remat}",
              "model.conv='native'"])
          r = dict(analyse(config, space, environment.WARP_MODES[mode]), space=space,
                   compute_dtype=dtype, remat=remat, warp=warp, shape=list(base.data.shape))
          out.append(r)
          log(f"| {'x'.join(map(str, base.data.shape))} | {space} | {dtype} | "
              f"{'UNet levels + loss' if remat else 'no'} | {warp} | {r['arguments']:.2f} | "
              f"{r['temporaries']:.2f} | {r['total']:.2f} | {r['compile_seconds']:.0f} |")
  return out


def plot(results, path: str, goals=((1, 11e9 / GIB), (8, 3e9 / GIB))) -> None:
  """Total GiB per device against ``space``, a line per (dtype, remat, warp); the goals
  (11 GB on one device, 3 GB at space 8) as crosses."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  keys = sorted({(r["compute_dtype"], r["remat"], r["warp"]) for r in results})
  for dtype, remat, warp in keys:
    pts = sorted((r["space"], r["total"]) for r in results
                 if (r["compute_dtype"], r["remat"], r["warp"]) == (dtype, remat, warp))
    ax.plot(*zip(*pts), marker="o", linestyle="-" if warp == "jax" else ":",
            label=f"{dtype}{', remat' if remat else ''}, {warp} warp")
  ax.plot(*zip(*goals), "kx", markersize=10, mew=2, label="goal (11 GB, 3 GB)")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log", base=2)
  spaces = sorted({r["space"] for r in results})
  ax.set_xticks(spaces, [str(s) for s in spaces])
  ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
  ax.set_xlabel("devices on the space axis")
  ax.set_ylabel("GiB per device (XLA:CPU analysis)")
  shape = "x".join(map(str, results[0]["shape"]))
  ax.set_title(f"paper-scale train step {shape}, batch 1")
  ax.legend(fontsize=7)
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  os.replace(tmp, path)


HEADER = ("| shape | space | compute dtype | remat | warp | arguments GiB | temporaries GiB | "
          "total GiB / device | compile s |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def _warp_modes(text: str) -> tuple[str, ...]:
  """``--warp``: comma-separated ``JAXREG_WARP`` values (``auto``, ``ffi``, ``jax``), each
  checked."""
  from jaxreg.pipeline import environment
  modes = tuple(m.strip() for m in text.split(",") if m.strip())
  bad = [m for m in modes if m not in environment.WARP_MODES]
  if bad or not modes:
    raise argparse.ArgumentTypeError(f"{text!r}: each of a comma-separated list must be one "
                                     f"of {', '.join(environment.WARP_MODES)}")
  return modes


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "default.py"))
  p.add_argument("--shape", help="X,Y,Z to override data.shape")
  p.add_argument("--space", default="1,2,4,8", help="devices on the space axis, e.g. 1,2,4,8")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--remat", default="no,yes", help="no, yes or no,yes")
  p.add_argument("--warp", default="auto,jax", type=_warp_modes,
                 help="warp paths to compile with, as JAXREG_WARP's values (auto: the C++ "
                      "kernel on a CPU)")
  p.add_argument("--json", help="also write the rows to this JSON file")
  p.add_argument("--plot", help="also plot GiB per device against space into this PNG")
  args = p.parse_args(argv)
  import jax

  from jaxreg import training
  base = training.load_config(args.config)
  if args.shape:
    base = training.override(base, [f"data.shape=({args.shape})"])
  spaces = [int(s) for s in args.space.split(",")]
  spaces = [s for s in spaces if s <= jax.device_count()]
  print(f"{args.config}: data.shape {tuple(base.data.shape)}, batch {base.train.batch_size}, "
        f"UNet {tuple(base.model.widths)}, K={base.model.num_subfields}, "
        f"{len(base.data.label_ids)} labels; {jax.devices()[0].platform}, "
        f"{jax.device_count()} device(s)")
  print(HEADER, flush=True)
  out = rows(base, spaces, tuple(args.dtypes.split(",")),
             tuple(v == "yes" for v in args.remat.split(",")), args.warp,
             log=lambda s: print(s, flush=True))
  if args.plot:
    plot(out, args.plot)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
