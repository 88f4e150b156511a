"""The warp's C++ kernel (jaxreg.ops.warp_kernel) against the pure-JAX warp and scipy.

Both paths run in one process: the ``path`` fixture picks the ``implementation``
argument that the helpers below pass to every warp, and each jitted function below is
a new function object, traced once per path.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxreg.ops import sharding as M
from jaxreg.ops import warp as W
from jaxreg.ops import warp_kernel as F

ODD = (13, 11, 9)
HAS_COMPILER = F._compiler() is not None


_IMPL = {"now": None}


@pytest.fixture(autouse=True, scope="module")
def _kernel():
  """These tests compare the kernel with XLA: load it (compiling it once if needed)."""
  F.load(required=True)


@pytest.fixture
def path():
  """``path("ffi" | "jax")`` picks the ``implementation`` the helpers below pass."""
  def pick(name):
    _IMPL["now"] = {"ffi": "ffi", "jax": "xla"}[name]
  yield pick
  _IMPL["now"] = None


def warp(*args, **kwargs):
  return W.warp(*args, implementation=_IMPL["now"], **kwargs)


def sample(*args, **kwargs):
  return W.sample(*args, implementation=_IMPL["now"], **kwargs)


def warp_batch(*args, **kwargs):
  return W.warp_batch(*args, implementation=_IMPL["now"], **kwargs)


def _case(seed, channels=None, amplitude=5.0, shape=ODD):
  rng = np.random.default_rng(seed)
  img = rng.normal(size=shape + ((channels,) if channels else ())).astype(np.float32)
  disp = (amplitude * rng.uniform(-1, 1, size=shape + (3,))).astype(np.float32)
  fixed = rng.normal(size=img.shape).astype(np.float32)
  return img, disp, fixed


def _custom_calls(fn, *args):
  return jax.jit(fn).lower(*args).as_text().count("jaxreg_")


def test_the_kernel_builds_where_a_compiler_is_found():
  """This machine has a C++ compiler (CI's too): the kernel must build and be used."""
  assert HAS_COMPILER, "no C++ compiler on the test machine: the kernel tests below need one"
  assert F.load() and F.loaded() and F.reason() is None
  assert F.build().exists()


@pytest.mark.parametrize("channels", [None, 2])
@pytest.mark.parametrize("padding,cval", [("constant", 0.0), ("constant", -2.5),
                                          ("border", 0.0)])
def test_both_paths_agree_on_values_and_both_gradients(path, channels, padding, cval):
  img, disp, fixed = _case(1, channels)
  coords = np.indices(ODD) + np.moveaxis(disp, -1, 0)
  assert np.any((coords < -1) | (coords > np.array(ODD)[:, None, None, None]), axis=0).mean() > 0.2

  def loss(i, d):  # a cotangent that depends on the warped image
    w = warp(i, d, padding=padding, cval=cval)
    return jnp.mean((fixed - w) ** 2) + jnp.mean(w ** 3)

  got = {}
  for name in ("jax", "ffi"):
    path(name)
    calls = _custom_calls(jax.grad(loss, argnums=(0, 1)), img, disp)
    assert (calls > 0) == (name == "ffi")
    value = jax.jit(lambda i, d: warp(i, d, padding=padding, cval=cval))(img, disp)
    got[name] = (value, *jax.jit(jax.grad(loss, argnums=(0, 1)))(img, disp))
  for a, b, what in zip(got["jax"], got["ffi"], ("value", "image grad", "field grad")):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * float(np.abs(a).max()), err_msg=what)


@pytest.mark.parametrize("padding,mode,cval", [("constant", "grid-constant", 1.5),
                                               ("border", "nearest", 0.0)])
