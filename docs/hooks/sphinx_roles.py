"""griffe extension (loaded by mkdocstrings): reStructuredText in docstrings becomes Markdown.

jaxreg's docstrings are Google style with a few reStructuredText habits, rewritten here before
griffe parses them: ``Title <url>`_`` links become Markdown links, a paragraph ending in ``::``
introduces a code block (fenced here), a ``.. math::`` block becomes ``$$ ... $$`` (rendered by
MathJax through ``pymdownx.arithmatex``), and Sphinx roles become cross-references.

Roles: jaxreg's docstrings name other objects the Sphinx way, ``:func:`register```,
``:class:`~jaxreg.types.Volume```, ``:mod:`jaxreg.ops.warp```. Markdown has no such roles,
so before the docstrings are parsed each one becomes an autorefs cross-reference,
``[`register`][jaxreg.pipeline.register.register]``, when the name resolves to an object
that the API pages render (the ``::: MODULE`` lines of ``docs/api/*.md``), and a plain
code span otherwise (names outside jaxreg, private objects, packages without a page of
their own). A reference is never emitted to an anchor that does not exist, so a strict
build cannot fail here.

Names resolve as Sphinx resolves them: a full dotted path, else relative to the enclosing
class, then the module (its own members and the names it imports).
"""

from __future__ import annotations

import glob
import os
import re

import griffe

_LINK = re.compile(r"`([^`<]+?)\s*<(https?://[^>\s]+)>`_", re.S)
_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|data|attr|obj|exc|const):`([^`]+)`")
_DIRECTIVE = re.compile(r"^:::\s+(\S+)\s*$")
_API = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "api")


def _rendered_modules() -> set[str]:
  """Modules whose members the API pages render (a ``:::`` line without ``members: false``)."""
  found = set()
  for page in glob.glob(os.path.join(_API, "*.md")):
    lines = open(page, encoding="utf-8").read().splitlines()
    for i, line in enumerate(lines):
      m = _DIRECTIVE.match(line)
      if not m:
        continue
      options = []
      for follow in lines[i + 1:]:
        if not follow.startswith("    "):
          break
        options.append(follow.strip())
      if "members: false" not in options:
        found.add(m.group(1))
  return found


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip())


def _literal_blocks(text: str) -> str:
  """``para::`` + an indented block -> ``para:`` + a fenced block; ``.. math::`` -> ``$$``."""
  lines, out, i = text.split("\n"), [], 0
  while i < len(lines):
    line = lines[i]
    math = line.strip() == ".. math::"
    if math or line.rstrip().endswith("::"):
      base, j = _indent(line), i + 1
      while j < len(lines) and not lines[j].strip():
        j += 1
      if j < len(lines) and _indent(lines[j]) > base:
        k = j
        while k < len(lines) and (not lines[k].strip() or _indent(lines[k]) > base):
          k += 1
        block = lines[j:k]
        while block and not block[-1].strip():
          block.pop()
        cut = min(_indent(b) for b in block if b.strip())
        pad = " " * base
        if math:
          out += [pad + "$$", *(pad + b[cut:] for b in block), pad + "$$", ""]
        else:
          head = line.rstrip()[:-2].rstrip()
          if head.strip():
            out += [head + ":", ""]
          out += [pad + "```", *(pad + b[cut:] for b in block), pad + "```", ""]
        i = k
        continue
    out.append(line)
    i += 1
  return "\n".join(out)


class SphinxRoles(griffe.Extension):
  """Rewrite ``:role:`name``` in every docstring of the package (see the module docstring)."""

  def __init__(self) -> None:
    super().__init__()
    self._modules = _rendered_modules()

  def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
    for obj in self._walk(pkg, set()):
      if obj.docstring is not None:
        text = _LINK.sub(lambda m: f"[{' '.join(m.group(1).split())}]({m.group(2)})",
                         obj.docstring.value)
        text = _literal_blocks(text)
        obj.docstring.value = _ROLE.sub(lambda m: self._replace(m.group(1), obj, loader), text)

  on_package_loaded = on_package  # the same event's name before griffe 2

  def _walk(self, obj, seen):
    if obj.path in seen:
      return
    seen.add(obj.path)
    yield obj
    for member in obj.members.values():
      if not member.is_alias:
        yield from self._walk(member, seen)

  def _replace(self, text: str, obj, loader) -> str:
    short = text.startswith("~")
    name = text.lstrip("~.")
    shown = name.rsplit(".", 1)[-1] if short else name
    target = self._resolve(name, obj, loader)
    return f"[`{shown}`][{target}]" if target else f"`{shown}`"

  def _resolve(self, name: str, obj, loader) -> str | None:
    scopes = []
    parent = obj if obj.is_module or obj.is_class else obj.parent
    while parent is not None:
      scopes.append(parent)
      parent = parent.parent
    candidates = [name] + [f"{scope.path}.{name}" for scope in scopes]
    for candidate in candidates:
      try:
        found = loader.modules_collection[candidate]
        if found.is_alias:
          found = found.final_target
      except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        continue
      return found.path if self._rendered(found) else None
    return None

  def _rendered(self, obj) -> bool:
    """Whether the API pages render ``obj`` under its own path (so its anchor exists)."""
    if any(part.startswith("_") for part in obj.path.split(".")):
      return False
    module = obj if obj.is_module else obj.module
    return module.path in self._modules
