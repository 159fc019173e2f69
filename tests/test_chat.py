"""Conversations: the KV cache kept between turns gives exactly what a fresh run gives, the context
overflows gracefully, and `localmoe chat` works in a real terminal and over a pipe."""

import errno
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import localmoe
from localmoe import chat as chat_module
from localmoe import files
from localmoe.chat import ChatSession, _command
from localmoe.engine import RuntimeOptions
from localmoe.errors import LocalMoEError


def session(folder, max_new_tokens=12, **options) -> ChatSession:
    engine = localmoe.load(str(folder), device="cpu", options=RuntimeOptions(**options))
    return ChatSession(engine, engine.sampling(), max_new_tokens)


def fresh_answer(folder, conversation, max_new_tokens=12, **options) -> str:
    """What a new engine answers to the whole conversation, prefilled from scratch."""
    engine = localmoe.load(str(folder), device="cpu", options=RuntimeOptions(**options))
    ids = engine.tokenizer.encode_chat(conversation)
    return "".join(engine.text(engine.generate_ids(ids, max_new_tokens)))


def say(chat: ChatSession, text: str, notices: list | None = None) -> str:
    return "".join(chat.reply(text, (notices if notices is not None else []).append))


@pytest.mark.parametrize("options", [{}, {"expert_slots": 5}], ids=["resident", "offloaded"])
def test_later_turns_reuse_the_cache_and_equal_a_fresh_run(chat_model, options):
    chat = session(chat_model, **options)
    chat.system = "Be brief."
    say(chat, "Hello there")
    first_prompt = chat.engine.tokenizer.encode_chat(chat.conversation()[:-1])
    second = say(chat, "And now?")
    whole = chat.engine.tokenizer.encode_chat(chat.conversation()[:-1])
    # At least the first turn's prompt came from the cache. (The answer itself may be re-fed: random
    # weights write invalid UTF-8, which does not re-tokenize to the same ids.)
    assert chat.engine.stats.prompt_tokens <= len(whole) - len(first_prompt) + 1
    assert second == fresh_answer(chat_model, chat.conversation()[:-1], **options)


def test_an_interrupted_answer_is_kept_and_the_next_turn_is_right(chat_model):
    chat = session(chat_model, max_new_tokens=40)
    pieces = chat.reply("Tell me a long story", [].append)
    next(pieces)
    next(pieces)
    pieces.close()  # what Ctrl-C does to the stream
    partial = chat.messages[-1]
    assert partial["role"] == "assistant" and len(partial["content"]) > 0
    after = say(chat, "Go on")
    assert after == fresh_answer(chat_model, chat.conversation()[:-1], max_new_tokens=40)


def test_oldest_turns_are_dropped_to_fit_the_context(chat_model):
    chat = session(chat_model, max_new_tokens=8, context=160)
    chat.system = "System stays."
    notices: list[str] = []
    for turn in range(8):
        say(chat, f"Message number {turn} with some words in it", notices)
    assert any("dropped the" in notice for notice in notices)
    assert chat.conversation()[0] == {"role": "system", "content": "System stays."}
    assert chat.messages[0]["role"] == "user"  # roles still alternate after dropping
    assert len(chat.engine.tokenizer.encode_chat(chat.conversation())) <= 160


def test_a_message_longer_than_the_context_is_refused_and_the_conversation_kept(chat_model, tmp_path):
    chat = session(chat_model, max_new_tokens=4, context=64)
    with pytest.raises(LocalMoEError, match="shorten it, or raise --context"):
        say(chat, "word " * 200)
    assert chat.messages == []
    say(chat, "one")
    say(chat, "two")
    kept = [dict(message) for message in chat.messages]
    with pytest.raises(LocalMoEError, match="shorten it, or raise --context"):
        say(chat, "word " * 200)
    assert chat.messages == kept and len(kept) == 4  # nothing dropped for a message that is refused
    chat.save(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["messages"] == kept
    assert say(chat, "short") is not None  # the session is still usable


def test_save_and_load(chat_model, tmp_path):
    chat = session(chat_model)
    chat.system = "S"
    say(chat, "one")
    chat.save(tmp_path / "c.json")
    other = session(chat_model)
    other.load(tmp_path / "c.json")
    assert (other.system, other.messages) == (chat.system, chat.messages)
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_a_failed_save_leaves_the_old_file(chat_model, tmp_path, monkeypatch, capsys):
    chat = session(chat_model)
    say(chat, "one")
    saved = tmp_path / "c.json"
    saved.write_text("the conversation saved before")

    def full_disk(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    _command(chat, f"/save {saved}")
    assert capsys.readouterr().err.strip() == f"localmoe: No space left on device: {saved}"
    assert saved.read_text() == "the conversation saved before"
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


TURN = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]


@pytest.fixture(scope="module")
def talked(chat_model):
    """A session one exchange in, shared by tests that leave it as it is."""
    chat = session(chat_model)
    say(chat, "one")
    return chat


@pytest.mark.parametrize(
    "content, reason",
    [
        ('{"messages": [{"role": "user"}]}', "not an object with a role and a content"),
        (json.dumps({"messages": [{"role": "user", "content": 5}, TURN[1]]}), "should be text from the user"),
        (json.dumps({"messages": TURN[::-1]}), "should be text from the user"),
        (json.dumps({"messages": TURN[:1]}), "ends with an answer"),
        (json.dumps({"messages": [{**TURN[0], "extra": 1}, TURN[1]]}), "and nothing else"),
        (json.dumps({"system": 3, "messages": TURN}), "system message is not text"),
        ("[]", "not a JSON object with a list of messages"),
        (b"\xff\xfe", "can't decode"),
        ("[" * 100_000, "recursion"),
        (json.dumps({"messages": TURN, "system": "x" * 200_000}), "larger than 0.190735 MiB"),
        ("/dev/zero", "larger than"),
    ],
    ids=[
        "no content",
        "content not text",
        "roles swapped",
        "ends with the user",
        "other keys",
        "system not text",
        "not an object",
        "not UTF-8",
        "nested too deep",
        "too large",
        "endless",
    ],
)
def test_load_refuses_what_is_not_a_saved_conversation(talked, tmp_path, monkeypatch, content, reason):
    monkeypatch.setattr(chat_module, "MAX_SAVED_BYTES", 200_000)
    chat = talked
    before = [dict(message) for message in chat.messages]
    path = tmp_path / "bad.json"
    if content == "/dev/zero":
        if not os.path.exists(content):
            pytest.skip("no /dev/zero here")
        path = Path(content)
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(LocalMoEError, match="cannot load a conversation from") as refused:
        chat.load(path)
    assert reason in str(refused.value) and "\n" not in str(refused.value)
    assert chat.messages == before  # the conversation goes on as it was


def test_piped_input_that_is_not_utf8_is_read_with_replacement(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"fine\ncaf\xe9 au lait\n"), encoding="utf-8"))
    assert chat_module._piped_line() == "fine\n"
    assert chat_module._piped_line() == "caf\ufffd au lait\n"
    assert "not valid utf-8 text: read with U+FFFD" in capsys.readouterr().err
    with pytest.raises(EOFError):
        chat_module._piped_line()


