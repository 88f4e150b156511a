"""The documentation site builds without a warning, and every Python snippet in it runs.

Each ```python block of ``docs/**/*.md`` and ``README.md`` runs in a fresh interpreter with the repository root as
its working folder, on one CPU device as a reader's machine would (the 8 fake devices of
``conftest.py`` are not passed on; a snippet that wants several sets ``XLA_FLAGS`` itself). A block
preceded by ``<!-- no-test -->`` is skipped: only for snippets that need a reader's own files.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
NO_TEST = "<!-- no-test -->"
_OPEN = re.compile(r"^(\s*)```python\s*$")


def python_blocks() -> list[tuple[str, int, str]]:
  """``(page, line, code)`` of every ```python block of the docs not marked ``no-test``."""
  blocks = []
  for page in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
      opened = _OPEN.match(lines[i])
      if not opened:
        i += 1
        continue
      indent, start = opened.group(1), i
      previous = next((l.strip() for l in reversed(lines[:start]) if l.strip()), "")
      i += 1
      body = []
      while i < len(lines) and lines[i].strip() != "```":
        body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
        i += 1
      i += 1
      if previous != NO_TEST:
        blocks.append((str(page.relative_to(ROOT)), start + 1, "\n".join(body) + "\n"))
  return blocks


def _snippet_env(tmp: Path) -> dict[str, str]:
  env = dict(os.environ, TMPDIR=str(tmp))  # the snippets' tempfile folders, removed by pytest
  env.pop("XLA_FLAGS", None)  # one CPU device, as on a reader's machine
  env.setdefault("PYTHONUNBUFFERED", "1")
  # JAX's persistent compilation cache, as the tests and the CLI use it.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ.get(
      "JAXREG_JAX_CACHE", os.path.expanduser(os.path.join("~", ".cache", "jaxreg", "jax"))))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  return env


def _run(code: str, tmp: Path) -> subprocess.CompletedProcess:
  tmp.mkdir(parents=True)
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_snippet_env(tmp),
                        capture_output=True, text=True, timeout=240)


BLOCKS = python_blocks()


@pytest.fixture(scope="module")
def snippet_runs(request, tmp_path_factory):
  """The selected snippets, started two at a time when the module's first snippet test runs
  (each is mostly a single-threaded import and compile), longest first."""
  wanted = [item.callspec.params["code"] for item in request.session.items
            if getattr(item, "originalname", None) == "test_python_snippet_runs"]
  workers = max(1, min(2, os.cpu_count() or 1))
  pool = concurrent.futures.ThreadPoolExecutor(workers)
  tmp = tmp_path_factory.mktemp("snippets")
  yield {code: pool.submit(_run, code, tmp / str(k))
         for k, code in enumerate(sorted(set(wanted), key=len, reverse=True))}
  pool.shutdown(wait=True, cancel_futures=True)  # after -x or a Ctrl-C: start nothing new


def test_the_docs_have_python_snippets():
  pages = {page for page, _, _ in BLOCKS}
  assert len(BLOCKS) >= 10 and len(pages) >= 8, sorted(pages)


@pytest.mark.parametrize("page, line, code", BLOCKS, ids=[f"{p}:{n}" for p, n, _ in BLOCKS])
def test_python_snippet_runs(page, line, code, snippet_runs):
  done = snippet_runs[code].result()
  if done.returncode != 0:
    numbered = "\n".join(f"{k:3d}  {s}" for k, s in enumerate(code.splitlines(), start=1))
    pytest.fail(f"{page}:{line}: the snippet exited {done.returncode}\n{numbered}\n"
                f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-6000:]}")


def test_the_api_reference_covers_every_module():
  """Each module and package of jaxreg has a ``::: name`` directive on an API page (the CLI and
  the shipped configs have pages of their own: the CLI reference and the training guide)."""
  documented = set()
  for page in (DOCS / "api").glob("*.md"):
    documented |= set(re.findall(r"^:::\s+(\S+)\s*$", page.read_text(encoding="utf-8"), re.M))
  modules = set()
  for path in (ROOT / "jaxreg").rglob("*.py"):
    parts = path.relative_to(ROOT).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    if parts[-1].startswith("_") or parts[:2] in (("jaxreg", "cli"), ("jaxreg", "configs")):
      continue
    modules.add(".".join(parts))
  assert not modules - documented, f"modules missing from docs/api/*.md: {sorted(modules - documented)}"


def test_mkdocs_build_is_strict_and_clean(tmp_path):
  site = tmp_path / "site"
  env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
  done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                         str(site)], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  log = done.stdout + done.stderr
  assert done.returncode == 0, log[-6000:]
  assert "WARNING" not in log, log[-6000:]
  cli = (site / "cli" / "index.html").read_text(encoding="utf-8")
  assert "--moving-labels" in cli and "--config CONFIG" in cli  # the generated CLI reference
  assert "<!-- cli-help" not in cli
  for png in sorted((ROOT / "benchmarks").glob("*.png")):
    assert (site / "img" / png.name).is_file(), png.name  # the benchmarks page's plots
  api = (site / "api" / "ops" / "index.html").read_text(encoding="utf-8")
  assert 'id="jaxreg.ops.warp.warp"' in api and ":func:`" not in api
