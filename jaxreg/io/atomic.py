"""Atomic outputs: a file or folder appears whole or not at all.

Each writer fills a temporary file or folder beside its target and renames it into place
only when complete; an exception (a SIGTERM through :mod:`jaxreg.io.interrupt` included)
removes the temporary and leaves the target as it was. :func:`output_lock` keeps two
processes from writing one output folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from jaxreg.io import interrupt
from jaxreg.types import InputError

__all__ = ["atomic_path", "atomic_dir", "output_lock", "check_output_dir"]


@contextlib.contextmanager
def atomic_path(path, suffix: str = ""):
  """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

  Readers never see a half-written file: the rename is atomic on POSIX, and the
  temporary file is removed if the body raises.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise InputError(f"{path}: folder {folder} does not exist")
  try:
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".tmp{suffix}",
                               dir=folder)
  except OSError as e:
    raise InputError(f"{path}: cannot write in {folder} ({e.strerror})") from e
  os.close(fd)
  try:
    yield tmp
    # mkstemp makes the file private (0600); give it the mode a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    interrupt.check()  # a signal whose first raise was dropped still stops the commit
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def output_lock(path):
  """Hold an exclusive lock on the output folder ``path`` for the body's duration.

  A second process asking for the same folder gets an :class:`InputError` at once (no
  waiting, no mixed files). The lock is ``flock`` on a hidden ``.NAME.lock`` file beside
  the folder, released by the kernel if the process dies, and removed on exit.

  Raises:
    InputError: another process holds the lock, or the parent folder is not writable.
  """
  path = check_output_dir(path)
  lock = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")
  try:
    import fcntl
  except ImportError:  # not POSIX: no lock, the atomic rename still avoids mixed files
    yield
    return
  try:
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
  except OSError as e:
    raise InputError(f"{path}: cannot write in {os.path.dirname(path)} ({e.strerror})") from e
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise InputError(f"{path}: another jaxreg process is writing this folder; wait for it "
                       "or choose another --out") from None
    try:
      yield
    finally:
      with contextlib.suppress(FileNotFoundError):
        os.remove(lock)
  finally:
    os.close(fd)


def check_output_dir(path) -> str:
  """The absolute path of an output folder that :func:`atomic_dir` can write.

  Call it before long work whose results go there, to fail at once.

  Raises:
    InputError: ``path`` exists and is not a folder, or its parent is missing.
  """
  path = os.path.abspath(os.fspath(path))
  parent = os.path.dirname(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise InputError(f"{path}: exists and is not a folder")
  if not os.path.isdir(parent):
    raise InputError(f"{path}: parent folder {parent} does not exist")
  return path


@contextlib.contextmanager
def atomic_dir(path):
  """Yield a temporary folder beside ``path``; it replaces ``path`` on success.

  A previous folder at ``path`` is removed only after the new one is complete;
  if the body raises, ``path`` is left as it was and the temporary folder is
  removed.

  Raises:
    InputError: ``path`` exists and is not a folder, or its parent is missing.
  """
  path = check_output_dir(path)
  parent = os.path.dirname(path)
  try:
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
  except OSError as e:
    raise InputError(f"{path}: cannot write in {parent} ({e.strerror})") from e
  try:
    try:
      yield tmp
    except OSError as e:  # a full disk, a quota, a vanished mount: say so in one line
      if isinstance(e, InputError) or e.errno is None:
        raise
      raise InputError(f"{path}: writing the outputs failed ({e.strerror}); nothing was "
                       "replaced, the previous contents are intact") from e
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private
    interrupt.check()  # a signal whose first raise was dropped still stops the commit
    old = None
    if os.path.exists(path):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".old", dir=parent)
      os.replace(path, os.path.join(old, "previous"))
    os.replace(tmp, path)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
