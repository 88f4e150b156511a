"""jaxreg.pipeline.refine: the control-grid upsampling against scipy, its smoothing against numpy,
recovery of a known deformation with each similarity, the level grids, and bad options."""

import dataclasses

import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxreg.io import resample as preprocess
from jaxreg.pipeline import refine
from jaxreg.ops import warp
from jaxreg.types import InputError, Volume, Grid
from jaxreg.pipeline.refine import RefineOptions

SPACING = 2.0
SHAPE = (40, 36, 32)


def test_upsample2_is_scipy_linear_zoom_with_cell_centred_grids():
  rng = np.random.default_rng(0)
  c = rng.normal(size=(5, 4, 3, 3)).astype(np.float32)
  ours = np.asarray(refine.upsample2(c))
  for k in range(3):
    want = ndi.zoom(c[..., k].astype(np.float64), 2, order=1, grid_mode=True, mode="nearest")
    np.testing.assert_allclose(ours[..., k], want, atol=1e-6)


def test_upsample2_gradient_is_the_adjoint_of_scipy_zoom():
  """The hand-written transpose: <zoom(c), g> == <c, upsample2's vjp(g)> for random c, g."""
  import jax
  rng = np.random.default_rng(1)
  c = rng.normal(size=(5, 4, 3, 3)).astype(np.float32)
  g = rng.normal(size=(10, 8, 6, 3)).astype(np.float32)
  (pulled,) = jax.vjp(refine.upsample2, c)[1](g)
  zoomed = np.stack([ndi.zoom(c[..., k].astype(np.float64), 2, order=1, grid_mode=True,
                              mode="nearest") for k in range(3)], -1)
  np.testing.assert_allclose(np.sum(np.asarray(pulled, np.float64) * c), np.sum(zoomed * g),
                             rtol=1e-5)
  # and entry by entry: the zoom of a unit control point, dotted with g
  for idx in [(0, 0, 0, 0), (4, 3, 2, 1), (2, 1, 0, 2), (1, 3, 1, 0)]:
    e = np.zeros(c.shape[:3])
    e[idx[:3]] = 1.0
    want = np.sum(ndi.zoom(e, 2, order=1, grid_mode=True, mode="nearest") * g[..., idx[3]])
    np.testing.assert_allclose(float(pulled[idx]), want, rtol=1e-5, atol=1e-6)


def test_smooth3_is_repeated_edge_normalised_3_cubed_mean():
  """Against a numpy loop over each voxel's in-volume 3x3x3 neighbours (not scipy's filters,
  whose edge modes do not renormalise)."""
  rng = np.random.default_rng(3)
  c = rng.normal(size=(5, 4, 6, 3)).astype(np.float32)
  want = c.astype(np.float64)
  for _ in range(2):
    out = np.empty_like(want)
    for i, j, k in np.ndindex(*c.shape[:3]):
      box = want[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2, max(k - 1, 0):k + 2]
      out[i, j, k] = box.reshape(-1, 3).mean(0)
    want = out
  np.testing.assert_allclose(np.asarray(refine.smooth3(c, 2)), want, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(refine.smooth3(c, 0)), c)
  const = np.full((5, 4, 6, 3), 1.5, np.float32)
  np.testing.assert_allclose(np.asarray(refine.smooth3(const, 3)), const, rtol=1e-6)


