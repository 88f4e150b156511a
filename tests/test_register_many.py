"""register_many / jaxreg register --pairs: one folder per pair, a failing pair recorded and
skipped, a re-run skips complete pairs; a second pair of another size compiles little; the
register stages alone."""

import csv
import json
import os

import numpy as np
import pytest
from nibabel.affines import apply_affine

from jaxreg.pipeline import affine as _affine
from jaxreg import cli
from jaxreg import data
from jaxreg import io
from jaxreg.io import resample as preprocess
from jaxreg.pipeline import register
from jaxreg.types import Volume, Grid


def _crop(array, affine, shape):
  lo = [(n - c) // 2 for n, c in zip(array.shape, shape)]
  out = affine.copy()
  out[:3, 3] = affine[:3, :3] @ np.asarray(lo) + affine[:3, 3]
  return array[tuple(slice(a, a + c) for a, c in zip(lo, shape))], out


@pytest.fixture(scope="module")
def pairs_csv(tmp_path_factory):
  """Two small crops of a demo pair (two sizes) and a third pair whose moving image is constant."""
  d = tmp_path_factory.mktemp("pairs")
  pair = data.demo_pair(1, split="eval")
  rows = []
  for i, shape in enumerate([(64, 64, 56), (60, 62, 52)]):
    for name, array, dtype in (("fixed", pair.fixed, np.int16), ("moving", pair.moving, np.int16),
                               ("fixed_labels", pair.fixed_labels, np.uint8),
                               ("moving_labels", pair.moving_labels, np.uint8)):
      a, aff = _crop(array, pair.affine, shape)
      io.save(d / f"{name}{i}.nii.gz", np.round(a).astype(dtype), aff)
    rows.append({"fixed": f"fixed{i}.nii.gz", "moving": f"moving{i}.nii.gz",
                 "fixed_labels": f"fixed_labels{i}.nii.gz",
                 "moving_labels": f"moving_labels{i}.nii.gz"})
  io.save(d / "flat.nii.gz", np.full((60, 62, 52), -1000, np.int16), io.load(d / "moving1.nii.gz")
          .affine)
  rows.append({"fixed": "fixed1.nii.gz", "moving": "flat.nii.gz", "fixed_labels": "",
               "moving_labels": ""})
  with open(d / "pairs.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return d / "pairs.csv"


def _summary(out):
  with open(out / "summary.csv") as f:
    return list(csv.DictReader(f))


def test_pairs_batch_records_a_failure_and_a_rerun_skips_complete_pairs(pairs_csv, tmp_path,
                                                                         capsys):
  out = tmp_path / "batch"
  rc = cli.main(["register", "--pairs", str(pairs_csv), "--out", str(out), "--levels",
                 "4,2", "--level-steps", "20,4"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2  # a pair failed: the batch went on, and says so
  assert len(err) == 1 and "002_flat_to_fixed1" in err[0] and "constant" in err[0], err
  rows = _summary(out)
  assert [r["status"] for r in rows] == ["done", "done", "failed"]
  assert "the image is constant" in rows[2]["error"]
  for row in rows[:2]:
    folder = out / row["pair"]
    assert {"warped.nii.gz", "displacement.nii.gz", "metrics.json", "report.png"} <= set(
        os.listdir(folder))
    assert float(row["mean_dice"]) > float(row["mean_dice_before"])
    m = json.load(open(folder / "metrics.json"))
    assert m["mean_dice"] == pytest.approx(float(row["mean_dice"]), abs=1e-4)
  assert not (out / rows[2]["pair"]).exists()
  before = {r["pair"]: os.path.getmtime(out / r["pair"] / "metrics.json") for r in rows[:2]}
  rc = cli.main(["register", "--pairs", str(pairs_csv), "--out", str(out), "--levels",
                 "4,2", "--level-steps", "20,4"])
  capsys.readouterr()
  again = _summary(out)
  assert [r["status"] for r in again] == ["skipped", "skipped", "failed"]
  assert all(os.path.getmtime(out / p / "metrics.json") == t for p, t in before.items())


def test_a_second_pair_of_another_size_compiles_little(pairs_csv):
  """Padded shape buckets: a pair of another size (same buckets) reuses the compiled code."""
  d = pairs_csv.parent
  options = register.RefineOptions(levels_mm=(4.0, 2.0), steps=(20, 4))
  register.register(io.load(d / "fixed0.nii.gz"), io.load(d / "moving0.nii.gz"),  # compiles
                    refine=options)
  second = register.register(io.load(d / "fixed1.nii.gz"), io.load(d / "moving1.nii.gz"),
                             refine=options)
  assert io.load(d / "fixed1.nii.gz").shape != io.load(d / "fixed0.nii.gz").shape
  assert second.metrics["xla_compilations"] <= 3, second.metrics


def test_compile_counter_counts_new_compilations_only():
  import jax
  import jax.numpy as jnp

  from jaxreg.pipeline.compilation import CompileCounter
  f = jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)
  with CompileCounter() as c:
    f(jnp.ones((7, 3)))
  assert c.compilations >= 1
  with CompileCounter() as again:
    f(jnp.ones((7, 3)))  # the same shape: nothing new
  assert again.compilations == 0


def test_to_fixed_grid_of_a_zero_field_is_the_affine_map():
  fixed = data.demo().ct
  grid = Grid.of(fixed)
  m = np.eye(4)
  m[:3, :3] = [[0.99, -0.1, 0.0], [0.1, 0.99, 0.02], [0.0, -0.02, 1.01]]
  m[:3, 3] = [5.0, -3.0, 12.0]
  model = preprocess.model_grid(fixed, spacing=8.0, divisor=16)
  d = register.to_fixed_grid(np.zeros(model.shape + (3,), np.float32), model, grid, m)
  np.testing.assert_allclose(d, _affine.displacement_mm(m, grid), atol=1e-3)


def test_aligned_moving_maps_fixed_points_through_the_matrix():
  """aligned(): the moving voxel seen at fixed world p is the one at world M p."""
  vol = Volume(np.zeros((4, 5, 6), np.float32), np.diag([2.0, 3.0, 1.5, 1.0]))
  m = np.eye(4)
  m[:3, 3] = [10.0, -4.0, 2.0]
  moved = register.aligned(vol, m)
  v = np.array([1.0, 2.0, 3.0])
  p = apply_affine(moved.affine, v)  # where voxel v appears after the affine stage
  np.testing.assert_allclose(apply_affine(m, p), apply_affine(vol.affine, v))


@pytest.mark.parametrize("size", [(40, 36, 30), (144, 144, 133)])
def test_the_network_grid_is_the_smallest_bucket_that_covers_the_image_up_to_the_models(size):
  """A small image runs the network on a small grid (a cost in proportion to the image):
  per axis the smallest shape bucket (the UNet's stride times 1, 2, 4 or 8 voxels) that
  covers the fixed image, capped at the model's training shape."""
  from jaxreg.io import weights
  from jaxreg.nn import model as _model
  _, config = weights.demo_model()
  ct = data.demo().ct
  box = tuple(slice(0, n) for n in size)
  fixed = Volume(ct.array[box], ct.affine)
  pair = register.to_model_grid(fixed, fixed, config)
  stride, cap = _model.unet_stride(config.model.widths), tuple(config.data.shape)
  buckets = [stride * 2 ** k for k in range(4)]
  corners = apply_affine(fixed.affine, np.array(np.meshgrid(*[[0, n - 1] for n in size]))
                         .reshape(3, -1).T)
  inside = apply_affine(np.linalg.inv(pair.grid.affine), corners)  # model-grid voxels
  for axis, n in enumerate(pair.grid.shape):
    needed = int(np.ceil(np.ptp(inside[:, axis]) - 1e-6)) + 1  # voxels spanning the image
    assert n == min(min(b for b in buckets if b >= needed), cap[axis]), (axis, n, needed)
    if n < cap[axis]:  # and it covers the image
      assert inside[:, axis].min() >= -0.5 and inside[:, axis].max() <= n - 0.5
  if size == (40, 36, 30):
    assert np.prod(pair.grid.shape) * 8 <= np.prod(cap)  # 100 mm at 6 mm: 32 voxels an axis
