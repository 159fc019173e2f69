"""`load` a checkpoint into an `Engine` that generates text: the entry point of the CLI and the API."""

from collections.abc import Iterator, Sequence
from functools import cached_property

import torch

from localmoe.checkpoint import Checkpoint
from localmoe.errors import LocalMoEError
from localmoe.loader import LoadedModel, load_model
from localmoe.models.moe import moe_blocks
from localmoe.runtime.generate import GenerationStats, greedy_tokens
from localmoe.runtime.resident import ResidentExperts
from localmoe.tokenizer import Tokenizer


class Engine:
    """A model with its experts placed, its stop tokens, and the checkpoint's tokenizer when text is used."""

    def __init__(self, checkpoint: Checkpoint, loaded: LoadedModel):
        self.checkpoint = checkpoint
        self.loaded = loaded
        self.model = loaded.model
        self.eos_ids = eos_ids(checkpoint)
        self.stats = GenerationStats()

    def generate_ids(self, prompt: Sequence[int], max_new_tokens: int) -> Iterator[int]:
        """Greedy token ids after `prompt`; `self.stats` describes the run as it goes."""
        self.stats = GenerationStats()
        return greedy_tokens(self.model, prompt, max_new_tokens, self.eos_ids, self.stats)

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer(self.checkpoint.path)

    def generate(self, prompt: str, max_new_tokens: int) -> Iterator[str]:
        """Stream the greedy continuation of `prompt` as text pieces."""
        ids = self.generate_ids(self.tokenizer.encode(prompt), max_new_tokens)
        return self.tokenizer.stream(token for token in ids if token not in self.eos_ids)


def load(
    source: str,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
) -> Engine:
    """Open a checkpoint (folder or Hub repo id) and load it for generation on `device`, all experts resident."""
    device = resolve_device(device)
    checkpoint = Checkpoint.open(source, revision)
    loaded = load_model(checkpoint, device, dtype)
    experts = ResidentExperts(loaded.experts, device, loaded.dtype)
    for block in moe_blocks(loaded.model):
        block.experts = experts
    return Engine(checkpoint, loaded)


def resolve_device(device: str | None) -> torch.device:
    """The requested device, or CUDA when present and the CPU otherwise."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise LocalMoEError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise LocalMoEError(f"{device} was asked for but this torch build sees no CUDA device: use --device cpu")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise LocalMoEError(f"{device} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if resolved.type not in ("cpu", "cuda"):
        raise LocalMoEError(f"device {device!r} is not supported: use cpu, cuda or cuda:N")
    return resolved


def eos_ids(checkpoint: Checkpoint) -> frozenset[int]:
    """Every EOS id that generation_config.json lists, else config.json's."""
    value = checkpoint.generation_config.get("eos_token_id")
    if value is None:
        value = checkpoint.config.get("eos_token_id")
    if value is None:
        return frozenset()
    return frozenset(value if isinstance(value, list) else [value])