def _phantom():
  """A body-like HU phantom: an ellipsoid of soft tissue with denser and darker blobs."""
  x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
  img = np.where(x ** 2 / 0.8 + y ** 2 / 0.7 + z ** 2 / 0.9 < 1, 40.0, -1000.0)
  rng = np.random.default_rng(1)
  for _ in range(14):
    c = rng.uniform(-0.5, 0.5, 3)
    r = rng.uniform(0.1, 0.25)
    img = np.where((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 < r * r,
                   rng.uniform(-400, 600), img)
  texture = ndi.gaussian_filter(rng.normal(size=SHAPE), 1.5)
  img = img + np.where(img > -500, 150 * texture / texture.std(), 0.0)  # tissue texture
  return ndi.gaussian_filter(img, 0.8).astype(np.float32)


@pytest.fixture(scope="module")
def pair():
  """Fixed = moving warped by a known smooth field (<= 3 voxels = 6 mm)."""
  affine = np.diag([SPACING, SPACING, SPACING, 1.0])
  moving = _phantom()
  rng = np.random.default_rng(2)
  coarse = rng.normal(size=(4, 4, 4, 3))
  field = np.stack([ndi.zoom(coarse[..., k], [n / 4 for n in SHAPE], order=3)
                    for k in range(3)], -1)
  field *= 3.0 / np.abs(field).max()
  fixed = np.asarray(warp.warp(moving, field.astype(np.float32), cval=-1000.0))
  return Volume(fixed, affine), Volume(moving, affine), field.astype(np.float32)


def _error(result, fixed, field):
  """Mean error (voxels) inside the body of the recovered field on the fixed grid."""
  grid = Grid.of(fixed)
  got = preprocess.field_to_world(result.disp, result.grid, grid) / SPACING
  body = fixed.array > -500
  return np.linalg.norm(got - field, axis=-1)[body].mean()


@pytest.mark.parametrize("similarity, left", [("lncc", 0.35), ("mind", 0.6), ("mse", 0.35)])
def test_refine_recovers_a_known_smooth_deformation(pair, similarity, left):
  """From a zero start, at most ``left`` of the mean error remains (measured 2026-12-01:
  LNCC 0.24, MIND 0.49, MSE 0.22 of it; MIND's coarser descriptors are less precise on
  this small phantom)."""
  fixed, moving, field = pair
  zero = np.zeros(SHAPE + (3,), np.float32)
  start = np.linalg.norm(field, axis=-1)[fixed.array > -500].mean()
  options = RefineOptions(levels_mm=(4.0, 2.0), steps=(60, 30), similarity=similarity, lr=0.3)
  result = refine.refine(fixed, moving, zero, Grid.of(fixed), options)
  assert result.grid.spacing == pytest.approx([SPACING] * 3)  # finest level: the image's
  assert [len(v) for v in result.losses] == [60, 30]
  assert all(v[-1] < v[0] for v in result.losses)
  assert _error(result, fixed, field) < left * start


def test_levels_laid_out_longest_axis_first_give_the_field_of_the_image_order(pair,
                                                                              monkeypatch):
  """The level grids' axes are ordered by size (shared programs for permuted sizes); the
  refinement treats the axes alike, so the field equals the one computed on grids in the
  image's axis order up to float rounding (here the pair is transposed so that the order
  differs)."""
  fixed, moving, _ = pair
  fixed, moving = (Volume(np.ascontiguousarray(np.transpose(v.array, (2, 1, 0))), v.affine)
                   for v in (fixed, moving))  # 32 x 36 x 40 voxels along x, y, z
  zero = np.zeros(fixed.shape + (3,), np.float32)
  options = RefineOptions(levels_mm=(4.0, 2.0), steps=(30, 10), lr=0.3)
  grids = refine.level_grids(fixed, options.levels_mm)
  assert all(list(g.shape) == sorted(g.shape, reverse=True) for g in grids)
  assert any(g.shape != preprocess.model_grid(fixed, spacing=s, divisor=16, bucket=True).shape
             for g, s in zip(grids, options.levels_mm))  # the layout did change something
  sorted_ = refine.refine(fixed, moving, zero, Grid.of(fixed), options)
  monkeypatch.setattr(preprocess, "longest_first", lambda grid: grid)
  plain = refine.refine(fixed, moving, zero, Grid.of(fixed), options)
  assert sorted_.grid.shape != plain.grid.shape
  a, b = (preprocess.field_to_world(r.disp, r.grid, Grid.of(fixed)) for r in (sorted_, plain))
  body = fixed.array > -500
  assert np.abs(a - b)[body].max() < 1e-3 * SPACING, np.abs(a - b)[body].max()


def test_default_levels_follow_the_fixed_spacing_with_a_2_mm_floor():
  assert RefineOptions().checked([2.5, 2.5, 2.5]).levels_mm == (10.0, 5.0, 2.5)
  assert RefineOptions().checked([0.7, 0.7, 2.5]).levels_mm == (8.0, 4.0, 2.0)
  assert RefineOptions().checked([2.5] * 3).steps == (40, 60, 10)
  assert RefineOptions(steps=40).checked([3.0] * 3).steps == (40, 40, 40)
  assert RefineOptions(levels_mm=(5.0,)).checked([2.5] * 3).steps == (60,)
  assert RefineOptions(levels_mm=(16.0, 8.0, 4.0, 2.0)).checked([2.0] * 3).steps == (40, 40, 60, 10)


@pytest.mark.parametrize("flags, steps, smooth", [
    ([], (40, 60, 10), (2, 2, 2)),
    (["--refine-smooth", "2"], (40, 60, 10), (2, 2, 2)),    # one number: every level
    (["--refine-smooth", "2,1", "--levels", "4,2", "--level-steps", "30"], (30, 30), (2, 1)),
    (["--levels", "8,4"], (60, 10), (2, 2)),                # default steps for two levels
])
def test_register_flags_give_one_value_per_level(flags, steps, smooth):
  from jaxreg import cli
  args = cli.build_parser().parse_args(["register", "--fixed", "f", "--moving", "m",
                                        "--out", "o", *flags])
  options = cli._refine_options(args).checked([2.0] * 3)
  assert options.steps == steps and options.smooth == smooth


def test_level_grids_cover_the_body_box_in_multiples_of_16(pair):
  fixed, _, _ = pair
  body = refine.body_grid(fixed)
  lo, hi = body.world_bounds()
  flo, fhi = Grid.of(fixed).world_bounds()
  assert np.all(lo >= flo - 1e-6) and np.all(hi <= fhi + 1e-6)
  inside = np.argwhere(fixed.array > -500) * SPACING
  assert np.all(inside.min(0) >= lo - 1e-6) and np.all(inside.max(0) <= hi + 1e-6)
  for g, s in zip(refine.level_grids(fixed, (4.0, 2.0)), (4.0, 2.0)):
    assert all(n % 16 == 0 for n in g.shape)
    assert g.spacing == pytest.approx([s] * 3)
    glo, ghi = g.world_bounds()
    assert np.all(glo <= lo + 1e-6) and np.all(ghi >= hi - 1e-6)


def test_level_grids_sit_on_the_fixed_voxels_so_the_finest_level_copies_them():
  # A flipped, offset 2.5 mm CT whose body box pads oddly to 16: centred, the level grid
  # would sit half a voxel off (a blur of the fixed image); on the lattice, resampling the
  # fixed image onto the finest level must copy its voxels (read here by numpy indexing).
  rng = np.random.default_rng(0)
  shape = (37, 30, 27)
  affine = np.array([[-2.5, 0, 0, 90.3], [0, 0, 2.5, -41.7], [0, -2.5, 0, 12.1], [0, 0, 0, 1]])
  array = rng.normal(0, 100, shape).astype(np.float32)
  fixed = Volume(array, affine)
  region = Grid.of(fixed)
  for spacing, stride in ((5.0, 2), (2.5, 1)):
    centred = preprocess.model_grid(region, spacing=spacing, divisor=16, bucket=True)
    if max(centred.shape) <= 32:  # a small level: the 32-voxel cube
      centred = preprocess.model_grid(region, spacing=spacing, divisor=16, shape=(32, 32, 32))
    g, = refine.level_grids(region, (spacing,))
    assert g.shape == centred.shape and np.allclose(g.affine[:3, :3], centred.affine[:3, :3])
    moved = g.affine[:3, 3] - centred.affine[:3, 3]
    assert np.all(np.abs(moved) < 2.5 + 1e-9)
    index = np.linalg.inv(affine) @ g.affine  # level voxel -> fixed voxel
    assert np.allclose(index[:3, 3], np.round(index[:3, 3]))  # the origin is a fixed voxel
    assert np.allclose(np.abs(index[:3, :3]).sum(axis=0), stride)
    glo, ghi = g.world_bounds()
    flo, fhi = region.world_bounds()
    assert np.all(glo <= flo + 1e-6) and np.all(ghi >= fhi - 1e-6)
  copied = preprocess.resample(fixed, g, cval=-7.0)
  ijk = np.rint(np.einsum("ab,xyzb->xyza", index[:3, :3], np.indices(g.shape).transpose(1, 2, 3, 0))
                + index[:3, 3]).astype(int)
  inside = np.all((ijk >= 0) & (ijk < np.array(shape)), axis=-1)
  want = np.full(g.shape, -7.0, np.float32)
  want[inside] = array[tuple(ijk[inside].T)]
  np.testing.assert_allclose(copied, want, atol=1e-3)
  oblique = Volume(array, affine @ np.array([[0.8, -0.6, 0, 0], [0.6, 0.8, 0, 0], [0, 0, 1, 0],
                                             [0, 0, 0, 1]]))
  g_obl = preprocess.model_grid(oblique, spacing=2.5, divisor=16)
  assert refine.on_lattice(g_obl, Grid.of(oblique)) is g_obl  # no lattice to meet


def test_a_level_samples_the_moving_image_once_through_its_map():
  # moving_map: the moving image stays on its own (oblique, anisotropic) grid and is sampled at
  # moving_map @ (x + u(x)); the first loss (the increment starts at 0) must be the MSE against
  # scipy's order-1 map_coordinates there, plus the weighted diffusion (numpy) of the base
  # along the moving axes (level voxels); with a vanishing lr the base comes back.
  import jax.numpy as jnp
  rng = np.random.default_rng(3)
  level = (16, 16, 16)
  native = ndi.gaussian_filter(rng.uniform(0, 1, (21, 18, 13)), 1.5).astype(np.float32)
  c, s_ = np.cos(0.3), np.sin(0.3)
  to_moving = np.array([[0.9 * c, -0.9 * s_, 0, 1.3], [0.7 * s_, 0.7 * c, 0, -0.4],
                        [0, 0, 0.6, 2.1], [0, 0, 0, 1]], np.float32)
  base = rng.normal(0, 0.7, level + (3,)).astype(np.float32)
  fixed = rng.uniform(0, 1, level).astype(np.float32)
  ones = np.ones(level, np.float32)
  out, values = refine.optimise_level(jnp.asarray(base), jnp.asarray(fixed), jnp.asarray(native),
                                      jnp.asarray(ones), 1e-9, 0.5, jnp.asarray(to_moving),
                                      steps=2, similarity="mse", control=2, smooth=0)
  np.testing.assert_allclose(out, base, atol=1e-4)  # back in level voxels
  x = np.indices(level).transpose(1, 2, 3, 0) + base
  points = x @ to_moving[:3, :3].T.astype(np.float64) + to_moving[:3, 3]
  warped = ndi.map_coordinates(native.astype(np.float64), points.reshape(-1, 3).T, order=1,
                               mode="grid-constant", cval=0.0).reshape(level)
  rot = to_moving[:3, :3] / np.linalg.norm(to_moving[:3, :3], axis=1)[:, None]
  v = base @ rot.T.astype(np.float64)  # the field along the moving axes, level voxels
  diffusion = sum(np.mean(np.sum(np.diff(v, axis=j) ** 2, axis=-1)) for j in range(3)) / 3
  want = np.mean((fixed - warped) ** 2) + 0.5 * diffusion
  assert float(values[0]) == pytest.approx(want, rel=1e-4)
  with pytest.raises(ValueError, match="MIND-SSC"):
    refine.optimise_level(jnp.asarray(base), jnp.asarray(fixed), jnp.asarray(native),
                          jnp.asarray(ones), 0.1, 0.5, jnp.asarray(to_moving), steps=1,
                          similarity="mind")


@pytest.mark.parametrize("change, match", [
    ({"similarity": "ssd"}, "unknown similarity 'ssd'; registered: lncc, mind, mse, ncc"),
    ({"regulariser": "tv"}, "unknown regulariser 'tv'; registered: bending, diffusion"),
    ({"levels_mm": (2.0, 4.0)}, "coarse to fine"),
    ({"levels_mm": (4.0, 0.1)}, ">= 0.5 mm"),
    ({"levels_mm": ()}, "coarse to fine"),
    ({"levels_mm": (8.0, 4.0, 2.0), "steps": (10, 10)}, "one positive number per level"),
    ({"steps": (10, 0)}, "one positive number per level"),
    ({"reg_weight": -1.0}, "reg_weight"),
    ({"lr": float("nan")}, "lr must be positive"),
    ({"window": 4}, "window must be a positive odd"),
    ({"control": 3}, "control strides must be 1 or 2"),
    ({"smooth": -1}, "smooth must be >= 0"),
    ({"smooth": (2, 1)}, "smooth must be >= 0 passes, one per level"),
])
def test_bad_options_raise_input_error(change, match):
  with pytest.raises(InputError, match=match):
    dataclasses.replace(RefineOptions(), **change).checked([2.0] * 3)


def test_registered_losses_drive_a_level_as_the_built_in_ones_do(scratch_registry):
  """The loss registry is the refinement's too: a registered similarity (an unweighted MSE)
  and regulariser (diffusion, by another name) give the built-in MSE's level with an
  all-ones mask; a registered similarity needs its reg_weight."""
  import jax.numpy as jnp
  from jaxreg.ops import losses
  losses.register_similarity("plain_mse", lambda f, w: jnp.mean((f - w) ** 2))
  losses.register_regulariser("smooth_too", losses.diffusion)
  rng = np.random.default_rng(5)
  level = (16, 16, 16)
  fixed = ndi.gaussian_filter(rng.uniform(0, 1, level), 1.5).astype(np.float32)
  moving = ndi.shift(fixed, (0.8, -0.5, 0.3), order=1, mode="nearest").astype(np.float32)
  args = (jnp.zeros(level + (3,)), jnp.asarray(fixed), jnp.asarray(moving),
          jnp.ones(level), 0.3, 0.05)
  built_in, v1 = refine.optimise_level(*args, steps=8, similarity="mse", smooth=0)
  mine, v2 = refine.optimise_level(*args, steps=8, similarity="plain_mse",
                                   regulariser="smooth_too", smooth=0)
  np.testing.assert_allclose(v2, v1, rtol=1e-4)
  np.testing.assert_allclose(mine, built_in, rtol=1e-3, atol=1e-4)
  with pytest.raises(InputError, match="give its reg_weight"):
    RefineOptions(similarity="plain_mse").checked([2.0] * 3)
  RefineOptions(similarity="plain_mse", regulariser="smooth_too", reg_weight=0.1).checked([2.0] * 3)


@pytest.mark.parametrize("mapped", [False, True])
def test_a_level_objective_and_its_gradient_on_8_devices_equal_one_device(mapped):
  """What the refinement's Adam follows, split along X over 8 devices (space = 8) and on one:
  the loss and its gradient agree to float32 summation-order rounding, a bound derived from
  the sums: eps32 * sqrt(N voxels) * 10 of the largest gradient."""
  import jax
  import jax.numpy as jnp
  from jaxreg.ops import sharding as mesh_lib
  from jaxreg.training import sharding
  rng = np.random.default_rng(7)
  level = (32, 16, 16)
  fixed = ndi.gaussian_filter(rng.uniform(0, 1, level), 1.5).astype(np.float32)
  moving = ndi.shift(fixed, (1.2, -0.7, 0.4), order=1, mode="nearest").astype(np.float32)
  weights = (ndi.gaussian_filter(rng.uniform(size=level), 3) > 0.5).astype(np.float32)
  base = ndi.gaussian_filter(rng.normal(0, 0.5, level + (3,)), (2, 2, 2, 0)).astype(np.float32)
  moving_map = np.array([[1.0, 0.05, 0, 0.3], [-0.05, 1.0, 0, -0.2], [0, 0, 1.0, 0.1],
                         [0, 0, 0, 1]], np.float32) if mapped else None
  c0 = rng.normal(0, 0.1, (16, 8, 8, 3)).astype(np.float32)

  def value_and_grad(base, fixed, weights, c):
    loss, _ = refine.level_objective(base, fixed, jnp.asarray(moving), weights, 0.1,
                                     None if moving_map is None else jnp.asarray(moving_map),
                                     similarity="lncc", window=5, smooth=2)
    return jax.value_and_grad(loss)(c)

  want = jax.jit(value_and_grad)(base, fixed, weights, c0)
  mesh = sharding.make_mesh(data=1, space=8)
  with mesh_lib.context(mesh):
    put = lambda x: mesh_lib.put_volume(x, mesh)
    got = jax.jit(value_and_grad)(put(base), put(fixed), put(weights), put(c0))
  n = np.prod(level)
  bound = 10 * np.finfo(np.float32).eps * np.sqrt(n)
  assert float(got[0]) == pytest.approx(float(want[0]), rel=bound)
  grad_max = float(np.abs(want[1]).max())
  assert grad_max > 0
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=0,
                             atol=bound * grad_max)


