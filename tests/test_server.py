"""`localmoe serve` on a free localhost port, talked to with the official openai client and raw HTTP."""

import http.client
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from click.testing import CliRunner
from conftest import serve_app
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import localmoe
from localmoe.cli import main
from localmoe.engine import RuntimeOptions
from localmoe.server import Server

KEY = "sekret"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def server(chat_model):
    """A real uvicorn server in a thread, with an API key, a queue of 2 and offloaded experts."""
    engine = localmoe.load(str(chat_model), device="cpu", options=RuntimeOptions(expert_slots=6))
    with serve_app(Server(engine, "tiny", KEY, queue_size=2, max_tokens_limit=3500).app()) as port:
        yield port


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def raw(port: int, method: str, path: str, body: bytes | None = None, key: str | None = KEY):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, dict(response.getheaders()), data


def cli_chat_text(chat_model, *flags) -> str:
    result = CliRunner().invoke(
        main,
        [
            "generate",
            str(chat_model),
            "-p",
            "Hello there",
            "--chat",
            "--system",
            "Be brief.",
            "--device",
            "cpu",
            *flags,
        ],
    )
    assert result.exit_code == 0, result.output
    return result.stdout[:-1]  # the newline after the text


def test_chat_equals_localmoe_generate_chat(client, chat_model):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == cli_chat_text(chat_model, "-n", "12", "--temperature", "0")
    assert reply.choices[0].finish_reason == "length"
    engine = localmoe.load(str(chat_model), device="cpu")
    prompt = len(engine.tokenizer.encode_chat(MESSAGES))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
        prompt,
        12,
        prompt + 12,
    )


def test_streamed_chat_is_the_same_text(client):
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 10


def test_stop_strings_cut_the_text(client):
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0)
    text = full.choices[0].message.content
    stop = text[3:5]
    cut = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_reproducible(client):
    def sample(seed):
        reply = client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=12, temperature=1.0, seed=seed
        )
        return reply.choices[0].message.content

    assert sample(11) == sample(11)
    assert len({sample(11), sample(12), sample(13)}) > 1


def test_completions_models_health_metrics(client, server):
    completion = client.completions.create(model="tiny", prompt="Once upon", max_tokens=5, temperature=0)
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 5
    assert [m.id for m in client.models.list()] == ["tiny"]
    status, _, body = raw(server, "GET", "/health", key=None)
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, _, body = raw(server, "GET", "/metrics")
    assert status == 200 and b"localmoe_requests_total" in body and b"localmoe_expert_hit_rate" in body


@pytest.mark.parametrize(
    "body,needle",
    [
        (b"{not json", "not valid JSON"),
        (json.dumps({"model": "tiny", "messages": []}).encode(), "'messages'"),
        (json.dumps({"model": "other", "messages": MESSAGES}).encode(), "is not served here"),
        (json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": 3600}).encode(), "at most 3500"),
        (json.dumps({"model": "tiny", "messages": MESSAGES, "temperature": -1}).encode(), "temperature"),
        (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "word " * 5000}]}).encode(), "context"),
    ],
)
def test_bad_requests_get_400_and_the_server_goes_on(server, client, body, needle):
    status, _, data = raw(server, "POST", "/v1/chat/completions", body)
    assert status == 400
    error = json.loads(data)["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"
    assert (
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices[0].message.content
        is not None
    )


def test_api_key_is_required_except_for_health(server):
    assert raw(server, "GET", "/v1/models", key="wrong")[0] == 401
    assert raw(server, "GET", "/v1/models", key=None)[0] == 401
    assert raw(server, "GET", "/health", key=None)[0] == 200


def test_twenty_clients_queue_or_get_429(server, client):
    def ask(i):
        try:
            reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20, temperature=0)
            return reply.usage.completion_tokens
        except openai.RateLimitError as error:
            assert error.response.headers.get("retry-after")
            return "429"

    with ThreadPoolExecutor(20) as pool:
        outcomes = list(pool.map(ask, range(20)))
    assert "429" in outcomes
    served = [o for o in outcomes if o != "429"]
    assert served and all(o == 20 for o in served)  # every accepted request answered in full


