"""The public API imports as documented, and the console script answers."""

import importlib
import os
import subprocess
import sys

import pytest

import jaxreg

CONTRACT = {
    "jaxreg.ops.grid": ["identity_grid", "voxel_to_world", "world_to_voxel", "disp_voxel_to_mm",
                    "disp_mm_to_voxel", "check_affine", "spacing", "affine_displacement"],
    "jaxreg.ops.warp": ["warp", "warp_batch", "sample"],
    "jaxreg.ops.fields": ["compose", "integrate", "resize", "jacobian_determinant", "compose_batch",
                      "integrate_batch", "jacobian_determinant_batch"],
    "jaxreg.ops.decompose": ["compose_all", "sum_all", "compose_all_svf", "combine", "combine_batch"],
    "jaxreg.io": ["load", "load_labels", "save", "save_displacement", "load_displacement",
                  "atomic_path", "atomic_dir", "check_same_grid"],
    "jaxreg.io.resample": ["model_grid", "resample", "window", "prepare_pair", "field_to_world",
                          "resample_moving"],
    "jaxreg.data": ["read_learn2reg", "read_pairs_csv", "read_keypoints", "demo", "demo_pair",
                    "synthetic_pair", "random_smooth_field", "breathing_field"],
    "jaxreg.metrics": ["dice", "hd95", "tre", "sdlogj", "folding_fraction", "field_quality",
                       "jacobian_determinant", "score"],
    "jaxreg.pipeline.register": ["register", "instance_optimise", "register_many",
                        "affine_stage", "aligned", "to_model_grid", "network_stage",
                        "refine_stage", "to_fixed_grid", "warp_outputs", "inverse_stage"],
    "jaxreg.pipeline.refine": ["refine", "optimise_level", "level_objective", "level_grids",
                               "body_grid", "upsample2", "RefineOptions"],
    "jaxreg.pipeline.affine": ["align", "matrix_from_params", "displacement_mm"],
    "jaxreg.pipeline.stages": ["Stage", "enabled", "folder", "status"],
    "jaxreg.pipeline.environment": ["configure", "warp_implementation"],
    "jaxreg.ops.warp_kernel": ["load", "loaded", "reason", "build", "runs"],
    "jaxreg.eval.demons": ["run", "available", "to_sitk"],
    "jaxreg.pipeline.compilation": ["enable_cache", "cache_dir", "CompileCounter"],
    "jaxreg.pipeline.outputs": ["write_registration", "label_scores"],
    "jaxreg.pipeline.apply": ["load_registration", "apply", "save", "Transform"],
    "jaxreg.nn.inputs": ["class_lut", "to_classes", "num_classes", "label_channels"],
    "jaxreg.ops.points": ["transform_points"],
    "jaxreg.eval.evaluation": ["evaluate", "case_metrics", "summarise", "load_cases", "run_method",
                               "main"],
    "jaxreg.pipeline.report": ["save_report", "save_box_plot"],
    "jaxreg.eval.elastix": ["run", "parameter_map", "available"],
    "jaxreg.io.weights": ["save_weights", "load_weights", "demo_model"],
    "jaxreg.nn.conv": ["conv3d_folded", "conv_fn"],
    "jaxreg.ops.losses": ["local_ncc", "global_ncc", "mse", "diffusion", "bending_energy",
                      "soft_dice", "folding", "box_sum", "box_counts", "local_ncc_map",
                      "mind_ssc", "mind_ssd"],
    "jaxreg.nn.model": ["RegistrationNet", "UNet", "predict_displacement"],
}


@pytest.mark.parametrize("module", sorted(CONTRACT))
def test_contract_names_are_public_and_callable(module):
  mod = importlib.import_module(module)
  for name in CONTRACT[module]:
    assert callable(getattr(mod, name)), f"{module}.{name}"
    assert name in mod.__all__, f"{module}.__all__ lacks {name}"


def test_top_level_all_resolves():
  for name in jaxreg.__all__:
    assert getattr(jaxreg, name) is not None
  assert jaxreg.ops.warp.warp is importlib.import_module("jaxreg.ops.warp").warp


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "jaxreg.cli", *args], capture_output=True,
                        text=True, timeout=120)