def test_kernel_matches_scipy(path, padding, mode, cval):
  path("ffi")
  img, disp, _ = _case(2, amplitude=3.0)
  coords = np.indices(ODD, dtype=np.float64) + np.moveaxis(disp, -1, 0)
  want = ndi.map_coordinates(img.astype(np.float64), coords, order=1, mode=mode, cval=cval)
  got = jax.jit(lambda i, d: warp(i, d, padding=padding, cval=cval))(img, disp)
  np.testing.assert_allclose(got, want, atol=2e-5)
  # sample() at arbitrary points (not a grid) takes the kernel too.
  pts = np.random.default_rng(3).uniform(-2, 14, size=(40, 3)).astype(np.float32)
  want = ndi.map_coordinates(img.astype(np.float64), pts.T.astype(np.float64), order=1,
                             mode=mode, cval=cval)
  got = jax.jit(lambda i, p: sample(i, p, padding=padding, cval=cval))(img, pts)
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_field_gradient_matches_finite_differences(path):
  """Independent of the JAX path: central differences in float64 of scipy's warp."""
  path("ffi")
  img, disp, fixed = _case(4, amplitude=2.0)
  img = ndi.gaussian_filter(img, 1.0).astype(np.float32)  # smooth: differences resolve it
  loss = lambda d: jnp.mean((fixed - warp(img, d, padding="border")) ** 2)
  grad = np.asarray(jax.jit(jax.grad(loss))(disp))

  def ref(d):
    coords = np.indices(ODD, dtype=np.float64) + np.moveaxis(d, -1, 0)
    w = ndi.map_coordinates(img.astype(np.float64), coords, order=1, mode="nearest")
    return np.mean((fixed - w) ** 2)

  rng = np.random.default_rng(5)
  for _ in range(6):
    idx = tuple(rng.integers(0, n) for n in ODD) + (int(rng.integers(0, 3)),)
    d = disp.astype(np.float64)
    if abs(d[idx] - np.round(d[idx])) < 0.05:  # keep off the kinks at integer positions
      continue
    hi, lo = d.copy(), d.copy()
    hi[idx] += 1e-3
    lo[idx] -= 1e-3
    fd = (ref(hi) - ref(lo)) / 2e-3
    assert grad[idx] == pytest.approx(fd, rel=1e-3, abs=1e-7)


def test_vmap_and_forward_mode_agree_with_the_jax_path(path):
  img, disp, fixed = _case(6, channels=3)
  imgs, disps = np.stack([img, 2 * img]), np.stack([disp, -disp])
  loss = lambda i, d: jnp.mean((fixed - warp(i, d)) ** 2)
  got = {}
  for name in ("jax", "ffi"):
    path(name)
    per_pair = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))(imgs, disps)
    shared_field = jax.jit(jax.vmap(jax.grad(loss), in_axes=(0, None)))(imgs, disp)
    batch = jax.jit(lambda i, d: warp_batch(i, d))(imgs, disps)
    _, jvp = jax.jvp(lambda i, d: loss(i, d), (img, disp), (img * 0.3, disp * 0.1))
    got[name] = (*per_pair, shared_field, batch, jvp)
  for a, b in zip(got["jax"], got["ffi"]):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * float(np.abs(a).max()))


def test_checkpoint_and_composition_of_fields(path):
  """jax.checkpoint and the fields' composition (3 channels, border) through the kernel."""
  from jaxreg.ops import fields
  _, u, _ = _case(7, amplitude=2.0)
  _, v, _ = _case(8, amplitude=2.0)
  got = {}
  for name in ("jax", "ffi"):
    path(name)
    loss = jax.checkpoint(lambda a, b: jnp.sum(
        fields.compose(a, b, implementation=_IMPL["now"]) ** 2))
    got[name] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(u, v)
  for a, b in zip(jax.tree.leaves(got["jax"]), jax.tree.leaves(got["ffi"])):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32])