def test_a_client_that_leaves_mid_stream_cancels_its_generation(server, client):
    body = json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": 3000, "stream": True}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", server, timeout=120)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    connection.request("POST", "/v1/chat/completions", body=body, headers=headers)
    response = connection.getresponse()
    assert response.status == 200
    response.readline()  # the stream has started
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens == 3
    _, _, metrics = raw(server, "GET", "/metrics")
    assert b"localmoe_cancelled_total 1" in metrics


# Every request field: changes behaviour as its API defines it, or is refused with a 400 naming it.


def post(port: int, path: str, body, headers: dict | None = None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    sent = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}", **(headers or {})}
    connection.request("POST", path, body=data, headers=sent)
    response = connection.getresponse()
    raw_body = response.read()
    connection.close()
    try:
        return response.status, json.loads(raw_body), dict(response.getheaders())
    except json.JSONDecodeError:
        return response.status, raw_body.decode(), dict(response.getheaders())


def schema_fields(params_module, base: str) -> set[str]:
    import typing

    hints = typing.get_type_hints(getattr(params_module, base + "Base"))
    return set(hints) | set(typing.get_type_hints(getattr(params_module, base + "Streaming")))


def text_of(data) -> str:
    choice = data["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def refused(field):
    return lambda status, data, base: status == 400 and field in json.dumps(data)


def differs(status, data, base):
    return status == 200 and text_of(data) != text_of(base)


def one_token_repeated(text: str, times: int) -> bool:
    return len(text) % times == 0 and text == text[: len(text) // times] * times


def same_as_greedy(status, data, base):
    return status == 200 and text_of(data) == text_of(base)


def completion_tokens(n):
    return lambda status, data, base: status == 200 and data["usage"]["completion_tokens"] == n


def sse_chunks(data: str) -> list[dict]:
    return [json.loads(line[6:]) for line in data.splitlines() if line.startswith("data: {")]


SAMPLED = {"temperature": 1.0, "seed": 1}  # a sampled answer that differs from the greedy one (checked below)
SHARED = {  # fields of both OpenAI endpoints: (what to add to the request, what must then hold)
    "model": ({"model": "other"}, refused("model")),
    "temperature": (SAMPLED, differs),
    "top_p": ({**SAMPLED, "top_p": 1e-6}, same_as_greedy),
    "top_k": ({**SAMPLED, "top_k": 1}, same_as_greedy),
    "min_p": ({**SAMPLED, "min_p": 0.99}, None),  # checked against the sampled answer below
    "seed": ({"temperature": 1.0, "seed": 2}, differs),
    "presence_penalty": ({"presence_penalty": 2.0}, differs),
    "frequency_penalty": ({"frequency_penalty": 2.0}, differs),
    "repetition_penalty": ({"repetition_penalty": 5.0}, differs),
    "logit_bias": ({"logit_bias": {"65": 100}}, lambda s, d, b: s == 200 and one_token_repeated(text_of(d), 24)),
    "max_tokens": ({"max_tokens": 3}, completion_tokens(3)),
    "n": ({"n": 2}, refused("n")),
    "stop": (None, None),  # set from the baseline's text below
    "stream": ({"stream": True}, lambda s, d, b: s == 200 and isinstance(d, str) and "[DONE]" in d),
    "stream_options": (
        {"stream": True, "stream_options": {"include_usage": True}},
        lambda s, d, b: s == 200 and sse_chunks(d)[-1]["usage"]["completion_tokens"] == 24,
    ),
    "user": ({"user": "ada"}, None),  # checked in the log line
}
CHAT_ONLY = {
    "messages": ({"messages": [{"role": "user"}]}, refused("content")),
    "max_completion_tokens": ({"max_completion_tokens": 4}, completion_tokens(4)),
    "logprobs": ({"logprobs": True}, lambda s, d, b: s == 200 and len(d["choices"][0]["logprobs"]["content"]) == 24),
    "top_logprobs": (
        {"logprobs": True, "top_logprobs": 3},
        lambda s, d, b: s == 200 and all(len(e["top_logprobs"]) == 3 for e in d["choices"][0]["logprobs"]["content"]),
    ),
    "response_format": ({"response_format": {"type": "json_object"}}, lambda s, d, b: text_of(d).startswith("{")),
    "tools": ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, refused("tool")),
    "tool_choice": ({"tool_choice": "required"}, refused("tool_choice")),
    "parallel_tool_calls": (None, None),  # test_tool_calls.py: one call of two kept
    "reasoning_effort": ({"reasoning_effort": "low"}, refused("reasoning_effort")),  # this template takes none
    **{
        field: ({field: value}, refused(field))
        for field, value in {
            "audio": {"voice": "alloy", "format": "wav"},
            "modalities": ["text", "audio"],
            "metadata": {"k": "v"},
            "store": True,
            "service_tier": "flex",
            "prediction": {"type": "content", "content": "x"},
            "web_search_options": {},
            "verbosity": "low",
            "moderation": {"type": "auto"},
            "prompt_cache_key": "k",
            "prompt_cache_retention": "24h",
            "prompt_cache_options": {"mode": "x"},
            "safety_identifier": "s",
            "functions": [{"name": "f"}],
            "function_call": "auto",
        }.items()
    },
}
COMPLETION_ONLY = {
    "prompt": ({"prompt": 5}, refused("prompt")),
    "echo": ({"echo": True}, lambda s, d, b: s == 200 and text_of(d) == "Once upon" + text_of(b)),
    "logprobs": ({"logprobs": 2}, lambda s, d, b: s == 200 and len(d["choices"][0]["logprobs"]["tokens"]) == 24),
    "best_of": ({"best_of": 2}, refused("best_of")),
    "suffix": ({"suffix": "end"}, refused("suffix")),
}


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_every_openai_field_changes_behaviour_or_is_refused(server, endpoint, caplog):
    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_params

    if endpoint == "chat":
        path, probes, fields = (
            "/v1/chat/completions",
            {**SHARED, **CHAT_ONLY},
            schema_fields(chat_params, "CompletionCreateParams"),
        )
        base_body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 24, "temperature": 0}
    else:
        path, probes = "/v1/completions", {**SHARED, **COMPLETION_ONLY}
        fields = schema_fields(completion_create_params, "CompletionCreateParams")
        base_body = {"model": "tiny", "prompt": "Once upon", "max_tokens": 24, "temperature": 0}
    extensions = {"top_k", "min_p", "repetition_penalty"}  # vLLM's and llama.cpp's, beyond OpenAI's schema
    assert set(probes) == fields | extensions, "a field of the openai package's schema has no test here"
    status, base, _ = post(server, path, base_body)
    assert status == 200
    status, sampled, _ = post(server, path, {**base_body, **SAMPLED})
    assert differs(status, sampled, base)  # the premise of the probes that sample
    probes["stop"] = (
        {"stop": [text_of(base)[3:5]]},
        lambda s, d, b: s == 200 and text_of(d) == text_of(b)[: text_of(b).index(text_of(b)[3:5])],
    )
    caplog.set_level("INFO", logger="localmoe.server")
    for field, (extra, holds) in probes.items():
        if extra is None:
            continue
        status, data, _ = post(server, path, {**base_body, **extra})
        if field == "user":
            assert status == 200 and 'user="ada"' in caplog.text
        elif field == "min_p":  # a flat random distribution: min_p narrows it, not always to the greedy token
            assert status == 200 and text_of(data) != text_of(sampled)
        else:
            assert holds(status, data, base), (field, status, data)


