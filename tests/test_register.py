"""jaxreg register: outputs on the fixed grid that SimpleITK reproduces; bad inputs exit 2."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from jaxreg import data
from jaxreg import io
from jaxreg.pipeline import outputs
from jaxreg.types import Volume
from jaxreg.types import Grid, Volume


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
  """A demo evaluation pair; the moving image is stored flipped (another orientation)."""
  d = tmp_path_factory.mktemp("pair")
  pair = data.demo_pair(0, split="eval")
  flip = np.eye(4)
  flip[0, 0], flip[0, 3] = -1, pair.fixed.shape[0] - 1  # voxel i -> n-1-i
  io.save(d / "fixed.nii.gz", np.round(pair.fixed).astype(np.int16), pair.affine)
  io.save(d / "fixed_labels.nii.gz", pair.fixed_labels.astype(np.uint8), pair.affine)
  io.save(d / "moving.nii.gz", np.round(pair.moving[::-1]).astype(np.int16), pair.affine @ flip)
  io.save(d / "moving_labels.nii.gz", pair.moving_labels[::-1].astype(np.uint8),
          pair.affine @ flip)
  return d


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "jaxreg.cli", *map(str, args)],
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def registered(pair_files, tmp_path_factory):
  """The CLI's output folder for the pair (one run shared by the tests below)."""
  d, reg = pair_files, tmp_path_factory.mktemp("out") / "reg"
  out = _cli("register", "--fixed", d / "fixed.nii.gz", "--moving", d / "moving.nii.gz",
             "--fixed-labels", d / "fixed_labels.nii.gz", "--moving-labels",
             d / "moving_labels.nii.gz", "--out", reg, "--learn2reg")
  assert out.returncode == 0, out.stderr[-3000:]
  return reg


def test_register_outputs_overlay_the_fixed_image(pair_files, registered):
  d, reg = pair_files, registered
  assert sorted(os.listdir(reg)) == ["affine.txt", "displacement.nii.gz",
                                     "displacement_voxel.nii.gz",
                                     "metrics.json", "report.png", "warped.nii.gz",
                                     "warped_labels.nii.gz"]
  fixed = io.load(d / "fixed.nii.gz")
  for name in ("warped.nii.gz", "warped_labels.nii.gz"):
    vol = io.load(reg / name)
    assert vol.shape == fixed.shape
    np.testing.assert_allclose(vol.affine, fixed.affine, atol=1e-5)
  metrics = json.load(open(reg / "metrics.json"))
  assert metrics["mean_dice"] > metrics["mean_dice_before"] + 0.03
  assert metrics["folding_fraction"] < 0.01 and np.isfinite(metrics["sdlogj"])
  losses = metrics["refine"]["loss_first_last"]  # [first, last] per level, coarse to fine
  assert len(losses) == 3 and all(last < first for first, last in losses)
  assert metrics["xla_compilations"] >= metrics["xla_cache_hits"] >= 0
  # the persistent cache is on (conftest): every jitted stage is exported or loaded, none falls back
  assert metrics["stages_fallback"] == 0 and metrics["stages_loaded"] + metrics["stages_exported"] >= 5
  assert set(metrics["stage_seconds"]) >= {"affine", "network", "refine", "warp"}
  # SimpleITK: moving labels (flipped grid) through displacement.nii.gz onto the fixed grid.
  ref = sitk.ReadImage(str(d / "fixed.nii.gz"))
  field = sitk.ReadImage(str(reg / "displacement.nii.gz"), sitk.sitkVectorFloat64)
  moving = sitk.ReadImage(str(d / "moving_labels.nii.gz"))
  theirs = sitk.GetArrayFromImage(sitk.Resample(
      moving, ref, sitk.DisplacementFieldTransform(field), sitk.sitkNearestNeighbor, 0))
  ours = sitk.GetArrayFromImage(sitk.ReadImage(str(reg / "warped_labels.nii.gz")))
  assert (theirs == ours).mean() >= 0.999
  # and the Learn2Reg voxel field is the same field in fixed voxels
  d_vox, _ = io.load_displacement(reg / "displacement_voxel.nii.gz", convention="voxel")
  d_itk, _ = io.load_displacement(reg / "displacement.nii.gz", convention="itk")
  np.testing.assert_allclose(d_vox, d_itk, atol=1e-4)


