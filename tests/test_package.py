"""The public API imports as documented, and the console script answers."""

import importlib
import subprocess
import sys

import pytest

import jaxreg

CONTRACT = {
    "jaxreg.grid": ["identity_grid", "voxel_to_world", "world_to_voxel", "disp_voxel_to_mm",
                    "disp_mm_to_voxel", "check_affine", "spacing", "affine_displacement"],
    "jaxreg.warp": ["warp", "warp_batch", "sample"],
    "jaxreg.fields": ["compose", "integrate", "resize", "jacobian_determinant", "compose_batch",
                      "integrate_batch", "jacobian_determinant_batch"],
    "jaxreg.decompose": ["compose_all", "sum_all", "compose_all_svf", "combine", "combine_batch"],
    "jaxreg.io": ["load", "load_labels", "save", "save_displacement", "load_displacement",
                  "atomic_path", "atomic_dir", "check_same_grid"],
    "jaxreg.preprocess": ["model_grid", "resample", "window", "prepare_pair", "field_to_world",
                          "resample_moving"],
    "jaxreg.data": ["read_learn2reg", "read_pairs_csv", "read_keypoints", "demo", "demo_pair",
                    "synthetic_pair", "random_smooth_field", "breathing_field", "Loader"],
    "jaxreg.metrics": ["dice", "hd95", "tre", "sdlogj", "folding_fraction", "field_quality"],
    "jaxreg.register": ["register", "instance_optimise", "score", "register_many",
                        "affine_stage", "aligned", "to_model_grid", "network_stage",
                        "refine_stage", "to_fixed_grid", "warp_outputs", "inverse_stage"],
    "jaxreg.refine": ["refine", "optimise_level", "level_grids", "body_grid", "upsample2",
                      "RefineOptions"],
    "jaxreg.demons": ["register", "available", "to_sitk"],
    "jaxreg.compilation": ["enable_cache", "cache_dir", "CompileCounter"],
    "jaxreg.outputs": ["write_registration"],
    "jaxreg.inputs": ["class_lut", "to_classes", "num_classes", "label_channels"],
    "jaxreg.points": ["transform_points"],
    "jaxreg.evaluation": ["evaluate", "score", "summarise", "load_cases", "run_method", "main"],
    "jaxreg.report": ["save_report", "save_box_plot"],
    "jaxreg.elastix": ["register", "parameter_map", "available"],
    "jaxreg.weights": ["save_weights", "load_weights", "export_checkpoint", "demo_model"],
    "jaxreg.conv": ["conv3d_folded", "conv_fn"],
    "jaxreg.losses": ["local_ncc", "global_ncc", "mse", "diffusion", "bending_energy",
                      "soft_dice", "folding", "box_sum", "box_counts", "local_ncc_map",
                      "mind_ssc", "mind_ssd"],
    "jaxreg.model": ["RegistrationNet", "UNet", "predict_displacement"],
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
  assert jaxreg.warp.warp is importlib.import_module("jaxreg.warp").warp


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
