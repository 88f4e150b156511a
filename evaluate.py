"""Evaluate registration methods: python evaluate.py --data demo --out DIR [--methods ...].

A thin entry point; see jaxreg/eval/evaluation.py for the flags, methods and outputs.
"""

import sys

from jaxreg.eval.evaluation import main

if __name__ == "__main__":
  sys.exit(main(prog="evaluate.py"))
