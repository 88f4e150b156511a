"""The sharded step, resumable training, the NaN guard, checkpoints and train.py."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg import training
from jaxreg.nn import inputs
from jaxreg.types import InputError
from jaxreg.training import config as config_lib, sharding, sources, state as state_lib, step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_CONFIG = os.path.join(ROOT, "configs", "test.py")


def _config(**overrides):
  config = training.load_config(TEST_CONFIG)
  return training.override(config, [f"{k}={v!r}" for k, v in overrides.items()])


def _batch(config, n):
  source = sources.make_sources(config).train
  examples = [source(i) for i in range(n)]
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def test_eight_device_step_equals_one_device_step():
  assert jax.device_count() == 8, "tests run with 8 fake CPU devices (see tests/conftest.py)"
  config = _config()
  graphdef, template, state = state_lib.init_state(config)
  step = step_lib.make_train_step(graphdef, template, config, state_lib.make_optimizer(config))
  batch = _batch(config, 8)
  results = {}
  for n in (1, 8):
    mesh = sharding.make_mesh(jax.devices()[:n])
    s = jax.device_put(jax.device_get(state), sharding.replicated(mesh))  # own copy: donated
    jitted = step_lib.jit_train_step(step, mesh, s)
    if n == 8:
      hlo = jitted.lower(s, sharding.global_batch(batch, mesh)).compile().as_text()
      assert "all-reduce" in hlo
    # Two steps: the warm-up starts at lr 0, and the second step uses the
    # optimiser state carried out of the first.
    for _ in range(2):
      s, metrics = jitted(s, sharding.global_batch(batch, mesh))
    results[n] = (jax.device_get(s.params), float(metrics["loss"]))
  assert results[1][1] == pytest.approx(results[8][1], rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               results[1][0], results[8][0])
  # and the step moved the parameters, so the comparison is not vacuous
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), results[8][0],
                       jax.device_get(state.params))
  assert max(jax.tree.leaves(moved)) > 1e-6


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path):
  mesh = sharding.make_mesh()
  with pytest.raises(ValueError, match="batch size 6 is not divisible by the 8 devices"):
    sharding.check_batch_size(6, mesh)
  with pytest.raises(ValueError, match="batch size 4 is not divisible by the 8 devices"):
    training.train_and_evaluate(_config(**{"train.batch_size": 4}), str(tmp_path / "w"),
                                progress=False, log=lambda s: None)
  assert not (tmp_path / "w").exists()  # nothing written for a run that cannot start


def _final_params(workdir):
  step, state, loader, _ = training.restore_latest(workdir)
  return step, jax.device_get(state.params), loader


def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path):
  config = _config()
  quiet = dict(progress=False, log=lambda s: None)
  full = training.train_and_evaluate(config, str(tmp_path / "full"), **quiet)
  part = training.train_and_evaluate(config, str(tmp_path / "part"), stop_at=2, **quiet)
  assert part["step"] == 2
  messages = []
  resumed = training.train_and_evaluate(config, str(tmp_path / "part"), progress=False,
                                        log=messages.append)
  assert any("resumed from step 2" in m for m in messages)
  assert resumed["step"] == full["step"] == 4
  step_a, params_a, loader_a = _final_params(str(tmp_path / "full"))
  step_b, params_b, loader_b = _final_params(str(tmp_path / "part"))
  assert step_a == step_b == 4 and loader_a == loader_b == {"next_index": 4 * 8}  # examples
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
  assert resumed["val_loss"] == full["val_loss"]
  # the resolved config is written beside the checkpoints
  written = json.load(open(tmp_path / "full" / "config.json"))
  assert written["train"]["steps"] == 4 and written["model"]["widths"] == [8, 8, 8]
  # metrics.jsonl has each train step once, also across the resume
  steps = [json.loads(l)["step"] for l in open(tmp_path / "part" / "metrics.jsonl")
           if json.loads(l)["kind"] == "train"]
  assert steps == [1, 2, 3, 4]


def test_checkpoints_keep_latest_and_best_by_validation_loss(tmp_path):
  ckpts = training.Checkpoints(str(tmp_path), keep_last=2, keep_best=1)
  _, _, state = state_lib.init_state(_config())
  for step, loss in [(1, 5.0), (2, 1.0), (3, 3.0), (4, 4.0), (5, 6.0)]:
    ckpts.save(step, state, {"position": step, "seed": 0}, {}, metrics={"val_loss": loss})
  ckpts.wait()
  assert sorted(ckpts.all_steps()) == [2, 4, 5]  # best (loss 1.0) + latest two
  ckpts.close()


def test_non_finite_loss_stops_with_the_step_and_saves_nothing(tmp_path, monkeypatch):
  real = sources.make_sources

  def poisoned(config):
    found = real(config)
    def bad(i):
      example = found.train(i)
      if i >= 8:  # the second batch of 8 examples
        example["fixed"] = np.full_like(example["fixed"], np.nan)
      return example
    return dataclasses.replace(found, train=bad)

  monkeypatch.setattr(sources, "make_sources", poisoned)
  config = _config(**{"train.checkpoint_every": 1})
  with pytest.raises(training.NonFiniteError, match="step 2: training loss is nan"):
    training.train_and_evaluate(config, str(tmp_path), progress=False, log=lambda s: None)
  ckpts = training.Checkpoints(str(tmp_path))
  assert ckpts.all_steps() == [1]  # step 1 was fine; nothing written at or after step 2
  ckpts.close()


def test_checkpoint_refuses_non_finite_state(tmp_path):
  _, _, state = state_lib.init_state(_config())
  bad = state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
  ckpts = training.Checkpoints(str(tmp_path))
  with pytest.raises(training.NonFiniteError, match="step 3"):
    ckpts.save(3, bad, {"position": 0, "seed": 0}, {})
  assert ckpts.all_steps() == []
  ckpts.close()


def test_config_overrides_and_bad_configs():
  c = _config(**{"optim.lr": 3e-4, "model.widths": (4, 4)})
  assert c.optim.lr == 3e-4 and tuple(c.model.widths) == (4, 4)
  with pytest.raises(InputError, match="no field 'optim.lrr'"):
    training.override(c, ["optim.lrr=1"])
  with pytest.raises(InputError, match="optim.lr is a float"):
    training.override(c, ["optim.lr='fast'"])
def test_bad_config_values_fail_before_anything_is_written(tmp_path):
  bad = _config(**{"data.shape": (18, 16, 16), "optim.lr": -1.0})
  with pytest.raises(InputError, match=r"divisible by the UNet stride 4.*optim.lr must be"):
    training.train_and_evaluate(bad, str(tmp_path / "w"), progress=False, log=lambda s: None)
  assert not (tmp_path / "w").exists()


def _run(*args, env=None):
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                        env=env, timeout=600)


def test_train_py_end_to_end_and_bad_flags(tmp_path):
  out = _run("train.py", "--config", "configs/test.py", "--workdir", str(tmp_path / "w"),
             "--steps", "2", "--config.train.batch_size=8", "--no-progress")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "done at step 2" in out.stdout
  assert json.load(open(tmp_path / "w" / "config.json"))["train"]["steps"] == 2
  bad = _run("train.py", "--config", "configs/test.py", "--workdir", str(tmp_path / "x"),
             "--config.model.heads='pyramid'")
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1].startswith("train.py: error:")


@pytest.mark.parametrize("name", ["demo", "demo_6mm", "default", "learn2reg_abdomen", "test"])
def test_shipped_configs_load_and_describe_a_network(name):
  config = training.load_config(os.path.join(ROOT, "configs", f"{name}.py"))
  from flax import nnx
  net = nnx.eval_shape(lambda: state_lib.build_model(config))  # structure only
  assert net.unet.stride == 2 ** (len(config.model.widths) - 1)
  assert all(s % net.unet.stride == 0 for s in config.data.shape)


def test_learn2reg_config_trains_on_a_folder_in_that_layout(tmp_path):
  from jaxreg import data
  from jaxreg import io
  root = tmp_path / "AbdomenCTCT"
  (root / "imagesTr").mkdir(parents=True)
  (root / "labelsTr").mkdir()
  demo = data.demo()
  entries = []
  for i in range(6):  # six "patients": shifted crops of the demo CT
    sl = (slice(30 + 3 * i, 110 + 3 * i), slice(30, 110), slice(40, 120))
    name = f"AbdomenCTCT_{i + 1:04d}_0000.nii.gz"
    io.save(str(root / "imagesTr" / name), demo.ct.array[sl], demo.ct.affine)
    io.save(str(root / "labelsTr" / name), demo.labels.array[sl].astype(np.uint8), demo.ct.affine)
    entries.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
  meta = {"training": entries, "training_paired_images": [],
          "registration_val": [{"fixed": entries[4]["image"], "moving": entries[5]["image"]}]}
  (root / "AbdomenCTCT_dataset.json").write_text(json.dumps(meta))
  config = training.override(training.load_config(os.path.join(ROOT, "configs",
                                                               "learn2reg_abdomen.py")), [
      f"data.path={str(root)!r}", "data.spacing=12.0", "data.shape=(16, 16, 16)",
      "data.label_ids=(5, 6)", "data.val_pairs=1", "model.widths=(8, 8, 8)",
      "model.convs_per_level=1", "model.num_subfields=2", "train.steps=2",
      "train.batch_size=8", "train.eval_every=2", "train.checkpoint_every=2",
      "optim.warmup_steps=1"])
  result = training.train_and_evaluate(config, str(tmp_path / "run"), progress=False,
                                       log=lambda s: None)
  assert result["step"] == 2 and np.isfinite(result["val_loss"])
  assert 0 < result["val_dice_identity"] < 1 and 0 < result["val_dice"] < 1
  with pytest.raises(InputError, match="data.path is required"):
    training.train_and_evaluate(training.override(config, ["data.path=''"]), str(tmp_path / "x"),
                                progress=False, log=lambda s: None)


def test_label_inputs_feed_organ_masks_to_the_network(tmp_path):
  config = _config(**{"model.label_inputs": True, "train.steps": 2})
  net = state_lib.build_model(config)
  assert net.unet.encoder[0][0].in_features == 2 + 2 * len(config.data.label_ids)
  graphdef, template, state = state_lib.init_state(config)
  batch = _batch(config, 2)
  extra = inputs.label_channels(config, batch["fixed_labels"], batch["moving_labels"])
  assert extra.shape == batch["fixed"].shape + (2 * len(config.data.label_ids),)
  np.testing.assert_array_equal(np.asarray(extra[..., 0]), batch["fixed_labels"] == 1)
  loss, _ = step_lib.make_loss_fn(graphdef, template, config)(state.params, batch)
  assert np.isfinite(float(loss))
  with pytest.raises(InputError, match="label_inputs needs data.label_ids"):
    training.train_and_evaluate(_config(**{"model.label_inputs": True, "data.label_ids": ()}),
                                str(tmp_path), progress=False, log=lambda s: None)


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
  quiet = dict(progress=False, log=lambda s: None)
  config = _config(**{"train.steps": 6})
  full = training.train_and_evaluate(config, str(tmp_path / "full"), **quiet)
  training.train_and_evaluate(config, str(tmp_path / "part"), stop_at=4, **quiet)
  ckpt = tmp_path / "part" / "checkpoints"
  assert sorted(os.listdir(ckpt)) == ["2", "4"]
  damaged = 0
  for root, _, files in os.walk(ckpt / "4" / "state"):
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:  # truncate every data file
        f.truncate(max(0, os.path.getsize(os.path.join(root, name)) // 3))
      damaged += 1
  assert damaged
  messages = []
  resumed = training.train_and_evaluate(config, str(tmp_path / "part"), progress=False,
                                        log=messages.append)
  warning = [m for m in messages if m.startswith("warning: checkpoint step 4 is unreadable")]
  assert len(warning) == 1 and any("resumed from step 2" in m for m in messages), messages
  assert os.listdir(tmp_path / "part" / "corrupt_checkpoints")[0].startswith("4.")
  assert resumed["step"] == full["step"] == 6
  jax.tree.map(np.testing.assert_array_equal, _final_params(str(tmp_path / "full"))[1],
               _final_params(str(tmp_path / "part"))[1])


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
  """train.py killed twice (SIGKILL, at random moments that include checkpoint writes: one
  is written every step), then resumed: same final parameters as a run never killed, and
  no finished checkpoint lost."""
  import random
  import signal
  import time

  overrides = {"train.steps": 10, "train.checkpoint_every": 1, "train.eval_every": 5,
               "train.keep_last": 2}
  config = _config(**overrides)
  quiet = dict(progress=False, log=lambda s: None)
  training.train_and_evaluate(config, str(tmp_path / "full"), **quiet)
  work = tmp_path / "killed"
  seed = int(time.time())
  rng = random.Random(seed)
  seed_note = f"(kill timing seed {seed})"

  def finished_steps():
    folder = work / "checkpoints"
    return {int(n) for n in os.listdir(folder) if n.isdigit()} if folder.is_dir() else set()

  before = set()
  for _ in range(2):
    start = max(finished_steps(), default=0)
    proc = subprocess.Popen([sys.executable, "train.py", "--config", "configs/test.py",
                             "--workdir", str(work), "--no-progress",
                             *[f"--config.{k}={v}" for k, v in overrides.items()]],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while max(finished_steps(), default=0) <= start and proc.poll() is None:
      assert time.time() < deadline, "no checkpoint appeared"
      time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.0))
    before = finished_steps()  # all finished at this moment
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if max(before, default=0) >= 10:
      break
  messages = []
  result = training.train_and_evaluate(config, str(work), progress=False, log=messages.append)
  resumed = [int(m.split("resumed from step ")[1].split()[0]) for m in messages
             if "resumed from step" in m]
  if max(before) < 10:
    assert resumed and resumed[0] >= max(before), (messages, before, seed_note)
  assert result["step"] == 10
  jax.tree.map(np.testing.assert_array_equal, _final_params(str(tmp_path / "full"))[1],
               _final_params(str(work))[1])



def test_loss_fn_takes_user_callables_in_place_of_config_names():
  from jaxreg.ops import losses
  config = _config()
  graphdef, template, state = state_lib.init_state(config)
  batch = _batch(config, 2)
  _, by_name = step_lib.make_loss_fn(graphdef, template, config)(state.params, batch)
  _, twice = step_lib.make_loss_fn(graphdef, template, config,
                                   regulariser=lambda u: 2.0 * losses.diffusion(u))(
                                       state.params, batch)
  np.testing.assert_allclose(twice["reg_total"], 2 * by_name["reg_total"], rtol=1e-5)
  np.testing.assert_allclose(twice["reg_subfields"], 2 * by_name["reg_subfields"], rtol=1e-5)
  _, l1 = step_lib.make_loss_fn(graphdef, template, config,
                                similarity=lambda f, w: jnp.mean(jnp.abs(f - w)))(
                                    state.params, batch)
  disp, _ = step_lib._forward(graphdef, template, config, state.params, batch)
  from jaxreg.ops import warp
  warped = np.asarray(warp.warp_batch(batch["moving"], disp))
  np.testing.assert_allclose(l1["similarity_loss"], np.mean(np.abs(batch["fixed"] - warped)),
                             rtol=1e-5)
  from jaxreg.types import InputError
  with pytest.raises(InputError, match="must return a scalar"):
    step_lib.make_loss_fn(graphdef, template, config, regulariser=lambda u: u ** 2)


def test_train_py_import_trains_with_a_user_regulariser(tmp_path, capsys, scratch_registry):
  from jaxreg.training.main import main
  module = tmp_path / "my_regularisers.py"
  module.write_text(
      "import jax.numpy as jnp\n"
      "from jaxreg import losses\n"
      "CALLS = []\n"
      "def stiff(disp, *, weight=1.0):\n"
      "  CALLS.append(disp.shape)\n"
      "  return weight * jnp.mean(disp ** 2)\n"
      "losses.register_regulariser('stiff', stiff)\n")
  common = ["--config", TEST_CONFIG, "--steps", "4", "--no-progress",
            "--config.train.eval_every=4", "--config.loss.reg_weight=50.0",
            "--config.loss.total_reg_weight=50.0", "--config.loss.dice_weight=0.0"]
  assert main(common + ["--workdir", str(tmp_path / "diffusion")]) == 0
  base = capsys.readouterr().out
  assert main(common + ["--workdir", str(tmp_path / "stiff"), "--import", str(module),
                        "--config.loss.reg=stiff", "--config.loss.reg_kwargs.weight=10.0"]) == 0
  custom = capsys.readouterr().out
  import my_regularisers
  assert (16, 16, 16, 3) in my_regularisers.CALLS  # it was traced on single-sample voxel fields
  written = json.load(open(tmp_path / "stiff" / "config.json"))["loss"]
  assert written["reg"] == "stiff" and written["reg_kwargs"] == {"weight": 10.0}

  def val(out, key):
    done = [line for line in out.splitlines() if line.startswith("train.py: done")][-1]
    return float(done.split(f"{key} ")[1].split(",")[0])
  # A penalty on the displacement itself, weighted heavily, holds the field back:
  # the registration moves less, so its warped image matches less well.
  assert val(custom, "val_reg_total") != val(base, "val_reg_total")
  assert val(custom, "val_similarity_loss") > val(base, "val_similarity_loss")


def test_unknown_or_broken_user_losses_are_one_line_errors(tmp_path, capsys, scratch_registry):
  from jaxreg.training.main import main
  assert main(["--config", TEST_CONFIG, "--workdir", str(tmp_path / "a"),
               "--config.loss.reg=mine"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "'mine'" in err[0] and "diffusion, bending" in err[0]
  assert "--import" in err[0] and not (tmp_path / "a").exists()
  broken = tmp_path / "broken.py"
  broken.write_text("from jaxreg import losses\nlosses.register_similarity('sim', 42)\n")
  assert main(["--config", TEST_CONFIG, "--workdir", str(tmp_path / "b"),
               "--import", str(broken)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "broken.py" in err[0] and "must be callable" in err[0]
  assert main(["--config", TEST_CONFIG, "--workdir", str(tmp_path / "c"),
               "--import", "no_such_module_here"]) == 2
  assert "No module named" in capsys.readouterr().err


def test_conditioned_loss_weights_the_regulariser_by_each_examples_lambda():
  config = _config(**{"model.condition_on_reg": True, "loss.reg_weight": 2.0,
                      "loss.total_reg_weight": 1.0, "model.head_init": 0.05})
  graphdef, template, state = state_lib.init_state(config)
  batch = _batch(config, 2)
  loss_fn = step_lib.make_loss_fn(graphdef, template, config)
  # FiLM starts at zero, so the field does not depend on lambda yet: only the weights do.
  lam = np.array([0.5, 8.0], np.float32)
  a, ma = loss_fn(state.params, dict(batch, reg_weight=lam))
  b, mb = loss_fn(state.params, dict(batch, reg_weight=2 * lam))
  disp, subs = step_lib._forward(graphdef, template, config, state.params,
                                 dict(batch, reg_weight=lam))
  from jaxreg.ops import losses
  reg_sub = np.array([np.mean([losses.diffusion(u[i]) for u in subs]) for i in range(2)])
  reg_tot = np.array([losses.diffusion(disp[i]) for i in range(2)])
  # total weight follows lambda with the config's ratio total_reg_weight / reg_weight = 1/2
  expected = np.mean(lam * reg_sub + lam * 0.5 * reg_tot)
  np.testing.assert_allclose(float(b - a), expected, rtol=1e-4)
  # without a batch lambda (evaluation), lambda = loss.reg_weight for every example
  c, _ = loss_fn(state.params, batch)
  d, _ = loss_fn(state.params, dict(batch, reg_weight=np.full(2, 2.0, np.float32)))
  np.testing.assert_allclose(float(c), float(d), rtol=1e-6)


def test_lambda_is_drawn_log_uniform_over_the_range():
  config = _config(**{"model.condition_on_reg": True})
  lam = np.asarray(step_lib.draw_reg_weight(config, jax.random.key(0), 20000))
  lo, hi = config.model.reg_range
  assert lam.min() >= lo and lam.max() <= hi
  t = (np.log(lam) - np.log(lo)) / (np.log(hi) - np.log(lo))  # uniform on [0, 1]
  assert abs(t.mean() - 0.5) < 0.01 and abs(t.var() - 1 / 12) < 0.005


def test_conditioned_training_learns_a_lambda_dependence(tmp_path):
  from jaxreg.nn import model
  from jaxreg.io import weights
  config = _config(**{"model.condition_on_reg": True, "train.steps": 6,
                      "optim.lr": 0.01})
  result = training.train_and_evaluate(config, str(tmp_path / "w"), progress=False,
                                       log=lambda s: None)
  assert result["step"] == 6
  training.export_checkpoint(str(tmp_path / "w"), str(tmp_path / "m"))
  net, loaded = weights.load_weights(str(tmp_path / "m"))
  assert loaded.model.condition_on_reg and tuple(loaded.model.reg_range) == (0.1, 100.0)
  batch = _batch(config, 1)
  low, high = (model.predict_displacement(net, batch["fixed"], batch["moving"],
                                          reg_weight=lam)[0] for lam in (0.1, 100.0))
  assert float(jnp.max(jnp.abs(low - high))) > 0  # FiLM left zero: trained


def test_bad_conditioning_configs_are_refused():
  from jaxreg.types import InputError
  with pytest.raises(InputError, match="must lie in model.reg_range"):
    config_lib.check_config(_config(**{"model.condition_on_reg": True, "loss.reg_weight": 500.0}))
  with pytest.raises(InputError, match="reg_conditioning must be one of film, channel"):
    config_lib.check_config(_config(**{"model.condition_on_reg": True,
                                     "model.reg_conditioning": "hyper"}))


def test_bfloat16_compute_trains_close_to_float32_with_float32_parameters(tmp_path):
  from jaxreg.nn import model
  results, params = {}, {}
  for name in ("float32", "bfloat16"):
    config = _config(**{"train.compute_dtype": name, "train.steps": 4})
    results[name] = training.train_and_evaluate(config, str(tmp_path / name), progress=False,
                                                log=lambda s: None)
    graphdef, template, state = state_lib.init_state(config)
    net = model.from_config(config)
    params[name] = jax.tree.leaves(state.params)
    assert all(p.dtype == jnp.float32 for p in params[name])
    if name == "bfloat16":
      assert net.unet.encoder[0][0].dtype == jnp.bfloat16
      batch = _batch(config, 1)
      disp, subs = model.predict_displacement(net, batch["fixed"], batch["moving"])
      assert disp.dtype == jnp.float32 and all(u.dtype == jnp.float32 for u in subs)
  # 4 steps from the same initialisation: the losses agree to bfloat16 precision
  a, b = results["float32"]["val_loss"], results["bfloat16"]["val_loss"]
  assert abs(a - b) < 0.01 * abs(a), (a, b)
  assert abs(results["float32"]["val_dice"] - results["bfloat16"]["val_dice"]) < 0.01
  from jaxreg.types import InputError
  with pytest.raises(InputError, match="compute_dtype must be one of float32, bfloat16"):
    config_lib.check_config(_config(**{"train.compute_dtype": "float16"}))


def test_resuming_with_another_network_is_refused_and_loses_nothing(tmp_path):
  workdir = tmp_path / "w"
  training.train_and_evaluate(_config(**{"train.steps": 2, "train.devices": 1}), str(workdir),
                              progress=False, log=lambda s: None)
  before = sorted(os.listdir(workdir / "checkpoints"))
  config_text = (workdir / "config.json").read_text()
  r = subprocess.run([sys.executable, "train.py", "--config", TEST_CONFIG, "--workdir",
                      str(workdir), "--no-progress", "--config.model.widths=(8, 16, 16)"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "holds another network than this config" in lines[0], r.stderr
  assert re.search(r"saved \(3, 3, 3, \d+, \d+\), here \(3, 3, 3, \d+, \d+\)", lines[0])
  assert sorted(os.listdir(workdir / "checkpoints")) == before  # nothing moved aside
  assert not (workdir / "corrupt_checkpoints").exists()
  assert (workdir / "config.json").read_text() == config_text
  step, _, _, _ = training.restore_latest(str(workdir))
  assert step == 2


def test_init_fine_tunes_the_shipped_model_and_records_it(tmp_path, capsys):
  """--init shipped: the run starts from the shipped weights (2 steps move them little, a
  random start is far), init.json names them (their sha256, computed here), the exported
  model's info.json too; a config of another network: one line, exit 2, nothing written."""
  import hashlib

  from flax import nnx

  from jaxreg.io import weights
  from jaxreg.training import checkpoint, main
  work = tmp_path / "ft"
  rc = main.main(["--config", "demo_6mm", "--workdir", str(work), "--steps", "2",
                  "--init", "shipped", "--no-progress", "--config.data.shape=(32, 32, 32)",
                  "--config.data.val_pairs=1", "--config.train.eval_every=2",
                  "--config.train.checkpoint_every=2", "--config.optim.warmup_steps=1",
                  "--config.train.devices=1"])
  assert rc == 0, capsys.readouterr().err
  with open(os.path.join(weights.DEMO_MODEL, "params.msgpack"), "rb") as f:
    want = hashlib.sha256(f.read()).hexdigest()
  record = json.loads((work / "init.json").read_text())
  assert record["init"] == "shipped" and record["params_sha256"] == want
  ckpts = checkpoint.Checkpoints(str(work))  # and in the checkpoint itself
  assert ckpts.origin(2) == record
  ckpts.close()
  shipped, _ = weights.demo_model()
  start = nnx.to_pure_dict(nnx.state(shipped))
  step, state, _, config = checkpoint.restore_latest(str(work))
  assert step == 2
  _, _, fresh = state_lib.init_state(config)
  dist = lambda a, b: max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
                          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  moved, random_start = dist(state.params, start), dist(fresh.params, start)
  assert 0 < moved < 0.01 and random_start > 10 * moved, (moved, random_start)
  checkpoint.export_checkpoint(str(work), str(tmp_path / "model"))
  info = json.loads((tmp_path / "model" / "info.json").read_text())
  assert info["init"]["params_sha256"] == want and info["step"] == 2
  capsys.readouterr()
  rc = main.main(["--config", "test", "--workdir", str(tmp_path / "other"), "--steps", "1",
                  "--init", "shipped", "--no-progress", "--config.train.devices=1"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and "--init shipped: its network differs" in err[0]
  assert not (tmp_path / "other").exists()


def _nifti_pairs(folder, count, labels=True):
  """``count`` pairs of the embedded CT at 20 mm as NIfTI files; their CSV rows."""
  from jaxreg import data, io
  keys = ("fixed", "moving", "fixed_labels", "moving_labels") if labels else ("fixed", "moving")
  rows = []
  for i in range(count):
    pair = data.demo_pair(i, spacing=20.0, shape=(16, 16, 16))
    row = []
    for key in keys:
      name = f"p{i}_{key}.nii.gz"
      io.save(str(folder / name), getattr(pair, key).astype(
          np.uint8 if "labels" in key else np.int16), pair.affine)
      row.append(name)
    rows.append(",".join(row))
  return ",".join(keys), rows


def test_a_manifest_with_bad_files_trains_on_the_rest_and_says_which(tmp_path):
  """A missing, a truncated and a non-CT file in a training manifest: one warning each,
  counted in metrics.jsonl, never retried in a loop; a bad validation pair is reported; past
  data.max_bad_fraction the run stops with one line (exit 2 from train.py)."""
  header, rows = _nifti_pairs(tmp_path, 6)
  good = (tmp_path / "p0_fixed.nii.gz").read_bytes()
  (tmp_path / "cut.nii.gz").write_bytes(good[: len(good) // 2])  # truncated
  (tmp_path / "notes.nii.gz").write_text("not an image")  # not a CT
  bad = [rows[1].replace("p1_fixed", "gone"),  # a file that does not exist
         rows[2].replace("p2_moving", "cut"), rows[3].replace("p3_fixed", "notes")]
  # training rows: 0 and the three bad ones and 4; validation: a bad one and 5
  lines = [header, rows[0], *bad, rows[4], rows[2].replace("p2_fixed", "gone_too"), rows[5]]
  (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
  config = _config(**{"data.source": "csv", "data.path": str(tmp_path / "pairs.csv"),
                      "data.val_pairs": 2, "train.batch_size": 1, "train.devices": 1,
                      "train.steps": 6,
                      "train.eval_every": 3, "train.checkpoint_every": 6,
                      "data.max_bad_fraction": 0.7})
  said = []
  result = training.train_and_evaluate(config, str(tmp_path / "run"), progress=False,
                                       log=said.append)
  warnings = [m for m in said if m.startswith("warning: skipping")]
  assert len(warnings) == 4, said  # three training files and one validation file, once each
  for name in ("gone.nii.gz", "cut.nii.gz", "notes.nii.gz", "gone_too.nii.gz"):
    assert sum(name in w for w in warnings) == 1, (name, warnings)
  assert all("\n" not in w for w in warnings)
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["skipped_pairs"] for r in records if r["kind"] == "train"][-1] == 3
  assert [r["val_skipped"] for r in records if r["kind"] == "val"] == [1, 1]
  assert result["step"] == 6 and result["val_skipped"] == 1 and np.isfinite(result["val_loss"])
  # more than the allowed fraction unreadable: one line, exit 2, before any step is saved
  from jaxreg.training import main as train_main
  import contextlib
  import io as _io_lib
  err = _io_lib.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(_io_lib.StringIO()):
    code = train_main.main(["--config", "test", "--workdir", str(tmp_path / "strict"),
                            "--no-progress", "--config.data.source='csv'",
                            f"--config.data.path='{tmp_path / 'pairs.csv'}'",
                            "--config.data.val_pairs=2", "--config.train.batch_size=1",
                            "--config.train.devices=1",
                            "--config.data.max_bad_fraction=0.4"])
  assert code == 2
  assert re.fullmatch(r"train.py: error: \S+pairs.csv: 3 of 5 pairs could not be read, more "
                      r"than data.max_bad_fraction=0.4 \(first: pair \d .*\)\n", err.getvalue())


def test_labels_asked_for_but_missing_from_the_manifest_is_one_line(tmp_path):
  header, rows = _nifti_pairs(tmp_path, 3, labels=False)
  (tmp_path / "pairs.csv").write_text("\n".join([header, *rows]) + "\n")
  config = _config(**{"data.source": "csv", "data.path": str(tmp_path / "pairs.csv"),
                      "data.val_pairs": 1, "train.batch_size": 1, "train.devices": 1})
  with pytest.raises(InputError, match=r"3 of 3 pairs have no fixed_labels/moving_labels .* "
                                       r"--config.data.label_ids='\(\)'"):
    training.train_and_evaluate(config, str(tmp_path / "run"), progress=False,
                                log=lambda s: None)
  assert not (tmp_path / "run").exists()
  # without label ids, the same manifest trains on image similarity alone
  config = training.override(config, ["data.label_ids=()", "train.steps=1",
                                      "train.eval_every=1", "train.checkpoint_every=1"])
  result = training.train_and_evaluate(config, str(tmp_path / "run"), progress=False,
                                       log=lambda s: None)
  assert result["step"] == 1 and "val_dice" not in result
