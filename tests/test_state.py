"""Generation state: which layers get a ring, what a ring holds, and when it can be rewound."""

import pytest
import torch

from localmoe.models import state as layer_state
from localmoe.models.layers import Step
from localmoe.models.state import AttentionKV, KVCache, WindowKV, attention_state


def keys(start: int, length: int) -> torch.Tensor:
    """[1, 1, length, 1] keys whose value is their position."""
    return torch.arange(start, start + length, dtype=torch.float32).view(1, 1, -1, 1)


def at(start: int, length: int) -> Step:
    """An eager step over positions start .. start + length - 1 (no rotary needed here)."""
    return Step(start, length, torch.empty(0), torch.empty(0))


def test_a_ring_only_where_it_saves_memory(monkeypatch):
    monkeypatch.setattr(layer_state, "REWIND_SLACK", 4)
    assert isinstance(attention_state(1, 2, 8, 100, 16, torch.float32, "cpu"), WindowKV)
    assert isinstance(attention_state(1, 2, 8, 20, 16, torch.float32, "cpu"), AttentionKV)
    assert isinstance(attention_state(1, 2, 8, 100, None, torch.float32, "cpu"), AttentionKV)
    assert attention_state(1, 2, 8, 10_000, 16, torch.float32, "cpu").k.shape[2] == 20


def test_the_ring_returns_every_key_a_query_may_see(monkeypatch):
    monkeypatch.setattr(layer_state, "REWIND_SLACK", 2)
    ring = WindowKV(1, 1, 1, 3, torch.float32, "cpu")
    k, _, positions = ring.update(keys(0, 7), keys(0, 7), at(0, 7))  # more new tokens than slots
    assert positions.tolist() == [-1] * 5 + list(range(7)) and k[0, 0, :, 0].tolist()[5:] == list(range(7))
    assert sorted(ring.positions.tolist()) == [2, 3, 4, 5, 6]
    for pos in range(7, 12):
        k, _, positions = ring.update(keys(pos, 1), keys(pos, 1), at(pos, 1))
        held = positions.tolist()
        assert sorted(held) == list(range(pos - 4, pos + 1))
        assert k[0, 0, :, 0].tolist() == [float(p) for p in held]


def test_rewinding_a_ring(monkeypatch):
    monkeypatch.setattr(layer_state, "REWIND_SLACK", 2)
    ring = WindowKV(1, 1, 1, 3, torch.float32, "cpu")
    cache = KVCache([ring], 100)
    ring.update(keys(0, 10), keys(0, 10), at(0, 10))
    cache.pos = 10
    assert cache.rewind(8) == 8  # two back: the window before position 8 is still there
    assert sorted(p for p in ring.positions.tolist() if p >= 0) == [5, 6, 7]
    ring.update(keys(8, 2), keys(8, 2), at(8, 2))
    cache.pos = 10
    assert cache.rewind(7) == 0  # three back is more than the slack: start again
    assert (ring.positions == -1).all()


@pytest.mark.parametrize("interrupted", [False, True])
def test_a_ring_cut_short_is_not_kept(monkeypatch, interrupted):
    monkeypatch.setattr(layer_state, "REWIND_SLACK", 2)
    ring = WindowKV(1, 1, 1, 3, torch.float32, "cpu")
    cache = KVCache([ring], 100)
    ring.update(keys(0, 6), keys(0, 6), at(0, 6))
    cache.pos, cache.writing = 6, interrupted
    assert cache.rewind(6) == (0 if interrupted else 6)
