"""Interrupted or failing runs lose nothing: SIGINT/SIGTERM, a full disk, two writers."""

import errno
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from jaxreg import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (32, 32, 32)
AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])


def _ct(seed):
  rng = np.random.default_rng(seed)
  centre = 15.5 + rng.normal(0, 1.0, 3)
  body = np.linalg.norm(np.indices(SHAPE) - centre[:, None, None, None], axis=0) < 12
  return (np.where(body, 40.0, -1000.0) + rng.normal(0, 20, SHAPE)).astype(np.int16)


@pytest.fixture()
def pairs(tmp_path):
  """Three small pairs and a pairs.csv (relative paths)."""
  d = tmp_path / "in"
  d.mkdir()
  rows = ["fixed,moving"]
  for i in range(3):
    for kind, seed in (("f", 2 * i), ("m", 2 * i + 1)):
      nib.save(nib.Nifti1Image(_ct(seed), AFFINE), str(d / f"{kind}{i}.nii.gz"))
    rows.append(f"f{i}.nii.gz,m{i}.nii.gz")
  (d / "pairs.csv").write_text("\n".join(rows) + "\n")
  return d


def _hidden(folder):
  return sorted(n for n in os.listdir(folder) if n.startswith("."))


def _start(*args):
  return subprocess.Popen([sys.executable, "-m", "jaxreg.cli", *map(str, args)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _wait_for(predicate, proc, timeout=300):
  t0 = time.time()
  while not predicate():
    assert proc.poll() is None, f"finished before the signal: {proc.communicate()}"
    assert time.time() - t0 < timeout
    time.sleep(0.02)


def test_a_full_disk_is_one_line_and_keeps_the_previous_outputs(pairs, tmp_path, capsys,
                                                                monkeypatch):
  from jaxreg import io
  out = tmp_path / "out"
  out.mkdir()
  (out / "previous.txt").write_text("an earlier run")
  real, calls = io.save, []

  def full_disk(*args, **kwargs):
    calls.append(args[0])
    if len(calls) == 1:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[0]))
    return real(*args, **kwargs)
  monkeypatch.setattr(io, "save", full_disk)
  rc = cli.main(["register", "--fixed", str(pairs / "f0.nii.gz"), "--moving",
                 str(pairs / "m0.nii.gz"), "--out", str(out), "--no-refine"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1, err
  assert "No space left on device" in err[0] and "previous contents are intact" in err[0]
  assert os.listdir(out) == ["previous.txt"] and _hidden(tmp_path) == []


def test_ctrl_c_while_writing_removes_the_partial_folder(pairs, tmp_path, capsys, monkeypatch):
  from jaxreg import io
  real = io.save

  def interrupt_on_first(*args, _n=[0], **kwargs):
    _n[0] += 1
    if _n[0] == 1:
      raise KeyboardInterrupt
    return real(*args, **kwargs)
  monkeypatch.setattr(io, "save", interrupt_on_first)
  rc = cli.main(["register", "--fixed", str(pairs / "f0.nii.gz"), "--moving",
                 str(pairs / "m0.nii.gz"), "--out", str(tmp_path / "out"), "--no-refine"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 130 and len(err) == 1 and "interrupted" in err[0]
  assert not (tmp_path / "out").exists() and _hidden(tmp_path) == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the drop
def test_a_sigterm_dropped_in_a_finaliser_still_stops_the_commit(tmp_path, capsys, monkeypatch):
  # Python runs the handler wherever the signal lands; inside a __del__ or a gc callback (JAX
  # registers one) its exception is printed as "Exception ignored" and dropped. The recorded
  # signal must still stop the rename, and a later interruptible() body starts clean.
  from jaxreg.io import interrupt
  from jaxreg import io

  class Finaliser:
    def __del__(self):
      os.kill(os.getpid(), signal.SIGTERM)
      for _ in range(1000):  # give the eval loop bytecodes to run the handler on
        pass
  out = tmp_path / "out"
  with interrupt.interruptible():
    with pytest.raises(interrupt.Interrupted, match="SIGTERM"):
      with io.atomic_dir(out) as tmp:
        (tmp_path / "reached").write_text("")
        Finaliser()  # freed at once: the handler's raise is dropped inside __del__
        (tmp_path / "survived").write_text("")  # so the body goes on
        open(os.path.join(tmp, "x.txt"), "w").close()
  assert (tmp_path / "survived").exists()  # the raise really was dropped
  assert sorted(os.listdir(tmp_path)) == ["reached", "survived"]  # and nothing was committed
  assert "Exception ignored" not in capsys.readouterr().err  # deferred, not reported

  class Broken:  # any other error in a finaliser still reaches the hook
    def __del__(self):
      raise ValueError("broken finaliser")
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
  with interrupt.interruptible():
    Finaliser()  # dropped again: not reported
    Broken()
    with pytest.raises(interrupt.Interrupted):
      interrupt.check()
  assert [type(e) for e in seen] == [ValueError]
  with interrupt.interruptible():
    with io.atomic_dir(out) as tmp:
      open(os.path.join(tmp, "x.txt"), "w").close()
  assert os.listdir(out) == ["x.txt"]


def test_sigterm_during_register_leaves_nothing(pairs, tmp_path):
  proc = _start("register", "--fixed", pairs / "f0.nii.gz", "--moving", pairs / "m0.nii.gz",
                "--out", tmp_path / "out")
  _wait_for(lambda: (tmp_path / ".out.lock").exists(), proc)  # the handler is in place
  time.sleep(1.0)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err
  assert len(err.strip().splitlines()) == 1, err
  line, = err.strip().splitlines()
  assert "terminated (SIGTERM)" in line and "Traceback" not in err
  assert os.listdir(tmp_path) == ["in"]  # no output folder, no temporary or lock file


def test_sigint_in_a_batch_keeps_what_finished_and_a_rerun_completes_it(pairs, tmp_path):
  # Twelve rows (the three pairs four times; folder names carry the row index) so that the
  # signal, sent once the first pair is summarised, lands while pairs remain: with three, the
  # warm 32^3 pairs could all finish before it arrived.
  rows = (pairs / "pairs.csv").read_text().splitlines()
  total = 12
  (pairs / "batch.csv").write_text("\n".join([rows[0]] + rows[1:] * (total // 3)) + "\n")
  out = tmp_path / "batch"
  args = ("register", "--pairs", pairs / "batch.csv", "--out", out, "--no-refine")
  proc = _start(*args)
  summary = out / "summary.csv"
  _wait_for(lambda: summary.exists() and summary.read_text().count("\n") >= 2, proc)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err
  assert "interrupted" in err.strip().splitlines()[-1]
  finished = [line.split(",")[0] for line in summary.read_text().splitlines()[1:]]
  assert 1 <= len(finished) < total
  folders = sorted(n for n in os.listdir(out) if n != "summary.csv")
  assert folders == finished  # only complete pairs; nothing half written, nothing hidden
  assert _hidden(tmp_path) == [] and _hidden(out) == []
  again = subprocess.run([sys.executable, "-m", "jaxreg.cli", *map(str, args)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert again.returncode == 0, again.stderr
  statuses = [line.split(",")[3] for line in summary.read_text().splitlines()[1:]]
  assert statuses == ["skipped"] * len(finished) + ["done"] * (total - len(finished))


def test_two_processes_on_one_output_folder_one_wins(pairs, tmp_path):
  args = ("register", "--fixed", pairs / "f1.nii.gz", "--moving", pairs / "m1.nii.gz",
          "--out", tmp_path / "out", "--no-refine")
  procs = [_start(*args), _start(*args)]
  results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
  codes = sorted(r[2] for r in results)
  assert codes == [0, 2], results
  loser = next(r for r in results if r[2] == 2)
  line, = loser[1].strip().splitlines()
  assert "another jaxreg process is writing this folder" in line
  assert "metrics.json" in os.listdir(tmp_path / "out") and _hidden(tmp_path) == []


def test_sigterm_during_evaluate_writes_nothing(tmp_path):
  proc = subprocess.Popen([sys.executable, "evaluate.py", "--data", "demo", "--pairs", "1",
                           "--methods", "identity,jaxreg", "--out", str(tmp_path / "eval")],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
  _wait_for(lambda: (tmp_path / ".eval.lock").exists(), proc)
  time.sleep(1.0)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err
  assert "terminated (SIGTERM)" in err.strip().splitlines()[-1] and "Traceback" not in err
  assert os.listdir(tmp_path) == []
