"""What ``import jaxreg`` costs beside ``import jax``: fresh processes, interleaved.

Each row is a fresh ``python -c`` process, timed end to end, median of ``--repeats``
rounds in which every row runs once in turn (so a drift of the machine's speed hits every
row alike). The reference is ``import jax`` in the same rounds; the goal (issue "A library
researchers adopt") is at most 0.5 s more for ``import jaxreg`` and its operators.

Usage: python benchmarks/imports.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from _common import interleaved_medians

ROWS = {
    "import jax (reference)": "import jax",
    "import jaxreg": "import jaxreg",
    "import jaxreg + operators": (
        "import jaxreg; jaxreg.warp; jaxreg.compose; jaxreg.integrate; jaxreg.invert; "
        "jaxreg.compose_all; jaxreg.transform_points; jaxreg.losses"),
    "+ jaxreg.pipeline.register": "import jaxreg.pipeline.register",
    "+ jaxreg.training": "import jaxreg.training",
}


def _process(code: str):
  def run():
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))
  return run


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args(argv)
  fns = [_process(code) for code in ROWS.values()]
  medians = interleaved_medians(fns, args.repeats, warmup=1)
  ref = medians[0]
  print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, Python "
        f"{sys.version.split()[0]}, median of {args.repeats} fresh processes each\n")
  print("| process | seconds | more than `import jax` |")
  print("| --- | ---: | ---: |")
  for name, seconds in zip(ROWS, medians):
    print(f"| `{name}` | {seconds:.2f} | {seconds - ref:+.2f} |")


if __name__ == "__main__":
  main()
