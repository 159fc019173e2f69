"""Structured output: a JSON Schema (or any JSON object) enforced while decoding, with llguidance.

llguidance (MIT, one abi3 wheel of about 3 MB with no dependencies, used by llama.cpp, vLLM and SGLang)
compiles a schema in about a millisecond and computes a token mask in tens of microseconds on a
100k-token vocabulary (scripts/bench_grammar.py, which also times xgrammar and outlines-core). It
reads the checkpoint's tokenizer.json itself, so any fast tokenizer works.

The output is compact JSON (", " and ": " separators, no other whitespace): a model cannot spend its
tokens on indentation, and what it writes parses with any JSON reader.
"""

import functools
import json
from pathlib import Path

import torch

from localmoe.errors import LocalMoEError

ANY_OBJECT = {"type": "object"}
FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise LocalMoEError("structured output needs llguidance: pip install 'localmoe[json]'") from None
    return llguidance


@functools.lru_cache(maxsize=2)
def _vocabulary(tokenizer_json: Path, vocab_size: int, eos: int):
    """llguidance's view of the tokenizer: built once per model (about a second for 100k tokens)."""
    return _llguidance().LLTokenizer(tokenizer_json.read_text(encoding="utf-8"), n_vocab=vocab_size, eos_token=eos)


class JsonConstraint:
    """Masks every token that would leave the JSON the schema describes; `finished` once it is complete."""

    def __init__(self, tokenizer_json: Path, vocab_size: int, eos: int, schema: dict):
        llguidance = _llguidance()
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=FORMAT)
        except ValueError as error:
            raise LocalMoEError(f"the JSON schema cannot be used: {error}") from None
        self.matcher = llguidance.LLMatcher(_vocabulary(tokenizer_json, vocab_size, eos), grammar, log_level=0)
        if self.matcher.is_error():
            raise LocalMoEError(f"the JSON schema cannot be used: {_first_line(self.matcher.get_error())}")
        self.finished = False
        self._bit = torch.arange(8, dtype=torch.uint8)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8)
        if self.matcher.is_error():
            raise LocalMoEError(f"the JSON constraint failed: {_first_line(self.matcher.get_error())}")
        # bit i of little-endian 32-bit word w allows token 32w + i: byte 4w + i // 8, bit i % 8
        allowed = ((words[:, None] >> self._bit) & 1).flatten()[: logits.numel()].bool()
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise LocalMoEError(f"the JSON constraint refused token {token}: {_first_line(self.matcher.get_error())}")
        self.finished = self.matcher.is_stopped()


def read_schema(path: Path) -> dict:
    """`generate --json-schema FILE`: the schema, as a JSON object."""
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LocalMoEError(f"cannot read the JSON schema {path}: {error}") from None
    if not isinstance(schema, dict):
        raise LocalMoEError(f"the JSON schema {path} must be a JSON object")
    return schema


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "unknown error"
