"""`localmoe serve`: an OpenAI-compatible HTTP server over one loaded model.

Starlette for routing and server-sent events, served by uvicorn (the `serve` extra): the smallest
standard ASGI stack that does what is needed; FastAPI would add pydantic and request models that
the few endpoints here do not need.

One model, one generation at a time: requests wait in a bounded FIFO queue for a single worker thread
that owns the device; a full queue is answered 429 with Retry-After. A client that goes away while its
answer streams cancels that generation at the next token.
"""

import asyncio
import hmac
import json
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from localmoe.engine import Engine
from localmoe.errors import LocalMoEError, as_flag
from localmoe.runtime.sampling import SamplingParams

RETRY_AFTER_S = 2


REQUEST_FIELDS = {"max_new_tokens": "max_tokens"}  # the setting as a request names it


def for_client(error: LocalMoEError) -> str:
    """An error's message for an HTTP client: settings of a request as its fields, the others as the
    server's start flags, which only whoever runs the server can change."""
    return error.phrased(lambda name: REQUEST_FIELDS.get(name) or f"the server's {as_flag(name)}")


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


def error_response(error: BadRequest, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": str(error), "type": error.kind, "param": error.param, "code": None}}
    return JSONResponse(body, status_code=error.status, headers=headers)


@dataclass
class Job:
    """One request's generation: what to feed, and how the worker talks back to the request."""

    ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Worker(threading.Thread):
    """The only thread that touches the model: takes jobs in order, streams their text back."""

    def __init__(self, engine: Engine, queue_size: int):
        super().__init__(daemon=True, name="localmoe-generation")
        self.engine = engine
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self.totals = {"requests": 0, "cancelled": 0, "prompt_tokens": 0, "generated_tokens": 0}
        self.last_decode_rate = 0.0

    def submit(self, job: Job) -> bool:
        try:
            self.jobs.put_nowait(job)
            return True
        except queue.Full:
            return False

    def run(self) -> None:
        self.engine.use_device()  # the current CUDA device is per thread
        while True:
            job = self.jobs.get()
            if job.cancelled.is_set():
                self.totals["cancelled"] += 1
                continue
            try:
                self._generate(job)
            except LocalMoEError as error:
                job.send("error", for_client(error))
            except Exception as error:  # a bug must not take the server down: report it and go on
                job.send("error", f"internal error: {type(error).__name__}: {error}")

    def _generate(self, job: Job) -> None:
        engine = self.engine
        generated: list[int] = []
        cut = []

        def recorded(tokens: Iterator[int]) -> Iterator[int]:
            for token in tokens:
                if job.cancelled.is_set():  # the client went away: stop at this token
                    cut.append(token)
                    return
                generated.append(token)
                yield token

        ids = engine.generate_ids(job.ids, job.max_tokens, job.sampling)
        for piece in engine.text(recorded(ids), job.stop):
            job.send("text", piece)
        ended_on_eos = bool(generated) and generated[-1] in engine.eos_ids
        completion = len(generated) - ended_on_eos
        self.totals["requests"] += 1
        self.totals["cancelled"] += bool(cut)
        self.totals["prompt_tokens"] += len(job.ids)
        self.totals["generated_tokens"] += len(generated)
        self.last_decode_rate = engine.stats.decode_rate
        finish = "length" if len(generated) == job.max_tokens and not ended_on_eos else "stop"
        usage = {
            "prompt_tokens": len(job.ids),
            "completion_tokens": completion,
            "total_tokens": len(job.ids) + completion,
        }
        job.send("done", finish, usage)


class Server:
    def __init__(self, engine: Engine, model_name: str, api_key: str | None, queue_size: int, max_tokens_limit: int):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.max_tokens_limit = min(max_tokens_limit, engine.plan.context)
        self.worker = Worker(engine, queue_size)
        self.worker.start()
        self.created = int(time.time())

    def app(self) -> Starlette:
        routes = [
            Route("/health", self.health),
            Route("/metrics", self.guarded(self.metrics)),
            Route("/v1/models", self.guarded(self.models)),
            Route("/v1/chat/completions", self.guarded(self.chat_completions), methods=["POST"]),
            Route("/v1/completions", self.guarded(self.completions), methods=["POST"]),
        ]
        return Starlette(routes=routes)

    def guarded(self, handler):
        async def endpoint(request: Request) -> Response:
            if self.api_key is not None:
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                    return error_response(BadRequest("invalid API key", 401, "authentication_error"))
            try:
                return await handler(request)
            except BadRequest as error:
                return error_response(error, {"Retry-After": str(RETRY_AFTER_S)} if error.status == 429 else None)

        return endpoint

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_name})

    async def models(self, request: Request) -> Response:
        model = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "localmoe"}
        return JSONResponse({"object": "list", "data": [model]})

    async def metrics(self, request: Request) -> Response:
        """Prometheus text format: request and token totals, the last decode speed, the expert cache."""
        lines = [f"localmoe_{name}_total {value}" for name, value in self.worker.totals.items()]
        lines += [f"localmoe_decode_tokens_per_second {self.worker.last_decode_rate:.3f}"]
        lines += [f"localmoe_queue_length {self.worker.jobs.qsize()}"]
        if (cache := self.engine.expert_cache()) is not None:
            totals = cache.total
            for name in (
                "uses",
                "hits",
                "misses",
                "prefetch_issued",
                "prefetch_used",
                "prefetch_wasted",
                "bytes_copied",
            ):
                lines.append(f"localmoe_expert_{name}_total {getattr(totals, name)}")
            lines.append(f"localmoe_expert_hit_rate {totals.hit_rate:.4f}")
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def chat_completions(self, request: Request) -> Response:
        body = await self._body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list", param="messages")
        try:
            ids = self.engine.tokenizer.encode_chat([_message(m) for m in messages])
        except LocalMoEError as error:
            raise BadRequest(for_client(error), param="messages") from None
        return await self._answer(request, body, ids, chat=True)

    async def completions(self, request: Request) -> Response:
        body = await self._body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("'prompt' must be a non-empty string", param="prompt")
        return await self._answer(request, body, self.engine.tokenizer.encode(prompt), chat=False)

    async def _body(self, request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        if body.get("model") not in (None, self.model_name):
            raise BadRequest(
                f"model {body['model']!r} is not served here; this server serves {self.model_name!r}", param="model"
            )
        if body.get("n", 1) != 1:
            raise BadRequest("only n=1 is supported", param="n")
        return body

    async def _answer(self, request: Request, body: dict, ids: list[int], chat: bool) -> Response:
        job = Job(ids, self._max_tokens(body, len(ids)), self._sampling(body), _stop(body), asyncio.get_running_loop())
        if not self.worker.submit(job):
            raise BadRequest("the server is busy: too many requests are waiting", 429, "rate_limit_error")
        reply = _Reply(self.model_name, chat)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self._stream(job, reply, include_usage), media_type="text/event-stream")
        text = []
        while True:
            kind, *values = await job.events.get()
            if kind == "text":
                text.append(values[0])
            elif kind == "error":
                raise BadRequest(values[0], 500 if values[0].startswith("internal error") else 400, "server_error")
            else:
                return JSONResponse(reply.whole("".join(text), *values))

    async def _stream(self, job: Job, reply: "_Reply", include_usage: bool) -> AsyncIterator[str]:
        try:
            yield _sse(reply.chunk(first=True))
            while True:
                kind, *values = await job.events.get()
                if kind == "text":
                    yield _sse(reply.chunk(text=values[0]))
                elif kind == "error":
                    yield _sse({"error": {"message": values[0], "type": "server_error", "param": None, "code": None}})
                    break
                else:
                    finish, usage = values
                    yield _sse(reply.chunk(finish=finish))
                    if include_usage:
                        yield _sse({**reply.chunk(), "choices": [], "usage": usage})
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # the client went away, or the answer is complete: either way, stop

    def _max_tokens(self, body: dict, prompt_tokens: int) -> int:
        room = self.engine.plan.context - prompt_tokens
        if room < 1:
            raise BadRequest(
                f"the prompt is {prompt_tokens} tokens and the context is {self.engine.plan.context}: shorten it",
                param="messages",
            )
        asked = body.get("max_completion_tokens", body.get("max_tokens"))
        if asked is None:
            return min(room, self.max_tokens_limit)
        if not isinstance(asked, int) or isinstance(asked, bool) or asked < 1:
            raise BadRequest("'max_tokens' must be a positive integer", param="max_tokens")
        if asked > self.max_tokens_limit:
            raise BadRequest(
                f"'max_tokens' is {asked}; this server allows at most {self.max_tokens_limit}", param="max_tokens"
            )
        if asked > room:
            raise BadRequest(
                f"the prompt ({prompt_tokens} tokens) plus max_tokens ({asked}) exceeds the context of "
                f"{self.engine.plan.context} tokens",
                param="max_tokens",
            )
        return asked

    def _sampling(self, body: dict) -> SamplingParams:
        values = {}
        for key, kind in (("temperature", float), ("top_p", float), ("seed", int)):
            value = body.get(key)
            if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
                raise BadRequest(f"'{key}' must be a number", param=key)
            values[key] = None if value is None else kind(value)
        try:
            return self.engine.sampling(**values)
        except LocalMoEError as error:
            raise BadRequest(for_client(error)) from None


class _Reply:
    """The OpenAI response shapes for one request."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def whole(self, text: str, finish: str, usage: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
        }

    def chunk(self, text: str | None = None, finish: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice]}


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _message(message) -> dict:
    """A chat message as templates expect it: a role and text content (text parts joined)."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise BadRequest("each message needs a 'role' and a 'content'", param="messages")
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise BadRequest("message content must be text", param="messages")
    return {**message, "content": content}


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise BadRequest("'stop' must be a string or a list of at most 4 strings", param="stop")
    return stops
