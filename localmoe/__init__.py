"""localmoe: run Mixture-of-Experts models from Hugging Face checkpoints on GPUs too small for every expert."""

from localmoe.engine import Engine, load
from localmoe.errors import LocalMoEError

__all__ = ["Engine", "LocalMoEError", "load"]
