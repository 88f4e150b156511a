"""Command line of training: ``train.py`` and ``jaxreg train`` both call :func:`main`.

``--config FILE[:ARG] --workdir DIR [--steps N] [--config.section.field=VALUE ...]``
``[--import MODULE ...]`` (modules that register losses, imported before the config is checked)
``[--distributed [--coordinator HOST:PORT --num-processes N --process-id I]] [--no-progress]``
``[--init PATH|shipped]`` (fine-tune from a model folder's weights)
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "build_parser", "import_modules"]


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=prog, description="Train a jaxreg registration network.",
                              epilog="Override any config field with --config.FIELD=VALUE, "
                                     "e.g. --config.optim.lr=3e-4 (values are Python literals).")
  p.add_argument("--config", required=True, help="config file, e.g. configs/demo.py[:arg]")
  p.add_argument("--workdir", required=True, help="output folder; an existing run is resumed")
  p.add_argument("--steps", type=int, help="shorthand for --config.train.steps")
  p.add_argument("--stop-at", type=int, help="stop after this step (resume later)")
  p.add_argument("--init", metavar="PATH|shipped",
                 help="fine-tune: start from these weights (a model folder as jaxreg writes "
                      "it, or 'shipped' for the shipped model; its network must be the "
                      "config's) instead of a random initialisation")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                 help="import a module (dotted name, or a .py file) first, e.g. one that calls "
                      "jaxreg.ops.losses.register_regulariser; repeatable")
  p.add_argument("--distributed", action="store_true",
                 help="multi-process run: calls jax.distributed.initialize()")
  p.add_argument("--coordinator", help="HOST:PORT of process 0 (else auto-detected)")
  p.add_argument("--num-processes", type=int)
  p.add_argument("--process-id", type=int)
  return p


def _init_distributed(args) -> None:
  import jax
  # Cross-process collectives for CPU devices (GPU/TPU use their own); set before
  # initialize(), which must precede any other JAX call.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if args.coordinator:
    kwargs = dict(coordinator_address=args.coordinator, num_processes=args.num_processes,
                  process_id=args.process_id)
  jax.distributed.initialize(**kwargs)


def import_modules(names: list[str]) -> None:
  """Import each module: a ``path/to/file.py`` or a dotted name (found from the working folder).

  Raises:
    InputError: a missing module, or any error raised while importing it.
  """
  import importlib
  import importlib.util
  import os

  from jaxreg.types import InputError
  for name in names:
    try:
      if name.endswith(".py") or os.sep in name:
        if not os.path.isfile(name):
          raise InputError(f"--import {name}: no such file")
        stem = os.path.splitext(os.path.basename(name))[0]
        spec = importlib.util.spec_from_file_location(stem, name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[stem] = module
        spec.loader.exec_module(module)
      else:
        if os.getcwd() not in sys.path:
          sys.path.insert(0, os.getcwd())
        importlib.import_module(name)
    except InputError as e:
      raise InputError(f"--import {name}: {e}" if not str(e).startswith("--import") else str(e))
    except Exception as e:  # a user's module: one line naming it and what went wrong
      raise InputError(f"--import {name}: {type(e).__name__}: {e}") from e


def main(argv: list[str] | None = None, prog: str = "train.py") -> int:
  """Parse, train, and turn user errors into one line on stderr with exit code 2."""
  argv = sys.argv[1:] if argv is None else list(argv)
  overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
  rest = [a for a in argv if not a.startswith("--config.")]
  args = build_parser(prog).parse_args(rest)

  from jaxreg.ops.warp_kernel import KernelError
  from jaxreg.training import checkpoint
  from jaxreg.training import config as config_lib
  from jaxreg.types import InputError
  try:
    if args.distributed:
      _init_distributed(args)
    import_modules(args.imports)
    from jaxreg.pipeline import environment
    environment.configure()  # the compilation cache and the CPU warp kernel ($JAXREG_*)
    from jaxreg.training.loop import train_and_evaluate
    config = config_lib.load_config(args.config)
    if args.steps is not None:
      overrides.append(f"train.steps={args.steps}")
    config = config_lib.override(config, overrides)
    result = train_and_evaluate(config, args.workdir, progress=not args.no_progress,
                                stop_at=args.stop_at, init=args.init)
  except (InputError, ValueError, KernelError, checkpoint.NonFiniteError) as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
  print(f"{prog}: done at step {result['step']}: " +
        ", ".join(f"{k} {v:.4f}" for k, v in sorted(result.items()) if k.startswith("val_")))
  return 0
