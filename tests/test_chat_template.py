"""Chat templates rendered and tokenized exactly as transformers' apply_chat_template does, for the
template styles real checkpoints ship."""

import json

import pytest
from conftest import save_tokenizer, train_tokenizer

from localmoe.errors import LocalMoEError
from localmoe.tokenizer import Tokenizer

# Our own renditions of the styles in use; each exercises different template features.
CHATML_WITH_TOOLS = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- "# Tools\\n\\nYou may call these functions:\\n<tools>" }}
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role != 'system' or not loop.first %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

MISTRAL_INST = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

DEEPSEEK = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}{% set ns.system = message['content'] %}"
    "{% endif %}{% endfor %}{{ ns.system }}"
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

LLAMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + strftime_now("%d %b %Y") + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}"""

# transformers' {% generation %} tag, as training-oriented templates use it
GENERATION_TAG = (
    "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
    "{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)

STYLES = {
    "chatml": (
        "byte_level",
        CHATML_WITH_TOOLS,
        ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        {"eos_token": "<|im_end|>"},
    ),
    "mistral": (
        "metaspace",
        MISTRAL_INST,
        ["<s>", "</s>", "[INST]", "[/INST]"],
        {"bos_token": "<s>", "eos_token": "</s>"},
    ),
    "deepseek": (
        "byte_level",
        DEEPSEEK,
        ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"],
        {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"},
    ),
    "llama3": (
        "byte_level",
        LLAMA3,
        ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    ),
    "generation-tag": ("metaspace", GENERATION_TAG, ["<s>", "</s>"], {"bos_token": "<s>", "eos_token": "</s>"}),
}

SYSTEM = {"role": "system", "content": "You are terse. Réponds en français si demandé."}
CONVERSATIONS = {
    "one-turn": [{"role": "user", "content": "Hello, how are you?"}],
    "system": [SYSTEM, {"role": "user", "content": "What is 2+2?"}],
    "multi-turn": [
        {"role": "user", "content": "Name a fox."},
        {"role": "assistant", "content": "The quick brown fox."},
        {"role": "user", "content": "Now 世界 🙂, please."},
    ],
    "system-multi-turn": [
        SYSTEM,
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "  spaces around  "},
    ],
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"city": {"type": "string"}}}}]


def build(name: str, folder):
    """(transformers' tokenizer, ours) over one saved tokenizer of the given style."""
    from transformers import AutoTokenizer

    style, template, specials, special_map = STYLES[name]
    save_tokenizer(train_tokenizer(style, specials), folder, template, **special_map)
    return AutoTokenizer.from_pretrained(folder), Tokenizer(folder)


@pytest.fixture(scope="module", params=list(STYLES))
def pair(request, tmp_path_factory):
    return build(request.param, tmp_path_factory.mktemp(request.param))


def reference(hf, conversation, add_generation_prompt, **kwargs):
    """transformers' rendering and token ids, or the message of the error it raises."""
    try:
        text = hf.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
        ids = hf.apply_chat_template(conversation, tokenize=True, add_generation_prompt=add_generation_prompt, **kwargs)
    except Exception as error:  # jinja2's TemplateError, from raise_exception
        return None, None, str(error)
    return text, list(ids["input_ids"] if hasattr(ids, "keys") else ids), None


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_and_ids_match_transformers(pair, name, add_generation_prompt):
    hf, ours = pair
    conversation = CONVERSATIONS[name]
    text, ids, error = reference(hf, conversation, add_generation_prompt)
    if error is not None:
        with pytest.raises(LocalMoEError, match="refused the conversation") as info:
            ours.render_chat(conversation, add_generation_prompt)
        assert error in str(info.value)
        return
    assert ours.render_chat(conversation, add_generation_prompt) == text
    assert ours.encode_chat(conversation, add_generation_prompt) == ids


def test_tools_are_rendered_with_transformers_json_spacing(tmp_path):
    hf, ours = build("chatml", tmp_path)
    conversation = CONVERSATIONS["system"]
    text, _, _ = reference(hf, conversation, True, tools=TOOLS)
    assert ours.render_chat(conversation, True, tools=TOOLS) == text
    assert json.dumps(TOOLS[0]) in text


def test_plain_encode_matches_transformers(pair):
    hf, ours = pair
    for text in ["Hello world", " leading space", "世界 🙂", ""]:
        assert ours.encode(text) == hf(text)["input_ids"]
        assert ours.decode(ours.encode(text)) == hf.decode(hf(text)["input_ids"], skip_special_tokens=True)


def test_bos_and_eos_flags_apply_where_tokenizer_json_has_no_post_processor(tmp_path):
    folder = save_tokenizer(train_tokenizer("metaspace", ["<s>", "</s>"]), tmp_path, bos_token="<s>", eos_token="</s>")
    ours = Tokenizer(folder)
    plain = ours.encode("Hello world")  # transformers wrote a post-processor that adds nothing
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True, "add_eos_token": True}))
    assert Tokenizer(folder).encode("Hello world") == plain  # tokenizer.json's post-processor decides
    data = json.loads((folder / "tokenizer.json").read_text())
    data["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(data))
    flagged = Tokenizer(folder)
    assert flagged.encode("Hello world") == [flagged.token_id("<s>"), *plain, flagged.token_id("</s>")]
    assert flagged.encode("Hello world", add_special_tokens=False) == plain


def test_template_sources(tmp_path):
    """chat_template.jinja wins; then tokenizer_config.json (a string, or named templates); then chat_template.json."""
    tok = train_tokenizer("byte_level", ["<|im_start|>", "<|im_end|>"])
    folder = save_tokenizer(tok, tmp_path, "A{{ messages[0].content }}")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    message = [{"role": "user", "content": "x"}]
    assert Tokenizer(folder).render_chat(message) == "Ax"
    (folder / "chat_template.jinja").unlink()
    assert Tokenizer(folder).chat_templates == {}
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": "D{{ messages[0].content }}"}))
    assert Tokenizer(folder).render_chat(message) == "Dx"
    config_path.write_text(json.dumps({**config, "chat_template": "B{{ messages[0].content }}"}))
    assert Tokenizer(folder).render_chat(message) == "Bx"
    named = [{"name": "default", "template": "C{{ messages[0].content }}"}, {"name": "tool_use", "template": "T"}]
    config_path.write_text(json.dumps({**config, "chat_template": named}))
    assert Tokenizer(folder).render_chat(message) == "Cx"
    assert Tokenizer(folder).render_chat(message, tools=TOOLS) == "T"


def test_no_template_and_broken_template(tmp_path):
    tok = train_tokenizer("byte_level", [])
    with pytest.raises(LocalMoEError, match="no chat template"):
        Tokenizer(save_tokenizer(tok, tmp_path / "none")).render_chat([{"role": "user", "content": "x"}])
    with pytest.raises(LocalMoEError, match="does not parse"):
        Tokenizer(save_tokenizer(tok, tmp_path / "bad", "{% for %}")).render_chat([{"role": "user", "content": "x"}])


def test_sandbox_blocks_attribute_escapes(tmp_path):
    tok = train_tokenizer("byte_level", [])
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(LocalMoEError, match="unsafe"):
        Tokenizer(save_tokenizer(tok, tmp_path, escape)).render_chat([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "template,needle",
    [
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "ran for more than"),
        ("{% for i in range(100000) %}{{ 'x' * 50 }}{% endfor %}", "wrote more than"),
        ("{{ 'x' * 1000000000 }}", "beyond the output limit"),
        ("{{ 'x' | center(1000000000) }}", "beyond the output limit"),
        ("{{ 2 ** 100000000 }}", "power too large"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
        ("{{ 1 + 'a' }}", "TypeError"),
        ("{% include 'other.jinja' %}", "failed"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed"),
    ],
)
def test_a_template_that_loops_floods_or_fails_is_one_line(tmp_path, monkeypatch, template, needle):
    import localmoe.tokenizer

    monkeypatch.setattr(localmoe.tokenizer, "RENDER_SECONDS", 1.0)
    monkeypatch.setattr(localmoe.tokenizer, "RENDER_CHARACTERS", 100_000)
    folder = save_tokenizer(train_tokenizer("byte_level", []), tmp_path, template)
    with pytest.raises(LocalMoEError, match=needle) as error:
        Tokenizer(folder).render_chat(CONVERSATIONS["one-turn"])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "config,needle",
    [
        ([1, 2], "must hold a JSON object"),
        ({"bos_token": ["<s>"]}, "bos_token must be text"),
        ({"eos_token": {"id": 3}}, "eos_token must be text"),
        ({"chat_template": 5}, "chat_template must be text"),
        ({"chat_template": [{"name": "default"}]}, "chat_template must list"),
    ],
)
def test_malformed_tokenizer_config_is_one_line(tmp_path, config, needle):
    folder = save_tokenizer(train_tokenizer("byte_level", []), tmp_path)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(LocalMoEError, match=needle):
        Tokenizer(folder)
