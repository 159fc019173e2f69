"""`localmoe serve` on a free localhost port, talked to with the official openai client and raw HTTP."""

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import uvicorn
from click.testing import CliRunner

import localmoe
from localmoe.cli import main
from localmoe.engine import RuntimeOptions
from localmoe.server import Server

KEY = "sekret"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(chat_model):
    """A real uvicorn server in a thread, with an API key, a queue of 2 and offloaded experts."""
    engine = localmoe.load(str(chat_model), device="cpu", options=RuntimeOptions(expert_slots=6))
    app = Server(engine, "tiny", KEY, queue_size=2, max_tokens_limit=3500).app()
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    yield port
    uv.should_exit = True
    thread.join(timeout=10)


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