ANTHROPIC = {
    "max_tokens": (
        {"max_tokens": 3},
        lambda s, d, b: s == 200 and d["usage"]["output_tokens"] == 3 and d["stop_reason"] == "max_tokens",
    ),
    "messages": ({"messages": [{"role": "user"}]}, refused("content")),
    "model": ({"model": "other"}, refused("model")),
    "system": (
        {"system": "Be brief."},
        lambda s, d, b: s == 200 and d["usage"]["input_tokens"] > b["usage"]["input_tokens"],
    ),
    "stop_sequences": (None, None),  # from the baseline's text below
    "stream": ({"stream": True}, lambda s, d, b: s == 200 and "event: message_stop" in d),
    "tools": ({"tools": [{"name": "f", "input_schema": {"type": "object"}}]}, refused("tool")),
    "tool_choice": ({"tool_choice": {"type": "any"}}, refused("tool_choice")),
    "metadata": ({"metadata": {"user_id": "ada"}}, None),  # checked in the log line
    "output_config": (
        {"output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}},
        lambda s, d, b: s == 200 and d["content"][0]["text"].startswith("{"),
    ),
    "thinking": ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, refused("thinking")),
    # one tier of service here: both values it takes ("auto", "standard_only") are what this server does
    "service_tier": ({"service_tier": "standard_only"}, lambda s, d, b: s == 200),
    **{
        field: ({field: value}, refused(field))
        for field, value in {
            "cache_control": {"type": "ephemeral"},
            "container": "c",
            "diagnostics": {"x": 1},
            "inference_geo": "us",
            "speed": "fast",
            "user_profile_id": "p",
            "workspace_id": "w",
        }.items()
    },
    "temperature": ({"temperature": 1.0}, lambda s, d, b: s == 200 and d["content"] != b["content"]),
    "top_k": ({"temperature": 1.0, "top_k": 1}, lambda s, d, b: s == 200 and d["content"] == b["content"]),
    "top_p": ({"temperature": 1.0, "top_p": 1e-6}, lambda s, d, b: s == 200 and d["content"] == b["content"]),
}


