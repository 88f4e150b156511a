"""The ANTs pair, against ANTs itself (antspyx: ``pip install 'jaxreg[ants]'``; skipped without
it): what ``jaxreg register --ants`` writes, applied by ``ants.apply_transforms`` and
``ants.apply_transforms_to_points``, reproduces jaxreg's own outputs; and a pair that
``ants.registration`` wrote, read by ``jaxreg apply``, reproduces ANTs' own resampling.

The conventions checked (jaxreg/io/ants.py): images moving -> fixed with
``transformlist=[warp, mat]``; fixed -> moving with ``[mat, inverse_warp]``, the affine
inverted; points go the other way: fixed points -> moving ones with ``[warp, mat]``, moving
points -> fixed ones with ``[mat, inverse_warp]`` (affine inverted).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

ants = pytest.importorskip("ants")
pd = pytest.importorskip("pandas")

from jaxreg import cli, data, io  # noqa: E402
from jaxreg.io import resample  # noqa: E402
from jaxreg.types import Grid, Volume  # noqa: E402

LPS = np.array([-1.0, -1.0, 1.0])


def _grid(centre, rot_deg, spacing, shape) -> Grid:
  """A grid of ``shape`` centred on ``centre`` (RAS mm), rotated about z, ``spacing`` mm."""
  t = np.radians(rot_deg)
  affine = np.eye(4)
  affine[:3, :3] = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0],
                             [0, 0, 1]]) @ np.diag(spacing)
  affine[:3, 3] = centre - affine[:3, :3] @ (np.array(shape) - 1) / 2
  return Grid(tuple(shape), affine)


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
  """A demo pair at 8 mm: the fixed image on an oblique (20 deg), anisotropic (6, 7, 8 mm)
  grid; the moving image rotated 10 deg and shifted 14 mm, on another grid (5, 5, 6 mm, rotated
  -8 deg) whose field of view is shifted; registered with --ants --inverse (network only)."""
  from scipy.spatial.transform import Rotation
  d = tmp_path_factory.mktemp("ants")
  pair = data.demo_pair(0, split="eval", spacing=8.0, shape=(32, 32, 32))
  centre = pair.affine[:3, :3] @ np.full(3, 15.5) + pair.affine[:3, 3]
  fixed_grid = _grid(centre, 20.0, (6.0, 7.0, 8.0), (36, 30, 28))
  m0 = np.eye(4)
  m0[:3, :3] = Rotation.from_euler("xyz", [0, 3, 10], degrees=True).as_matrix()
  m0[:3, 3] = centre + [8.0, -10.0, 6.0] - m0[:3, :3] @ centre
  moving_grid = _grid(m0[:3, :3] @ centre + m0[:3, 3] + [10.0, 0.0, 0.0], -8.0,
                      (5.0, 5.0, 6.0), (40, 44, 36))
  # moving'(q) = moving(M0^-1 q) on its own grid
  world = np.moveaxis(np.indices(moving_grid.shape), 0, -1) @ moving_grid.affine[:3, :3].T
  world = world + moving_grid.affine[:3, 3]
  back = world @ np.linalg.inv(m0)[:3, :3].T + np.linalg.inv(m0)[:3, 3] - world
  vol = lambda a: Volume(a, pair.affine)
  for name, array, grid, order, dtype in (
      ("fixed", pair.fixed, fixed_grid, 1, np.int16),
      ("fixed_labels", pair.fixed_labels, fixed_grid, 0, np.uint8),
      ("moving", pair.moving, moving_grid, 1, np.int16),
      ("moving_labels", pair.moving_labels, moving_grid, 0, np.uint8)):
    disp = np.zeros((*grid.shape, 3), np.float32) if grid is fixed_grid else back
    out = resample.resample_moving(vol(array), disp.astype(np.float32), grid, order=order,
                                   cval=-1024.0 if order else 0)
    io.save(d / f"{name}.nii.gz", np.round(out).astype(dtype), grid.affine)
  rc = cli.main(["register", "--fixed", str(d / "fixed.nii.gz"), "--moving",
                 str(d / "moving.nii.gz"), "--moving-labels", str(d / "moving_labels.nii.gz"),
                 "--out", str(d / "reg"), "--no-refine", "--ants", "--inverse"])
  assert rc == 0
  return d


def _inner(shape, margin=2):
  idx = np.moveaxis(np.indices(shape), 0, -1)
  return np.all((idx >= margin) & (idx <= np.array(shape) - 1 - margin), axis=-1)


def _labelled_points(path, n=50, seed=0):
  """World points (RAS mm) in the labelled voxels of ``path``, two voxels inside its grid."""
  vol = io.load_labels(path)
  rng = np.random.default_rng(seed)
  idx = np.argwhere((vol.array > 0) & _inner(vol.shape))
  idx = idx[rng.choice(len(idx), n, replace=False)] + rng.uniform(-0.4, 0.4, (n, 3))
  return idx @ vol.affine[:3, :3].T + vol.affine[:3, 3]


def _ants_points(ras, transformlist, whichtoinvert=None):
  """RAS points through ``ants.apply_transforms_to_points`` (LPS)."""
  frame = pd.DataFrame(ras * LPS, columns=["x", "y", "z"])
  out = ants.apply_transforms_to_points(3, frame, transformlist, whichtoinvert=whichtoinvert)
  return out[["x", "y", "z"]].to_numpy() * LPS


def test_ants_applies_the_written_pair_as_jaxreg(registered):
  """Labels moving -> fixed with [warp, mat]: jaxreg's warped labels (>= 99.9% of labelled
  voxels away from the border); fixed points -> moving with the same list: jaxreg.map_points
  within 0.01 mm."""
  import jaxreg
  d, reg = registered, registered / "reg"
  warp, mat = str(reg / "ants_1Warp.nii.gz"), str(reg / "ants_0GenericAffine.mat")
  out = ants.apply_transforms(ants.image_read(str(d / "fixed.nii.gz")),
                              ants.image_read(str(d / "moving_labels.nii.gz")),
                              transformlist=[warp, mat], interpolator="nearestNeighbor")
  theirs = out.numpy()
  ours = io.load_labels(reg / "warped_labels.nii.gz").array
  labelled = _inner(ours.shape) & ((theirs > 0) | (ours > 0))
  assert labelled.sum() > 1000
  assert (theirs[labelled] == ours[labelled]).mean() >= 0.999
  ras = _labelled_points(d / "fixed_labels.nii.gz")
  mapped = jaxreg.map_points(str(reg), ras)
  assert np.abs(mapped - ras).max() > 5.0  # the affine part moved them
  np.testing.assert_allclose(_ants_points(ras, [warp, mat]), mapped, atol=0.01)
  # the other order is another map: the test tells them apart
  assert np.abs(_ants_points(ras, [mat, warp]) - mapped).max() > 0.1


def test_ants_inverts_the_written_pair_as_jaxreg(registered):
  """Moving points -> fixed with [mat, inverse_warp] (mat inverted): ``q -> y + v(y)``,
  ``y = A^-1 q`` (v read as a field by jaxreg, within 0.01 mm); where ``y`` is a voxel centre
  of the fixed grid the exact inverse of the forward map (jaxreg.map_points inverse, and ANTs'
  own forward map back, within 0.01 mm), between them within 1 mm (``v`` read trilinearly;
  7 mm voxels of a network-only field; ANTs resamples images with the same map)."""
  import jaxreg
  from jaxreg.io import ants as ants_io
  d, reg = registered, registered / "reg"
  inv, mat = str(reg / "ants_1InverseWarp.nii.gz"), str(reg / "ants_0GenericAffine.mat")
  warp = str(reg / "ants_1Warp.nii.gz")
  matrix = ants_io.read_matrix(mat)
  fixed = io.load_labels(d / "fixed_labels.nii.gz")
  idx = np.argwhere((fixed.array > 0) & _inner(fixed.shape))
  idx = idx[np.random.default_rng(3).choice(len(idx), 50, replace=False)]
  nodes = idx @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]           # y on voxel centres
  q = nodes @ matrix[:3, :3].T + matrix[:3, 3]                          # q = A y
  back = _ants_points(q, [mat, inv], whichtoinvert=[True, False])
  np.testing.assert_allclose(back, jaxreg.map_points(inv, nodes), atol=0.01)  # y + v(y)
  np.testing.assert_allclose(back, jaxreg.map_points(str(reg), q, inverse=True), atol=0.01)
  np.testing.assert_allclose(_ants_points(back, [warp, mat]), q, atol=0.01)
  assert np.abs(back - nodes).max() > 1.0  # the warp is not the identity there
  fixed_pts = _labelled_points(d / "fixed_labels.nii.gz", seed=1)
  moving_pts = jaxreg.map_points(str(reg), fixed_pts)
  back = _ants_points(moving_pts, [mat, inv], whichtoinvert=[True, False])
  np.testing.assert_allclose(back, fixed_pts, atol=1.0)


@pytest.fixture(scope="module")
def ants_registered(registered):
  """A pair that ants.registration (SyN, few iterations) wrote, prefix ``syn/out_``."""
  d = registered
  os.makedirs(d / "syn", exist_ok=True)
  reg = ants.registration(ants.image_read(str(d / "fixed.nii.gz")),
                          ants.image_read(str(d / "moving.nii.gz")), type_of_transform="SyN",
                          outprefix=str(d / "syn" / "out_"), reg_iterations=(20, 10, 0),
                          aff_iterations=(100, 50, 0, 0), random_seed=1)
  assert reg["fwdtransforms"] == [str(d / "syn" / "out_1Warp.nii.gz"),
                                  str(d / "syn" / "out_0GenericAffine.mat")]
  return d, reg


def test_jaxreg_applies_a_pair_ants_wrote_as_ants(ants_registered, tmp_path):
  """jaxreg apply on the prefix and on the folder: ANTs' own resampling of the labels
  (>= 99.9% of labelled voxels away from the border), of the image (linear: within 1 HU), and
  its mapping of fixed points within 0.01 mm."""
  import jaxreg
  d, reg = ants_registered
  fixed = ants.image_read(str(d / "fixed.nii.gz"))
  theirs = ants.apply_transforms(fixed, ants.image_read(str(d / "moving_labels.nii.gz")),
                                 transformlist=reg["fwdtransforms"],
                                 interpolator="nearestNeighbor").numpy()
  for registration in (d / "syn" / "out_", d / "syn"):
    out = tmp_path / "labels.nii.gz"
    assert cli.main(["apply", "--registration", str(registration), "--moving",
                     str(d / "moving_labels.nii.gz"), "--labels", "--out", str(out)]) == 0
    ours = io.load_labels(out).array
    labelled = _inner(ours.shape) & ((theirs > 0) | (ours > 0))
    assert labelled.sum() > 1000
    assert (theirs[labelled] == ours[labelled]).mean() >= 0.999
  image = ants.apply_transforms(fixed, ants.image_read(str(d / "moving.nii.gz")),
                                transformlist=reg["fwdtransforms"], interpolator="linear",
                                defaultvalue=-1024).numpy()
  assert cli.main(["apply", "--registration", str(d / "syn" / "out_"), "--moving",
                   str(d / "moving.nii.gz"), "--cval", "-1024", "--out",
                   str(tmp_path / "image.nii.gz")]) == 0
  ours = io.load(tmp_path / "image.nii.gz")
  # where the fixed voxel maps a voxel or more inside the moving image (at its edge ITK gives
  # the default value beyond the last voxel centre, jaxreg blends towards it)
  world = np.moveaxis(np.indices(ours.shape), 0, -1) @ ours.affine[:3, :3].T + ours.affine[:3, 3]
  moved = jaxreg.map_points(str(d / "syn"), world.reshape(-1, 3)).reshape(world.shape)
  moving = io.load(d / "moving.nii.gz")
  inv = np.linalg.inv(moving.affine)
  vox = moved @ inv[:3, :3].T + inv[:3, 3]
  inside = np.all((vox >= 1) & (vox <= np.array(moving.shape) - 2), axis=-1)
  assert inside.mean() > 0.5
  assert np.abs(ours.array - image)[inside].max() < 1.0
  ras = _labelled_points(d / "fixed_labels.nii.gz", seed=2)
  mapped = jaxreg.map_points(str(d / "syn" / "out_"), ras)
  assert np.abs(mapped - ras).max() > 5.0
  np.testing.assert_allclose(mapped, _ants_points(ras, reg["fwdtransforms"]), atol=0.01)


def test_half_an_ants_pair_is_refused_in_one_line(ants_registered, tmp_path, capsys):
  d, _ = ants_registered
  shutil.copy(d / "syn" / "out_1Warp.nii.gz", tmp_path / "out_1Warp.nii.gz")
  rc = cli.main(["apply", "--registration", str(tmp_path), "--moving",
                 str(d / "moving.nii.gz"), "--out", str(tmp_path / "x.nii.gz")])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and str(tmp_path / "out_0GenericAffine.mat") in err[0]
  assert not (tmp_path / "x.nii.gz").exists()
