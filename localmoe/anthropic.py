"""The Anthropic Messages API's response shapes (`POST /v1/messages`): a message with text and tool_use
content blocks, or the same as server-sent events (message_start, content_block_start/delta/stop,
message_delta, message_stop), and Anthropic's error object."""

import json
import uuid
from collections.abc import Iterator

from starlette.responses import JSONResponse

from localmoe.api import BadRequest, GenerationRequest
from localmoe.tool_calls import Parsed, ToolCall

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


def error_response(error: BadRequest) -> JSONResponse:
    kind = ERROR_TYPES.get(error.status, "api_error")
    return JSONResponse({"type": "error", "error": {"type": kind, "message": str(error)}}, status_code=error.status)


def _input(call: ToolCall) -> dict:
    try:
        value = json.loads(call.arguments or "{}")
    except json.JSONDecodeError:
        value = None
    return value if isinstance(value, dict) else {"arguments": call.arguments}


class Reply:
    """One request's answer as a Message, whole or as events; the model's reasoning (a harmony
    analysis channel) is left out, as the request did not ask for thinking blocks."""

    def __init__(self, model: str, spec: GenerationRequest, parser, prompt_tokens: int):
        self.model, self.spec, self.parser, self.prompt_tokens = model, spec, parser, prompt_tokens
        self.id = "msg_" + uuid.uuid4().hex
        self.text, self.calls = [], []
        self.usage: dict | None = None
        self.block: str | None = None  # the type of the content block open in the stream
        self.blocks = 0

    def _parse(self, piece: str | None) -> Parsed:
        if self.parser is None:
            return Parsed(text=piece or "")
        return self.parser.feed(piece) if piece is not None else self.parser.finish()

    def add(self, piece: str, entries: list[dict]) -> Parsed:
        parsed = self._parse(piece)
        self.text.append(parsed.text)
        self.calls.extend(parsed.calls)
        return parsed

    def _stop(self, finish: str, usage: dict, matched: str | None) -> tuple[str, str | None]:
        self.usage = usage
        if finish == "length":
            return "max_tokens", None
        if matched is not None:
            return "stop_sequence", matched
        return ("tool_use" if self.calls else "end_turn"), None

    def whole(self, finish: str, usage: dict, matched: str | None, entries: list[dict]) -> dict:
        self.add_rest()
        reason, sequence = self._stop(finish, usage, matched)
        text = "".join(self.text)
        content = [{"type": "text", "text": text}] if text or not self.calls else []
        content += [{"type": "tool_use", "id": c.id, "name": c.name, "input": _input(c)} for c in self.calls]
        return self._message(content, reason, sequence, usage["completion_tokens"])

    def add_rest(self) -> Parsed:
        parsed = self._parse(None)
        self.text.append(parsed.text)
        self.calls.extend(parsed.calls)
        return parsed

    def _message(self, content: list, reason: str | None, sequence: str | None, output_tokens: int) -> dict:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": {"input_tokens": self.prompt_tokens, "output_tokens": output_tokens},
        }

    def start(self) -> Iterator[str]:
        yield _event("message_start", {"type": "message_start", "message": self._message([], None, None, 0)})

    def delta(self, piece: str, entries: list[dict]) -> Iterator[str]:
        yield from self._blocks(self.add(piece, entries))

    def _blocks(self, parsed: Parsed) -> Iterator[str]:
        if parsed.text:
            if self.block != "text":
                yield from self._close()
                yield self._open({"type": "text", "text": ""}, "text")
            delta = {"type": "text_delta", "text": parsed.text}
            yield _event(
                "content_block_delta", {"type": "content_block_delta", "index": self.blocks - 1, "delta": delta}
            )
        for call in parsed.calls:
            yield from self._close()
            yield self._open({"type": "tool_use", "id": call.id, "name": call.name, "input": {}}, "tool_use")
            delta = {"type": "input_json_delta", "partial_json": json.dumps(_input(call), ensure_ascii=False)}
            yield _event(
                "content_block_delta", {"type": "content_block_delta", "index": self.blocks - 1, "delta": delta}
            )
            yield from self._close()

    def _open(self, block: dict, kind: str) -> str:
        self.block, self.blocks = kind, self.blocks + 1
        return _event(
            "content_block_start", {"type": "content_block_start", "index": self.blocks - 1, "content_block": block}
        )

    def _close(self) -> Iterator[str]:
        if self.block is not None:
            yield _event("content_block_stop", {"type": "content_block_stop", "index": self.blocks - 1})
            self.block = None

    def end(self, finish: str, usage: dict, matched: str | None, entries: list[dict]) -> Iterator[str]:
        yield from self._blocks(self.add_rest())
        if self.blocks == 0:  # an empty answer is still one (empty) text block, as whole() gives
            yield self._open({"type": "text", "text": ""}, "text")
        yield from self._close()
        reason, sequence = self._stop(finish, usage, matched)
        delta = {"stop_reason": reason, "stop_sequence": sequence}
        yield _event(
            "message_delta",
            {"type": "message_delta", "delta": delta, "usage": {"output_tokens": usage["completion_tokens"]}},
        )
        yield _event("message_stop", {"type": "message_stop"})

    def error(self, message: str) -> str:
        return _event("error", {"type": "error", "error": {"type": "api_error", "message": message}})


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
