"""`localmoe chat`: a conversation with the model, in a terminal or over piped lines."""

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from localmoe.engine import Engine
from localmoe.errors import LocalMoEError, as_flag
from localmoe.files import read_limited, sweep_temporaries, write_atomic
from localmoe.runtime.sampling import SamplingParams

HELP = """commands:
  /help          this text
  /reset         forget the conversation (the system message stays)
  /system TEXT   set the system message (empty TEXT removes it)
  /stats         speed of the last answer and the expert cache counters
  /cache [SLOTS] show, or change, how many expert slots the cache uses (within those allocated)
  /save FILE     write the conversation to FILE as JSON
  /load FILE     continue the conversation saved in FILE
  /exit          leave (or Ctrl-D); Ctrl-C stops an answer and keeps what was said"""


ROLES = ("user", "assistant")  # the turns of a session, in order; the system message is kept apart
# A session holds at most a context of text (older turns are dropped), a few MiB even for a million tokens:
# a file much larger than that was not written by /save.
MAX_SAVED_BYTES = 64 * 2**20


@dataclass
class ChatSession:
    """A conversation over one KV cache: each turn feeds the model only what the cache does not hold yet."""

    engine: Engine
    sampling: SamplingParams
    max_new_tokens: int
    stop: list[str] = field(default_factory=list)
    system: str | None = None
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self._cache = self.engine.new_cache()
        self._cached: list[int] = []  # the tokens whose keys and values the cache holds, in order
        # the drafter goes on from turn to turn as the cache does (MTP layers keep caches of their own)
        self._drafter = self.engine.new_drafter()

    @property
    def context(self) -> int:
        return self.engine.plan.context

    def conversation(self, messages: list[dict] | None = None) -> list[dict]:
        """The system message, then `messages` (default: the session's)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *(self.messages if messages is None else messages)]

    def reset(self) -> None:
        self.messages.clear()

    def reply(self, text: str, notice: Callable[[str], None]) -> Iterator[str]:
        """Stream the answer to `text`. The answer joins the conversation even when cut short.

        When the conversation no longer fits the context, its oldest turns are dropped (the system
        message stays) and `notice` says so.
        """
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self._fit(notice)
        except BaseException:
            self.messages.pop()  # refused: the conversation stays as it was
            raise
        reuse = _common_prefix(self._cached, ids)
        budget = min(self.max_new_tokens, self.context - len(ids))
        generated: list[int] = []
        answer: list[str] = []
        self._cached = self._cached[:reuse]  # all the cache can be trusted with until this turn completes
        tokens = self.engine.generate_ids(
            ids, budget, self.sampling, cache=self._cache, reuse=reuse, drafter=self._drafter
        )
        try:
            for piece in self.engine.text(_recorded(tokens, generated), self.stop):
                answer.append(piece)
                yield piece
        finally:
            # The last token was chosen but never fed back, so the cache ends just before it.
            self._cached = ids + generated[:-1] if generated else ids[: min(reuse, len(ids) - 1)]
            self.messages.append({"role": "assistant", "content": "".join(answer)})

    def save(self, path: Path) -> None:
        """Write the conversation to `path` as JSON, whole: a run killed meanwhile leaves the old file."""
        sweep_temporaries(path.parent, path.name)
        write_atomic(path, json.dumps({"system": self.system, "messages": self.messages}, indent=2, ensure_ascii=False))

    def load(self, path: Path) -> None:
        """Continue the conversation saved in `path`; a file that is not one leaves this one as it was."""
        try:
            system, messages = _conversation(json.loads(read_limited(path, MAX_SAVED_BYTES).decode("utf-8")))
        except (OSError, ValueError, RecursionError) as error:  # ValueError: UnicodeDecodeError, JSONDecodeError
            raise LocalMoEError(f"cannot load a conversation from {path}: {error}") from None
        self.system, self.messages = system, messages

    def _fit(self, notice: Callable[[str], None]) -> list[int]:
        """Token ids of the conversation, dropping its oldest exchanges until there is room to answer.
        A last message that leaves no room even alone is refused before anything is dropped."""
        room = min(self.max_new_tokens, self.context // 4)
        alone = self.engine.tokenizer.encode_chat(self.conversation(self.messages[-1:]))
        if len(alone) + room > self.context:
            raise LocalMoEError(
                f"that message is {len(alone)} tokens with the template, and the context is {self.context} "
                f"with {room} kept for the answer: shorten it, or raise --context"
            )
        dropped = 0
        while len(ids := self.engine.tokenizer.encode_chat(self.conversation())) + room > self.context:
            del self.messages[:2]  # one user message and its answer, so roles keep alternating
            dropped += 2
        if dropped:
            notice(f"[dropped the {dropped} oldest messages to fit the {self.context}-token context]")
        return ids


def _conversation(data) -> tuple[str | None, list[dict]]:
    """The system message and the messages of a saved conversation, its shape checked."""
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise ValueError("it is not a JSON object with a list of messages")
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError("its system message is not text")
    for number, message in enumerate(data["messages"]):
        if not (isinstance(message, dict) and message.keys() == {"role", "content"}):
            raise ValueError(f"message {number + 1} is not an object with a role and a content, and nothing else")
        if message["role"] != ROLES[number % 2] or not isinstance(message["content"], str):
            raise ValueError(
                f"message {number + 1} should be text from the {ROLES[number % 2]}: turns alternate, the user's first"
            )
    if len(data["messages"]) % 2:
        raise ValueError("its last message is the user's: a saved conversation ends with an answer")
    return system, data["messages"]


def _recorded(tokens: Iterator[int], into: list[int]) -> Iterator[int]:
    for token in tokens:
        into.append(token)
        yield token


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def run(session: ChatSession, interactive: bool) -> None:
    """The read-answer loop. Interactive: a prompt with line editing and history. Piped: each input
    line is a user turn and answers are plain text, one block per line read."""
    if interactive:
        with contextlib.suppress(ImportError):  # not on every platform; input() works without it
            import readline  # noqa: F401  (line editing and history for input())
        print("Type /help for commands. Ctrl-C stops an answer, Ctrl-D exits.", file=sys.stderr)
    read = functools.partial(input, "> ") if interactive else _piped_line
    while True:
        try:
            line = read()
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        except UnicodeDecodeError as error:  # typed in a terminal: it can be typed again
            print(f"localmoe: that line is not valid {error.encoding} text: it was not sent", file=sys.stderr)
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if _command(session, line) == "exit":
                break
            continue
        _answer(session, line)


def _piped_line() -> str:
    """The next line of piped input; invalid text in it read with U+FFFD in place, with a notice, so that
    the conversation goes on. EOFError at the end."""
    binary = getattr(sys.stdin, "buffer", None)
    if binary is None:  # a text stream without bytes beneath (an embedding program's)
        line = sys.stdin.readline()
    else:
        raw, encoding = binary.readline(), sys.stdin.encoding or "utf-8"
        try:
            line = raw.decode(encoding)
        except UnicodeDecodeError:
            line = raw.decode(encoding, errors="replace")
            print(
                f"localmoe: a line of input is not valid {encoding} text: read with U+FFFD in its place",
                file=sys.stderr,
            )
    if not line:
        raise EOFError
    return line


def _answer(session: ChatSession, text: str) -> None:
    def notice(message: str) -> None:
        print(message, file=sys.stderr)

    try:
        for piece in session.reply(text, notice):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        print("[stopped]", file=sys.stderr)
    except LocalMoEError as error:
        print(f"localmoe: {error.phrased(as_flag)}", file=sys.stderr)
    sys.stdout.flush()


def _cache_command(engine: Engine, argument: str) -> None:
    if argument and not argument.isdigit():
        raise LocalMoEError(f"/cache takes a number of expert slots, not {argument!r}")
    if argument:
        engine.reconfigure(slots=int(argument))
    cache = engine.expert_cache()
    if cache is None:
        print("[every expert is resident: there is no expert cache]", file=sys.stderr)
    else:
        print(f"[expert cache: {cache.slots} of {cache.allocated} allocated slots in use]", file=sys.stderr)


def _command(session: ChatSession, line: str) -> str | None:
    name, _, argument = line.partition(" ")
    argument = argument.strip()
    try:
        if name in ("/exit", "/quit"):
            return "exit"
        if name == "/help":
            print(HELP, file=sys.stderr)
        elif name == "/reset":
            session.reset()
            print("[conversation cleared]", file=sys.stderr)
        elif name == "/system":
            session.system = argument or None
            print("[system message set]" if argument else "[system message removed]", file=sys.stderr)
        elif name == "/stats":
            print(session.engine.stats.summary(), file=sys.stderr)
            print(session.engine.cache_report(), file=sys.stderr)
        elif name == "/cache":
            _cache_command(session.engine, argument)
        elif name in ("/save", "/load") and not argument:
            print(f"{name} needs a file name", file=sys.stderr)
        elif name == "/save":
            session.save(Path(argument))
            print(f"[saved to {argument}]", file=sys.stderr)
        elif name == "/load":
            session.load(Path(argument))
            print(f"[loaded {len(session.messages)} messages from {argument}]", file=sys.stderr)
        else:
            print(f"unknown command {name}: /help lists them", file=sys.stderr)
    except LocalMoEError as error:
        print(f"localmoe: {error.phrased(as_flag)}", file=sys.stderr)
    except OSError as error:
        print(f"localmoe: {error.strerror or error}: {argument}", file=sys.stderr)
    return None