def test_every_anthropic_field_changes_behaviour_or_is_refused(server, caplog):
    from anthropic.types import message_create_params

    fields = schema_fields(message_create_params, "MessageCreateParams")
    assert set(ANTHROPIC) == fields | {"temperature", "top_k", "top_p"}, "an anthropic field has no test here"
    base_body = {
        "model": "tiny",
        "max_tokens": 24,
        "messages": [{"role": "user", "content": "Hello there"}],
        "temperature": 0,
    }
    status, base, _ = post(server, "/v1/messages", base_body)
    assert status == 200 and base["stop_reason"] == "max_tokens"
    text = base["content"][0]["text"]
    ANTHROPIC["stop_sequences"] = (
        {"stop_sequences": [text[3:5]]},
        lambda s, d, b: (
            s == 200
            and d["stop_reason"] == "stop_sequence"
            and d["content"][0]["text"] == text[: text.index(text[3:5])]
        ),
    )
    caplog.set_level("INFO", logger="localmoe.server")
    for field, (extra, holds) in ANTHROPIC.items():
        status, data, _ = post(server, "/v1/messages", {**base_body, **extra})
        if field == "metadata":
            assert status == 200 and 'user="ada"' in caplog.text
            continue
        assert holds(status, data, base), (field, status, data)


def test_anthropic_client_streaming_equals_whole(server):
    import anthropic

    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{server}", api_key=KEY, max_retries=0, timeout=120)
    ask = dict(
        model="tiny",
        max_tokens=10,
        system="Be brief.",
        messages=[{"role": "user", "content": "Hello there"}],
    )
    whole = client.messages.create(**ask)
    with client.messages.stream(**ask) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].text == whole.content[0].text and whole.content[0].text
    assert (streamed.stop_reason, streamed.usage.output_tokens, streamed.usage.input_tokens) == (
        whole.stop_reason,
        whole.usage.output_tokens,
        whole.usage.input_tokens,
    )
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(**{**ask, "tool_choice": {"type": "any"}})


