"""The accelerator run: every benchmark at one size setting, one JSON + markdown table.

    python benchmarks/accelerator.py --out DIR [--size tiny|full]   (or benchmarks/accelerator.sh)

Each benchmark runs as its own process with a time limit (a slow or failing one is recorded,
the rest go on), on whatever platform JAX finds (GPU, TPU, else CPU). ``full`` sizes fit
about 8 minutes on one modern GPU; ``tiny`` runs anywhere in about two minutes (a test runs
it on CPU, so the script works the first time an accelerator is lent).

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
        "scatter_n": 32, "register": "demo", "limit_s": 240,
    },
    "full": {
        "train_step": ["benchmarks/train_step.py", "--sizes", "128", "--grow", "64", "128",
                       "192", "--repeats", "3"],
        "warp": ["benchmarks/warp.py", "--sizes", "128", "192", "--repeats", "10"],
        "operators": ["benchmarks/operators.py", "--sizes", "128", "--repeats", "5"],
        "memory": ["benchmarks/memory.py", "--space", "1", "--dtypes", "float32,bfloat16",
                   "--remat", "no,yes"],
        "scatter_n": 192, "register": "demo", "limit_s": 150,
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


def _register_demo(out: str, limit: float) -> dict:
  """``jaxreg register`` as a whole process on the embedded demo pair (both label maps)."""
  import numpy as np

  from jaxreg import data
  from jaxreg import io
  pair = data.demo_pair(0, split="eval")
  d = os.path.join(out, "register_inputs")
  os.makedirs(d, exist_ok=True)
  for name, arr in (("fixed", np.round(pair.fixed).astype(np.int16)),
                    ("moving", np.round(pair.moving).astype(np.int16)),
                    ("fixed_labels", pair.fixed_labels.astype(np.uint8)),
                    ("moving_labels", pair.moving_labels.astype(np.uint8))):
    io.save(os.path.join(d, f"{name}.nii.gz"), arr, pair.affine)
  target = os.path.join(out, "register_output")
  cmd = [sys.executable, "-m", "jaxreg.cli", "register", "--out", target] + sum(
      ([f"--{k.replace('_', '-')}", os.path.join(d, f"{k}.nii.gz")]
       for k in ("fixed", "moving", "fixed_labels", "moving_labels")), [])
  row = _run("register", cmd, limit)
  metrics_path = os.path.join(target, "metrics.json")
  if row["rc"] == 0 and os.path.exists(metrics_path):
    m = json.load(open(metrics_path, encoding="utf-8"))
    row["metrics"] = {k: m.get(k) for k in ("seconds", "stage_seconds", "xla_compilations",
                                            "mean_dice", "mean_dice_before", "folding_fraction")}
    row["shape"] = list(pair.fixed.shape)
  return row


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
  rows.append(_register_demo(args.out, plan["limit_s"]))
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
