"""`localmoe serve`: the OpenAI (chat completions, completions) and Anthropic (messages) HTTP APIs over
one loaded model.

Starlette for routing and server-sent events, served by uvicorn (the `serve` extra): the smallest
standard ASGI stack that does what is needed; FastAPI would add pydantic and request models that
the few endpoints here do not need.

One model, one generation at a time: requests wait in a bounded FIFO queue for a single worker thread
that owns the device; a full queue is answered 429 with Retry-After. A request is checked whole (its
fields, its prompt rendered and counted, its schema compiled) before it is queued, and that work runs
off the event loop. A client that goes away, streaming or not, cancels its generation at the next token.
"""

import asyncio
import hmac
import ipaddress
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from localmoe import anthropic
from localmoe.api import BadRequest, GenerationRequest, parse_chat, parse_completion, parse_messages
from localmoe.engine import Engine
from localmoe.errors import LocalMoEError, as_flag
from localmoe.runtime.sampling import Constraint, SamplingParams, StepLogprobs
from localmoe.runtime.speculative import SpeculationStats
from localmoe.tokenizer import StopStrings
from localmoe.tool_calls import HarmonyParser, Parsed, ToolCallParser, markers, output_parser, template_messages

RETRY_AFTER_S = 2
TOTALS = {
    "accepted": "requests queued for generation",
    "requests": "generations finished",
    "cancelled": "generations cancelled because the client went away",
    "prompt_tokens": "prompt tokens fed to the model",
    "generated_tokens": "tokens generated",
}
log = logging.getLogger("localmoe.server")
REQUEST_FIELDS = {"max_new_tokens": "max_tokens"}  # the setting as a request names it


def for_client(error: LocalMoEError) -> str:
    """An error's message for an HTTP client: settings of a request as its fields, the others as the
    server's start flags, which only whoever runs the server can change."""
    return error.phrased(lambda name: REQUEST_FIELDS.get(name) or f"the server's {as_flag(name)}")


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
    constraint: Constraint | None = None
    top_logprobs: int | None = None
    keep: frozenset[int] = frozenset()  # special tokens the output parser must see
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
        self.totals = {"accepted": 0, "requests": 0, "cancelled": 0, "prompt_tokens": 0, "generated_tokens": 0}
        self.last_decode_rate = 0.0
        self.last_loaded_per_token: float | None = None
        self.speculation = SpeculationStats()  # summed over the requests

    def submit(self, job: Job) -> bool:
        try:
            self.jobs.put_nowait(job)
            self.totals["accepted"] += 1
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

        ids = engine.generate_ids(
            job.ids, job.max_tokens, job.sampling, constraint=job.constraint, top_logprobs=job.top_logprobs
        )
        stops, sent = StopStrings(job.stop), 0
        for piece in engine.text(recorded(ids), stops, job.keep):
            steps = self._steps(sent)
            sent += len(steps)
            job.send("text", piece, self._entries(steps, job.keep))
        ended_on_eos = bool(generated) and generated[-1] in engine.eos_ids
        completion = len(generated) - ended_on_eos
        self.totals["requests"] += 1
        self.totals["cancelled"] += bool(cut)
        self.totals["prompt_tokens"] += len(job.ids)
        self.totals["generated_tokens"] += len(generated)
        self.last_decode_rate = engine.stats.decode_rate
        self.last_loaded_per_token = engine.stats.loaded_per_token
        if engine.stats.speculation is not None:
            self.speculation += engine.stats.speculation
        hit_limit = len(generated) == job.max_tokens and not ended_on_eos and not stops.stopped
        finish = "length" if hit_limit and not engine.sampler.finished else "stop"
        usage = {
            "prompt_tokens": len(job.ids),
            "completion_tokens": completion,
            "total_tokens": len(job.ids) + completion,
        }
        job.send("done", finish, usage, stops.matched, self._entries(self._steps(sent), job.keep))

    def _steps(self, start: int) -> list[StepLogprobs]:
        sampler = self.engine.sampler
        if sampler is None or sampler.top_logprobs is None:
            return []
        return sampler.steps[start:]

    def _entries(self, steps: list[StepLogprobs], keep: frozenset[int]) -> list[dict]:
        """OpenAI's logprobs content for these tokens (EOS tokens, which print nothing, left out)."""
        decode = self.engine.tokenizer.decode
        entries = []
        for step in steps:
            if step.token in self.engine.eos_ids:
                continue
            entries.append(
                {
                    **_token_logprob(decode([step.token], keep), step.logprob),
                    "top_logprobs": [_token_logprob(decode([t], keep), lp) for t, lp in step.top],
                }
            )
        return entries


