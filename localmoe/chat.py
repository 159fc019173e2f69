"""`localmoe chat`: a conversation with the model, in a terminal or over piped lines."""

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from localmoe.engine import Engine
from localmoe.errors import LocalMoEError, as_flag
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

    @property
    def context(self) -> int:
        return self.engine.plan.context

    def conversation(self) -> list[dict]:
        return [*([{"role": "system", "content": self.system}] if self.system else []), *self.messages]

    def reset(self) -> None:
        self.messages.clear()

    def reply(self, text: str, notice: Callable[[str], None]) -> Iterator[str]:
        """Stream the answer to `text`. The answer joins the conversation even when cut short.

        When the conversation no longer fits the context, its oldest turns are dropped (the system
        message stays) and `notice` says so.
        """
        self.messages.append({"role": "user", "content": text})
        ids = self._fit(notice)
        reuse = _common_prefix(self._cached, ids)
        budget = min(self.max_new_tokens, self.context - len(ids))
        generated: list[int] = []
        answer: list[str] = []
        self._cached = self._cached[:reuse]  # all the cache can be trusted with until this turn completes
        tokens = self.engine.generate_ids(ids, budget, self.sampling, cache=self._cache, reuse=reuse)
        try:
            for piece in self.engine.text(_recorded(tokens, generated), self.stop):
                answer.append(piece)
                yield piece
        finally:
            # The last token was chosen but never fed back, so the cache ends just before it.
            self._cached = ids + generated[:-1] if generated else ids[: min(reuse, len(ids) - 1)]
            self.messages.append({"role": "assistant", "content": "".join(answer)})

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"system": self.system, "messages": self.messages}, indent=2, ensure_ascii=False))

    def load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            messages = data["messages"]
            if not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages):
                raise ValueError("every message needs a role and a content")
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise LocalMoEError(f"cannot load a conversation from {path}: {error}") from None
        self.system, self.messages = data.get("system"), messages

    def _fit(self, notice: Callable[[str], None]) -> list[int]:
        """Token ids of the conversation, dropping its oldest exchanges until there is room to answer."""
        room = min(self.max_new_tokens, self.context // 4)
        dropped = 0
        while True:
            ids = self.engine.tokenizer.encode_chat(self.conversation())
            if len(ids) + room <= self.context:
                break
            if len(self.messages) == 1:
                self.messages.pop()
                raise LocalMoEError(
                    f"that message is {len(ids)} tokens with the template, and the context is {self.context} "
                    f"with {room} kept for the answer: shorten it, or raise --context"
                )
            del self.messages[:2]  # one user message and its answer, so roles keep alternating
            dropped += 2
        if dropped:
            notice(f"[dropped the {dropped} oldest messages to fit the {self.context}-token context]")
        return ids


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
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        if not interactive and not line:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if _command(session, line) == "exit":
                break
            continue
        _answer(session, line)


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
