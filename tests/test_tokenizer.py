"""Streaming detokenization never splits a character, and adds up to the plain decode."""

import pytest

from localmoe.demo import byte_level_tokenizer
from localmoe.errors import LocalMoEError
from localmoe.tokenizer import Tokenizer


@pytest.fixture
def tokenizer(tmp_path):
    byte_level_tokenizer().save(str(tmp_path / "tokenizer.json"))
    return Tokenizer(tmp_path)


@pytest.mark.parametrize("text", ["plain ascii", "héllo wörld", "世界 and 🙂 emoji", "ends in 世"])
def test_stream_joins_to_the_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    pieces = list(tokenizer.stream(ids))
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_bos_is_added_and_skipped_in_decode(tokenizer):
    ids = tokenizer.encode("a")
    assert len(ids) == 2 and tokenizer.decode(ids) == "a"


def test_damaged_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LocalMoEError, match="damaged"):
        Tokenizer(tmp_path)