@pytest.mark.slow
def test_piped_lines_are_turns(chat_model, tmp_path):
    saved = tmp_path / "piped.json"
    done = subprocess.run(
        [sys.executable, "-m", "localmoe", "chat", str(chat_model), "--device", "cpu", "-n", "6"],
        input=f"hello\n\nsecond line\ncaf\xe9 in Latin-1\n/save {saved}\n".encode("latin-1"),
        capture_output=True,
        timeout=300,
    )
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr
    assert "Traceback" not in stderr and "not valid utf-8 text" in stderr
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    assert messages[4]["content"] == "caf\ufffd in Latin-1"


def test_generate_with_chat_template_and_json(chat_model):
    from click.testing import CliRunner

    from localmoe.cli import main

    result = CliRunner().invoke(
        main,
        ["generate", str(chat_model), "-p", "hi", "--chat", "--system", "S", "-n", "5", "--json", "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["new_tokens"] == 5 and report["prompt_tokens"] > 5
    assert report["text"] == fresh_answer(
        chat_model, [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}], 5
    )


# pexpect waits: generous, since a loaded CI machine can take minutes where an idle one takes seconds
PATIENCE = 600


def _chat_in_a_terminal(chat_model, tmp_path, max_new_tokens: int):
    pexpect = pytest.importorskip("pexpect")
    command = f"{sys.executable} -m localmoe chat {chat_model} --device cpu --expert-slots 6 -n {max_new_tokens}"
    # Ctrl-C must reach the chat as a user's terminal delivers it, even where the test runner ignores
    # SIGINT (a background job of a non-interactive shell does, and a child inherits that)
    child = pexpect.spawn(
        command,
        cwd=str(tmp_path),
        encoding="utf-8",
        timeout=PATIENCE,
        dimensions=(40, 200),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    child.expect("Type /help")
    child.expect("> ")
    return pexpect, child


def _leave(pexpect, child) -> None:
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_chat_in_a_terminal(chat_model, tmp_path):
    pexpect, child = _chat_in_a_terminal(chat_model, tmp_path, 8)
    child.sendline("hello")
    child.expect("> ")  # the answer ran to its end
    child.sendline("/stats")
    child.expect("hit rate")
    child.expect("> ")
    child.sendline("/reset")
    child.expect("conversation cleared")
    _leave(pexpect, child)


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_stops_the_answer_and_keeps_the_chat(chat_model, tmp_path):
    # an answer far longer than the test waits for: Ctrl-C is what ends it
    pexpect, child = _chat_in_a_terminal(chat_model, tmp_path, 3000)
    child.sendline("tell me everything")
    child.expect("tell me everything\r\n")  # the terminal's echo of the line (not yet the answer)
    child.expect("\\S")  # the answer has started streaming: a Ctrl-C before it would stop the line, not the answer
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect("> ")
    child.sendline("/reset")
    child.expect("conversation cleared")
    _leave(pexpect, child)


def test_cache_command_resizes_the_pool_without_reloading(chat_model, capsys):
    chat = session(chat_model, expert_slots=6)
    rows = chat.engine.experts.cache.rows
    _command(chat, "/cache")
    assert "6 of 6 allocated slots" in capsys.readouterr().err
    _command(chat, "/cache 3")
    assert "3 of 6 allocated slots" in capsys.readouterr().err
    assert say(chat, "hello") == fresh_answer(chat_model, [{"role": "user", "content": "hello"}])
    assert chat.engine.experts.cache.rows is rows
    _command(chat, "/cache 6")
    for argument, error in (("99", "allocated 6 expert slots at start-up"), ("1", "use at least 2"), ("x", "a number")):
        _command(chat, f"/cache {argument}")
        assert error in capsys.readouterr().err
    assert chat.engine.experts.cache.slots == 6
    _command(session(chat_model), "/cache 3")
    assert "no expert cache to resize" in capsys.readouterr().err
