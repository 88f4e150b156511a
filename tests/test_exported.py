"""jaxreg.pipeline.stages: inside ``stages.enabled(folder)`` a stage traced in one process is
loaded, not traced, by the next, and is traced again whenever its key changes (shape, static
argument, its source, whether the warp kernel is loaded), or its file is damaged; outside it
(the default, JAX's persistent cache on or not) nothing is written; calls under another
transformation fall back to plain jit; bad static argument names fail when the stage is made."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

MODULE = textwrap.dedent("""
    import jax.numpy as jnp
    from jaxreg.pipeline import stages as exported

    TRACES = []


    def _f(x, y, *, k):
      TRACES.append(x.shape)  # runs only while JAX traces f
      return jnp.sin(x) * k + jnp.cumsum(y)


    f = exported.Stage(_f, static_argnames=("k",))
    """)

RUNNER = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, sys.argv[2])
    from jaxreg.pipeline import compilation
    from jaxreg.pipeline import stages as exported
    folder = compilation.enable_cache(sys.argv[1])
    import stagemod
    on = sys.argv[3] == "on"
    results = {}
    with exported.enabled(folder + "/jaxreg-exported" if on else None):
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


def _run(folder, on="on", **env):
  cache = folder / "cache"
  proc = subprocess.run([sys.executable, str(folder / "runner.py"), str(cache), str(folder), on],
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

  off = _run(stage_dir, on="off")  # JAX's persistent cache on, the stage cache not enabled
  assert off["traces"] == 3 and off["counts"]["fallback"] == 3
  assert "off" in off["counts"]["reason"]
  assert len(_files(stage_dir)) == 6  # nothing written
  assert off["results"] == edited["results"]


WARP_MODULE = textwrap.dedent("""
    from jaxreg.pipeline import stages as exported
    from jaxreg.ops import warp

    def _g(image, disp, *, implementation=None):
      return warp.warp(image, disp, implementation=implementation) * 2.0

    g = exported.Stage(_g, static_argnames=("implementation",))
    """)

WARP_RUNNER = textwrap.dedent("""
    import json, os, sys
    import jax.numpy as jnp, numpy as np
    sys.path.insert(0, sys.argv[2])
    from jaxreg.pipeline import compilation
    from jaxreg.pipeline import stages as exported
    from jaxreg.ops import warp_kernel
    folder = compilation.enable_cache(sys.argv[1])
    import warpmod
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.random((6, 5, 4), np.float32))
    disp = jnp.asarray(rng.uniform(-2, 2, (6, 5, 4, 3)).astype(np.float32))
    out, kernel = {}, {}
    with exported.enabled(folder + "/jaxreg-exported"):
      for step in sys.argv[3].split(","):
        if step == "load":  # implementation=None traces the kernel from now on
          warp_kernel.load(required=True)
          continue
        impl = None if step == "none" else step
        out[step + str(warp_kernel.loaded())] = np.asarray(warpmod.g(image, disp,
                                                                   implementation=impl)).tolist()
    print(json.dumps({"out": out, "counts": exported.status()}))
    """)


def test_loading_the_kernel_mid_process_exports_each_program_apart(tmp_path):
  """Whether the kernel is loaded changes what implementation=None traces, and jit's trace
  cache does not see it: a process that loads the kernel after a first call must not
  export its XLA trace under the kernel key (or the reverse), and a later process that
  never loads the kernel must run its own program."""
  (tmp_path / "warpmod.py").write_text(WARP_MODULE)
  (tmp_path / "runner.py").write_text(WARP_RUNNER)

  def run(steps):
    proc = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "cache"),
                           str(tmp_path), steps], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])

  first = run("none,load,none,xla")
  assert first["counts"]["exported"] == 3  # None without, None with the kernel, and xla
  later = run("none,xla")  # the kernel never loaded here: its own programs (the kernel
  assert later["counts"]["loaded"] == 1 and later["counts"]["exported"] == 1  # state is keyed)
  assert later["out"]["noneFalse"] == first["out"]["noneFalse"]
  assert later["out"]["xlaFalse"] == first["out"]["xlaTrue"]
  kernel = run("load,none")  # a process that loads it first gets the kernel program
  assert kernel["counts"] == {"loaded": 1, "exported": 0, "fallback": 0, "reason": None}
  assert kernel["out"]["noneTrue"] == first["out"]["noneTrue"]
  np.testing.assert_allclose(first["out"]["noneTrue"], first["out"]["noneFalse"], rtol=1e-6,
                             atol=1e-6)


def test_static_argument_names_are_checked_when_the_stage_is_made():
  from jaxreg.pipeline import stages

  def f(x, *, k):
    return x * k

  with pytest.raises(TypeError, match=r"static_argnames \['kk'\] are not keyword parameters"):
    stages.Stage(f, static_argnames=("kk",))
  with pytest.raises(TypeError, match=r"unkeyed \['x'\] are not static arguments"):
    stages.Stage(f, static_argnames=("k",), unkeyed=("x",))
