"""Streaming detokenization never splits a character and adds up to the plain decode; stop strings."""

import pytest
from conftest import save_tokenizer, train_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from localmoe.demo import byte_level_tokenizer
from localmoe.errors import LocalMoEError
from localmoe.tokenizer import StopStrings, Tokenizer

SPECIALS = ["<s>", "</s>"]


@pytest.fixture(scope="module", params=["byte_level", "metaspace", "demo"])
def tokenizer(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "demo":
        byte_level_tokenizer().save(str(folder / "tokenizer.json"))
    else:
        save_tokenizer(train_tokenizer(request.param, SPECIALS), folder, bos_token="<s>", eos_token="</s>")
    return Tokenizer(folder)


@pytest.mark.parametrize("text", ["plain ascii", "héllo wörld", "世界 and 🙂 emoji", "ends in 世", "  two spaces"])
def test_stream_joins_to_the_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    pieces = list(tokenizer.stream(ids))
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_stream_of_any_ids_joins_to_the_decode(tokenizer, data):
    """Any id sequence, including bytes that never form a character and special tokens."""
    size = tokenizer._tok.get_vocab_size()
    ids = data.draw(st.lists(st.integers(min_value=0, max_value=size - 1), max_size=40))
    assert "".join(tokenizer.stream(ids)) == tokenizer.decode(ids)


def test_multibyte_character_is_never_split(tmp_path):
    byte_level_tokenizer().save(str(tmp_path / "tokenizer.json"))
    tokenizer = Tokenizer(tmp_path)
    ids = tokenizer.encode("🙂", add_special_tokens=False)
    assert len(ids) == 4  # one token per byte
    assert list(tokenizer.stream(ids)) == ["🙂"]


def test_damaged_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LocalMoEError, match="damaged"):
        Tokenizer(tmp_path)


@pytest.mark.parametrize(
    "pieces,stops,expected,stopped",
    [
        (["Hello", " wor", "ld"], ["world"], "Hello ", True),
        (["a", "b", "c"], ["bd"], "abc", False),  # a false start is released once it cannot match
        (["ST", "OP here"], ["STOP"], "", True),  # a stop string split across pieces
        (["x", "yz"], ["z", "yz"], "x", True),  # the earliest of several
        (["plain"], [], "plain", False),
    ],
)
def test_stop_strings(pieces, stops, expected, stopped):
    scanner = StopStrings(stops)
    out = ""
    for piece in pieces:
        out += scanner.feed(piece)
        if scanner.stopped:
            break
    if not scanner.stopped:
        out += scanner.flush()
    assert (out, scanner.stopped) == (expected, stopped)
