"""One network conditioned on the regularisation weight vs separately trained fixed-lambda ones.

    python benchmarks/reg_conditioning.py train      # the five trainings (resumable), ~1 h on 2 cores
    python benchmarks/reg_conditioning.py evaluate   # the table and reg_conditioning.png

Trained on configs/demo.py (48³ at 8 mm, synthetic pairs of the embedded CT) with ``STEPS``
steps each: a FiLM-conditioned and a channel-conditioned network over lambda in
``model.reg_range`` = (0.1, 100), and fixed-lambda networks at three of the evaluated values.
Evaluation: the validation pairs (held-out seeds) at each lambda of ``LAMBDAS``: mean Dice over
the 12 organs, SDlogJ and the folding fraction of the network's field. ``JAXREG_WARP`` is
read once at the start (:func:`jaxreg.pipeline.environment.configure`, without the
compilation cache): ``auto`` loads the C++ warp kernel, which the warps then use on a CPU.
"""

from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join(ROOT, "runs", "reg_conditioning")
STEPS = 600
LAMBDAS = (0.1, 0.5, 3.0, 20.0, 100.0)
FIXED = (0.1, 3.0, 100.0)


def runs() -> dict[str, list[str]]:
  """Name -> config overrides of each training."""
  common = [f"train.steps={STEPS}", f"train.eval_every={STEPS}",
            f"train.checkpoint_every={STEPS // 4}"]
  out = {"film": common + ["model.condition_on_reg=True", "model.reg_conditioning='film'"],
         "channel": common + ["model.condition_on_reg=True", "model.reg_conditioning='channel'"]}
  for lam in FIXED:
    out[f"fixed_{lam:g}"] = common + [f"loss.reg_weight={lam}", f"loss.total_reg_weight={lam}"]
  return dict(sorted(out.items(), key=lambda kv: ["film", "fixed_3", "fixed_0.1", "fixed_100",
                                                  "channel"].index(kv[0])))


def train() -> None:
  from jaxreg import training
  from jaxreg.pipeline import environment
  environment.configure("off")  # $JAXREG_WARP: the kernel (auto) for the training's warps
  base = training.load_config(os.path.join(ROOT, "configs", "demo.py"))
  for name, overrides in runs().items():
    t = time.time()
    result = training.train_and_evaluate(training.override(base, overrides),
                                         os.path.join(RUNS, name), progress=False)
    print(f"{name}: step {result['step']}, {time.time() - t:.0f} s, "
          f"val_dice {result.get('val_dice', float('nan')):.4f}", flush=True)


def _load(name: str):
  """``(network, config, step)`` of run ``name``'s latest checkpoint."""
  import tempfile

  from jaxreg.io import weights
  with tempfile.TemporaryDirectory() as tmp:
    step = weights.export_checkpoint(os.path.join(RUNS, name), os.path.join(tmp, "model"))
    return (*weights.load_weights(os.path.join(tmp, "model")), step)


def score(net, config, lam: float | None, pairs, implementation: str | None = None
          ) -> dict[str, float]:
  """Mean Dice (organs present), SDlogJ and folding of the network's field at ``lam``
  (``implementation``: the warp's; :mod:`jaxreg.ops.warp`)."""
  import jax.numpy as jnp
  import numpy as np

  from jaxreg import metrics
  from jaxreg.nn import model
  from jaxreg.ops import warp
  dice, sd, fold = [], [], []
  classes = range(1, len(config.data.label_ids) + 1)
  for ex in pairs:
    reg = None if lam is None else jnp.full((1,), lam, jnp.float32)
    disp, _ = model.predict_displacement(net, jnp.asarray(ex["fixed"])[None],
                                         jnp.asarray(ex["moving"])[None],
                                         method=config.decomposition, reg_weight=reg,
                                         implementation=implementation)
    disp = np.asarray(disp[0])
    warped = np.asarray(warp.warp(ex["moving_labels"], disp, order=0,
                                  implementation=implementation))
    dice.append(metrics.finite_mean(metrics.dice(ex["fixed_labels"], warped, classes)))
    sd.append(metrics.sdlogj(disp))
    fold.append(metrics.folding_fraction(disp))
  return {"dice": float(np.mean(dice)), "sdlogj": float(np.mean(sd)),
          "folding": float(np.mean(fold))}


