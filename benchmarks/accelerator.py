"""The accelerator run: every benchmark at one size setting, one JSON + markdown table.

    python benchmarks/accelerator.py --out DIR [--size tiny|full]   (or benchmarks/accelerator.sh)

Each benchmark runs as its own process with a time limit (a slow or failing one is recorded,
the rest go on), on whatever platform JAX finds (GPU, TPU, else CPU). ``full`` sizes fit
about 8 minutes on one modern GPU; ``tiny`` runs anywhere in about two minutes (a test runs
it on CPU, so the script works the first time an accelerator is lent).

The register benchmark runs ``jaxreg register`` as whole processes on the embedded pair and
centred crops of it (``tiny``: a 64x60x56 crop; ``full``: 64x60x56, 80x80x70 and the whole
144x144x133), each with an empty compilation cache and again warm, and tabulates the process
wall time, the registration's seconds per stage and the programs compiled / loaded.

Besides the benchmarks it measures the **scatter-add** that the warp's image gradient and
the composition's backward use: f32 ``.at[].add`` of one value per voxel into a volume,
against the same sum as a sort + ``segment_sum``, so the known slowdown of f32 scatter-add
on GPU in some jaxlib releases shows up as a ratio in the table, with the jax/jaxlib versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = {
    "tiny": {
        "train_step": ["benchmarks/train_step.py", "--sizes", "16", "--grow", "--repeats", "1"],
        "warp": ["benchmarks/warp.py", "--sizes", "32", "--repeats", "2"],
        "operators": ["benchmarks/operators.py", "--sizes", "32", "--repeats", "1"],
        "memory": ["benchmarks/memory.py", "--config", "configs/test.py", "--space", "1,2",
                   "--dtypes", "float32", "--remat", "no"],
        "scatter_n": 32, "register": [(64, 60, 56)], "limit_s": 240,
    },
    "full": {
        "train_step": ["benchmarks/train_step.py", "--sizes", "128", "--grow", "64", "128",
                       "192", "--repeats", "3"],
        "warp": ["benchmarks/warp.py", "--sizes", "128", "192", "--repeats", "10"],
        "operators": ["benchmarks/operators.py", "--sizes", "128", "--repeats", "5"],
        "memory": ["benchmarks/memory.py", "--space", "1", "--dtypes", "float32,bfloat16",
                   "--remat", "no,yes"],
        "scatter_n": 192, "register": [(64, 60, 56), (80, 80, 70), None], "limit_s": 150,
    },
}


def _device() -> dict:
  import jax
  import jaxlib
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": getattr(d, "device_kind", ""),
          "device_count": jax.device_count(), "jax": jax.__version__,
          "jaxlib": jaxlib.__version__, "python": platform.python_version(),
          "machine": platform.machine(), "cpu_count": os.cpu_count(),
          "date": time.strftime("%Y-%m-%d")}


def scatter_add(n: int, repeats: int = 5) -> dict:
  """Seconds of a volume-sized f32 scatter-add vs sort + segment_sum (same sums, checked)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  size = n ** 3
  rng = np.random.default_rng(0)
  idx = jnp.asarray(rng.integers(0, size, size), jnp.int32)
  val = jnp.asarray(rng.random(size, np.float32))
  scatter = jax.jit(lambda i, v: jnp.zeros(size, jnp.float32).at[i].add(v))

  def sorted_sum(i, v):
    order = jnp.argsort(i)
    return jax.ops.segment_sum(v[order], i[order], size, indices_are_sorted=True)

  segment = jax.jit(sorted_sum)
  a, b = scatter(idx, val).block_until_ready(), segment(idx, val).block_until_ready()
  err = float(jnp.max(jnp.abs(a - b)))
  times = {}
  for name, fn in (("scatter_add", scatter), ("sort_segment_sum", segment)):
    ts = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      fn(idx, val).block_until_ready()
      ts.append(time.perf_counter() - t0)
    times[name] = float(np.median(ts))
  return {"n": n, "voxels": size, **times, "max_abs_difference": err,
          "scatter_over_sort": times["scatter_add"] / times["sort_segment_sum"]}


