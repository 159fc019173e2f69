"""The model against itself: incremental decode, chunked prefill and batching all equal one full forward."""

import pytest
import torch
from conftest import MIXTRAL, QWEN3_MOE, hf_model, save_hf
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
    ],
    ids=["mixtral", "mixtral-window", "qwen3"],
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
