"""The scripts in examples/ run at tiny size, so that they cannot rot."""

import importlib.util
import os

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example(name):
  path = os.path.join(ROOT, "examples", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"example_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_batched_instance_optimisation_vmapped_and_sharded():
  ex = _example("batched_instance_optimisation")
  out = ex.main(["--tiny", "--pairs", "8"])
  assert out["devices"] == jax.device_count() == 8
  assert out["shards"] == [(1, 16, 16, 16, 3)] * 8  # one pair per device
  curves = out["loss_curves"]
  assert curves.shape == (8, out["steps"]) and np.all(curves[:, -1] < curves[:, 0])
  assert out["max_loss_difference"] < 1e-4
  np.testing.assert_allclose(out["dice_after_sharded"], out["dice_after"], atol=0.01)
  assert np.mean(out["dice_after"]) > np.mean(out["dice_before"])
  # vmap against the plain function on one pair
  b = out["batch"]
  disp, curve = jax.jit(lambda f, m: ex.optimise_pair(f, m, steps=out["steps"], lr=0.1,
                                                       alpha=0.5, window=5))(
      b["fixed"][3], b["moving"][3])
  np.testing.assert_allclose(curve, curves[3], rtol=1e-4, atol=1e-5)


def test_learned_intensity_mapping_registers_across_a_contrast_change():
  out = _example("learned_intensity_mapping").main(["--tiny", "--pairs", "1"])
  row = out["rows"][0]
  assert np.isfinite(list(row.values())).all()
  assert row["loss_last"] < row["loss_first"]
  assert row["mse_mapped"] > row["mse"] + 0.1  # plain MSE is pulled the wrong way
  assert row["mapping_error"] < 0.15


def test_joint_segmentation_and_registration_trains():
  out = _example("registration_guided_segmentation").main(["--tiny"])
  for run in ("atlas only", "joint"):
    r = out[run]
    assert all(np.isfinite(v) for v in r.values())
    assert r["loss_last"] < r["loss_first"]
    assert 0.0 <= r["seg_dice"] <= 1.0
