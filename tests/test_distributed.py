"""Two real processes on localhost (gloo collectives) train like one process with two devices."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from jaxreg import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["train.py", "--config", "configs/test.py", "--no-progress",
        "--config.train.batch_size=2", "--config.train.steps=3",
        "--config.train.checkpoint_every=3", "--config.train.eval_every=3"]


def _env(devices):
  # XLA:CPU aborts a collective whose device threads do not all arrive within 40 s; on 2 busy
  # cores one thread was once starved that long (CI, 2026-12-04): allow 10 minutes.
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
             "--xla_cpu_collective_call_terminate_timeout_seconds=600", PYTHONUNBUFFERED="1")
  env.pop("JAX_PLATFORMS", None)
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _params(workdir):
  step, state, loader, _ = training.restore_latest(workdir)
  return step, jax.device_get(state.params), loader


def test_two_processes_equal_one_process(tmp_path):
  one = subprocess.run([sys.executable, *ARGS, "--workdir", str(tmp_path / "one")], cwd=ROOT,
                       env=_env(2), capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  assert "2 device(s) in 1 process(es)" in one.stdout

  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, *ARGS, "--workdir", str(tmp_path / "two"), "--distributed",
       "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
       "--config.data.workers=1"],  # each host's examples made by its own worker process
      cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    # the data workers stop without leaving notices (shared memory, iterator clean-up)
    assert "leaked" not in err and "Exception ignored" not in err, err[-3000:]
  assert "2 device(s) in 2 process(es)" in outs[0][0]

  step_1, params_1, loader_1 = _params(str(tmp_path / "one"))
  step_2, params_2, loader_2 = _params(str(tmp_path / "two"))
  assert step_1 == step_2 == 3
  assert loader_1 == {"next_index": 3 * 2} and loader_2 is None  # one file per process there
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               params_1, params_2)
  # resuming the two-process run in one process: one line, nothing moved aside
  again = subprocess.run([sys.executable, *ARGS, "--workdir", str(tmp_path / "two"),
                          "--config.train.steps=4"], cwd=ROOT, env=_env(2),
                         capture_output=True, text=True, timeout=600)
  assert again.returncode == 2
  assert again.stderr.strip().endswith("holds the data positions of 2 process(es), this run "
                                       "has 1: resume with as many processes"), again.stderr
  assert not (tmp_path / "two" / "corrupt_checkpoints").exists()