@pytest.mark.parametrize("padding", ["constant", "border"])
def test_nearest_on_label_maps(path, dtype, padding):
  rng = np.random.default_rng(9)
  labels = rng.integers(0, 9, size=ODD).astype(dtype)
  _, disp, _ = _case(9, amplitude=4.0)
  disp = np.round(disp * 2) / 2  # exact halves: the rounding rule decides
  got = {}
  for name in ("jax", "ffi"):
    path(name)
    fn = lambda l, d: warp(l, d, order=0, padding=padding, cval=7)
    assert (_custom_calls(fn, labels, disp) > 0) == (name == "ffi")
    got[name] = np.asarray(jax.jit(fn)(labels, disp))
  assert got["ffi"].dtype == dtype
  np.testing.assert_array_equal(got["ffi"], got["jax"])


def test_threads_do_not_change_results(path):
  path("ffi")
  img, disp, fixed = _case(10, shape=(40, 30, 24))  # several chunks of points
  got = []
  for threads in (1, None):
    loss = lambda i, d: jnp.mean((fixed - warp(i, d, threads=threads)) ** 2)
    assert f"threads = {threads or 0} : i64" in jax.jit(loss).lower(img, disp).as_text()
    got.append(jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(img, disp))
  (v1, (gi1, gd1)), (v2, (gi2, gd2)) = got
  np.testing.assert_array_equal(gd1, gd2)  # per-point work: identical
  np.testing.assert_allclose(gi1, gi2, rtol=1e-6, atol=1e-9)  # splat: summation order


def test_other_dtypes_and_sharded_meshes_take_the_jax_path(path):
  path("ffi")
  img, disp, _ = _case(11)
  fn = lambda i, d: warp(i, d)
  assert _custom_calls(fn, img.astype(jnp.bfloat16), disp) == 0
  mesh = M.make_mesh(jax.devices()[:8], data=1, space=8)
  disp8 = np.zeros((16, 4, 4, 3), np.float32)
  assert _custom_calls(M.on_mesh(fn, mesh), np.ones((16, 4, 4), np.float32), disp8) == 0
  assert _custom_calls(fn, np.ones((16, 4, 4), np.float32), disp8) > 0


def test_bad_implementation_is_a_precise_error():
  with pytest.raises(ValueError, match="implementation must be None, 'xla' or 'ffi', got 'fast'"):
    W.warp(np.ones(ODD, np.float32), np.zeros(ODD + (3,), np.float32), implementation="fast")


_FALLBACK = """
import numpy as np, jax
from jaxreg.ops import warp as W
from jaxreg.pipeline import environment
environment.configure(kernel=True)  # what the entry points do
out = jax.jit(lambda i, d: W.warp(i, d))(np.ones((5, 4, 3), np.float32), np.zeros((5, 4, 3, 3), np.float32))
out = jax.jit(lambda i, d: W.warp(i, d) * 2)(np.ones((5, 4, 3), np.float32), np.zeros((5, 4, 3, 3), np.float32))
print("sum", float(out.sum()))
"""