def test_a_level_compares_only_where_both_images_have_data():
  """With ``moving_valid``/``fixed_valid`` the first loss is the MSE weighted by
  fixed_valid(x) * moving_valid(moving_map (x + u(x))) (scipy's order-1 samples, 0 outside
  the moving grid), normalised by the weights actually used, plus the diffusion everywhere;
  values of the moving image where it has no data change nothing, gradient included."""
  import jax
  import jax.numpy as jnp
  rng = np.random.default_rng(4)
  level = (16, 16, 16)
  native = ndi.gaussian_filter(rng.uniform(0, 1, (20, 18, 14)), 1.5).astype(np.float32)
  to_moving = np.array([[0.9, 0.1, 0, 1.0], [-0.1, 0.8, 0, -0.5], [0, 0, 0.7, 1.5],
                        [0, 0, 0, 1]], np.float32)
  base = rng.normal(0, 0.7, level + (3,)).astype(np.float32)
  fixed = rng.uniform(0, 1, level).astype(np.float32)
  valid = refine.data_weights(native.shape, np.arange(14)[None, None, :] < 9
                              + np.zeros(native.shape, bool))  # cut after slice 8
  f_valid = np.ones(level, np.float32)
  f_valid[:, :2] = 0.0  # the fixed image's field of view ends here
  ones = np.ones(level, np.float32)
  args = lambda m: (jnp.asarray(base), jnp.asarray(fixed), jnp.asarray(m), jnp.asarray(ones),
                    0.5, jnp.asarray(to_moving), jnp.asarray(valid), jnp.asarray(f_valid))
  loss, _ = refine.level_objective(*args(native), similarity="mse", control=2, smooth=0)
  c0 = jnp.zeros((8, 8, 8, 3), jnp.float32)
  x = np.indices(level).transpose(1, 2, 3, 0) + base
  points = (x @ to_moving[:3, :3].T.astype(np.float64) + to_moving[:3, 3]).reshape(-1, 3).T
  sample = lambda v: ndi.map_coordinates(v.astype(np.float64), points, order=1,
                                         mode="grid-constant", cval=0.0).reshape(level)
  w = f_valid * sample(valid)
  assert 0.2 < w.mean() < 0.9  # both cuts matter here
  rot = to_moving[:3, :3] / np.linalg.norm(to_moving[:3, :3], axis=1)[:, None]
  v = base @ rot.T.astype(np.float64)
  diffusion = sum(np.mean(np.sum(np.diff(v, axis=j) ** 2, axis=-1)) for j in range(3)) / 3
  want = np.sum(w * (fixed - sample(native)) ** 2) / np.sum(w) + 0.5 * diffusion
  assert float(loss(c0)) == pytest.approx(want, rel=1e-4)
  # beyond the cut nothing counts (a sample blended with it has weight 0)
  garbage = native.copy()
  garbage[:, :, 9:] = rng.uniform(0, 1, garbage[:, :, 9:].shape)
  loss2, _ = refine.level_objective(*args(garbage), similarity="mse", control=2, smooth=0)
  c1 = jnp.asarray(rng.normal(0, 0.3, (8, 8, 8, 3)), jnp.float32)
  for name in ("mse", "lncc"):
    l1, _ = refine.level_objective(*args(native), similarity=name, control=2, smooth=0)
    l2, _ = refine.level_objective(*args(garbage), similarity=name, control=2, smooth=0)
    assert float(l1(c1)) == pytest.approx(float(l2(c1)), rel=1e-5)
    np.testing.assert_allclose(jax.grad(l1)(c1), jax.grad(l2)(c1), atol=1e-6)
  assert float(loss2(c0)) == pytest.approx(want, rel=1e-4)


