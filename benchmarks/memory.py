"""Device memory of the compiled train step, from XLA's own analysis (no accelerator needed).

    python benchmarks/memory.py                       # configs/default.py (2 mm whole body)
    python benchmarks/memory.py --shape 96,80,128     # another grid

Compiles the train step of a config for one device, in float32 and with bfloat16 compute
(``train.compute_dtype``), with and without rematerialisation of the UNet levels
(``model.remat``), without running it, and prints ``compiled.memory_analysis()``:
arguments (parameters, optimiser state, batch), outputs and temporaries (activations kept
for the backward pass and scratch), in GiB. The reference is the paper's 11 GB for a
2 mm whole-body batch of 1. The figures are XLA:CPU's; a GPU/TPU compiler schedules
differently, so on an accelerator run it there (benchmarks/accelerator.sh).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GIB = 2.0 ** 30


def analyse(config) -> dict[str, float]:
  """Compile one train step (abstract inputs, nothing allocated) and read its memory."""
  import jax
  import jax.numpy as jnp

  from jaxreg.training import sharding, state as state_lib, step as step_lib
  graphdef, template, state = state_lib.init_state(config)
  mesh = sharding.make_mesh(jax.devices()[:1])
  tx = state_lib.make_optimizer(config)
  train_step = step_lib.jit_train_step(step_lib.make_train_step(graphdef, template, config, tx),
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
          "peak": (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes) / GIB,
          "compile_seconds": time.time() - t0}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "default.py"))
  p.add_argument("--shape", help="X,Y,Z to override data.shape")
  args = p.parse_args(argv)
  from jaxreg import training
  base = training.load_config(args.config)
  if args.shape:
    base = training.override(base, [f"data.shape=({args.shape})"])
  print(f"{args.config}: data.shape {tuple(base.data.shape)}, batch {base.train.batch_size}, "
        f"UNet {tuple(base.model.widths)}, K={base.model.num_subfields}; one device, XLA:CPU")
  print("| compute dtype | remat | arguments GiB | outputs GiB | temporaries GiB | total GiB |"
        " compile s |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for remat in (False, True):
    for dtype in ("float32", "bfloat16"):
      r = analyse(training.override(base, [f"train.compute_dtype='{dtype}'", "train.devices=1",
                                           f"model.remat={remat}"]))
      print(f"| {dtype} | {'levels' if remat else 'no'} | {r['arguments']:.2f} | "
            f"{r['outputs']:.2f} | {r['temporaries']:.2f} | {r['peak']:.2f} | "
            f"{r['compile_seconds']:.0f} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