def test_register_is_deterministic_across_processes(pair_files, registered):
  """The same inputs registered again, here in this process: bit-identical outputs."""
  from jaxreg.pipeline import register
  d = pair_files
  fixed_labels = io.load_labels(d / "fixed_labels.nii.gz")
  moving_labels = io.load_labels(d / "moving_labels.nii.gz")
  result = register.register(io.load(d / "fixed.nii.gz"), io.load(d / "moving.nii.gz"),
                             fixed_labels=fixed_labels, moving_labels=moving_labels)
  np.testing.assert_array_equal(io.load(registered / "warped.nii.gz").array, result.warped)
  d_vox, _ = io.load_displacement(registered / "displacement_voxel.nii.gz", convention="voxel")
  np.testing.assert_array_equal(d_vox, result.displacement_voxel)
  assert np.all(np.isfinite(result.displacement_mm))
  scores = outputs.label_scores(result, fixed_labels, moving_labels)
  assert json.load(open(registered / "metrics.json"))["mean_dice"] == scores["mean_dice"]


@pytest.mark.parametrize("case", ["missing", "labels of another grid", "out is a file",
                                  "not nifti", "out in a missing folder"])
def test_bad_inputs_are_one_line_exit_2_and_write_nothing(pair_files, tmp_path, case):
  d = pair_files
  args = {"--fixed": d / "fixed.nii.gz", "--moving": d / "moving.nii.gz",
          "--out": tmp_path / "reg"}
  expect = None
  if case == "missing":
    args["--moving"], expect = tmp_path / "nope.nii.gz", "nope.nii.gz: no such file"
  elif case == "labels of another grid":
    # the moving grid shifted by half a voxel: not the same voxels in another order
    lab = io.load_labels(d / "moving_labels.nii.gz")
    shifted = lab.affine.copy()
    shifted[:3, 3] += 0.5 * lab.affine[:3, 0]
    io.save(tmp_path / "shifted_labels.nii.gz", lab.array.astype(np.uint8), shifted)
    args["--moving-labels"] = tmp_path / "shifted_labels.nii.gz"
    expect = "affine differs from"
  elif case == "out in a missing folder":
    args["--out"], expect = tmp_path / "no" / "reg", "parent folder"
  elif case == "out is a file":
    (tmp_path / "reg").write_text("x")
    expect = "exists and is not a folder"
  else:
    (tmp_path / "bad.nii.gz").write_text("not an image")
    args["--fixed"], expect = tmp_path / "bad.nii.gz", "not a readable NIfTI"
  out = _cli("register", *[x for kv in args.items() for x in kv])
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and expect in lines[0] and "Traceback" not in out.stderr
  if case != "out is a file":
    assert not (tmp_path / "reg").exists()


def test_labels_stored_in_the_other_axis_order_are_accepted(pair_files):
  """The fixed labels hold the same voxels as the flipped moving grid: re-indexed, not refused."""
  d = pair_files
  moving = io.load(d / "moving.nii.gz")
  labels = io.load_labels(d / "fixed_labels.nii.gz", like=moving)
  np.testing.assert_allclose(labels.affine, moving.affine)
  np.testing.assert_array_equal(labels.array, io.load_labels(d / "fixed_labels.nii.gz").array[::-1])


