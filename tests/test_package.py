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


def test_cli_unbuilt_command_is_one_line_exit_2():
  out = _cli("register")
  assert out.returncode == 2
  assert out.stderr.strip() == "jaxreg register: error: 'jaxreg register' is not built yet"
  assert "Traceback" not in out.stderr