def test_logprobs_are_the_log_softmax_of_the_logits(server, client, chat_model):
    import torch

    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=4
    )
    entries = reply.choices[0].logprobs.content
    engine = localmoe.load(str(chat_model), device="cpu")
    prompt = engine.tokenizer.encode_chat(MESSAGES)
    generated = list(engine.generate_ids(prompt, 6))
    ids = torch.tensor([prompt + generated])
    with torch.inference_mode():
        logits = engine.model(ids, engine.model.new_cache(1, ids.shape[1]), all_logits=True)[0].float()
    expected = logits.log_softmax(-1)[len(prompt) - 1 : -1]
    assert len(entries) == len(generated)
    for entry, token, row in zip(entries, generated, expected, strict=True):
        assert entry.logprob == pytest.approx(float(row[token]), abs=1e-4)
        best = row.topk(4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [engine.tokenizer.decode([i]) for i in best.indices.tolist()]


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "happy": {"type": "boolean"},
        "pet": {"enum": ["cat", "dog", "none"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    },
    "required": ["name", "age", "happy", "pet", "tags"],
    "additionalProperties": False,
}


def valid(value) -> bool:
    """SCHEMA, checked by hand (no jsonschema dependency for one schema)."""
    return (
        isinstance(value, dict)
        and set(value) == set(SCHEMA["required"])
        and isinstance(value["name"], str)
        and len(value["name"]) <= 6
        and type(value["age"]) is int
        and 0 <= value["age"] <= 120
        and isinstance(value["happy"], bool)
        and value["pet"] in ("cat", "dog", "none")
        and isinstance(value["tags"], list)
        and len(value["tags"]) <= 2
        and all(isinstance(t, str) and len(t) <= 3 for t in value["tags"])
    )


def test_json_schema_output_always_parses_and_validates(server, client):
    """Random weights: without the constraint the text is noise, so every valid answer is the grammar's doing."""
    form = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    for seed in range(3):
        reply = client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=400, temperature=1.0, seed=seed, response_format=form
        )
        assert reply.choices[0].finish_reason == "stop"
        assert valid(json.loads(reply.choices[0].message.content)), reply.choices[0].message.content
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    with pytest.raises(openai.BadRequestError, match="schema"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, response_format=bad)


def test_generate_json_schema_on_the_command_line(chat_model, tmp_path):
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    text = cli_chat_text(
        chat_model, "-n", "400", "--temperature", "1", "--seed", "3", "--json-schema", str(tmp_path / "schema.json")
    )
    assert valid(json.loads(text))
    (tmp_path / "bad.json").write_text("[1]")
    result = CliRunner().invoke(
        main, ["generate", str(chat_model), "-p", "x", "--json-schema", str(tmp_path / "bad.json")]
    )
    assert result.exit_code == 2 and "must be a JSON object" in result.output


# Hardening


def test_model_names_hub_id_folder_and_aliases(chat_model):
    engine = localmoe.load(str(chat_model), device="cpu")
    names = ["org/tiny-chat", "tiny-chat", "alias"]
    server = Server(engine, names, None, 1, 8)
    with serve_app(server.app()) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == names
        for name in names:
            assert client.completions.create(model=name, prompt="Hi", max_tokens=1).model == name
        with pytest.raises(openai.BadRequestError, match="not served"):
            client.completions.create(model="org/other", prompt="Hi", max_tokens=1)


def test_browser_origins_content_type_and_body_size(server):
    evil = {"Origin": "http://evil.example"}
    status, data, _ = post(
        server, "/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 1}, evil
    )
    assert status == 403 and "--cors" in data["error"]["message"]
    status, _, _ = post(server, "/v1/chat/completions", {"messages": MESSAGES}, {"Content-Type": "text/plain"})
    assert status == 415
    status, data, _ = post(server, "/v1/chat/completions", {"messages": MESSAGES}, {"Host": "evil.example:8000"})
    assert status == 403 and "Host" in data["error"]["message"]  # a DNS-rebinding page's own name
    status, data, _ = post(server, "/v1/chat/completions", b"x" * (5 * 2**20))
    assert status == 413
    many = "word " * 200_000  # under --max-body, but more characters than the context can hold as tokens
    status, data, _ = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": many}]})
    assert status == 400 and "characters" in data["error"]["message"]
    _, _, metrics = raw(server, "GET", "/metrics")
    assert b"# TYPE localmoe_requests_total counter" in metrics and b"# HELP localmoe_queue_length" in metrics


