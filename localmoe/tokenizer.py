"""The checkpoint's tokenizer: `tokenizer.json` through `tokenizers`, its special tokens, and its chat
template rendered the way transformers renders it (sandboxed jinja2, same helpers, same JSON spacing).
"""

import functools
import json
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as FastTokenizer
from tokenizers import processors

from localmoe.errors import LocalMoEError

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


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
        config = _read_json(folder / "tokenizer_config.json")
        self.special_tokens = {
            name: _token_text(config[name], folder / "tokenizer_config.json", name)
            for name in SPECIAL_TOKEN_NAMES
            if config.get(name) is not None
        }
        self._apply_bos_eos_flags(config)
        self.chat_templates = _chat_templates(folder, config)
        self._byte_tokens = _byte_fallback_tokens(self._tok)
        self._special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; with `add_special_tokens`, plus what the post-processor adds (such as BOS)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], keep: frozenset[int] = frozenset()) -> str:
        """Text of `ids` without special tokens, except those in `keep` (a tool-call format's markers)."""
        if not keep:
            return self._tok.decode(ids, skip_special_tokens=True)
        return self._tok.decode([i for i in ids if i not in self._special_ids or i in keep], skip_special_tokens=False)

    def special_ids(self, texts: Iterable[str]) -> frozenset[int]:
        """The ids of those `texts` that are special tokens (decoding drops them unless kept)."""
        return frozenset(i for i in map(self._tok.token_to_id, texts) if i is not None and i in self._special_ids)

    def token_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)

    @functools.cached_property
    def longest_token(self) -> int:
        """Characters in the longest token's vocabulary entry (at least its text's): a text of n
        characters is at least n / longest_token tokens, which bounds a prompt before it is tokenized."""
        return max(map(len, self._tok.get_vocab(with_added_tokens=True)), default=1)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def render_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None, **kwargs
    ) -> str:
        """The conversation as the model was trained to see it, rendered from the checkpoint's chat template."""
        context = {
            "messages": messages,
            "tools": tools,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
            **{**self.special_tokens, **kwargs},
        }
        return render_bounded(_compile(self.template(tools)), context)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Token ids of the rendered conversation: the template writes the special tokens itself."""
        return self.encode(self.render_chat(messages, add_generation_prompt, **kwargs), add_special_tokens=False)

    def stream(self, ids: Iterable[int], keep: frozenset[int] = frozenset()) -> Iterator[str]:
        """Text pieces as tokens arrive, never splitting a multi-byte character.

        Each step decodes only a short window: the tokens since the last emitted piece, with the ones
        before them as context, so decoders that drop a leading space (metaspace) or assemble bytes
        from several tokens (byte fallback, byte-level) still join pieces correctly. Text is held back
        while it ends in an unfinished character, or in byte-fallback tokens: the decoder renders a run
        of those as a whole, and a later byte can change how the earlier ones read.
        """
        tokens: list[int] = []
        prefix = read = 0
        after_byte = False  # the last token that decodes to anything was a byte-fallback token
        for token in ids:
            tokens.append(token)
            if token not in self._special_ids or token in keep:  # skipped in decode: bytes on both sides join
                after_byte = token in self._byte_tokens
            before = self.decode(tokens[prefix:read], keep)
            text = self.decode(tokens[prefix:], keep)
            if len(text) > len(before) and not text.endswith("\ufffd") and not after_byte:
                yield text[len(before) :]
                prefix, read = read, len(tokens)
        rest = self.decode(tokens[prefix:], keep)[len(self.decode(tokens[prefix:read], keep)) :]
        if rest:
            yield rest

    def _apply_bos_eos_flags(self, config: dict) -> None:
        """tokenizer.json's post-processor decides what encode adds; where it has none, the
        add_bos_token/add_eos_token flags of tokenizer_config.json do, as older Llama-style repos expect."""
        if self._tok.post_processor is not None:
            return
        single, special = "$A:0", []
        for flag, name, before in (("add_bos_token", "bos_token", True), ("add_eos_token", "eos_token", False)):
            token = self.special_tokens.get(name)
            token_id = self._tok.token_to_id(token) if token else None
            if config.get(flag) and token_id is not None:
                single = f"{token}:0 {single}" if before else f"{single} {token}:0"
                special.append((token, token_id))
        pair = f"{single} " + single.replace("$A", "$B").replace(":0", ":1")
        self._tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    def template(self, tools: list[dict] | None) -> str:
        templates = self.chat_templates
        if not templates:
            raise LocalMoEError(
                "this checkpoint has no chat template (a base model?): give it plain text to continue, not a chat"
            )
        if tools is not None and "tool_use" in templates:
            return templates["tool_use"]
        if "default" in templates:
            return templates["default"]
        raise LocalMoEError(f"the checkpoint has chat templates {sorted(templates)} but none named default")


def _byte_fallback_tokens(tok: FastTokenizer) -> frozenset[int]:
    """Ids of the <0xNN> tokens of a byte-fallback tokenizer (SentencePiece style); empty otherwise."""
    if "ByteFallback" not in repr(tok.decoder):
        return frozenset()
    vocab = tok.get_vocab()
    return frozenset(vocab[f"<0x{byte:02X}>"] for byte in range(256) if f"<0x{byte:02X}>" in vocab)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LocalMoEError(f"{path} is not valid JSON ({error}): the file is damaged; download it again") from None
    if not isinstance(value, dict):
        raise LocalMoEError(f"{path} must hold a JSON object, not {type(value).__name__}: the file is damaged")
    return value


def _token_text(value: Any, path: Path, name: str) -> str:
    """Special tokens are written as text, or as {"content": text, ...} in older configs."""
    text = value.get("content") if isinstance(value, dict) else value
    if not isinstance(text, str):
        raise LocalMoEError(f'{path}: {name} must be text or {{"content": text}}, not {value!r}'[:300])
    return text


def _chat_templates(folder: Path, config: dict) -> dict[str, str]:
    """Named chat templates, from the first place that has any: chat_template.jinja (plus
    additional_chat_templates/*.jinja), tokenizer_config.json, then chat_template.json."""
    templates = {}
    if (folder / "chat_template.jinja").is_file():
        templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for file in sorted((folder / "additional_chat_templates").glob("*.jinja")):
        templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    if templates:
        return templates
    source = "tokenizer_config.json" if config.get("chat_template") else "chat_template.json"
    value = config.get("chat_template") or _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(value, list):
        named = [e for e in value if isinstance(e, dict) and isinstance(e.get("name"), str)]
        if len(named) < len(value) or not all(isinstance(e.get("template"), str) for e in named):
            raise LocalMoEError(f"{folder / source}: chat_template must list {{name, template}} objects of text")
        return {entry["name"]: entry["template"] for entry in named}
    if value and not isinstance(value, str):
        raise LocalMoEError(f"{folder / source}: chat_template must be text or a list of named templates")
    return {"default": value} if value else {}


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; it renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


RENDER_SECONDS = 10.0  # a template still rendering after this is looping: real ones take milliseconds
RENDER_CHARACTERS = 16 * 2**20  # more text than any context holds
TEMPLATE_FILE = "<template>"  # the file name jinja2 gives the code it compiles from a string


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox, where no single operation may build a huge value: repeating a string or a
    list, a large power, or a call (method, filter or function) given an integer beyond the output limit
    is refused. Loops and output are bounded by `render_bounded`."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def call_binop(self, context, operator, left, right):
        numbers = [v for v in (left, right) if isinstance(v, int)]
        if operator == "**" and isinstance(right, int) and isinstance(left, int) and abs(right) > 64 and abs(left) > 1:
            raise jinja2.exceptions.SecurityError("the chat template computes a power too large to build")
        if operator == "*" and numbers and any(isinstance(v, str | list | tuple) for v in (left, right)):
            size = max(numbers) * max(len(v) for v in (left, right) if isinstance(v, str | list | tuple))
            if size > RENDER_CHARACTERS:
                raise jinja2.exceptions.SecurityError("the chat template repeats a value beyond the output limit")
        if operator == "%":
            _check_sizes((right,) if not isinstance(right, tuple) else right, {})
        return super().call_binop(context, operator, left, right)

    def call(self, context, obj, *args, **kwargs):
        _check_sizes(args, kwargs)
        return super().call(context, obj, *args, **kwargs)


def _check_sizes(args, kwargs) -> None:
    if any(isinstance(v, int) and abs(v) > RENDER_CHARACTERS for v in (*args, *kwargs.values())):
        raise jinja2.exceptions.SecurityError("the chat template asks for a value beyond the output limit")


def _bounded_filter(filter_function):
    @functools.wraps(filter_function)
    def bounded(*args, **kwargs):
        _check_sizes(args[1:], kwargs)
        return filter_function(*args, **kwargs)

    return bounded


class _TooLong(Exception):
    pass


def render_bounded(template: jinja2.Template, context: dict) -> str:
    """Render within RENDER_SECONDS and RENDER_CHARACTERS, and turn every failure into one line: the
    template is the checkpoint's code, run on the caller's thread, and must neither hang nor flood it.
    The deadline is checked on each line the template's compiled code runs (a trace on this thread)."""
    deadline = time.monotonic() + RENDER_SECONDS

    def each_line(frame, event, arg):
        if time.monotonic() > deadline:
            raise _TooLong(f"it ran for more than {RENDER_SECONDS:.0f} s")
        return each_line

    def trace(frame, event, arg):
        return each_line if frame.f_code.co_filename == TEMPLATE_FILE else None

    previous, pieces, size = sys.gettrace(), [], 0
    sys.settrace(trace)
    try:
        for piece in template.generate(**context):
            size += len(piece)
            if size > RENDER_CHARACTERS:
                raise _TooLong(f"it wrote more than {RENDER_CHARACTERS} characters")
            pieces.append(piece)
    except _TooLong as error:
        raise LocalMoEError(f"the chat template was stopped: {error}") from None
    except jinja2.TemplateError as error:
        raise LocalMoEError(f"the chat template refused the conversation: {_one_line(error)}") from None
    except RecursionError:
        raise LocalMoEError("the chat template failed: it recursed without end") from None
    except Exception as error:  # the template is code from the checkpoint: any failure is its own
        raise LocalMoEError(f"the chat template failed: {type(error).__name__}: {_one_line(error)}") from None
    finally:
        sys.settrace(previous)
    return "".join(pieces)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300]


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    """Compile in the sandbox transformers uses, with the helpers real templates call."""
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(function) for name, function in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as error:
        raise LocalMoEError(f"the checkpoint's chat template does not parse (line {error.lineno}: {error})") from None


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Unlike jinja2's own filter: no HTML escaping, and json.dumps' spacing, as transformers renders it.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


class StopStrings:
    """Cuts streamed text at the first user stop string, which is never printed.

    Text that might be the start of a stop string is held back until the next piece settles it.
    """

    def __init__(self, stops: Iterable[str]):
        self.stops = [stop for stop in stops if stop]
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text
        self._pending = ""

    def feed(self, piece: str) -> str:
        """The part of the text so far that is safe to print; sets `stopped` at a stop string."""
        text = self._pending + piece
        hits = [(i, stop) for stop in self.stops if (i := text.find(stop)) >= 0]
        if hits:
            at, self.matched = min(hits)
            self.stopped, self._pending = True, ""
            return text[:at]
        hold = max((n for stop in self.stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """What was held back, once the text has ended without a stop string."""
        rest, self._pending = self._pending, ""
        return rest
