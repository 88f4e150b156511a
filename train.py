"""Train a jaxreg registration network: python train.py --config configs/demo.py --workdir DIR.

A thin entry point; see jaxreg/training/main.py for the flags and
jaxreg/training/loop.py for the run itself.
"""

import sys

from jaxreg.training.main import main

if __name__ == "__main__":
  sys.exit(main(prog="train.py"))