def test_cli_version_and_help():
  out = _cli("--version")
  assert out.returncode == 0 and out.stdout.strip() == f"jaxreg {jaxreg.__version__}"
  out = _cli("--help")
  assert out.returncode == 0 and "register" in out.stdout and "demo" in out.stdout


def test_cli_evaluate_bad_method_is_one_line_exit_2(tmp_path):
  out = _cli("evaluate", "--data", "demo", "--out", str(tmp_path / "ev"), "--methods", "ants")
  assert out.returncode == 2
  assert out.stderr.strip() == ("jaxreg evaluate: error: --methods: unknown ['ants']; choose "
                                "from identity,jaxreg,jaxreg+io,jaxreg+refine,jaxreg+refine-mind,"
                                "elastix,demons")
  assert not (tmp_path / "ev").exists()


def test_cli_demo_trains_evaluates_and_writes_an_example_that_overlays(tmp_path):
  import json

  import SimpleITK as sitk

  out = _cli("demo", "--out", str(tmp_path / "demo"), "--steps", "3", "--pairs", "1")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "| shipped demo model" in out.stdout
  summary = json.load(open(tmp_path / "demo" / "summary.json"))
  assert summary["shipped"]["val_dice"] > summary["shipped"]["val_dice_identity"]
  assert summary["trained_here"]["step"] == 3
  # The predicted field, applied by SimpleITK to the moving labels, gives jaxreg's warped labels.
  folder = tmp_path / "demo" / "example"
  moving = sitk.ReadImage(str(folder / "moving_labels.nii.gz"))
  field = sitk.ReadImage(str(folder / "displacement.nii.gz"), sitk.sitkVectorFloat64)
  warped = sitk.GetArrayFromImage(sitk.Resample(
      moving, moving, sitk.DisplacementFieldTransform(field), sitk.sitkNearestNeighbor, 0))
  ours = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "warped_labels.nii.gz")))
  assert (warped == ours).mean() >= 0.999
  assert (ours != sitk.GetArrayFromImage(moving)).mean() > 0.005  # the field moved them
  assert (folder / "report.png").stat().st_size > 10_000  # through register(), as `register`
  metrics = json.load(open(folder / "metrics.json"))
  assert metrics["mean_dice"] > metrics["mean_dice_before"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temp folders left


def test_cli_demo_into_a_file_is_one_line_exit_2(tmp_path):
  (tmp_path / "f").write_text("x")
  out = _cli("demo", "--out", str(tmp_path / "f"))
  assert out.returncode == 2
  assert out.stderr.strip().count("\n") == 0 and "exists and is not a folder" in out.stderr
  assert "Traceback" not in out.stderr


# Configs by name: `train.py --config demo` / `jaxreg train --config demo` load the ones
# shipped in jaxreg/configs (an installed wheel has no configs/ folder beside it).

SHIPPED = ("default", "demo", "demo_6mm", "learn2reg_abdomen", "test")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "jaxreg", "configs")


