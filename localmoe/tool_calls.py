"""Tool calls in the model's own syntax: which syntax a checkpoint speaks (read from its chat template),
and a streaming parser that splits the output into text and OpenAI-style tool calls.

Each format's syntax is the one its family's chat template renders for an assistant turn with
tool_calls, which is what the model was trained to write; the same syntaxes are parsed by vLLM's
and SGLang's tool parsers (hermes, qwen3_coder, glm45, deepseek_v3, deepseek_v31, kimi_k2, mistral,
llama4_json, minimax, minimax_m2; gpt-oss's harmony format by openai_harmony):

- hermes (Qwen2.5, Qwen3, Hunyuan): <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>
- qwen3_coder (Qwen3-Coder, Qwen3.5): <tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>
  \\n</function>\\n</tool_call>
- glm45 (GLM-4.5 to 4.7, GLM-5): <tool_call>NAME\\n<arg_key>KEY</arg_key>\\n<arg_value>VALUE</arg_value>
  \\n</tool_call>
- deepseek_v3: <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```
  <｜tool▁call▁end｜><｜tool▁calls▁end｜>
- deepseek_v31 (V3.1, V3.2): <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>...
- kimi_k2: <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:INDEX<|tool_call_argument_begin|>
  {...}<|tool_call_end|><|tool_calls_section_end|>
- mistral (v11+ tokenizers: Mistral Small 3.1+, Mistral Small 4): [TOOL_CALLS]NAME[ARGS]{...}, once per call;
  mistral_v3 (older): [TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]
- llama4: <|python_start|>{"name": ..., "parameters": {...}}<|python_end|> (the tags may be left out)
- minimax (MiniMax-Text-01, M1): <tool_calls>\\n{"name": ..., "arguments": {...}}\\n...</tool_calls>
- minimax_m2: <minimax:tool_call>\\n<invoke name="NAME">\\n<parameter name="KEY">VALUE</parameter>\\n</invoke>
  \\n</minimax:tool_call>
- harmony (gpt-oss): messages <|channel|>CHANNEL[ to=functions.NAME][ <|constrain|>json]<|message|>BODY
  ended by <|end|>, <|call|> or <|return|>; `final` is the answer, `analysis` the reasoning, a message
  to functions.NAME a call with BODY as its arguments.
"""

import contextlib
import json
import re
import secrets
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from localmoe.errors import LocalMoEError


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: call_id())

    def openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def call_id() -> str:
    """Nine letters and digits: Mistral's templates refuse any other shape, the others take anything."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


@dataclass
class Parsed:
    """What a piece of output adds: answer text, reasoning text, and calls now complete."""

    text: str = ""
    reasoning: str = ""
    calls: list[ToolCall] = field(default_factory=list)


def _json_arguments(value) -> str:
    return json.dumps(value if value is not None else {}, ensure_ascii=False)


def _typed(value: str, name: str, key: str, tools: list[dict]) -> object:
    """An XML-style argument's value: text where the tool's schema says string, else JSON when it parses."""
    for tool in tools:
        function = tool.get("function", {})
        if function.get("name") == name:
            schema = (function.get("parameters") or {}).get("properties", {}).get(key, {})
            if schema.get("type") == "string":
                return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _name_and_arguments(objects: list) -> list[ToolCall]:
    calls = []
    for obj in objects:
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            arguments = obj.get("arguments", obj.get("parameters"))
            calls.append(ToolCall(obj["name"], arguments if isinstance(arguments, str) else _json_arguments(arguments)))
    return calls


def _json_objects(text: str) -> list:
    """The JSON values in `text`, one after another from the first `{` or `[` (a list's items count
    one by one), up to the first that does not parse: an unfinished one is not read from inside."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while (start := _next_json(text, at)) is not None:
        try:
            value, at = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            break
        values.extend(value if isinstance(value, list) else [value])
    return values


def _next_json(text: str, at: int) -> int | None:
    starts = [i for i in (text.find("{", at), text.find("[", at)) if i >= 0]
    return min(starts) if starts else None


