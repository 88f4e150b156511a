"""The two-axis mesh: batch over ``data``, the first spatial axis over ``space`` (8 fake CPU
devices, tests/conftest.py), against one device."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg.ops import losses
from jaxreg.ops import sharding as mesh_lib
from jaxreg import training
from jaxreg.ops import warp
from jaxreg.ops import trilinear
from jaxreg.types import InputError
from jaxreg.training import config as config_lib, sharding, sources, state as state_lib, step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_CONFIG = os.path.join(ROOT, "configs", "test.py")
# Data parallel over all 8 devices, and both axes at once (halos between 4 X-slabs, the batch
# over 2): the pure space = 8 split is compared in test_refine / test_register and below.
MESHES = [(8, 1), (2, 4)]


def _config(**overrides):
  config = training.load_config(TEST_CONFIG)
  return training.override(config, [f"{k}={v!r}" for k, v in overrides.items()])


def _batch(config, n):
  source = sources.make_sources(config).train
  examples = [source(i) for i in range(n)]
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def _close(a, b, rtol=2e-5, atol=2e-7):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def test_meshes_give_one_device_loss_gradients_and_parameters():
  assert jax.device_count() == 8, "tests run with 8 fake CPU devices (see tests/conftest.py)"
  config = _config()
  graphdef, template, state = state_lib.init_state(config)
  tx = state_lib.make_optimizer(config)
  step = step_lib.make_train_step(graphdef, template, config, tx)
  loss_fn = step_lib.make_loss_fn(graphdef, template, config)
  batch = _batch(config, 8)
  results = {}
  for data, space in [(1, 1)] + MESHES:
    mesh = sharding.make_mesh(jax.devices()[:data * space], data=data, space=space)
    assert dict(mesh.shape) == {"data": data, "space": space}
    rep = sharding.replicated(mesh)
    s = jax.device_put(jax.device_get(state), rep)
    grad = jax.jit(mesh_lib.on_mesh(jax.value_and_grad(loss_fn, has_aux=True), mesh),
                   in_shardings=(jax.tree.map(lambda _: rep, s.params),
                                 sharding.batch_sharding(mesh)), out_shardings=rep)
    (loss, _), grads = grad(s.params, sharding.global_batch(batch, mesh))
    # compiled once, ahead of time, and run as compiled (no second compilation)
    jitted = step_lib.jit_train_step(step, mesh, s).lower(
        s, sharding.global_batch(batch, mesh)).compile()
    if space > 1:  # the convolutions really are split along X: halos travel between devices
      assert "collective-permute" in jitted.as_text()
    losses_ = []
    for _ in range(3):  # the warm-up starts at lr 0: steps 2 and 3 move the parameters
      s, metrics = jitted(s, sharding.global_batch(batch, mesh))
      losses_.append(float(metrics["loss"]))
    results[(data, space)] = (float(loss), jax.device_get(grads), losses_,
                              jax.device_get(s.params))
  ref = results[(1, 1)]
  for key in MESHES:
    loss, grads, losses_, params = results[key]
    assert loss == pytest.approx(ref[0], rel=1e-5), key
    assert losses_ == pytest.approx(ref[2], rel=1e-5), key
    _close(grads, ref[1], rtol=1e-4, atol=1e-6)
    _close(params, ref[3])
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), ref[3],
                       jax.device_get(state.params))
  assert max(jax.tree.leaves(moved)) > 1e-6  # not a comparison of untouched parameters


def test_lncc_and_warp_across_shard_borders_equal_one_device():
  """Windows 9 voxels wide over shards 2 voxels thick; a field reaching 5 voxels across."""
  rng = np.random.default_rng(0)
  fixed = rng.random((2, 16, 12, 10), np.float32)
  moving = rng.random((2, 16, 12, 10), np.float32)
  disp = (5 * rng.uniform(-1, 1, (2, 16, 12, 10, 3))).astype(np.float32)

  def f(fixed, moving, disp):
    warped = warp.warp_batch(moving, mesh_lib.spatial(disp))
    return jnp.mean(jax.vmap(lambda a, b: losses.local_ncc(a, b, window=9))(fixed, warped))

  ref = jax.jit(jax.value_and_grad(f, argnums=(1, 2)))(fixed, moving, disp)
  mesh = sharding.make_mesh(data=1, space=8)
  vol = sharding.batch_sharding(mesh)
  sharded = jax.jit(mesh_lib.on_mesh(jax.value_and_grad(f, argnums=(1, 2)), mesh),
                    in_shardings=(vol, vol, vol))
  args = [jax.device_put(x, vol) for x in (fixed, moving, disp)]
  assert args[2].sharding.shard_shape(disp.shape)[1] == 2
  out = sharded(*args)
  assert float(out[0]) == pytest.approx(float(ref[0]), rel=1e-5)
  _close(jax.device_get(out[1]), ref[1], rtol=1e-4, atol=1e-6)


def test_channel_at_a_time_warp_across_shards_equals_one_device(monkeypatch):
  """Large multi-channel warps loop over channels (trilinear._SEQUENTIAL_VALUES, forced here):
  under space = 8 they equal one device's all-channels-at-once warp, gradients included."""
  rng = np.random.default_rng(1)
  image = rng.random((2, 16, 12, 10, 3), np.float32)
  disp = (4 * rng.uniform(-1, 1, (2, 16, 12, 10, 3))).astype(np.float32)
  weights = rng.normal(size=image.shape).astype(np.float32)
  f = lambda a, d: jnp.sum(warp.warp_batch(a, mesh_lib.spatial(d)) ** 2 * weights)
  ref = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(image, disp)
  monkeypatch.setattr(trilinear, "_SEQUENTIAL_VALUES", 0)
  mesh = sharding.make_mesh(data=1, space=8)
  vol = sharding.batch_sharding(mesh)
  sharded = jax.jit(mesh_lib.on_mesh(jax.value_and_grad(f, argnums=(0, 1)), mesh),
                    in_shardings=(vol, vol))
  out = sharded(*[jax.device_put(x, vol) for x in (image, disp)])
  assert float(out[0]) == pytest.approx(float(ref[0]), rel=1e-5)
  _close(jax.device_get(out[1]), ref[1], rtol=1e-4, atol=1e-5)


