"""Requests of the OpenAI (chat completions, completions) and Anthropic (messages) APIs, checked whole
into one `GenerationRequest` before anything is queued.

No field is silently ignored: each is either carried out as its API defines it, or answered 400 with
its name; a field that has no effect here is accepted only at its neutral value (`store: false`,
`n: 1`). Unknown fields are refused too, as is every wrong type: a 400, never a 500.
"""

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from localmoe.errors import LocalMoEError


class BadRequest(LocalMoEError):
    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


@dataclass
class GenerationRequest:
    """What to generate and how to answer, in one shape for the three endpoints."""

    api: str  # "chat", "completions" or "messages"
    messages: list[dict] | None = None  # as chat templates take them
    prompt: str | None = None
    tools: list[dict] | None = None  # OpenAI's function tools, the shape chat templates take
    template_kwargs: dict = field(default_factory=dict)
    sampling: dict = field(default_factory=dict)  # overrides of the checkpoint's sampling defaults
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    top_logprobs: int | None = None  # None: no log-probabilities; k: the chosen token's and the k best
    json_schema: dict | None = None  # the output must be JSON this validates ({"type": "object"}: any object)
    one_tool_call: bool = False  # parallel_tool_calls: false
    echo: bool = False
    user: str | None = None  # for the request's log line


class Body:
    """A request body read field by field; what is left unread at the end is refused."""

    def __init__(self, body: Any):
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        self.body, self.read = body, set()

    def get(self, key: str, check: Callable[[str, Any], Any] | None = None, default: Any = None) -> Any:
        self.read.add(key)
        value = self.body.get(key)
        if value is None:
            return default
        return check(key, value) if check else value

    def neutral(self, key: str, *allowed: Any, why: str) -> None:
        """A field with no effect here: accepted only when absent, null or one of `allowed`."""
        value = self.get(key)
        if value is not None and value not in allowed:
            raise BadRequest(f"'{key}' is not supported: {why}", param=key)

    def finish(self) -> None:
        unknown = sorted(set(self.body) - self.read)
        if unknown:
            raise BadRequest(f"unknown field '{unknown[0]}': localmoe does not implement it", param=unknown[0])


def number(low: float, high: float) -> Callable[[str, Any], float]:
    def check(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise BadRequest(f"'{key}' must be a number", param=key)
        if not low <= value <= high:
            raise BadRequest(f"'{key}' must be from {low} to {high}", param=key)
        return float(value)

    return check


def integer(low: int, high: int) -> Callable[[str, Any], int]:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(f"'{key}' must be an integer", param=key)
        if not low <= value <= high:
            raise BadRequest(f"'{key}' must be from {low} to {high}", param=key)
        return value

    return check


def boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"'{key}' must be true or false", param=key)
    return value


def text(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"'{key}' must be a string", param=key)
    return value