def _token_logprob(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


class Server:
    def __init__(
        self,
        engine: Engine,
        names: str | list[str],
        api_key: str | None,
        queue_size: int,
        max_tokens_limit: int,
        *,
        max_body: int = 4 * 2**20,
        cors: tuple[str, ...] = (),
        sampling: SamplingParams | None = None,
        stop: tuple[str, ...] = (),
        host: str = "127.0.0.1",
    ):
        """`sampling` and `stop`: the defaults of every request (the checkpoint's and no stop string
        unless given); a request's own fields override them. Listening on a loopback `host`, requests
        must name a loopback host in their Host header (a DNS-rebinding page names its own)."""
        self.loopback_only = is_loopback(host)
        self.engine, self.api_key = engine, api_key
        self.sampling, self.stop = sampling or engine.sampling(), list(stop)
        self.names = [names] if isinstance(names, str) else list(names)
        self.max_tokens_limit = min(max_tokens_limit, engine.plan.context)
        self.max_body, self.cors = max_body, set(cors)
        self.worker = Worker(engine, queue_size)
        self.worker.start()
        self.created = int(time.time())

    def app(self) -> Starlette:
        both = ["POST", "OPTIONS"]
        routes = [
            Route("/health", self.health),
            Route("/metrics", self.guarded(self.metrics)),
            Route("/v1/models", self.guarded(self.models)),
            Route("/v1/chat/completions", self.guarded(self.chat_completions), methods=both),
            Route("/v1/completions", self.guarded(self.completions), methods=both),
            Route("/v1/messages", self.guarded(self.messages, anthropic_errors=True), methods=both),
        ]
        return Starlette(routes=routes)

    def guarded(self, handler, anthropic_errors: bool = False):
        """Browser origins, the API key and the body's type are checked before the handler runs; a
        BadRequest becomes the API's error object, and every request gets one log line."""

        async def endpoint(request: Request) -> Response:
            started, headers = time.perf_counter(), {}
            try:
                headers = self._cors_headers(request)
                if request.method == "OPTIONS":
                    response = Response(status_code=204, headers=headers)
                else:
                    self._check(request)
                    response = await handler(request)
                    response.headers.update(headers)
            except BadRequest as error:
                extra = {"Retry-After": str(RETRY_AFTER_S)} if error.status == 429 else {}
                response = anthropic.error_response(error) if anthropic_errors else error_response(error)
                response.headers.update({**headers, **extra})
            if isinstance(response, StreamingResponse):  # logged once the stream has ended
                response.body_iterator = _logged(response.body_iterator, request, response, started)
            else:
                _log_line(request, response, started)
            return response

        return endpoint

    def _cors_headers(self, request: Request) -> dict:
        """A browser page may only drive this server from an origin that --cors allows: a page elsewhere
        (a DNS-rebinding one included) gets 403 before anything runs."""
        origin = request.headers.get("origin")
        if origin is None:
            return {}
        if origin not in self.cors and "*" not in self.cors:
            raise BadRequest(
                f"origin {origin} is not allowed: start the server with --cors {origin}", 403, "permission_error"
            )
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Headers": "authorization, content-type, x-api-key, anthropic-version",
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Vary": "Origin",
        }

    def _check(self, request: Request) -> None:
        if self.loopback_only and not is_loopback(_host_name(request.headers.get("host", ""))):
            raise BadRequest(
                "this server answers requests for localhost only (the Host header)", 403, "permission_error"
            )
        if self.api_key is not None:
            given = request.headers.get("authorization", "")
            key = request.headers.get("x-api-key")  # Anthropic's clients send the key so
            wanted = f"Bearer {self.api_key}"
            if not hmac.compare_digest(given.encode(), wanted.encode()) and not (
                key is not None and hmac.compare_digest(key.encode(), self.api_key.encode())
            ):
                raise BadRequest("invalid API key", 401, "authentication_error")
        if request.method == "POST":
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                raise BadRequest("the request body must be sent as Content-Type: application/json", 415)

    async def health(self, request: Request) -> Response:
        try:
            headers = self._cors_headers(request)
        except BadRequest as error:
            return error_response(error)
        return JSONResponse({"status": "ok", "model": self.names[0]}, headers=headers)

    async def models(self, request: Request) -> Response:
        data = [{"id": name, "object": "model", "created": self.created, "owned_by": "localmoe"} for name in self.names]
        return JSONResponse({"object": "list", "data": data})

    async def metrics(self, request: Request) -> Response:
        """Prometheus text format: request and token totals, the last decode speed, the expert cache."""
        lines = []

        def metric(name: str, kind: str, what: str, value) -> None:
            lines.extend([f"# HELP {name} {what}", f"# TYPE {name} {kind}", f"{name} {value}"])

        for name, value in self.worker.totals.items():
            what = TOTALS[name]
            metric(f"localmoe_{name}_total", "counter", what, value)
        metric(
            "localmoe_decode_tokens_per_second",
            "gauge",
            "decode speed of the last request",
            f"{self.worker.last_decode_rate:.3f}",
        )
        metric("localmoe_queue_length", "gauge", "requests waiting for the model", self.worker.jobs.qsize())
        if (loaded := self.worker.last_loaded_per_token) is not None:
            what = "experts loaded from outside the slots per decoded token, in the last request"
            metric("localmoe_experts_loaded_per_token", "gauge", what, f"{loaded:.3f}")
        if self.engine.speculative != "off":
            spec = self.worker.speculation
            metric("localmoe_draft_tokens_total", "counter", "tokens drafted for speculative decoding", spec.drafted)
            metric("localmoe_draft_tokens_accepted_total", "counter", "drafted tokens the model kept", spec.accepted)
            metric("localmoe_verifications_total", "counter", "forward passes that checked a draft", spec.verifications)
            name = "localmoe_draft_acceptance_rate"
            lines += [f"# HELP {name} share of the drafts reaching a position whose token there was kept"]
            lines += [f"# TYPE {name} gauge"]
            lines += [f'{name}{{position="{i + 1}"}} {rate:.4f}' for i, rate in enumerate(spec.rates())]
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
                what = f"expert cache {name.replace('_', ' ')} since the server started"
                metric(f"localmoe_expert_{name}_total", "counter", what, getattr(totals, name))
            metric("localmoe_expert_hit_rate", "gauge", "expert cache hits per use", f"{totals.hit_rate:.4f}")
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, parse_chat)

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, parse_completion)

    async def messages(self, request: Request) -> Response:
        return await self._serve(request, parse_messages)

    async def _serve(self, request: Request, parse) -> Response:
        body = await self._body(request)
        spec = parse(body)
        model = body.get("model")
        if model is not None and model not in self.names:
            raise BadRequest(f"model {model!r} is not served here; this server serves {self.names}", param="model")
        loop = asyncio.get_running_loop()
        job, parser = await loop.run_in_executor(None, self._prepare, spec, loop)
        if not self.worker.submit(job):
            raise BadRequest("the server is busy: too many requests are waiting", 429, "rate_limit_error")
        reply = (anthropic.Reply if spec.api == "messages" else OpenAIReply)(
            model or self.names[0], spec, parser, len(job.ids)
        )
        request.state.tokens = lambda: reply.usage
        request.state.user = spec.user
        if spec.stream:
            return StreamingResponse(self._stream(job, reply), media_type="text/event-stream")
        return await self._whole(request, job, reply)

    async def _body(self, request: Request):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise BadRequest(f"the request body is over {self.max_body} bytes (--max-body)", 413)
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body:
                    raise BadRequest(f"the request body is over {self.max_body} bytes (--max-body)", 413)
                chunks.append(chunk)
        except ClientDisconnect:
            raise BadRequest("the client went away while sending its request") from None
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest("the request body is not valid JSON") from None

    def _prepare(self, spec: GenerationRequest, loop) -> tuple[Job, "ToolCallParser | HarmonyParser | None"]:
        """Everything that can refuse a request, off the event loop: the prompt rendered and counted,
        the sampling settings, the output parser, the JSON schema compiled."""
        engine, tokenizer = self.engine, self.engine.tokenizer
        try:
            if spec.messages is not None:
                template = tokenizer.template(spec.tools)
                unused = [key for key in spec.template_kwargs if key not in template]
                if unused:
                    raise BadRequest(
                        f"'{unused[0]}' is not supported: this checkpoint's chat template does not take it",
                        param=unused[0],
                    )
                parser = output_parser(template, spec.tools)
                self._check_length(sum(len(m["content"]) for m in spec.messages) + len(json.dumps(spec.tools or [])))
                messages = list(template_messages(spec.messages, template))
                ids = tokenizer.encode_chat(messages, tools=spec.tools, **spec.template_kwargs)
                keep = tokenizer.special_ids(markers(template)) if parser else frozenset()
            else:
                self._check_length(len(spec.prompt))
                ids, parser, keep = tokenizer.encode(spec.prompt), None, frozenset()
            given = {key: value for key, value in spec.sampling.items() if value is not None}
            sampling = replace(self.sampling, **given)
            sampling.check()
            vocab = engine.model.model.embed_tokens.weight.shape[0]
            if any(token >= vocab for token, _ in sampling.logit_bias):
                raise BadRequest(f"'logit_bias' names a token id beyond the vocabulary of {vocab}", param="logit_bias")
            constraint = engine.json_constraint(spec.json_schema) if spec.json_schema is not None else None
        except BadRequest:
            raise
        except LocalMoEError as error:
            raise BadRequest(for_client(error)) from None
        max_tokens = self._max_tokens(spec.max_tokens, len(ids))
        job = Job(ids, max_tokens, sampling, [*self.stop, *spec.stop], loop, constraint, spec.top_logprobs, keep)
        return job, parser

    def _check_length(self, characters: int) -> None:
        """Refuse a prompt that cannot fit the context before tokenizing it: n characters are at least
        n / (the longest token's length) tokens."""
        context, longest = self.engine.plan.context, self.engine.tokenizer.longest_token
        if characters > context * longest:
            raise BadRequest(
                f"the prompt is {characters} characters, more than the {context}-token context can hold: shorten it",
                param="messages",
            )

    def _max_tokens(self, asked: int | None, prompt_tokens: int) -> int:
        context = self.engine.plan.context
        room = context - prompt_tokens
        if room < 1:
            raise BadRequest(
                f"the prompt is {prompt_tokens} tokens and the context is {context}: shorten it", param="messages"
            )
        if asked is None:
            return min(room, self.max_tokens_limit)
        if asked > self.max_tokens_limit:
            raise BadRequest(
                f"'max_tokens' is {asked}; this server allows at most {self.max_tokens_limit}", param="max_tokens"
            )
        if asked > room:
            raise BadRequest(
                f"the prompt ({prompt_tokens} tokens) plus max_tokens ({asked}) exceeds the {context}-token context",
                param="max_tokens",
            )
        return asked

    async def _whole(self, request: Request, job: Job, reply) -> Response:
        """Wait for the whole answer; a client that disconnects meanwhile cancels its generation (the
        ASGI server's next message after the body is the disconnect)."""
        gone = asyncio.ensure_future(request.receive())
        try:
            while True:
                event = asyncio.ensure_future(job.events.get())
                await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not event.done():
                    event.cancel()
                    job.cancelled.set()
                    raise BadRequest("the client went away", 499)
                kind, *values = event.result()
                if kind == "error":
                    raise BadRequest(values[0], 500 if values[0].startswith("internal error") else 400, "server_error")
                if kind == "text":
                    reply.add(*values)
                else:
                    return JSONResponse(reply.whole(*values))
        finally:
            gone.cancel()

    async def _stream(self, job: Job, reply) -> AsyncIterator[str]:
        try:
            for event in reply.start():
                yield event
            while True:
                kind, *values = await job.events.get()
                if kind == "text":
                    for event in reply.delta(*values):
                        yield event
                elif kind == "error":
                    yield reply.error(values[0])
                    break
                else:
                    for event in reply.end(*values):
                        yield event
                    break
        finally:
            job.cancelled.set()  # the client went away, or the answer is complete: either way, stop


