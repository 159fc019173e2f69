import os
from pathlib import Path


def cache_dir() -> Path:
    """localmoe's own cache folder: `$LOCALMOE_CACHE`, else `$XDG_CACHE_HOME/localmoe`, else ~/.cache/localmoe.

    It holds what localmoe writes for itself (the demo checkpoint, later quantized stores); downloaded
    checkpoints stay in the Hugging Face cache and are never written to.
    """
    if env := os.environ.get("LOCALMOE_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "localmoe"