@pytest.fixture(scope="module")
def misaligned_files(tmp_path_factory):
  """A demo evaluation pair whose moving image is also rotated 10 deg and shifted 25 mm."""
  import scipy.spatial.transform as sst

  from jaxreg.pipeline import affine
  from jaxreg.io import resample as preprocess
  d = tmp_path_factory.mktemp("misaligned")
  pair = data.demo_pair(0, split="eval")
  fixed = Volume(np.round(pair.fixed).astype(np.int16), pair.affine)
  centre = affine.centre_of_mass(fixed)
  m0 = np.eye(4)
  m0[:3, :3] = sst.Rotation.from_euler("xyz", [0, 4, 10], degrees=True).as_matrix()
  m0[:3, 3] = centre + [15.0, -20.0, 8.0] - m0[:3, :3] @ centre
  grid = Grid.of(fixed)
  back = affine.displacement_mm(np.linalg.inv(m0), grid)  # moving'(q) = moving(M0^-1 q)
  moving = Volume(pair.moving, pair.affine)
  labels = Volume(pair.moving_labels, pair.affine)
  io.save(d / "fixed.nii.gz", fixed.array, fixed.affine)
  io.save(d / "fixed_labels.nii.gz", pair.fixed_labels.astype(np.uint8), pair.affine)
  io.save(d / "moving.nii.gz", np.round(preprocess.resample_moving(moving, back, grid, cval=-1024))
          .astype(np.int16), pair.affine)
  io.save(d / "moving_labels.nii.gz",
          preprocess.resample_moving(labels, back, grid, order=0).astype(np.uint8), pair.affine)
  return d, m0


def test_affine_then_deformable_composes_one_transform_and_its_inverse(misaligned_files,
                                                                        tmp_path):
  from jaxreg.ops import points
  from jaxreg.pipeline import register
  d, m0 = misaligned_files
  out = _cli("register", "--fixed", d / "fixed.nii.gz", "--moving", d / "moving.nii.gz",
             "--fixed-labels", d / "fixed_labels.nii.gz", "--moving-labels",
             d / "moving_labels.nii.gz", "--out", tmp_path / "reg", "--inverse")
  assert out.returncode == 0, out.stderr[-3000:]
  reg = tmp_path / "reg"
  assert {"affine.txt", "inverse_displacement.nii.gz"} <= set(os.listdir(reg))
  metrics = json.load(open(reg / "metrics.json"))
  assert metrics["mean_dice_before"] < 0.3 and metrics["mean_dice"] > 0.7  # all labels
  # without the affine stage the network cannot bridge a 25 mm / 10 degree offset
  fixed, moving = io.load(d / "fixed.nii.gz"), io.load(d / "moving.nii.gz")
  fixed_labels = io.load_labels(d / "fixed_labels.nii.gz")
  moving_labels = io.load_labels(d / "moving_labels.nii.gz")
  alone = register.register(fixed, moving, affine="none", refine=None,
                            fixed_labels=fixed_labels, moving_labels=moving_labels)
  alone_dice = outputs.label_scores(alone, fixed_labels, moving_labels)["mean_dice"]
  assert alone_dice < metrics["mean_dice"] - 0.15
  # affine.txt (ITK, LPS) holds about the known misalignment, read by SimpleITK
  tx = sitk.ReadTransform(str(reg / "affine.txt"))
  body = np.argwhere(fixed.array > -500)[::50] @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]
  theirs = np.array([tx.TransformPoint((-p[0], -p[1], p[2])) for p in body]) * [-1, -1, 1]
  assert np.linalg.norm(theirs - (body @ m0[:3, :3].T + m0[:3, 3]), axis=1).mean() < 4.0
  # the one displacement maps labels as SimpleITK applies it (the image interpolated once)
  field = sitk.ReadImage(str(reg / "displacement.nii.gz"), sitk.sitkVectorFloat64)
  warped = sitk.GetArrayFromImage(sitk.Resample(
      sitk.ReadImage(str(d / "moving_labels.nii.gz")), sitk.ReadImage(str(d / "fixed.nii.gz")),
      sitk.DisplacementFieldTransform(field), sitk.sitkNearestNeighbor, 0))
  ours = sitk.GetArrayFromImage(sitk.ReadImage(str(reg / "warped_labels.nii.gz")))
  assert (warped == ours).mean() >= 0.999
  # forward then inverse returns body points to themselves
  fwd, aff = io.load_displacement(reg / "displacement.nii.gz")
  inv, _ = io.load_displacement(reg / "inverse_displacement.nii.gz")
  inner = body[np.all(np.abs(body - body.mean(0)) < 60, axis=1)]
  there = np.asarray(points.transform_points(inner, fwd, aff))
  back = np.asarray(points.transform_points(there, inv, aff))
  error = np.linalg.norm(back - inner, axis=1)  # mm; 2026-12-05: mean 0.05, max 0.24
  assert error.mean() < 0.2 and error.max() < 1.0
  # The fixed-point residual in metrics.json is a max over the whole grid: ~0 except at the few
  # (near-)folding voxels of the fine field (folding fraction < 0.1%), where no inverse exists
  # (8-12 voxels there, whatever the weights); the round trip above is the accuracy check.
  assert metrics["folding_fraction"] < 1e-3 and np.isfinite(metrics["inverse_residual_voxels"])



