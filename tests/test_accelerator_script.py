"""benchmarks/accelerator.sh runs end to end on CPU at tiny sizes (so it works the first time
an accelerator is lent) and writes one JSON + markdown table."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accelerator_script_runs_every_benchmark_on_cpu(tmp_path):
  out = tmp_path / "accel"
  env = dict(os.environ, JAXREG_NO_INSTALL="1", PYTHON=sys.executable, JAXREG_BENCH_SIZE="tiny")
  r = subprocess.run(["bash", "benchmarks/accelerator.sh", str(out)], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  result = json.loads((out / "accelerator.json").read_text(encoding="utf-8"))
  assert result["size"] == "tiny" and result["device"]["platform"] == "cpu"
  rows = {row["name"]: row for row in result["benchmarks"]}
  assert sorted(rows) == ["memory", "operators", "register", "train_step", "warp"]
  assert all(row["rc"] == 0 for row in rows.values()), {k: v["error"] for k, v in rows.items()}
  assert "| 16x16x16 | 2 | float32 |" in rows["memory"]["output"]  # sharded over 2 devices
  assert "torch" in rows["warp"]["output"].lower()  # the reference, measured in the same run
  assert rows["register"]["metrics"]["mean_dice"] > rows["register"]["metrics"]["mean_dice_before"]
  s = result["scatter_add"]
  assert s["max_abs_difference"] < 1e-4 and s["scatter_add"] > 0 and s["sort_segment_sum"] > 0
  md = (out / "accelerator.md").read_text(encoding="utf-8")
  assert "| register | 0 |" in md and "f32 scatter-add" in md