def test_data_weights_are_the_mask_eroded_by_one_voxel():
  mask = np.zeros((7, 8, 9), bool)
  mask[1:6, 2:8, 0:9] = True
  got = refine.data_weights(mask.shape, mask)
  want = np.zeros(mask.shape)
  for i, j, k in np.ndindex(*mask.shape):  # every neighbour (the box's outside counts as no data)
    want[i, j, k] = all(0 <= a < n and mask[a, b, c] for a, b, c, n in
                        ((i + di, j + dj, k + dk, 7) for di in (-1, 0, 1) for dj in (-1, 0, 1)
                         for dk in (-1, 0, 1))
                        if 0 <= b < 8 and 0 <= c < 9) and 0 < j < 7 and 0 < k < 8
  np.testing.assert_array_equal(got, want)


def test_a_moving_box_weighs_as_its_data_weights_sampled():
  """No mask: the moving scan's box weighed in closed form (moving_box, no gather) equals
  the trilinear sample of data_weights of that box (moving_valid), value and gradient, also
  with the moving image padded beyond its box (a shape bucket)."""
  import jax
  import jax.numpy as jnp
  rng = np.random.default_rng(5)
  level = (16, 16, 16)
  native = ndi.gaussian_filter(rng.uniform(0, 1, (20, 18, 14)), 1.5).astype(np.float32)
  padded = np.pad(native, ((0, 12), (0, 14), (0, 2)))
  to_moving = np.array([[1.1, 0.1, 0, -1.0], [-0.1, 1.0, 0, -0.5], [0, 0, 0.9, 1.5],
                        [0, 0, 0, 1]], np.float32)
  base = rng.normal(0, 1.0, level + (3,)).astype(np.float32)
  fixed = rng.uniform(0, 1, level).astype(np.float32)
  valid = np.pad(refine.data_weights(native.shape), ((0, 12), (0, 14), (0, 2)))
  common = (jnp.asarray(base), jnp.asarray(fixed), jnp.asarray(padded),
            jnp.ones(level, jnp.float32), 0.5, jnp.asarray(to_moving))
  c = jnp.asarray(rng.normal(0, 0.5, (8, 8, 8, 3)), jnp.float32)
  for name in ("lncc", "mse"):
    by_box, _ = refine.level_objective(*common, None, None, jnp.asarray(native.shape, jnp.float32),
                                       similarity=name, smooth=1)
    by_valid, _ = refine.level_objective(*common, jnp.asarray(valid), similarity=name, smooth=1)
    assert float(by_box(c)) == pytest.approx(float(by_valid(c)), rel=1e-5)
    np.testing.assert_allclose(jax.grad(by_box)(c), jax.grad(by_valid)(c), atol=1e-6)