def obj(key: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise BadRequest(f"'{key}' must be an object", param=key)
    return value


def stop_strings(limit: int) -> Callable[[str, Any], list[str]]:
    def check(key: str, value: Any) -> list[str]:
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > limit:
            raise BadRequest(f"'{key}' must be a string or a list of at most {limit} non-empty strings", param=key)
        return stops

    return check


SEED = integer(-(2**63), 2**64 - 1)


def _sampling(body: Body, request: GenerationRequest, openai: bool) -> None:
    """The sampling fields: OpenAI's, and the extensions vLLM and llama.cpp also take."""
    ranges = {"temperature": (0, 2) if openai else (0, 1), "top_p": (0, 1), "min_p": (0, 1)}
    for key, (low, high) in ranges.items():
        request.sampling[key] = body.get(key, number(low, high))
    if request.sampling["top_p"] == 0:
        raise BadRequest("'top_p' must be above 0", param="top_p")
    request.sampling["top_k"] = body.get("top_k", integer(-1, 2**31))
    if request.sampling["top_k"] == -1:  # vLLM's spelling of "off"
        request.sampling["top_k"] = 0
    request.sampling["repetition_penalty"] = body.get("repetition_penalty", number(1e-6, 1e6))
    if openai:
        for key in ("presence_penalty", "frequency_penalty"):
            request.sampling[key] = body.get(key, number(-2, 2))
        request.sampling["seed"] = body.get("seed", SEED)
        bias = body.get("logit_bias", obj)
        if bias is not None:
            request.sampling["logit_bias"] = _logit_bias(bias)


def _logit_bias(bias: dict) -> tuple[tuple[int, float], ...]:
    pairs = []
    for token, value in bias.items():
        if not token.isdigit() or isinstance(value, bool) or not isinstance(value, int | float):
            raise BadRequest("'logit_bias' maps token ids (as strings) to numbers", param="logit_bias")
        if not -100 <= value <= 100:
            raise BadRequest("'logit_bias' values must be from -100 to 100", param="logit_bias")
        pairs.append((int(token), float(value)))
    return tuple(pairs)


def _response_format(value: Any) -> dict | None:
    """json_object: any JSON object; json_schema: JSON that the schema validates; text: free text."""
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise BadRequest("'response_format' must have type text, json_object or json_schema", param="response_format")
    if value["type"] == "text":
        return None
    if value["type"] == "json_object":
        return {"type": "object"}
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise BadRequest("'response_format.json_schema' must be an object with a 'schema'", param="response_format")
    return spec.get("schema") or {}


def _tools(value: Any) -> list[dict]:
    if not isinstance(value, list):
        raise BadRequest("'tools' must be a list", param="tools")
    for tool in value:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise BadRequest("each tool must be {'type': 'function', 'function': {...}}", param="tools")
        if not isinstance(function.get("name"), str) or not isinstance(function.get("parameters", {}), dict):
            raise BadRequest("each tool function needs a 'name' and object 'parameters'", param="tools")
    return value


def _tool_choice(body: Body, tools: list[dict] | None, key: str = "tool_choice") -> list[dict] | None:
    """auto (the default) lets the model call tools, none keeps them from the prompt; forcing a call is
    refused: it would need the call syntax as a grammar."""
    choice = body.get(key)
    if choice is None or choice == "auto" or (isinstance(choice, dict) and choice.get("type") == "auto"):
        return tools
    if choice == "none" or (isinstance(choice, dict) and choice.get("type") == "none"):
        return None
    raise BadRequest(f"'{key}' {choice!r} is not supported: use auto or none", param=key)


def _openai_message(message: Any) -> dict:
    if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant", "tool"):
        raise BadRequest("each message needs a 'role' of system, developer, user, assistant or tool", param="messages")
    role, content = message["role"], message.get("content")
    if content is None and not (role == "assistant" and message.get("tool_calls")):
        raise BadRequest(f"a {role} message needs 'content'", param="messages")
    out = {"role": "system" if role == "developer" else role, "content": _content(content)}
    if role == "assistant" and message.get("tool_calls") is not None:
        out["tool_calls"] = _message_tool_calls(message["tool_calls"])
    if role == "tool":
        out["tool_call_id"] = message.get("tool_call_id", None)
        if not isinstance(out["tool_call_id"], str):
            raise BadRequest("a tool message needs its 'tool_call_id'", param="messages")
    if isinstance(message.get("name"), str):
        out["name"] = message["name"]
    return out


def _content(content: Any) -> str:
    """Message content as text: a string, or a list of text parts; other parts (images) are refused."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in content):
            raise BadRequest("only text content parts are supported", param="messages")
        return "".join(part["text"] for part in content)
    raise BadRequest("message content must be a string or a list of text parts", param="messages")


def _message_tool_calls(calls: Any) -> list[dict]:
    good = isinstance(calls, list) and all(
        isinstance(c, dict)
        and isinstance(c.get("function"), dict)
        and isinstance(c["function"].get("name"), str)
        and isinstance(c["function"].get("arguments", ""), str)
        for c in calls
    )
    if not good:
        raise BadRequest("'tool_calls' must be a list of {'id', 'type', 'function': {'name', 'arguments'}}")
    return [{"id": c.get("id"), "type": "function", "function": dict(c["function"])} for c in calls]


def _common_openai(body: Body, request: GenerationRequest) -> None:
    _sampling(body, request, openai=True)
    request.stop = body.get("stop", stop_strings(4), [])
    request.stream = body.get("stream", boolean, False)
    options = body.get("stream_options", obj)
    if options is not None:
        if not request.stream:
            raise BadRequest("'stream_options' needs 'stream': true", param="stream_options")
        if set(options) - {"include_usage", "include_obfuscation"}:
            raise BadRequest("'stream_options' takes include_usage", param="stream_options")
        request.include_usage = boolean("stream_options.include_usage", options.get("include_usage", False))
        if options.get("include_obfuscation"):
            raise BadRequest("'stream_options.include_obfuscation' is not supported", param="stream_options")
    body.neutral("n", 1, why="one choice per request (send several requests)")
    request.user = body.get("user", text)
    body.neutral("service_tier", "auto", "default", why="there is one tier here")
    body.neutral("store", False, why="localmoe stores no completions")
    body.neutral("metadata", {}, why="localmoe stores no completions to attach metadata to")


def parse_chat(raw: Any) -> GenerationRequest:
    body, request = Body(raw), GenerationRequest("chat")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", param="messages")
    request.messages = [_openai_message(m) for m in messages]
    body.get("model")
    _common_openai(body, request)
    tokens = body.get("max_completion_tokens", integer(1, 2**31)) or body.get("max_tokens", integer(1, 2**31))
    body.read.add("max_tokens")
    request.max_tokens = tokens
    if body.get("logprobs", boolean, False):
        request.top_logprobs = body.get("top_logprobs", integer(0, 20), 0)
    elif body.get("top_logprobs") is not None:
        raise BadRequest("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    request.json_schema = body.get("response_format", lambda k, v: _response_format(v))
    request.tools = _tool_choice(body, body.get("tools", lambda k, v: _tools(v)))
    request.one_tool_call = not body.get("parallel_tool_calls", boolean, True)
    effort = body.get("reasoning_effort", text)
    if effort is not None:
        request.template_kwargs["reasoning_effort"] = effort
    for key, why in (
        ("functions", "use 'tools'"),
        ("function_call", "use 'tool_choice'"),
        ("audio", "text only"),
        ("prediction", "no speculative decoding here"),
        ("web_search_options", "no web search here"),
        ("verbosity", "no checkpoint template takes it"),
        ("moderation", "no moderation here"),
        ("prompt_cache_key", "localmoe keeps no prompt cache between requests"),
        ("prompt_cache_retention", "localmoe keeps no prompt cache between requests"),
        ("prompt_cache_options", "localmoe keeps no prompt cache between requests"),
        ("safety_identifier", "use 'user'"),
    ):
        body.neutral(key, why=why)
    body.neutral("modalities", ["text"], why="text only")
    body.finish()
    return request


def parse_completion(raw: Any) -> GenerationRequest:
    body, request = Body(raw), GenerationRequest("completions")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("'prompt' must be a non-empty string (one prompt per request)", param="prompt")
    request.prompt = prompt
    body.get("model")
    _common_openai(body, request)
    request.max_tokens = body.get("max_tokens", integer(1, 2**31), 16)
    request.top_logprobs = body.get("logprobs", integer(0, 5))
    request.echo = body.get("echo", boolean, False)
    if request.echo and request.top_logprobs is not None:
        raise BadRequest(
            "'echo' with 'logprobs' would need the prompt's log-probabilities: not supported", param="echo"
        )
    body.neutral("best_of", 1, why="one choice per request")
    body.neutral("suffix", "", why="no fill-in-the-middle here")
    body.finish()
    return request


# Anthropic Messages


def _anthropic_content(content: Any, role: str) -> tuple[str, list[dict], list[dict]]:
    """A message's text, its tool_use blocks (assistant) and tool_result blocks (user)."""
    if isinstance(content, str):
        return content, [], []
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise BadRequest("message content must be a string or a list of content blocks", param="messages")
    texts, uses, results = [], [], []
    for block in content:
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use" and role == "assistant" and isinstance(block.get("name"), str):
            uses.append(block)
        elif kind == "tool_result" and role == "user" and isinstance(block.get("tool_use_id"), str):
            results.append(block)
        else:
            raise BadRequest(f"content block {kind!r} is not supported in a {role} message", param="messages")
    return "".join(texts), uses, results


def _anthropic_messages(messages: Any, system: str | None) -> list[dict]:
    """Anthropic's conversation as OpenAI-shaped messages: tool_use blocks become tool_calls,
    tool_result blocks become tool messages."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", param="messages")
    out = [{"role": "system", "content": system}] if system else []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise BadRequest("each message needs a 'role' of user or assistant", param="messages")
        if "content" not in message:
            raise BadRequest("each message needs 'content'", param="messages")
        role = message["role"]
        content, uses, results = _anthropic_content(message["content"], role)
        for result in results:
            out.append({"role": "tool", "tool_call_id": result["tool_use_id"], "content": _result_text(result)})
        if role == "assistant" and uses:
            calls = [_use_as_call(use) for use in uses]
            out.append({"role": "assistant", "content": content, "tool_calls": calls})
        elif content or not results:
            out.append({"role": role, "content": content})
    return out


def _use_as_call(use: dict) -> dict:
    return {
        "id": use.get("id"),
        "type": "function",
        "function": {"name": use["name"], "arguments": json.dumps(use.get("input") or {}, ensure_ascii=False)},
    }


def _result_text(result: dict) -> str:
    content = result.get("content", "")
    if isinstance(content, str):
        return content
    text, _, _ = _anthropic_content(content, "user")
    return text


def _anthropic_tools(value: Any) -> list[dict]:
    if not isinstance(value, list):
        raise BadRequest("'tools' must be a list", param="tools")
    tools = []
    for tool in value:
        if (
            not isinstance(tool, dict)
            or not isinstance(tool.get("name"), str)
            or tool.get("type") not in (None, "custom")
        ):
            raise BadRequest(
                "each tool needs a 'name' and an 'input_schema' (server tools are not supported)", param="tools"
            )
        schema = tool.get("input_schema", {})
        if not isinstance(schema, dict):
            raise BadRequest("a tool's 'input_schema' must be an object", param="tools")
        function = {"name": tool["name"], "parameters": schema}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        tools.append({"type": "function", "function": function})
    return tools


def parse_messages(raw: Any) -> GenerationRequest:
    body, request = Body(raw), GenerationRequest("messages")
    request.max_tokens = body.get("max_tokens", integer(1, 2**31))
    if request.max_tokens is None:
        raise BadRequest("'max_tokens' is required", param="max_tokens")
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        system, _, _ = _anthropic_content(system, "system")
    request.messages = _anthropic_messages(body.get("messages"), system)
    body.get("model")
    _sampling(body, request, openai=False)
    request.stop = body.get("stop_sequences", stop_strings(16), [])
    request.stream = body.get("stream", boolean, False)
    request.tools = _tool_choice(body, body.get("tools", lambda k, v: _anthropic_tools(v)))
    metadata = body.get("metadata", obj, {})
    if set(metadata) - {"user_id"} or not isinstance(metadata.get("user_id", ""), str | None):
        raise BadRequest("'metadata' takes user_id, a string", param="metadata")
    request.user = metadata.get("user_id")
    output = body.get("output_config", obj, {})
    if set(output) - {"format"}:
        raise BadRequest(
            f"'output_config.{sorted(set(output) - {'format'})[0]}' is not supported", param="output_config"
        )
    fmt = output.get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise BadRequest(
                "'output_config.format' must be {'type': 'json_schema', 'schema': {...}}", param="output_config"
            )
        request.json_schema = fmt["schema"]
    thinking = body.get("thinking", obj)
    if thinking is not None and thinking.get("type") != "disabled":
        raise BadRequest(
            "'thinking' is not supported: the chat template decides whether the model reasons", param="thinking"
        )
    body.neutral("service_tier", "auto", "standard_only", why="there is one tier here")
    for key, why in (
        ("cache_control", "localmoe keeps no prompt cache between requests"),
        ("container", "no code execution containers here"),
        ("diagnostics", "no diagnostics here"),
        ("inference_geo", "this server runs where it runs"),
        ("speed", "one speed here"),
        ("user_profile_id", "no user profiles here"),
        ("workspace_id", "no workspaces here"),
    ):
        body.neutral(key, why=why)
    body.finish()
    return request