def test_checkpoint_written_under_one_mesh_resumes_under_another(tmp_path):
  quiet = dict(progress=False, log=lambda s: None)
  whole = training.train_and_evaluate(_config(**{"mesh.data": 1, "train.devices": 1}),
                                      str(tmp_path / "one"), **quiet)
  training.train_and_evaluate(_config(**{"mesh.data": 2, "mesh.space": 4}),
                              str(tmp_path / "split"), stop_at=2, **quiet)
  resumed = training.train_and_evaluate(_config(**{"mesh.space": 8}),
                                        str(tmp_path / "split"), **quiet)
  assert resumed["step"] == whole["step"] == 4
  _, p_one, _, _ = training.restore_latest(str(tmp_path / "one"))
  _, p_split, _, _ = training.restore_latest(str(tmp_path / "split"))
  _close(jax.device_get(p_split.params), jax.device_get(p_one.params), rtol=1e-4, atol=1e-6)
  assert resumed["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-4)


def test_bad_meshes_are_one_line_errors():
  with pytest.raises(InputError, match=r"data=3 x space=2 = 6 devices, but 8 device"):
    mesh_lib.make_mesh(data=3, space=2)
  with pytest.raises(InputError, match="space=3 does not divide the 8 device"):
    mesh_lib.make_mesh(space=3)
  with pytest.raises(InputError, match=r"space=3 does not divide the first axis of data.shape"):
    config_lib.check_config(_config(**{"mesh.space": 3, "mesh.data": 1}))
  with pytest.raises(InputError, match="unknown axis 'model'"):
    mesh_lib.parse_mesh("model=2")
  assert mesh_lib.parse_mesh("data=2,space=4") == {"data": 2, "space": 4}
  assert mesh_lib.parse_mesh("1,8") == {"data": 1, "space": 8}
  with pytest.raises(InputError, match="expected 'data=D,space=S'"):
    mesh_lib.parse_mesh("8")


@pytest.mark.parametrize("flag, message", [
    ("--config.mesh.space=3", "space=3 does not divide the first axis of data.shape (16, 16, 16)"),
    ("--config.mesh.data=3", "data=3 x space=1 = 3 devices, but 8 device(s) are in use"),
])
def test_train_py_refuses_a_bad_mesh_in_one_line(tmp_path, flag, message):
  r = subprocess.run([sys.executable, "train.py", "--config", TEST_CONFIG, "--workdir",
                      str(tmp_path / "w"), "--no-progress", flag], cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], r.stderr
  assert not (tmp_path / "w").exists()