def test_reg_weight_picks_the_trade_off_of_a_conditioned_model(pair_files, tmp_path):
  from jaxreg.pipeline import register
  from jaxreg import training
  from jaxreg.io import weights
  from jaxreg.types import InputError
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = training.override(training.load_config(os.path.join(root, "configs", "test.py")),
                             ["model.condition_on_reg=True", "train.steps=4", "optim.lr=0.01"])
  training.train_and_evaluate(config, str(tmp_path / "w"), progress=False, log=lambda s: None)
  training.export_checkpoint(str(tmp_path / "w"), str(tmp_path / "model"))
  net, config = weights.load_weights(str(tmp_path / "model"))
  d = pair_files
  fixed, moving = io.load(d / "fixed.nii.gz"), io.load(d / "moving.nii.gz")
  runs = {lam: register.register(fixed, moving, net=net, config=config, refine=None,
                                 affine="none", reg_weight=lam) for lam in (0.1, 100.0)}
  assert runs[0.1].metrics["network_reg_weight"] == 0.1
  assert np.max(np.abs(runs[0.1].displacement_mm - runs[100.0].displacement_mm)) > 0
  default = register.register(fixed, moving, net=net, config=config, refine=None, affine="none")
  assert default.metrics["network_reg_weight"] == config.loss.reg_weight
  # with the refinement after it, the network runs at the smooth end by default (clamped)
  refined = register.register(fixed, moving, net=net, config=config, affine="none")
  assert refined.metrics["network_reg_weight"] == 20.0
  narrow = training.override(config, ["model.reg_range=(0.1,5.0)"])
  assert register.default_reg_weight(narrow, register.RefineOptions()) == 5.0
  assert register.default_reg_weight(narrow, None) == config.loss.reg_weight
  assert register.default_reg_weight(weights.load_weights(
      os.path.join(root, "benchmarks", "candidates", "demo_8mm"))[1], None) is None
  with pytest.raises(InputError, match=r"outside the range this model was trained on \[0.1, 100\]"):
    register.register(fixed, moving, net=net, config=config, refine=None, reg_weight=1000.0)
  # the CLI: a model without conditioning (the previously shipped 8 mm one; the shipped model is
  # conditioned) refuses --reg-weight, before writing anything
  plain = os.path.join(root, "benchmarks", "candidates", "demo_8mm")
  assert not weights.load_weights(plain)[1].model.get("condition_on_reg", False)
  out = _cli("register", "--fixed", d / "fixed.nii.gz", "--moving", d / "moving.nii.gz",
             "--out", tmp_path / "reg", "--reg-weight", "1.0", "--checkpoint", plain)
  assert out.returncode == 2 and "Traceback" not in out.stderr
  line, = out.stderr.strip().splitlines()
  assert "--reg-weight needs a model trained with lambda conditioning" in line
  assert not (tmp_path / "reg").exists()


