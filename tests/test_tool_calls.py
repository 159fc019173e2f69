"""Tool calls through the server, in each family's syntax: the model's output is forced by a test double
of the sampler, so parsing is tested on known text, with the official openai and anthropic clients;
the call goes back as a `role: tool` (or tool_result) conversation rendered by the chat template."""

import contextlib
import json
import shutil

import anthropic
import openai
import pytest
import torch
from conftest import MIXTRAL, hf_model, save_hf, save_tokenizer, serve_app, train_tokenizer

import localmoe
import localmoe.engine
from localmoe.runtime.sampling import Sampler
from localmoe.server import Server
from localmoe.tool_calls import FORMATS, HARMONY_MARKERS, tool_format

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city for some days.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city", "days"],
            },
        },
    }
]
ARGUMENTS = {"city": "Paris", "days": 2}
SAY = "Let me look. "

# How each family's template renders an assistant's call (the syntax its model writes), and the output
# forced for the test: text, then one call to get_weather(city="Paris", days=2).
CALLS = {
    "hermes": (
        '<tool_call>\n{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}'
        "\n</tool_call>",
        SAY + '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>',
    ),
    "qwen3_coder": (
        "<tool_call>\n<function={{ c.function.name }}>\n{% for k, v in c.function.arguments.items() %}"
        "<parameter={{ k }}>\n{{ v }}\n</parameter>\n{% endfor %}</function>\n</tool_call>",
        SAY + "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n"
        "</parameter>\n</function>\n</tool_call>",
    ),
    "glm45": (
        "<tool_call>{{ c.function.name }}\n{% for k, v in c.function.arguments.items() %}<arg_key>{{ k }}</arg_key>\n"
        "<arg_value>{{ v }}</arg_value>\n{% endfor %}</tool_call>",
        SAY + "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n"
        "<arg_value>2</arg_value>\n</tool_call>",
    ),
    "deepseek_v3": (
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>{{ c.function.name }}\n```json\n"
        "{{ c.function.arguments }}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        SAY + "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
        '{"city": "Paris", "days": 2}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
    ),
    "deepseek_v31": (
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>{{ c.function.name }}<｜tool▁sep｜>{{ c.function.arguments }}"
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        SAY + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris", "days": 2}'
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
    ),
    "kimi_k2": (
        "<|tool_calls_section_begin|><|tool_call_begin|>{{ c.id }}<|tool_call_argument_begin|>"
        "{{ c.function.arguments | tojson }}<|tool_call_end|><|tool_calls_section_end|>",
        SAY + "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
        '{"city": "Paris", "days": 2}<|tool_call_end|><|tool_calls_section_end|>',
    ),
    "mistral": (
        "[TOOL_CALLS]{{ c.function.name }}[ARGS]{{ c.function.arguments | tojson }}",
        SAY + '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 2}',
    ),
    "mistral_v3": (
        '[TOOL_CALLS] [{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}]',
        SAY + '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]',
    ),
    "llama4": (
        '<|python_start|>{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}'
        "<|python_end|>",
        SAY + '<|python_start|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}<|python_end|>',
    ),
    "minimax": (
        '<tool_calls>\n{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n'
        "</tool_calls>",
        SAY + '<tool_calls>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_calls>',
    ),
    "minimax_m2": (
        '<minimax:tool_call>\n<invoke name="{{ c.function.name }}">\n{% for k, v in c.function.arguments.items() %}'
        '<parameter name="{{ k }}">{{ v }}</parameter>\n{% endfor %}</invoke>\n</minimax:tool_call>',
        SAY + '<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n'
        '<parameter name="days">2</parameter>\n</invoke>\n</minimax:tool_call>',
    ),
}

CHATML_TOOLS = (
    "{%- if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{{ m.content }}"
    "{% for c in m.tool_calls %}CALL{% endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

HARMONY = (
    "{%- if tools %}<|start|>developer<|message|>{% for t in tools %}{{ t | tojson }}{% endfor %}<|end|>{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}{% for c in m.tool_calls %}<|start|>assistant<|channel|>"
    "commentary to=functions.{{ c.function.name }} <|constrain|>json<|message|>{{ c.function.arguments | tojson }}"
    "<|call|>{% endfor %}"
    "{%- elif m.role == 'tool' %}<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"
    "{{ m.content }}<|end|>"
    "{%- else %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)
HARMONY_OUTPUT = (
    "<|channel|>analysis<|message|>The user wants weather.<|end|><|start|>assistant<|channel|>commentary "
    'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris", "days": 2}<|call|>'
)
TEMPLATES = {name: (CHATML_TOOLS.replace("CALL", call), output) for name, (call, output) in CALLS.items()}
TEMPLATES["harmony"] = (HARMONY, HARMONY_OUTPUT)


def test_every_format_has_a_test():
    assert set(TEMPLATES) == {f.name for f in FORMATS} | {"harmony"}


@pytest.fixture(scope="module")
def tool_checkpoint(tmp_path_factory):
    """A tiny Mixtral whose tokenizer has every format's markers as special tokens; EOS ends a turn."""
    specials = ["<|im_start|>", "<|im_end|>", *HARMONY_MARKERS]
    specials += [m for f in FORMATS for m in f.markers if m not in specials]
    tok = train_tokenizer("byte_level", list(dict.fromkeys(specials)))
    eos = [tok.token_to_id(t) for t in ("<|im_end|>", "<|call|>", "<|return|>")]
    config = {**MIXTRAL, "vocab_size": tok.get_vocab_size(), "max_position_embeddings": 1024}
    config.update(bos_token_id=None, eos_token_id=eos)
    folder = save_hf(hf_model("MixtralConfig", **config), tmp_path_factory.mktemp("tools"), "single")
    return save_tokenizer(tok, folder, eos_token="<|im_end|>")


def checkpoint_with(base, folder, template: str):
    shutil.copytree(base, folder)
    (folder / "chat_template.jinja").write_text(template)
    return folder


def forced(ids: list[int], eos: int):
    """A sampler double that writes `ids` and then EOS, whatever the logits say."""

    class Forced(Sampler):
        def __call__(self, logits, seen):
            super().__call__(logits, seen)
            at = seen.numel() - self.prompt_length
            return torch.tensor(ids[at] if at < len(ids) else eos)

    return Forced


@contextlib.contextmanager
def serving(folder, output: str, monkeypatch):
    engine = localmoe.load(str(folder), device="cpu")
    tok = engine.tokenizer
    monkeypatch.setattr(
        localmoe.engine, "Sampler", forced(tok.encode(output, add_special_tokens=False), min(engine.eos_ids))
    )
    with serve_app(Server(engine, "tiny", None, 2, 200).app()) as port:
        yield port, engine


def streamed_calls(stream) -> tuple[str, list[dict], str]:
    text, calls, finish = "", {}, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        text += delta.content or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += call.id or ""
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return text, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_tool_call_round_trip(name, tool_checkpoint, tmp_path, monkeypatch):
    template, output = TEMPLATES[name]
    folder = checkpoint_with(tool_checkpoint, tmp_path / name, template)
    fmt = tool_format(template)
    assert (fmt if fmt == "harmony" else fmt.name) == name  # the format is read from the template
    with serving(folder, output, monkeypatch) as (port, engine):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=120)
        user = [{"role": "user", "content": "Weather in Paris?"}]
        reply = client.chat.completions.create(model="tiny", messages=user, tools=TOOLS, max_tokens=150)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == ARGUMENTS
        assert (choice.message.content or "") == ("" if name == "harmony" else SAY)
        if name == "kimi_k2":
            assert call.id == "functions.get_weather:0"  # Kimi's template writes the id back as the call's name

        stream = client.chat.completions.create(model="tiny", messages=user, tools=TOOLS, max_tokens=150, stream=True)
        text, calls, finish = streamed_calls(stream)
        assert text == (choice.message.content or "") and finish == "tool_calls"
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", ARGUMENTS)]

        back = [
            *user,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C"},
        ]
        answer = client.chat.completions.create(model="tiny", messages=back, tools=TOOLS, max_tokens=150)
        assert answer.choices[0].finish_reason == "tool_calls"  # the double writes the call again
        rendered = engine.tokenizer.render_chat(
            [
                *user,
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            **call.model_dump(),
                            "function": {
                                "name": "get_weather",
                                "arguments": ARGUMENTS
                                if name not in ("deepseek_v3", "deepseek_v31")
                                else call.function.arguments,
                            },
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C"},
            ],
            tools=TOOLS,
        )
        assert "Sunny, 24 C" in rendered and "get_weather" in rendered
        assert answer.usage.prompt_tokens == len(engine.tokenizer.encode(rendered, add_special_tokens=False))


def test_tools_with_an_unknown_format_are_refused(chat_model):
    """The ChatML test template renders tools but writes no call syntax: a 400, not ignored tools."""
    engine = localmoe.load(str(chat_model), device="cpu")
    with serve_app(Server(engine, "tiny", None, 2, 20).app()) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=120)
        with pytest.raises(openai.BadRequestError, match="tool-call format"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], tools=TOOLS)
        plain = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], tools=TOOLS, tool_choice="none", max_tokens=3
        )
        assert plain.choices[0].finish_reason == "length"


def test_anthropic_tool_use_round_trip_and_streaming(tool_checkpoint, tmp_path, monkeypatch):
    template, output = TEMPLATES["hermes"]
    folder = checkpoint_with(tool_checkpoint, tmp_path / "hermes", template)
    tools = [{"name": "get_weather", "description": "Weather.", "input_schema": TOOLS[0]["function"]["parameters"]}]
    with serving(folder, output, monkeypatch) as (port, _):
        client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key="-", max_retries=0, timeout=120)
        question = [{"role": "user", "content": "Weather in Paris?"}]
        message = client.messages.create(model="tiny", max_tokens=150, messages=question, tools=tools)
        assert message.stop_reason == "tool_use"
        text, use = message.content
        assert text.type == "text" and text.text == SAY
        assert use.type == "tool_use" and use.name == "get_weather" and use.input == ARGUMENTS
        with client.messages.stream(model="tiny", max_tokens=150, messages=question, tools=tools) as stream:
            streamed = stream.get_final_message()
        assert [b.model_dump(exclude={"id"}) for b in streamed.content] == [
            b.model_dump(exclude={"id"}) for b in message.content
        ]
        assert (streamed.stop_reason, streamed.usage.output_tokens) == (
            message.stop_reason,
            message.usage.output_tokens,
        )
        back = [
            *question,
            {"role": "assistant", "content": [b.model_dump() for b in message.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny"}]},
        ]
        again = client.messages.create(model="tiny", max_tokens=150, messages=back, tools=tools)
        assert again.usage.input_tokens > message.usage.input_tokens


def test_parallel_tool_calls_false_keeps_the_first_call(tool_checkpoint, tmp_path, monkeypatch):
    template, output = TEMPLATES["hermes"]
    folder = checkpoint_with(tool_checkpoint, tmp_path / "hermes", template)
    second = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 1}}\n</tool_call>'
    with serving(folder, output + second, monkeypatch) as (port, _):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=120)
        user = [{"role": "user", "content": "Weather in Paris and Rome?"}]
        both = client.chat.completions.create(model="tiny", messages=user, tools=TOOLS, max_tokens=150)
        assert [json.loads(c.function.arguments)["city"] for c in both.choices[0].message.tool_calls] == [
            "Paris",
            "Rome",
        ]
        one = client.chat.completions.create(
            model="tiny", messages=user, tools=TOOLS, max_tokens=150, parallel_tool_calls=False
        )
        assert [json.loads(c.function.arguments)["city"] for c in one.choices[0].message.tool_calls] == ["Paris"]


def test_a_looping_template_is_stopped_and_the_server_goes_on(tool_checkpoint, tmp_path, monkeypatch):
    import localmoe.tokenizer

    monkeypatch.setattr(localmoe.tokenizer, "RENDER_SECONDS", 1.0)
    looping = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    folder = checkpoint_with(tool_checkpoint, tmp_path / "loop", looping)
    with serving(folder, "x", monkeypatch) as (port, _):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=120)
        with pytest.raises(openai.BadRequestError, match="ran for more than"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        assert client.completions.create(model="tiny", prompt="hi", max_tokens=1).choices[0].finish_reason