def test_cors_allows_the_origins_it_names(chat_model):
    engine = localmoe.load(str(chat_model), device="cpu")
    app = Server(engine, "tiny", None, 1, 8, cors=("http://localhost:3000",)).app()
    with serve_app(app) as port:
        ok = {"Origin": "http://localhost:3000"}
        status, _, headers = post(port, "/v1/completions", {"prompt": "Hi", "max_tokens": 1}, ok)
        assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"
        status, _, _ = post(
            port, "/v1/completions", {"prompt": "Hi", "max_tokens": 1}, {"Origin": "http://evil.example"}
        )
        assert status == 403


def test_nan_and_wrong_types_get_400(server):
    for body, field in [
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": NaN}', "repetition_penalty"),
        (
            json.dumps(
                {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": None, "max_tokens": 0}
            ).encode(),
            "max_tokens",
        ),
        (
            json.dumps(
                {"messages": [{"role": "user", "content": "hi"}], "stream": True, "stream_options": "x"}
            ).encode(),
            "stream_options",
        ),
        (json.dumps({"messages": [{"role": "user"}]}).encode(), "content"),
        (json.dumps({"messages": "hi"}).encode(), "messages"),
    ]:
        status, data, _ = post(server, "/v1/chat/completions", body)
        assert status == 400 and field in json.dumps(data), (body, data)
        assert "/" not in data["error"]["message"].replace("/v1", "")  # no server path leaks


def test_an_abandoned_request_is_cancelled(server, client):
    _, _, before = raw(server, "GET", "/metrics")
    cancelled = int(before.split(b"\nlocalmoe_cancelled_total ")[1].split()[0])
    connection = http.client.HTTPConnection("127.0.0.1", server, timeout=120)
    body = json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": 3000}).encode()
    connection.request(
        "POST",
        "/v1/chat/completions",
        body=body,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    time.sleep(1.0)  # the request is in; its generation has started
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert reply.usage.completion_tokens == 2
    _, _, after = raw(server, "GET", "/metrics")
    assert int(after.split(b"\nlocalmoe_cancelled_total ")[1].split()[0]) == cancelled + 1


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5000) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
CHAT_FIELDS = [
    "messages",
    "model",
    "max_tokens",
    "temperature",
    "stream",
    "stream_options",
    "tools",
    "stop",
    "logprobs",
    "top_logprobs",
    "response_format",
    "n",
    "seed",
    "logit_bias",
    "tool_choice",
    "top_k",
]
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "tool", "x"]), "content": JSON})


@pytest.fixture(scope="module")
def fuzz_server(chat_model):
    """A second server whose answers are at most 2 tokens, so that the valid requests the fuzzer finds
    finish at once."""
    engine = localmoe.load(str(chat_model), device="cpu")
    server = Server(engine, "tiny", None, queue_size=4, max_tokens_limit=2)
    with serve_app(server.app()) as port:
        yield port, server


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.one_of(
        JSON,
        st.dictionaries(st.sampled_from(CHAT_FIELDS), JSON, max_size=5),
        st.fixed_dictionaries(
            {"messages": st.lists(MESSAGE, min_size=1, max_size=2), "max_tokens": st.integers(-1, 3)},
            optional={k: JSON for k in CHAT_FIELDS[3:]},
        ),
    ),
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/messages"]),
)
def test_fuzzed_requests_get_200_or_4xx_and_only_accepted_ones_queue(fuzz_server, body, path):
    port, server = fuzz_server
    accepted = server.worker.totals["accepted"]
    status, data, _ = post(port, path, body)
    assert status in (200, 400), (status, data)
    assert server.worker.totals["accepted"] == accepted + (status == 200)


def test_slow_clients_are_cut_off_by_the_header_timeout(chat_model):
    from localmoe.server import protocol_with_header_timeout

    engine = localmoe.load(str(chat_model), device="cpu")
    app = Server(engine, "tiny", None, 1, 8).app()
    slow = []
    with serve_app(app, http=protocol_with_header_timeout(1.0), limit_concurrency=20) as port:
        try:
            for _ in range(40):  # twice the concurrency limit, each sending half a request line
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(b"GET /hea")
                slow.append(s)
            time.sleep(3.0)  # past the header timeout: the server has closed them
            assert all(s.recv(1) == b"" for s in slow)
            assert raw(port, "GET", "/health", key=None)[0] == 200
        finally:
            for s in slow:
                s.close()