def test_register_spatially_sharded_on_8_devices_equals_one_device(pair_files):
  """--mesh space=8: the network and every refinement level split along X over 8 devices."""
  import jax

  from jaxreg.pipeline import register
  assert jax.device_count() == 8
  d = pair_files
  fixed, moving = io.load(d / "fixed.nii.gz"), io.load(d / "moving.nii.gz")
  net_one = register.register(fixed, moving, affine="none", refine=None)
  net_split = register.register(fixed, moving, affine="none", refine=None, mesh="space=8")
  assert np.abs(net_one.displacement_mm).max() > 1.0  # a real deformation is compared
  np.testing.assert_allclose(net_split.displacement_mm, net_one.displacement_mm, atol=1e-3)
  one = register.register(fixed, moving, affine="none")
  split = register.register(fixed, moving, affine="none", mesh="space=8")
  assert one.metrics["mesh_space"] == 1 and split.metrics["mesh_space"] == 8
  # The refinement's losses agree to float32 rounding at every level (means over ~1e5
  # voxels summed in another order: a few float32 ulps times sqrt(N), ~1e-5 relative).
  # Its fields are not compared voxel by voxel: Adam normalises each step, so a
  # summation-order difference in a near-zero gradient (flat background) moves a control
  # point by up to lr; the gradients Adam follows are compared in test_refine.
  np.testing.assert_allclose(split.metrics["refine"]["loss_first_last"],
                             one.metrics["refine"]["loss_first_last"], rtol=2e-5)


@pytest.mark.parametrize("mesh, message", [
    ("data=2,space=4", "one registration has no batch to split"),
    ("space=16", "space=16 but 8 local device(s) exist"),
    ("space=5", "space=5 does not divide the first axis of the model grid"),
])
def test_bad_mesh_is_one_line_exit_2(pair_files, tmp_path, mesh, message):
  d = pair_files
  out = _cli("register", "--fixed", d / "fixed.nii.gz", "--moving", d / "moving.nii.gz",
             "--out", tmp_path / "reg", "--mesh", mesh, "--affine", "none")
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], out.stderr
  assert not (tmp_path / "reg").exists()


def test_values_outside_a_mask_never_reach_the_registration(pair_files):
  """--moving-mask / --fixed-mask: replace every voxel outside the masks by noise and the
  field is the same, bit for bit -- no stage (affine, network inputs, refinement, their
  filters) reads them; and metrics.json's figures match numpy's Jacobian of the field."""
  from jaxreg.pipeline import register
  d = pair_files
  fixed, moving = io.load(d / "fixed.nii.gz"), io.load(d / "moving.nii.gz")
  rng = np.random.default_rng(0)
  m_mask = np.zeros(moving.shape, bool)
  m_mask[:, :, : 2 * moving.shape[2] // 3] = True  # the moving scan's lower two thirds
  f_mask = np.zeros(fixed.shape, bool)
  f_mask[4:-4, 4:-4, 3:] = True
  noisy = lambda v, m: Volume(np.where(m, v.array, rng.uniform(-1000, 2000, v.shape)),
                                 v.affine)
  a = register.register(fixed, moving, fixed_mask=f_mask, moving_mask=m_mask)
  b = register.register(noisy(fixed, f_mask), noisy(moving, m_mask), fixed_mask=f_mask,
                        moving_mask=Volume(m_mask.astype(np.uint8), moving.affine))
  np.testing.assert_array_equal(a.displacement_mm, b.displacement_mm)
  whole = register.register(fixed, moving)
  assert np.abs(whole.displacement_mm - a.displacement_mm).max() > 0.1  # the masks do matter
  # metrics: folding over the fixed body and the whole grid, the largest displacement
  grads = [np.gradient(a.displacement_voxel[..., k].astype(np.float64)) for k in range(3)]
  det = np.linalg.det(np.eye(3) + np.stack([np.stack(g, -1) for g in grads], -2))
  body = fixed.array > -500
  assert a.metrics["folding_fraction_body"] == pytest.approx(np.mean(det[body] <= 0), abs=1e-4)
  assert a.metrics["folding_fraction"] == pytest.approx(np.mean(det <= 0), abs=1e-4)
  assert a.metrics["max_displacement_mm"] == pytest.approx(
      np.linalg.norm(a.displacement_mm, axis=-1).max(), rel=1e-5)
