"""jaxreg.exported: a stage traced in one process is loaded, not traced, by the next, and is
traced again whenever its key changes (shape, static argument, its source), its file is damaged,
or the feature is off; calls under another transformation fall back to plain jit."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

MODULE = textwrap.dedent("""
    import jax.numpy as jnp
    from jaxreg import exported

    TRACES = []


    @exported.stage(static_argnames=("k",))
    def f(x, y, *, k):
      TRACES.append(x.shape)  # runs only while JAX traces f
      return jnp.sin(x) * k + jnp.cumsum(y)
    """)

RUNNER = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, sys.argv[2])
    from jaxreg import compilation, exported
    compilation.enable_cache(sys.argv[1])
    import stagemod
    results = {}
    for n, k in ((5, 2), (6, 2), (5, 3)):
      x = np.linspace(0, 1, n, dtype=np.float32)
      y = np.arange(n, dtype=np.float32)
      results[f"{n},{k}"] = np.asarray(stagemod.f(jnp.asarray(x), jnp.asarray(y), k=k)).tolist()
    traces = len(stagemod.TRACES)
    counts = exported.status()
    inner = jax.jit(lambda x: stagemod.f(x, x, k=2))(jnp.ones(5, jnp.float32))
    print(json.dumps({"traces": traces, "results": results, "counts": counts,
                      "after_jit": exported.status(), "inner": np.asarray(inner).tolist()}))
    """)

CASES = ((5, 2), (6, 2), (5, 3))


@pytest.fixture
def stage_dir(tmp_path):
  (tmp_path / "stagemod.py").write_text(MODULE)
  (tmp_path / "runner.py").write_text(RUNNER)
  return tmp_path


def _run(folder, **env):
  cache = folder / "cache"
  proc = subprocess.run([sys.executable, str(folder / "runner.py"), str(cache), str(folder)],
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, **env})
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _files(folder):
  d = folder / "cache" / "jaxreg-exported"
  return sorted(p for p in d.iterdir() if p.suffix == ".bin") if d.is_dir() else []


def _reference(n, k):
  x = np.linspace(0, 1, n, dtype=np.float32)
  return np.sin(x) * np.float32(k) + np.cumsum(np.arange(n, dtype=np.float32))


def test_a_stage_is_traced_once_then_loaded_by_later_processes(stage_dir):
  first = _run(stage_dir)
  assert first["traces"] == 3 and first["counts"]["exported"] == 3
  assert len(_files(stage_dir)) == 3  # one per shape and static argument
  for (n, k) in CASES:
    np.testing.assert_allclose(first["results"][f"{n},{k}"], _reference(n, k), rtol=1e-6)

  second = _run(stage_dir)
  assert second["traces"] == 0, "a later process traced the stage instead of loading it"
  assert second["counts"] == {"loaded": 3, "exported": 0, "fallback": 0, "reason": None}
  assert second["results"] == first["results"]  # bit for bit
  # inside another jit the arguments are tracers: plain jit, the same values
  assert second["after_jit"]["fallback"] == 1 and "traced" in second["after_jit"]["reason"]
  np.testing.assert_allclose(second["inner"], np.sin(np.ones(5)) * 2 + np.arange(1, 6),
                             rtol=1e-6)


def test_a_damaged_file_an_edited_source_or_the_switch_off_trace_again(stage_dir):
  _run(stage_dir)
  damaged = _files(stage_dir)[0]
  damaged.write_bytes(b"not a serialized program")
  again = _run(stage_dir)
  assert again["traces"] == 1 and again["counts"]["loaded"] == 2
  assert again["counts"]["exported"] == 1
  assert damaged.read_bytes() != b"not a serialized program"  # written again
  for (n, k) in CASES:
    np.testing.assert_allclose(again["results"][f"{n},{k}"], _reference(n, k), rtol=1e-6)

  # editing the file that defines the stage changes its key: nothing stale is loaded
  with open(stage_dir / "stagemod.py", "a") as f:
    f.write("\n# edited\n")
  edited = _run(stage_dir)
  assert edited["traces"] == 3 and edited["counts"]["exported"] == 3
  assert len(_files(stage_dir)) == 6

  off = _run(stage_dir, JAXREG_EXPORTED="off")
  assert off["traces"] == 3 and off["counts"]["fallback"] == 3
  assert "off" in off["counts"]["reason"]
  assert len(_files(stage_dir)) == 6  # nothing written
  assert off["results"] == edited["results"]


WARP_MODULE = textwrap.dedent("""
    import jax.numpy as jnp
    from jaxreg import exported, warp

    @exported.stage()
    def g(image, disp):
      return warp.warp(image, disp) * 2.0
    """)

WARP_RUNNER = textwrap.dedent("""
    import json, os, sys
    import jax.numpy as jnp, numpy as np
    sys.path.insert(0, sys.argv[2])
    from jaxreg import compilation, exported, warp_ffi
    compilation.enable_cache(sys.argv[1])
    import warpmod
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.random((6, 5, 4), np.float32))
    disp = jnp.asarray(rng.uniform(-2, 2, (6, 5, 4, 3)).astype(np.float32))
    out, kernel = {}, {}
    for mode in sys.argv[3].split(","):
      os.environ["JAXREG_WARP"] = mode  # read while tracing: each mode its own program
      out[mode] = np.asarray(warpmod.g(image, disp)).tolist()
      kernel[mode] = warp_ffi.status()["kernel"]  # (mode jax: never loads the kernel)
    print(json.dumps({"out": out, "counts": exported.status(), "kernel": kernel}))
    """)


def test_a_process_that_switches_the_warp_path_exports_each_path_apart(tmp_path):
  """JAXREG_WARP is read while tracing, and jit's trace cache does not see it: a process
  switching auto -> jax must not export its kernel trace under the pure-JAX key, which
  a later JAXREG_WARP=jax process (kernel never loaded) would fail to run."""
  (tmp_path / "warpmod.py").write_text(WARP_MODULE)
  (tmp_path / "runner.py").write_text(WARP_RUNNER)

  def run(modes):
    proc = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "cache"),
                           str(tmp_path), modes], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAXREG_WARP": "auto"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])

  first = run("auto,jax")
  assert first["kernel"] == {"auto": True, "jax": False}, "needs the C++ kernel (a compiler)"
  assert first["counts"]["exported"] == 2  # two keys, two programs
  later = run("jax")
  assert later["counts"]["loaded"] == 1 and later["kernel"] == {"jax": False}
  np.testing.assert_allclose(later["out"]["jax"], first["out"]["auto"], rtol=1e-6, atol=1e-6)
  assert later["out"]["jax"] == first["out"]["jax"]