def _json_blocks(opening: str, closing: str) -> Callable[[str, list[dict], bool], list[ToolCall]]:
    """Calls written as JSON objects ({"name", "arguments"}) between two tags, one or more per block."""
    blocks = re.compile(re.escape(opening) + "(.*?)" + re.escape(closing), re.DOTALL)

    def read(region: str, tools: list[dict], final: bool) -> list[ToolCall]:
        return _name_and_arguments([obj for block in blocks.findall(region) for obj in _json_objects(block)])

    return read


def _xml_calls(call: str, parameter: str) -> Callable[[str, list[dict], bool], list[ToolCall]]:
    """Calls written as markup: `call` finds (name, body) pairs, `parameter` (key, value) pairs in a body;
    values are typed by the tool's schema."""
    calls, parameters = re.compile(call, re.DOTALL), re.compile(parameter, re.DOTALL)

    def read(region: str, tools: list[dict], final: bool) -> list[ToolCall]:
        found = []
        for name, body in calls.findall(region):
            name = name.strip()
            arguments = {k.strip(): _typed(v.strip(), name, k.strip(), tools) for k, v in parameters.findall(body)}
            found.append(ToolCall(name, _json_arguments(arguments)))
        return found

    return read


def _deepseek_v3(region: str, tools: list[dict], final: bool) -> list[ToolCall]:
    found = re.findall(
        r"<｜tool▁call▁begin｜>.*?<｜tool▁sep｜>(.*?)\n```json\n(.*?)\n```<｜tool▁call▁end｜>", region, re.DOTALL
    )
    return [ToolCall(name.strip(), arguments.strip()) for name, arguments in found]


def _deepseek_v31(region: str, tools: list[dict], final: bool) -> list[ToolCall]:
    found = re.findall(r"<｜tool▁call▁begin｜>(.*?)<｜tool▁sep｜>(.*?)<｜tool▁call▁end｜>", region, re.DOTALL)
    return [ToolCall(name.strip(), arguments.strip()) for name, arguments in found]


def _kimi_k2(region: str, tools: list[dict], final: bool) -> list[ToolCall]:
    found = re.findall(
        r"<\|tool_call_begin\|>(.*?)<\|tool_call_argument_begin\|>(.*?)<\|tool_call_end\|>", region, re.DOTALL
    )
    calls = []
    for ident, arguments in found:
        ident = ident.strip()  # functions.NAME:INDEX, which Kimi's template writes back as the call's id
        name = ident.split(".", 1)[-1].rsplit(":", 1)[0]
        calls.append(ToolCall(name, arguments.strip(), ident))
    return calls


def _mistral(region: str, tools: list[dict], final: bool) -> list[ToolCall]:
    calls = []
    for part in region.split("[TOOL_CALLS]")[1:]:
        name, sep, arguments = part.partition("[ARGS]")
        if sep and (complete := _json_objects(arguments)):  # its object has closed
            calls.append(ToolCall(name.strip(), _json_arguments(complete[0])))
    return calls


def _json_after_marker(region: str, tools: list[dict], final: bool) -> list[ToolCall]:
    """Formats whose calls are JSON objects after a marker, complete only once the output ends."""
    return _name_and_arguments(_json_objects(region)) if final else []


def _mistral_v3(region: str, tools: list[dict], final: bool) -> list[ToolCall]:
    return _json_after_marker(region.replace("[TOOL_CALLS]", ""), tools, final)  # its brackets are no JSON


@dataclass(frozen=True)
class ToolFormat:
    """One family's tool-call syntax: how to recognise its chat template, where calls start in the
    output, the marker tokens the parser must see (kept when decoding), and how to read the calls."""

    name: str
    template_has: tuple[str, ...]  # every one of these is in the chat template
    starts: tuple[str, ...]  # calls begin at the first of these in the output
    markers: tuple[str, ...]
    read: Callable[[str, list[dict], bool], list[ToolCall]]
    arguments_as_text: bool = False  # the template concatenates the arguments: give it JSON text, not a dict


DEEPSEEK_MARKERS = (
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
)

