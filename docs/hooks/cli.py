"""mkdocs hook: the CLI reference is generated from the argparse parsers themselves.

A line ``<!-- cli-help: NAME -->`` in a page is replaced by ``NAME --help`` as a code block,
where NAME is ``jaxreg``, ``jaxreg SUBCOMMAND`` (a sub-parser of
:func:`jaxreg.cli.build_parser`), ``train.py`` / ``jaxreg train``
(:func:`jaxreg.training.main.build_parser`) or ``evaluate.py`` / ``jaxreg evaluate``
(:func:`jaxreg.eval.evaluation.build_parser`). An unknown NAME fails the build.
"""

from __future__ import annotations

import os
import re
import sys

_MARKER = re.compile(r"^<!--\s*cli-help:\s*(.+?)\s*-->\s*$", re.MULTILINE)
_WIDTH = "100"  # argparse wraps help to $COLUMNS: fixed, so the page does not depend on a terminal


def _parser(name: str):
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if root not in sys.path:
    sys.path.insert(0, root)
  words = name.split()
  if words[0] in ("train.py", "evaluate.py") or words[1:2] in (["train"], ["evaluate"]):
    if "train" in words[0] or words[1:2] == ["train"]:
      from jaxreg.training.main import build_parser
    else:
      from jaxreg.eval.evaluation import build_parser
    return build_parser(name)
  if words[0] != "jaxreg":
    raise ValueError(f"cli-help: unknown program {name!r}")
  from jaxreg.cli import build_parser
  parser = build_parser()
  if len(words) == 1:
    return parser
  subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
  if len(words) != 2 or words[1] not in subparsers.choices:
    raise ValueError(f"cli-help: unknown command {name!r}; the commands are "
                     f"{', '.join(subparsers.choices)}")
  return subparsers.choices[words[1]]


def help_text(name: str) -> str:
  """``NAME --help``, wrapped at a fixed width."""
  saved = {k: os.environ.get(k) for k in ("COLUMNS", "NO_COLOR")}
  os.environ.update(COLUMNS=_WIDTH, NO_COLOR="1")  # Python >= 3.14 colours help otherwise
  try:
    parser = _parser(name)
    if hasattr(parser, "color"):
      parser.color = False
    return parser.format_help().rstrip()
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value


def on_page_markdown(markdown: str, page, config, files) -> str:
  return _MARKER.sub(lambda m: f"```text\n$ {m.group(1)} --help\n{help_text(m.group(1))}\n```",
                     markdown)
