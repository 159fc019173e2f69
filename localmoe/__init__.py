"""localmoe: run Mixture-of-Experts models from Hugging Face checkpoints on GPUs too small for every expert.

`localmoe.load(...)` gives an `Engine`; they are imported on first use, so that the command's help starts
without torch."""

from localmoe.errors import LocalMoEError

__all__ = ["Engine", "LocalMoEError", "load"]


def __getattr__(name: str):
    if name in ("Engine", "load"):
        from localmoe import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'localmoe' has no attribute {name!r}")