async def _logged(body: AsyncIterator, request: Request, response: Response, started: float) -> AsyncIterator:
    try:
        async for chunk in body:
            yield chunk
    finally:
        _log_line(request, response, started)


def _log_line(request: Request, response: Response, started: float) -> None:
    """One line per request: its id, endpoint, status, tokens and time."""
    usage = getattr(request.state, "tokens", lambda: None)()
    tokens = f" prompt={usage['prompt_tokens']} completion={usage['completion_tokens']}" if usage else ""
    user = getattr(request.state, "user", None)
    log.info(
        "request %s %s %s status=%d%s seconds=%.3f%s",
        uuid.uuid4().hex[:8],
        request.method,
        request.url.path,
        response.status_code,
        tokens,
        time.perf_counter() - started,
        f" user={json.dumps(user)}" if user else "",
    )


class OpenAIReply:
    """The OpenAI response shapes of one request: whole or as server-sent chunks, with tool calls and
    reasoning split from the text by the output parser, and log-probabilities when asked."""

    def __init__(self, model: str, spec: GenerationRequest, parser, prompt_tokens: int):
        self.model, self.spec, self.parser = model, spec, parser
        self.chat = spec.api == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.text, self.reasoning, self.calls, self.logprobs = [], [], [], []
        self.usage: dict | None = None
        if spec.echo:
            self.text.append(spec.prompt)

    def _parse(self, piece: str | None) -> Parsed:
        if self.parser is None:
            return Parsed(text=piece or "")
        parsed = self.parser.feed(piece) if piece is not None else self.parser.finish()
        if self.spec.one_tool_call:
            parsed.calls = parsed.calls[: max(0, 1 - len(self.calls))]
        return parsed

    def add(self, piece: str, entries: list[dict]) -> Parsed:
        parsed = self._parse(piece)
        self.text.append(parsed.text)
        self.reasoning.append(parsed.reasoning)
        self.calls.extend(parsed.calls)
        self.logprobs.extend(entries)
        return parsed

    def _finish(self, finish: str, usage: dict, entries: list[dict]) -> tuple[Parsed, str]:
        parsed = self._parse(None)
        self.text.append(parsed.text)
        self.reasoning.append(parsed.reasoning)
        self.calls.extend(parsed.calls)
        self.logprobs.extend(entries)
        self.usage = usage
        return parsed, "tool_calls" if self.calls and finish == "stop" else finish

    def whole(self, finish: str, usage: dict, matched: str | None, entries: list[dict]) -> dict:
        _, finish = self._finish(finish, usage, entries)
        text = "".join(self.text)
        if self.chat:
            message = {"role": "assistant", "content": text if text or not self.calls else None}
            if reasoning := "".join(self.reasoning):
                message["reasoning_content"] = reasoning
            if self.calls:
                message["tool_calls"] = [call.openai() for call in self.calls]
            choice = {
                "index": 0,
                "message": message,
                "finish_reason": finish,
                "logprobs": self._logprobs(self.logprobs),
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": self._logprobs(self.logprobs), "finish_reason": finish}
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
        }

    def _logprobs(self, entries: list[dict]) -> dict | None:
        if self.spec.top_logprobs is None:
            return None
        if self.chat:
            return {"content": entries}
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": _offsets(entries),
        }

    def _chunk(self, delta: dict | None = None, text: str = "", finish: str | None = None, entries=()) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": delta or {}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish}
        choice["logprobs"] = self._logprobs(list(entries)) if entries else None
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice]}

    def _pieces(self, parsed: Parsed, entries: list[dict]) -> Iterator[str]:
        first = len(self.calls) - len(parsed.calls)
        if self.chat:
            if parsed.reasoning:
                yield _sse(self._chunk({"reasoning_content": parsed.reasoning}))
            if parsed.text or entries:
                yield _sse(self._chunk({"content": parsed.text}, entries=entries))
            for i, call in enumerate(parsed.calls):
                yield _sse(self._chunk({"tool_calls": [call.openai(first + i)]}))
        elif parsed.text or entries:
            yield _sse(self._chunk(text=parsed.text, entries=entries))

    def start(self) -> Iterator[str]:
        if self.chat:
            yield _sse(self._chunk({"role": "assistant", "content": ""}))
        if self.spec.echo:
            yield _sse(self._chunk(text=self.spec.prompt))

    def delta(self, piece: str, entries: list[dict]) -> Iterator[str]:
        yield from self._pieces(self.add(piece, entries), entries)

    def end(self, finish: str, usage: dict, matched: str | None, entries: list[dict]) -> Iterator[str]:
        parsed, finish = self._finish(finish, usage, entries)
        yield from self._pieces(parsed, entries)
        yield _sse(self._chunk(finish=finish))
        if self.spec.include_usage:
            yield _sse({**self._chunk(), "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"

    def error(self, message: str) -> str:
        return _sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})


def _offsets(entries: list[dict]) -> list[int]:
    offsets, at = [], 0
    for entry in entries:
        offsets.append(at)
        at += len(entry["token"])
    return offsets


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _host_name(header: str) -> str:
    """The host of a Host header, without its port: "[::1]:8000" -> "::1", "localhost:8000" -> "localhost"."""
    if header.startswith("["):
        return header[1:].split("]")[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers: a client that opens a
    connection and sends its request line slowly, or nothing, is cut off instead of holding the
    connection (uvicorn itself only times out idle keep-alive connections)."""

    header_timeout = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def _arm(self) -> None:
        waiting_for = self.cycle  # a new request replaces the cycle; the same one at the deadline: none came
        self.loop.call_later(self.header_timeout, self._expire, waiting_for)

    def _expire(self, waiting_for) -> None:
        if self.cycle is waiting_for and not self.transport.is_closing():
            self.transport.close()


def protocol_with_header_timeout(seconds: float) -> type[H11Protocol]:
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": seconds})
