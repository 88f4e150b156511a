"""Model folders: round trip, a mismatched model, non-finite parameters, the shipped model."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreg import training
from jaxreg.io import weights
from jaxreg.types import InputError
from jaxreg.training import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(*overrides):
  return training.override(training.load_config(os.path.join(ROOT, "configs", "test.py")),
                           list(overrides))


def test_round_trip_gives_the_same_network(tmp_path):
  config = _config("model.head_init=0.1")
  net = state_lib.build_model(config, seed=3)
  params = nnx.to_pure_dict(nnx.state(net))
  weights.save_weights(str(tmp_path / "m"), config, params, info={"note": "test"})
  loaded, cfg = weights.load_weights(str(tmp_path / "m"))
  assert tuple(cfg.model.widths) == tuple(config.model.widths)
  x = jnp.asarray(np.random.default_rng(0).random((1, 16, 16, 16)), jnp.float32)
  for a, b in zip(net(x, x * 0.5), loaded(x, x * 0.5)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert json.load(open(tmp_path / "m" / "info.json")) == {"note": "test"}


def test_parameters_of_another_model_are_rejected(tmp_path):
  small = state_lib.build_model(_config())
  weights.save_weights(str(tmp_path / "m"), _config("model.widths=(8, 16, 16)"),
                       nnx.to_pure_dict(nnx.state(small)))
  with pytest.raises(InputError, match="does not fit the network"):
    weights.load_weights(str(tmp_path / "m"))
  with pytest.raises(InputError, match="params.msgpack is missing"):
    os.remove(tmp_path / "m" / "params.msgpack")
    weights.load_weights(str(tmp_path / "m"))


def test_non_finite_parameters_are_not_saved(tmp_path):
  params = nnx.to_pure_dict(nnx.state(state_lib.build_model(_config())))
  params = jax.tree.map(lambda x: x * np.nan, params)
  with pytest.raises(ValueError, match="non-finite"):
    weights.save_weights(str(tmp_path / "m"), _config(), params)
  assert not (tmp_path / "m").exists()


def test_export_checkpoint_matches_the_trained_state(tmp_path):
  config = _config("train.steps=2", "train.batch_size=8")
  training.train_and_evaluate(config, str(tmp_path / "run"), progress=False, log=lambda s: None)
  step = training.export_checkpoint(str(tmp_path / "run"), str(tmp_path / "m"))
  assert step == 2
  net, _ = weights.load_weights(str(tmp_path / "m"))
  _, state, _, _ = training.restore_latest(str(tmp_path / "run"))
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(net)),
               jax.device_get(state.params))


def test_shipped_demo_model_loads_and_beats_identity_on_held_out_pairs():
  net, config = weights.demo_model()
  info = json.load(open(os.path.join(weights.DEMO_MODEL, "info.json")))
  assert info["step"] == config.train.steps
  config = training.override(config, ["data.val_pairs=2"])
  scores = training.evaluate(config, nnx.to_pure_dict(nnx.state(net)))
  assert scores["val_dice"] > scores["val_dice_identity"] + 0.05
  assert scores["val_folding_fraction"] < 0.01
