"""The ``jaxreg`` command line: ``jaxreg [--version] COMMAND ...``.

User errors (bad files, bad arguments) print one line on stderr and exit 2,
without a traceback.
"""

from __future__ import annotations

import argparse
import sys

import jaxreg

# Commands that later work adds; listed so that `jaxreg --help` tells the truth.
_PLANNED = {
    "register": "register a fixed/moving CT pair (not built yet)",
    "train": "train a model from a config (not built yet)",
    "evaluate": "evaluate methods on a dataset (not built yet)",
}


class UserError(Exception):
  """An error caused by the user's input: reported as one line, exit code 2."""


def _demo(args: argparse.Namespace) -> int:
  del args
  print(
      "jaxreg demo: the demo training and evaluation are not built yet.\n"
      "Built so far: the registration operators (jaxreg.grid, jaxreg.warp, jaxreg.fields,\n"
      "jaxreg.decompose). Not built yet: data loading and the embedded demo CT, the model,\n"
      "training, register and evaluate.")
  return 0


def _not_built(name: str):
  def run(args: argparse.Namespace) -> int:
    del args
    raise UserError(f"'jaxreg {name}' is not built yet")
  return run


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="jaxreg",
      description="Learned deformable CT registration with field decomposition, in JAX.")
  parser.add_argument("--version", action="version", version=f"jaxreg {jaxreg.__version__}")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  demo = sub.add_parser("demo", help="run the demo job on the embedded data")
  demo.set_defaults(func=_demo)
  for name, text in _PLANNED.items():
    sub.add_parser(name, help=text).set_defaults(func=_not_built(name))
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help()
    return 2
  try:
    return args.func(args)
  except UserError as e:
    print(f"jaxreg {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