def evaluate() -> None:
  import jax
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from jaxreg.pipeline import environment
  from jaxreg.training import sources
  implementation = environment.configure("off").implementation
  results: dict[str, dict] = {}
  pairs = None
  for name in runs():
    if not os.path.isdir(os.path.join(RUNS, name, "checkpoints")):
      print(f"{name}: not trained (run `train` first); skipped")
      continue
    net, config, step = _load(name)
    if step < STEPS:
      print(f"{name}: at step {step} of {STEPS} (still training?); skipped")
      continue
    if pairs is None:
      found = sources.make_sources(config)
      val_source, num_val = found.val, found.num_val
      pairs = [val_source(i) for i in range(num_val)]
    if name.startswith("fixed_"):
      results[name] = {float(config.loss.reg_weight): score(net, config, None, pairs,
                                                            implementation)}
    else:
      results[name] = {lam: score(net, config, lam, pairs, implementation) for lam in LAMBDAS}
  if pairs is None:
    print("no trained run to evaluate")
    return
  identity = score_identity(pairs)
  print(f"{len(pairs)} validation pairs (held-out seeds), {jax.devices()[0].platform}, "
        f"{time.strftime('%Y-%m-%d')}; identity Dice {identity:.4f}")
  print("| lambda | " + " | ".join(f"{n} Dice / SDlogJ / folding %" for n in results) + " |")
  print("| --- |" + " --- |" * len(results))
  for lam in LAMBDAS:
    cells = []
    for name in results:
      r = results[name].get(lam)
      cells.append("" if r is None else
                   f"{r['dice']:.4f} / {r['sdlogj']:.3f} / {100 * r['folding']:.3f}")
    print(f"| {lam:g} | " + " | ".join(cells) + " |")
  for name in results:
    if name.startswith("fixed_"):
      (lam, r), = results[name].items()
      for cond in ("film", "channel"):
        if cond in results:
          print(f"{cond} at lambda {lam:g}: Dice {results[cond][lam]['dice'] - r['dice']:+.4f} "
                f"vs {name}")
  json.dump({n: {str(k): v for k, v in r.items()} for n, r in results.items()},
            open(os.path.join(RUNS, "results.json"), "w"), indent=1)
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
  for ax, key, label in zip(axes, ("dice", "sdlogj", "folding"),
                            ("mean Dice (12 organs)", "SDlogJ", "folding fraction")):
    for name, r in results.items():
      lams = sorted(r)
      style = dict(marker="o", ls="-") if not name.startswith("fixed_") else \
          dict(marker="s", ls="none", ms=8, color="k")
      ax.plot(lams, [r[l][key] for l in lams], label=None if name.startswith("fixed_") and
              name != "fixed_0.1" else ("fixed-lambda models" if name.startswith("fixed_")
                                        else f"one {name}-conditioned model"), **style)
    if key == "dice":
      ax.axhline(identity, color="grey", ls=":", label="identity")
    ax.set_xscale("log")
    ax.set_xlabel("lambda (regularisation weight)")
    ax.set_title(label)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  out = os.path.join(ROOT, "benchmarks", "reg_conditioning.png")
  fig.savefig(out, dpi=110)
  print(f"plot: {out}")


def score_identity(pairs) -> float:
  import numpy as np

  from jaxreg import metrics
  classes = range(1, int(max(np.max(p["fixed_labels"]) for p in pairs)) + 1)
  return float(np.mean([metrics.finite_mean(metrics.dice(p["fixed_labels"], p["moving_labels"],
                                                         classes)) for p in pairs]))


if __name__ == "__main__":
  {"train": train, "evaluate": evaluate}[sys.argv[1]]()