def _register_sizes(out: str, limit: float, crops) -> dict:
  """``jaxreg register`` as whole processes on the embedded demo pair (both label maps) and
  centred crops of it (``crops``: shapes, ``None`` for the whole 144x144x133 pair), each
  size twice: with an empty compilation cache of its own ("cold"), then again ("warm").
  One row: every run's wall seconds and ``metrics.json`` (per-stage seconds, programs
  compiled / loaded, Dice); ``metrics`` is the last (largest) size's warm run."""
  import numpy as np

  from jaxreg import data
  from jaxreg import io
  pair = data.demo_pair(0, split="eval")
  t0, runs, row = time.time(), [], None
  for crop in crops:
    shape = tuple(crop) if crop else pair.fixed.shape
    label = "x".join(map(str, shape))
    lo = [(n - c) // 2 for n, c in zip(pair.fixed.shape, shape)]
    box = tuple(slice(a, a + c) for a, c in zip(lo, shape))
    affine = pair.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ np.asarray(lo) + affine[:3, 3]
    d = os.path.join(out, "register", label)
    os.makedirs(d, exist_ok=True)
    for name, arr in (("fixed", np.round(pair.fixed).astype(np.int16)),
                      ("moving", np.round(pair.moving).astype(np.int16)),
                      ("fixed_labels", pair.fixed_labels.astype(np.uint8)),
                      ("moving_labels", pair.moving_labels.astype(np.uint8))):
      io.save(os.path.join(d, f"{name}.nii.gz"), arr[box], affine)
    for cache in ("cold", "warm"):
      target = os.path.join(d, f"out-{cache}")
      cmd = [sys.executable, "-m", "jaxreg.cli", "register", "--out", target,
             "--jax-cache", os.path.join(d, "jax-cache")] + sum(
          ([f"--{k.replace('_', '-')}", os.path.join(d, f"{k}.nii.gz")]
           for k in ("fixed", "moving", "fixed_labels", "moving_labels")), [])
      row = _run("register", cmd, limit)
      run = {"shape": list(shape), "cache": cache, "rc": row["rc"], "wall_s": row["seconds"]}
      metrics_path = os.path.join(target, "metrics.json")
      if row["rc"] == 0 and os.path.exists(metrics_path):
        m = json.load(open(metrics_path, encoding="utf-8"))
        run.update({k: m.get(k) for k in (
            "seconds", "stage_seconds", "programs_compiled", "programs_loaded", "mean_dice",
            "mean_dice_before", "folding_fraction")})
      runs.append(run)
      if row["rc"] != 0:
        break
  row = dict(row, seconds=round(time.time() - t0, 1), runs=runs,
             rc=next((r["rc"] for r in runs if r["rc"] != 0), 0))
  if runs and "seconds" in runs[-1]:
    row["metrics"] = {k: v for k, v in runs[-1].items() if k not in ("rc", "wall_s")}
    row["shape"] = runs[-1]["shape"]
  return row


def _register_table(row: dict) -> str:
  lines = ["| shape | cache | process wall s | registration s | affine | model grid | network "
           "| refine | to fixed grid | warp | programs compiled / loaded | Dice before -> after |",
           "| --- | --- |" + " ---: |" * 10]
  for r in row.get("runs", []):
    st = r.get("stage_seconds") or {}
    cells = [f"{st.get(k, float('nan')):.2f}" for k in ("affine", "model_grid", "network",
                                                        "refine", "to_fixed_grid", "warp")]
    reg = f"{r['seconds']:.2f}" if r.get("seconds") is not None else f"exit {r['rc']}"
    dice = (f"{r['mean_dice_before']:.3f} -> {r['mean_dice']:.3f}"
            if r.get("mean_dice") is not None else "")
    lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['cache']} | {r['wall_s']} | {reg} | "
                 + " | ".join(cells) + f" | {r.get('programs_compiled')} / "
                 f"{r.get('programs_loaded')} | {dice} |")
  return "\n".join(lines)


def _run(name: str, cmd: list[str], limit: float) -> dict:
  t0 = time.time()
  try:
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
    rc, out, err = p.returncode, p.stdout, p.stderr
  except subprocess.TimeoutExpired as e:
    rc = "timeout"
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    err = f"stopped after {limit:.0f} s"
  return {"name": name, "command": " ".join(cmd[1:]), "rc": rc,
          "seconds": round(time.time() - t0, 1), "output": out[-6000:],
          "error": (err or "").strip().splitlines()[-1:] if rc else []}


def markdown(result: dict) -> str:
  dev, lines = result["device"], []
  lines.append(f"# jaxreg on {dev['platform']} ({dev['device_kind']}, {dev['device_count']} "
               f"device(s)), jax {dev['jax']} / jaxlib {dev['jaxlib']}, {dev['date']}, "
               f"size {result['size']}\n")
  lines.append("| benchmark | exit | seconds |\n| --- | --- | --- |")
  for row in result["benchmarks"]:
    lines.append(f"| {row['name']} | {row['rc']} | {row['seconds']} |")
  s = result["scatter_add"]
  lines.append(f"\n## f32 scatter-add, {s['voxels']} values into a {s['n']}³ volume\n")
  lines.append("| scatter-add s | sort + segment_sum s | scatter / sort | max abs diff |\n"
               "| --- | --- | --- | --- |")
  lines.append(f"| {s['scatter_add']:.4f} | {s['sort_segment_sum']:.4f} | "
               f"{s['scatter_over_sort']:.2f} | {s['max_abs_difference']:.2e} |")
  for row in result["benchmarks"]:
    lines.append(f"\n## {row['name']} (`python {row['command']}`)\n")
    if row.get("runs"):
      lines.append(_register_table(row) + "\n")
    if row.get("metrics"):
      lines.append("```\n" + json.dumps(row["metrics"], indent=1) + "\n```")
    lines.append(row["output"].strip() or "(no output) " + " ".join(row["error"]))
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.path.join(ROOT, "runs", "accelerator"))
  p.add_argument("--size", choices=tuple(SIZES), default=os.environ.get("JAXREG_BENCH_SIZE"))
  args = p.parse_args(argv)
  device = _device()
  size = args.size or ("tiny" if device["platform"] == "cpu" else "full")
  plan = SIZES[size]
  os.makedirs(args.out, exist_ok=True)
  print(f"jaxreg accelerator run: {device['platform']} x{device['device_count']}, size {size}",
        flush=True)
  rows = []
  for name in ("train_step", "warp", "operators", "memory"):
    rows.append(_run(name, [sys.executable, *plan[name]], plan["limit_s"]))
    print(f"  {name}: exit {rows[-1]['rc']} in {rows[-1]['seconds']} s", flush=True)
  rows.append(_register_sizes(args.out, plan["limit_s"], plan["register"]))
  print(f"  register: exit {rows[-1]['rc']} in {rows[-1]['seconds']} s", flush=True)
  result = {"size": size, "device": device, "scatter_add": scatter_add(plan["scatter_n"]),
            "benchmarks": rows}
  with open(os.path.join(args.out, "accelerator.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(args.out, "accelerator.md"), "w", encoding="utf-8") as f:
    f.write(markdown(result))
  print(f"written to {args.out}/accelerator.json and accelerator.md")
  return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
