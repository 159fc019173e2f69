"""The checkpoint's fast tokenizer (`tokenizer.json`, through `tokenizers`)."""

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as FastTokenizer

from localmoe.errors import LocalMoEError


class Tokenizer:
    def __init__(self, folder: Path):
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise LocalMoEError(
                f"{folder} has no tokenizer.json: localmoe needs the checkpoint's fast tokenizer to read text"
            )
        try:
            self._tok = FastTokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception on malformed files
            raise LocalMoEError(f"{path} cannot be read ({error}): the file is damaged; download it again") from None

    def encode(self, text: str) -> list[int]:
        """Token ids, with the special tokens (such as BOS) that the tokenizer's post-processor adds."""
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def stream(self, ids: Iterable[int]) -> Iterator[str]:
        """Text pieces as tokens arrive, never splitting a multi-byte character.

        Each step decodes only a short window: the tokens since the last emitted piece, with the ones
        before them as context, so decoders that drop a leading space still join pieces correctly.
        """
        tokens: list[int] = []
        prefix = read = 0
        for token in ids:
            tokens.append(token)
            before = self.decode(tokens[prefix:read])
            text = self.decode(tokens[prefix:])
            if len(text) > len(before) and not text.endswith("\ufffd"):
                yield text[len(before) :]
                prefix, read = read, len(tokens)
        rest = self.decode(tokens[prefix:])[len(self.decode(tokens[prefix:read])) :]
        if rest:
            yield rest