# Most specific first: glm45 and qwen3_coder also write <tool_call>, minimax_m2 also writes <invoke.
FORMATS = (
    ToolFormat(
        "kimi_k2",
        ("<|tool_calls_section_begin|>",),
        ("<|tool_calls_section_begin|>", "<|tool_call_begin|>"),
        (
            "<|tool_calls_section_begin|>",
            "<|tool_calls_section_end|>",
            "<|tool_call_begin|>",
            "<|tool_call_argument_begin|>",
            "<|tool_call_end|>",
        ),
        _kimi_k2,
    ),
    ToolFormat(
        "deepseek_v3",
        ("<｜tool▁calls▁begin｜>", "```json"),
        ("<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>"),
        DEEPSEEK_MARKERS,
        _deepseek_v3,
        arguments_as_text=True,
    ),
    ToolFormat(
        "deepseek_v31",
        ("<｜tool▁calls▁begin｜>",),
        ("<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>"),
        DEEPSEEK_MARKERS,
        _deepseek_v31,
        arguments_as_text=True,
    ),
    ToolFormat(
        "minimax_m2",
        ("<minimax:tool_call>",),
        ("<minimax:tool_call>",),
        ("<minimax:tool_call>", "</minimax:tool_call>"),
        _xml_calls(r'<invoke name="([^"]+)">(.*?)</invoke>', r'<parameter name="([^"]+)">(.*?)</parameter>'),
    ),
    ToolFormat(
        "minimax",
        ("<tool_calls>",),
        ("<tool_calls>",),
        ("<tool_calls>", "</tool_calls>"),
        _json_blocks("<tool_calls>", "</tool_calls>"),
    ),
    ToolFormat(
        "glm45",
        ("<tool_call>", "<arg_key>"),
        ("<tool_call>",),
        ("<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"),
        _xml_calls(r"<tool_call>([^<]*)(.*?)</tool_call>", r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>"),
    ),
    ToolFormat(
        "qwen3_coder",
        ("<tool_call>", "<function="),
        ("<tool_call>",),
        ("<tool_call>", "</tool_call>"),
        _xml_calls(r"<function=([^>\n]+)>(.*?)</function>", r"<parameter=([^>\n]+)>(.*?)</parameter>"),
    ),
    ToolFormat(
        "hermes",
        ("<tool_call>",),
        ("<tool_call>",),
        ("<tool_call>", "</tool_call>"),
        _json_blocks("<tool_call>", "</tool_call>"),
    ),
    ToolFormat("mistral", ("[TOOL_CALLS]", "[ARGS]"), ("[TOOL_CALLS]",), ("[TOOL_CALLS]", "[ARGS]"), _mistral),
    ToolFormat("mistral_v3", ("[TOOL_CALLS]",), ("[TOOL_CALLS]",), ("[TOOL_CALLS]",), _mistral_v3),
    ToolFormat(
        "llama4",
        ("<|python_start|>",),
        ("<|python_start|>", '{"name"'),
        ("<|python_start|>", "<|python_end|>"),
        _json_after_marker,
    ),
)
HARMONY_MARKERS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|call|>", "<|return|>", "<|constrain|>")


def tool_format(template: str | None) -> "ToolFormat | str | None":
    """The tool-call format a chat template speaks: a ToolFormat, "harmony", or None when unknown."""
    if not template:
        return None
    if "<|channel|>" in template and "<|message|>" in template:
        return "harmony"
    return next((f for f in FORMATS if all(marker in template for marker in f.template_has)), None)


class ToolCallParser:
    """Splits streamed output into text and tool calls: text is passed on until a call may start (a
    possible start marker is held back until it is settled), then calls are read as they complete."""

    def __init__(self, fmt: ToolFormat, tools: list[dict]):
        self.fmt, self.tools = fmt, tools
        self.region: str | None = None  # the output from the first start marker on
        self.pending = ""
        self.emitted = 0

    def feed(self, piece: str) -> Parsed:
        if self.region is None:
            text = self.pending + piece
            hits = [i for i in (text.find(start) for start in self.fmt.starts) if i >= 0]
            if not hits:
                hold = _partial_suffix(text, self.fmt.starts)
                self.pending = text[len(text) - hold :] if hold else ""
                return Parsed(text=text[: len(text) - hold])
            self.region, self.pending = text[min(hits) :], ""
            return Parsed(text=text[: min(hits)], calls=self._new_calls(False))
        self.region += piece
        return Parsed(calls=self._new_calls(False))

    def finish(self) -> Parsed:
        if self.region is None:
            rest, self.pending = self.pending, ""
            return Parsed(text=rest)
        return Parsed(calls=self._new_calls(True))

    def _new_calls(self, final: bool) -> list[ToolCall]:
        calls = self.fmt.read(self.region, self.tools, final)
        new = calls[self.emitted :]
        self.emitted = len(calls)
        return new


class HarmonyParser:
    """gpt-oss's harmony output: the `final` channel is the answer, `analysis` the reasoning, a message
    addressed to functions.NAME a call. The generation prompt ends at `<|start|>assistant`, so the
    output starts with a message header."""

    def __init__(self, tools: list[dict]):
        self.buffer = ""
        self.header: str | None = None  # the header of the message whose body is streaming
        self.sent = 0  # characters of that body already passed on

    def feed(self, piece: str) -> Parsed:
        self.buffer += piece
        out = Parsed()
        while True:
            if self.header is None:
                head, sep, rest = self.buffer.partition("<|message|>")
                if not sep:
                    return out
                self.header, self.buffer, self.sent = head, rest, 0
            ends = [i for i in (self.buffer.find(m) for m in ("<|end|>", "<|call|>", "<|return|>")) if i >= 0]
            if not ends:
                self._body(
                    out,
                    self.buffer[
                        : len(self.buffer) - _partial_suffix(self.buffer, ("<|end|>", "<|call|>", "<|return|>"))
                    ],
                    False,
                )
                return out
            body, self.buffer = self.buffer[: min(ends)], self.buffer[min(ends) :].split("|>", 1)[1]
            self._body(out, body, True)
            self.header = None

    def finish(self) -> Parsed:
        out = Parsed()
        if self.header is not None:
            self._body(out, self.buffer, True)
        self.header, self.buffer = None, ""
        return out

    def _body(self, out: Parsed, body: str, complete: bool) -> None:
        header = self.header or ""
        recipient = re.search(r"to=functions\.([^\s<]+)", header)
        if recipient:
            if complete:
                out.calls.append(ToolCall(recipient.group(1), body.strip()))
            return
        new, self.sent = body[self.sent :], len(body)
        if "<|channel|>analysis" in header:
            out.reasoning += new
        else:
            out.text += new


def _partial_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that begins one of `markers`."""
    return max((n for m in markers for n in range(1, len(m)) if text.endswith(m[:n])), default=0)


def output_parser(template: str | None, tools: list[dict] | None) -> "ToolCallParser | HarmonyParser | None":
    """The parser for a request's output: harmony always (its channels are the answer's structure),
    another format when tools are given; a 400-worthy LocalMoEError when tools meet an unknown format."""
    fmt = tool_format(template)
    if fmt == "harmony":
        return HarmonyParser(tools or [])
    if not tools:
        return None
    if fmt is None:
        raise LocalMoEError(
            "tools were given but this checkpoint's chat template uses no tool-call format localmoe knows "
            f"({', '.join(['harmony', *(f.name for f in FORMATS)])})"
        )
    return ToolCallParser(fmt, tools)


def markers(template: str | None) -> tuple[str, ...]:
    """The marker strings to keep when decoding output in the template's format."""
    fmt = tool_format(template)
    if fmt == "harmony":
        return HARMONY_MARKERS
    return fmt.markers if fmt else ()


def template_messages(messages: list[dict], template: str | None) -> Iterator[dict]:
    """Messages as chat templates expect them: a call's arguments as a dict (the transformers
    convention), or as JSON text where the format's template concatenates them."""
    fmt = tool_format(template)
    as_text = isinstance(fmt, ToolFormat) and fmt.arguments_as_text
    for message in messages:
        if not message.get("tool_calls") or as_text:
            yield message
            continue
        calls = []
        for call in message["tool_calls"]:
            function = dict(call.get("function", {}))
            with contextlib.suppress(TypeError, json.JSONDecodeError):  # arguments that are no JSON stay text
                function["arguments"] = json.loads(function.get("arguments") or "{}")
            calls.append({**call, "function": function})
        yield {**message, "tool_calls": calls}