def test_shipped_configs_are_the_package_files():
  from jaxreg.training import config as config_lib
  assert config_lib.shipped_configs() == SHIPPED
  assert sorted(f[:-3] for f in os.listdir(CONFIGS)
                if f.endswith(".py") and f != "__init__.py") == list(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_config_by_name_equals_its_file(name):
  import runpy

  from jaxreg.training import config as config_lib
  path = os.path.join(CONFIGS, f"{name}.py")
  expected = runpy.run_path(path)["get_config"]().to_dict()  # the file, run by itself
  assert config_lib.load_config(name).to_dict() == expected
  assert config_lib.load_config(path).to_dict() == expected


def test_config_by_name_values():
  from jaxreg.training import config as config_lib
  c = config_lib.load_config("test")  # jaxreg/configs/test.py, over demo.py's values
  assert tuple(c.data.shape) == (16, 16, 16) and c.data.spacing == 20.0
  assert tuple(c.model.widths) == (8, 8, 8) and c.train.steps == 4
  assert c.data.source == "demo" and c.data.hu_window == (-1000.0, 1000.0)  # from demo.py
  c = config_lib.load_config("learn2reg_abdomen")  # over default.py, over demo.py
  assert c.data.source == "learn2reg" and c.data.label_ids == tuple(range(1, 14))
  assert tuple(c.data.shape) == (192, 160, 256) and c.optim.lr == 1e-4


def test_configs_folder_paths_still_load_from_a_checkout(monkeypatch):
  from jaxreg.training import config as config_lib
  monkeypatch.chdir(ROOT)
  assert os.path.isfile("configs/demo.py")  # the top-level symlink to jaxreg/configs
  assert (config_lib.load_config("configs/demo_6mm.py").to_dict()
          == config_lib.load_config("demo_6mm").to_dict())


def test_an_existing_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
  from jaxreg.training import config as config_lib
  (tmp_path / "demo").write_text("import ml_collections\n\n"
                                 "def get_config():\n"
                                 "  return ml_collections.ConfigDict({'mine': 1})\n")
  monkeypatch.chdir(tmp_path)
  assert config_lib.load_config("demo").to_dict() == {"mine": 1}
  (tmp_path / "demo").unlink()
  (tmp_path / "demo").mkdir()  # a folder of that name (e.g. an output folder) does not
  assert config_lib.load_config("demo").data.spacing == 8.0


def test_shipped_configs_import_each_other_through_the_package():
  import ast
  for name in SHIPPED:
    tree = ast.parse(open(os.path.join(CONFIGS, f"{name}.py")).read())
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom):
        assert node.module != "configs" and not (node.module or "").startswith("configs."), name
      elif isinstance(node, ast.Import):
        assert all(not a.name.split(".")[0] == "configs" for a in node.names), name


def test_unknown_config_name_is_an_input_error_naming_the_shipped_ones():
  from jaxreg.training import config as config_lib
  from jaxreg.types import InputError
  with pytest.raises(InputError) as e:
    config_lib.load_config("dmeo")
  assert str(e.value) == ("dmeo: no such config file, nor a shipped config "
                          "(shipped: default, demo, demo_6mm, learn2reg_abdomen, test)")
  with pytest.raises(InputError) as e:  # the README's path, typed outside a checkout
    config_lib.load_config(os.path.join("no-such-checkout", "configs", "demo.py"))
  assert str(e.value).endswith("; outside a checkout of jaxreg use the shipped one: "
                               "--config demo")


def _train_py(*args, cwd):
  return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *map(str, args)],
                        capture_output=True, text=True, timeout=300, cwd=cwd)


def test_train_py_config_by_name_from_another_folder(tmp_path):
  # train.steps=0 fails the config check, which runs after the config loaded by name and
  # the override applied: nothing is trained, nothing written.
  out = _train_py("--config", "test", "--workdir", tmp_path / "run", "--steps", "0",
                  cwd=tmp_path)
  assert out.returncode == 2
  assert out.stderr.strip() == "train.py: error: bad config: train.steps must be >= 1, got 0"
  out = _train_py("--config", "dmeo", "--workdir", tmp_path / "run", cwd=tmp_path)
  assert out.returncode == 2
  assert out.stderr.strip() == ("train.py: error: dmeo: no such config file, nor a shipped "
                                "config (shipped: default, demo, demo_6mm, learn2reg_abdomen, "
                                "test)")
  assert sorted(os.listdir(tmp_path)) == []
  # a model folder's config.json (what weights are saved with) is not a config to train from
  model_config = os.path.join(ROOT, "jaxreg", "demo_model", "config.json")
  out = _train_py("--config", model_config, "--workdir", tmp_path / "run", cwd=tmp_path)
  assert out.returncode == 2
  assert out.stderr.strip() == (
      f"train.py: error: {model_config}: a JSON file (a model folder's or a run's resolved "
      "config.json) is not a training config: give a Python config file or a shipped name "
      "(default, demo, demo_6mm, learn2reg_abdomen, test)")
  assert sorted(os.listdir(tmp_path)) == []