def test_without_a_compiler_the_jax_path_runs(tmp_path):
  """No compiler on PATH and an empty kernel cache: one informational line, same result;
  JAXREG_WARP=ffi then fails with the reason."""
  env = dict(os.environ, PATH=os.path.dirname(sys.executable), CXX="",
             JAXREG_KERNEL_CACHE=str(tmp_path / "kernels"), JAXREG_WARP="auto")
  done = subprocess.run([sys.executable, "-c", _FALLBACK], env=env, capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert "sum 120.0" in done.stdout
  lines = [ln for ln in done.stderr.splitlines() if ln.startswith("jaxreg:")]
  assert lines == ["jaxreg: using the pure-JAX warp (the C++ kernel cannot be built: "
                   "no C++ compiler found ($CXX, c++, g++ or clang++))"]
  env["JAXREG_WARP"] = "ffi"
  done = subprocess.run([sys.executable, "-c", _FALLBACK], env=env, capture_output=True,
                        text=True, timeout=120)
  assert done.returncode != 0
  assert "the warp kernel cannot be built: no C++ compiler" in done.stderr
  assert not (tmp_path / "kernels").exists() or not any((tmp_path / "kernels").iterdir())


def test_a_failing_compiler_is_reported_and_the_jax_path_runs(tmp_path):
  fake = tmp_path / "bin" / "c++"
  fake.parent.mkdir()
  fake.write_text("#!/bin/sh\necho 'fatal error: xla/ffi/api/ffi.h: No such file' >&2\nexit 1\n")
  fake.chmod(0o755)
  env = dict(os.environ, PATH=f"{fake.parent}:{os.path.dirname(sys.executable)}", CXX="",
             JAXREG_KERNEL_CACHE=str(tmp_path / "kernels"), JAXREG_WARP="auto")
  done = subprocess.run([sys.executable, "-c", _FALLBACK], env=env, capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert "sum 120.0" in done.stdout
  assert "c++ failed (exit 1): fatal error: xla/ffi/api/ffi.h" in done.stderr
  assert [p.name for p in (tmp_path / "kernels").iterdir()] == []  # no half-written library


def test_cli_bad_warp_settings_are_one_line_exit_2(tmp_path):
  env = dict(os.environ, JAXREG_WARP="fast")
  done = subprocess.run([sys.executable, "-m", "jaxreg.cli", "register", "--help"], env=env,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [
      "jaxreg: error: JAXREG_WARP must be one of auto, ffi, jax, got 'fast'"]
  env = dict(os.environ, JAXREG_WARP="ffi", PATH=os.path.dirname(sys.executable), CXX="",
             JAXREG_KERNEL_CACHE=str(tmp_path / "kernels"))
  done = subprocess.run([sys.executable, "-m", "jaxreg.cli", "register", "--fixed", "f.nii.gz",
                         "--moving", "m.nii.gz", "--out", str(tmp_path / "out")], env=env,
                        capture_output=True, text=True, timeout=120, cwd=tmp_path)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [
      "jaxreg register: error: the warp kernel cannot be built: no C++ compiler "
      "found ($CXX, c++, g++ or clang++)"]
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("channels", [None, 3])
def test_second_order_through_the_kernel_equals_the_jax_path(path, channels):
  """A gradient penalty (grad of a function of the gradient) and a Hessian-vector product:
  the kernel's derivatives fall back to the XLA code where it has no rule of its own."""
  img, disp, fixed = _case(12, channels)
  got = {}
  for name in ("jax", "ffi"):
    path(name)
    loss = lambda i, d: jnp.mean((fixed - warp(i, d, padding="border")) ** 2)
    penalty = lambda i, d: jnp.sum(jax.grad(loss, argnums=1)(i, d) ** 2)
    hvp = lambda d, v: jax.jvp(lambda x: jax.grad(loss, argnums=1)(img, x), (d,), (v,))[1]
    if name == "jax":
      assert _custom_calls(jax.grad(penalty, argnums=(0, 1)), img, disp) == 0
    got[name] = (*jax.jit(jax.grad(penalty, argnums=(0, 1)))(img, disp),
                 jax.jit(hvp)(disp, np.ones_like(disp)))
  for a, b, what in zip(got["jax"], got["ffi"], ("image", "field", "hvp")):
    assert np.isfinite(np.asarray(a)).all()
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()), err_msg=what)


def test_ffi_before_the_kernel_is_loaded_is_a_clear_error():
  """A fresh process: nothing loads the kernel behind the caller's back; None runs XLA."""
  code = """
import numpy as np, jax, jaxreg
from jaxreg.ops import warp_kernel as F
img, d = np.ones((5, 4, 3), np.float32), np.zeros((5, 4, 3, 3), np.float32)
text = jax.jit(lambda i, u: jaxreg.warp(i, u)).lower(img, d).as_text()
print("custom calls", text.count("jaxreg_"), "loaded", F.loaded())
try:
  jaxreg.warp(img, d, implementation="ffi")
except F.KernelError as e:
  print("error", e)
"""
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert "custom calls 0 loaded False" in done.stdout
  assert "error implementation='ffi' needs the C++ kernel: call jaxreg.load_kernel() first" \
      in done.stdout
