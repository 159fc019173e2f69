"""Generation state: which layers get a ring, what a ring holds, and when it can be rewound; a compressor's
pooled state cut back into a speculative check."""

import pytest
import torch
from torch import nn

from localmoe.models import state as layer_state
from localmoe.models.deepseek_v4 import Compressor, DeepseekV4Args
from localmoe.models.layers import Step
from localmoe.models.rotary import RotaryEmbedding
from localmoe.models.state import AttentionKV, KVCache, PooledState, WindowKV, attention_state


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


def compressor(rate: int, overlap: bool) -> tuple[Compressor, RotaryEmbedding]:
    """A DeepSeek-V4 compressor with random weights and its rotary."""
    torch.manual_seed(rate + overlap)
    args = DeepseekV4Args(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, head_dim=8)
    module = Compressor(16, 8, rate, overlap, 1e-6).double()
    nn.init.normal_(module.position_bias)
    return module, RotaryEmbedding(args.rope("compress"), 8, 64)


def pooled(module: Compressor, rotary, *chunks: torch.Tensor, trail: bool = False) -> PooledState:
    """A state fed the hidden states `chunks` [1, T, 16] one forward pass each (the last one with `trail`)."""
    state = module.new_state(1, 64, torch.float64, "cpu")
    for i, x in enumerate(chunks):
        module(x, state, rotary, trail and i == len(chunks) - 1)
    return state


@pytest.mark.parametrize(
    "rate,overlap,before",
    [
        (4, True, 6),  # CSA: a check of 7 from 6 completes a window inside it, and one straddling its start
        (3, True, 3),  # the check starts on a window boundary; two windows end inside it
        (8, False, 5),  # HCA: one window ends inside the check
        (2, False, 0),  # the check is the first pass: nothing pending before it, no overlap
    ],
)
def test_a_pooled_state_is_cut_back_into_a_check(rate, overlap, before):
    """Cut back to each position of a check, a compressor's state is the one fed just the tokens through it,
    and pools the tokens after it as that one does."""
    module, rotary = compressor(rate, overlap)
    x = torch.randn(1, before + 7 + 5, 16, dtype=torch.float64)  # 5 tokens after the check
    prefix, check = x[:, :before], x[:, before : before + 7]
    with torch.no_grad():
        for keep in range(before, before + 8):
            cut = pooled(module, rotary, prefix, check, trail=True)
            assert cut.truncate(keep, before + 7) and cut.trail is None
            fed = pooled(module, rotary, prefix, x[:, before:keep])
            assert cut.count == fed.count == keep // rate
            for got, expected in ((cut.pending_kv, fed.pending_kv), (cut.pending_gate, fed.pending_gate)):
                assert got.shape[1] == keep % rate
                torch.testing.assert_close(got, expected)
            for state in (cut, fed):  # what the pending tokens keep alive: themselves, not their forward pass
                pending = (state.pending_kv, state.pending_gate)
                assert all(t.untyped_storage().nbytes() == t.nbytes for t in pending)
            assert (cut.overlap is None) == (fed.overlap is None) == (not overlap or keep < rate)
            for got, expected in zip(cut.overlap or (), fed.overlap or (), strict=True):
                torch.testing.assert_close(got, expected)
            rest = x[:, keep:]
            torch.testing.assert_close(module(rest, cut, rotary, False), module(rest, fed, rotary, False))


def test_a_pooled_state_is_not_cut_back_without_its_trail():
    """A pass without trail (a prefill chunk) or an older one: the state can only stay where it is."""
    module, rotary = compressor(4, True)
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    with torch.no_grad():
        assert not pooled(module, rotary, x[:, :6], x[:, 6:]).truncate(9, 12)
        state = pooled(module, rotary, x[:, :6], x[:, 6:10], trail=True)
        module(x[:, 10:], state, rotary, False)  # the trail is dropped
        assert state.trail is None and not state.truncate(9, 12)
        state = pooled(module, rotary, x[:, :6], x[:, 6:], trail=True)
        assert not state.truncate(3, 12)  # before the check's first pending token (position 4)
        assert pooled(module, rotary, x[:, :6], x[:, 6:], trail=True).truncate(4, 12)
