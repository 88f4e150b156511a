"""Training: state, sharding, the jitted step, checkpoints, the loop.

``train_and_evaluate(config, workdir)`` is the entry point that ``train.py``,
``jaxreg train`` and the tests call.
"""

from jaxreg.training.checkpoint import Checkpoints as Checkpoints
from jaxreg.training.checkpoint import NonFiniteError as NonFiniteError
from jaxreg.training.checkpoint import export_checkpoint as export_checkpoint
from jaxreg.training.checkpoint import restore_latest as restore_latest
from jaxreg.training.config import load_config as load_config
from jaxreg.training.config import override as override
from jaxreg.training.loop import evaluate as evaluate
from jaxreg.training.loop import train_and_evaluate as train_and_evaluate
from jaxreg.training.sharding import make_mesh as make_mesh
from jaxreg.training.state import TrainState as TrainState
from jaxreg.training.state import init_state as init_state

__all__ = [
    "Checkpoints",
    "NonFiniteError",
    "export_checkpoint",
    "TrainState",
    "evaluate",
    "init_state",
    "load_config",
    "make_mesh",
    "override",
    "restore_latest",
    "train_and_evaluate",
]
