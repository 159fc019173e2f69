"""The Python API: `localmoe.load` takes the CLI's settings by name, written as on the command line, and
the engine generates, streams and chats."""

import pytest

import localmoe
from localmoe.options import RuntimeOptions


def test_load_takes_the_flags_by_name_and_as_written(tiny_mixtral):
    engine = localmoe.load(
        str(tiny_mixtral),
        device="cpu",
        dtype="float32",
        vram_budget="2MiB",
        host_budget="1GiB",
        policy="lfu",
        prefetch=2,
        miss_policy="auto",  # which prefetches, and weighs the bandwidths
        expert_bits="16",
        copy_bandwidth=2,  # GB/s, as --copy-bandwidth
        cpu_bandwidth=3,
    )
    cache = engine.expert_cache()
    assert cache is not None and engine.options.policy == "lfu" and engine.plan.device_budget == 2 * 2**20
    assert (engine.bandwidths.copy, engine.bandwidths.cpu) == (2e9, 3e9)
    assert str(engine.parts.dtype) == "torch.float32"


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"vram": "2GiB"}, "unknown setting 'vram'"),
        ({"vram_budget": "12"}, "has no unit"),
        ({"dtype": "float8"}, "unknown dtype 'float8'"),
        ({"expert_bits": 3}, "expert_bits 3 is not supported: use 16, 8 or 4"),
        ({"options": RuntimeOptions(), "policy": "lru"}, "not both"),
    ],
)
def test_a_wrong_setting_is_one_line(tiny_mixtral, settings, message):
    with pytest.raises(localmoe.LocalMoEError, match=message):
        localmoe.load(str(tiny_mixtral), device="cpu", **settings)


def test_generate_stream_and_their_defaults(tiny_mixtral):
    engine = localmoe.load(str(tiny_mixtral), device="cpu")
    text = engine.generate("Hello", 12)
    assert isinstance(text, str) and text == "".join(engine.stream("Hello", max_new_tokens=12))
    assert engine.stats.new_tokens == 12
    engine.generate("Hello")  # the default (128 new tokens) fits the model's 256 positions
    long_prompt = "x" * 200
    engine.generate(long_prompt)  # the default is lowered to what the context leaves
    assert engine.stats.new_tokens <= 256 - 200
    with pytest.raises(localmoe.LocalMoEError, match="exceeds the 256-token context"):
        engine.generate(long_prompt, max_new_tokens=100)  # an explicit count is never cut short
    sampled = [engine.generate("Hello", 8, temperature=1.0, top_k=5, seed=3) for _ in range(2)]
    assert sampled[0] == sampled[1]
    first_letter = engine.generate("Hello", 12)[:1]
    assert first_letter and engine.generate("Hello", 12, stop=first_letter) == ""


def test_chat_needs_messages_and_a_template(tiny_mixtral, chat_model):
    with pytest.raises(localmoe.LocalMoEError, match="no chat template"):
        localmoe.load(str(tiny_mixtral), device="cpu").chat([{"role": "user", "content": "Hi"}])
    engine = localmoe.load(str(chat_model), device="cpu", dtype="float32")
    messages = [{"role": "user", "content": "Hi"}]
    answer = engine.chat(messages, max_new_tokens=6)
    assert answer == "".join(engine.stream(messages, max_new_tokens=6))
    with pytest.raises(localmoe.LocalMoEError, match="chat takes a list of messages"):
        engine.chat("Hi")
    with pytest.raises(localmoe.LocalMoEError, match="raw encodes text as written"):
        engine.stream(messages, raw=True)
