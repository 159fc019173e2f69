"""The model against itself: incremental decode, chunked prefill and batching all equal one full forward."""

import pytest
import torch
from conftest import DEEPSEEK_V2, GPT_OSS, MINIMAX, MIXTRAL, QWEN3_MOE, hf_model, save_hf
from hypothesis import given, settings
from hypothesis import strategies as st

import localmoe

TOLERANCE = 1e-5


@pytest.fixture(
    scope="module",
    params=[
        ("MixtralConfig", MIXTRAL),
        # a window shorter than the sequence exercises the explicit-mask path of chunked prefill
        ("MixtralConfig", {**MIXTRAL, "sliding_window": 6}),
        ("Qwen3MoeConfig", {**QWEN3_MOE, "mlp_only_layers": [1]}),
        ("DeepseekV3Config", {**DEEPSEEK_V2, "n_group": 4, "topk_group": 2}),
        ("GptOssConfig", GPT_OSS),
        # lightning attention first: its state carries across chunks and blocks
        ("MiniMaxConfig", {**MINIMAX, "layer_types": ["linear_attention", "full_attention"] * 2}),
    ],
    ids=["mixtral", "mixtral-window", "qwen3", "deepseek-v3", "gpt-oss", "minimax"],
)
def model(request, tmp_path_factory):
    config_class, config = request.param
    folder = save_hf(hf_model(config_class, **config), tmp_path_factory.mktemp("m"), "sharded")
    return localmoe.load(str(folder), device="cpu", dtype=torch.float32).model


def tokens(batch: int, length: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def full_forward(model, ids):
    return model(ids, model.new_cache(ids.shape[0], ids.shape[1]), all_logits=True)


@settings(max_examples=12, deadline=None)
@given(chunks=st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=6))
def test_any_chunking_equals_full_forward(model, chunks):
    """Prefill in pieces of any size, then decode: the same logits as one pass over everything."""
    ids = tokens(1, sum(chunks))
    expected = full_forward(model, ids)
    cache = model.new_cache(1, ids.shape[1])
    got, start = [], 0
    for size in chunks:
        got.append(model(ids[:, start : start + size], cache, all_logits=True))
        start += size
    assert cache.pos == ids.shape[1]
    assert (torch.cat(got, dim=1) - expected).abs().max().item() < TOLERANCE


def test_batch_of_two_equals_each_alone(model):
    ids = tokens(2, 10)
    batched = full_forward(model, ids)
    cache = model.new_cache(2, 14)
    model(ids, cache)
    steps = tokens(2, 4, seed=4)
    decoded = [model(steps[:, i : i + 1], cache) for i in range(4)]
    for row in range(2):
        alone = full_forward(model, torch.cat([ids[row : row + 1], steps[row : row + 1]], dim=1))
        assert (batched[row] - alone[0, :10]).abs().max().item() < TOLERANCE
        for i, logits in enumerate(decoded):
            assert (logits[row, -1] - alone[0, 10 + i]).abs().max().item() < TOLERANCE


def test_overrunning_the_allocated_context_is_an_error(model):
    cache = model.new_cache(1, 8)
    model(tokens(1, 6), cache)
    with pytest.raises(localmoe.LocalMoEError, match="do not fit the 8-token context"):
        model(tokens(1, 3), cache)


def test_rewinding_keeps_what_it_can(model):
    """Keys and values can be kept for any prefix; a linear-attention state only when nothing is dropped."""
    ids = tokens(1, 12)
    expected = full_forward(model, ids)
    cache = model.new_cache(1, 12)
    model(ids[:, :8], cache)
    recurrent = any(getattr(state, "recurrent", False) for state in cache.layers)
    assert cache.rewind(8) == 8
    kept = cache.rewind(5)
    assert kept == (0 if recurrent else 5)
    got = model(ids[:, kept:], cache, all_logits=True)
    assert (got - expected[:, kept:]).abs().max().item() < TOLERANCE


def test_a_forward_cut_short_is_not_trusted(model, monkeypatch):
    """Ctrl-C in the middle of a forward pass: some layers have taken the new tokens, others not."""
    ids = tokens(1, 12)
    expected = full_forward(model, ids)
    cache = model.new_cache(1, 12)
    model(ids[:, :6], cache)
    last = model.model.layers[-1]
    monkeypatch.setattr(last, "forward", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        model(ids[:, 6:], cache)
    monkeypatch.undo()
    kept = cache.rewind(6)
    recurrent = any(getattr(state, "recurrent", False) for state in cache.layers)
    assert kept == (0 if recurrent else 6)
    got = model(ids[:, kept:], cache, all_logits=True)
    assert (got - expected[:, kept:]).abs().max().item() < TOLERANCE
