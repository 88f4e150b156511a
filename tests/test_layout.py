"""The package's form: the layering of .importlinter holds, no module imports another in a
circle, and importing jaxreg (or touching an operator) pulls in no heavy dependency,
compiles nothing, writes nothing and prints nothing."""

import os
import subprocess
import sys

import grimp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_linter_contracts_hold():
  done = subprocess.run([os.path.join(os.path.dirname(sys.executable), "lint-imports"),
                         "--config", os.path.join(ROOT, ".importlinter")],
                        capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
  assert "Contracts: 2 kept, 0 broken." in done.stdout


def test_no_import_cycles_between_modules():
  """Every import, at module level or inside a function (grimp sees both)."""
  graph = grimp.build_graph("jaxreg")
  modules = sorted(m for m in graph.modules if m.startswith("jaxreg."))
  cycles = set()
  for a in modules:
    for b in graph.find_modules_directly_imported_by(a):
      if b != "jaxreg" and graph.find_shortest_chain(importer=b, imported=a):
        cycles.add(tuple(sorted((a, b))))
  assert not cycles


def test_the_layering_is_violated_when_a_module_imports_upwards(tmp_path):
  """The contract can fail: the same check on a copy where ops imports the pipeline."""
  import shutil
  copy = tmp_path / "src"
  shutil.copytree(os.path.join(ROOT, "jaxreg"), copy / "jaxreg",
                  ignore=shutil.ignore_patterns("demo_data", "demo_model", "__pycache__"))
  with open(copy / "jaxreg" / "ops" / "optim.py", "a") as f:
    f.write("\nfrom jaxreg.pipeline import stages  # noqa\n")
  shutil.copy(os.path.join(ROOT, ".importlinter"), copy / ".importlinter")
  done = subprocess.run([os.path.join(os.path.dirname(sys.executable), "lint-imports")],
                        capture_output=True, text=True, cwd=copy, timeout=300,
                        env=dict(os.environ, PYTHONPATH=str(copy)))
  assert done.returncode != 0
  assert "jaxreg.ops is not allowed to import jaxreg.pipeline" in done.stdout


HEAVY = ("scipy", "nibabel", "matplotlib", "orbax", "SimpleITK", "flax", "optax", "grain")


def test_importing_jaxreg_and_its_operators_is_light_and_silent(tmp_path):
  code = f"""
import sys, jax.numpy as jnp
import jaxreg
names = ["warp", "warp_batch", "sample", "compose", "invert", "integrate", "resize",
         "jacobian_determinant", "combine", "compose_all", "compose_all_svf", "sum_all",
         "identity_grid", "transform_points", "losses", "types", "ops"]
for n in names:
  getattr(jaxreg, n)
u = jnp.zeros((4, 4, 4, 3))
out = jaxreg.warp(jnp.ones((4, 4, 4)), u)
loss = jaxreg.losses.local_ncc(out, out, window=3) + jaxreg.losses.diffusion(u)
print("heavy", [m for m in {HEAVY!r} if m in sys.modules])
from jaxreg.ops import warp_kernel
print("kernel loaded", warp_kernel.loaded())
"""
  home = tmp_path / "home"
  home.mkdir()
  env = dict(os.environ, HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"))
  env.pop("JAXREG_JAX_CACHE", None)
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=tmp_path, env=env, timeout=300)
  assert done.returncode == 0, done.stderr
  assert done.stdout.splitlines() == ["heavy []", "kernel loaded False"]
  assert [ln for ln in done.stderr.splitlines() if "jaxreg" in ln] == []
  written = [os.path.relpath(os.path.join(d, f), tmp_path)
             for d, _, files in os.walk(tmp_path) for f in files]
  assert written == [], written


def test_the_namespace_is_flat_and_no_module_shadows_a_function():
  import jaxreg
  from jaxreg.ops import fields, warp
  assert jaxreg.warp is warp.warp and callable(jaxreg.warp)
  assert jaxreg.compose is fields.compose and jaxreg.invert is fields.invert
  assert jaxreg.losses.local_ncc is not None and jaxreg.losses.diffusion is not None
  for name in jaxreg.__all__:
    assert getattr(jaxreg, name) is not None, name
  with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
    jaxreg.not_a_name  # noqa: B018
