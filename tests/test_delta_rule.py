"""The chunked gated delta rule against the token-by-token one it must equal."""

import pytest
import torch

from localmoe.kernels.delta_rule import gated_delta_rule, gated_delta_rule_chunked


def inputs(T: int, seed: int = 0, per_channel: bool = False):
    generator = torch.Generator().manual_seed(seed)
    B, H, Dk, Dv = 2, 3, 8, 5

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    q, v = randn(B, H, T, Dk), randn(B, H, T, Dv)
    k = torch.nn.functional.normalize(randn(B, H, T, Dk), dim=-1)
    g = -2 * torch.rand(B, H, T, *((Dk,) if per_channel else ()), generator=generator)
    beta = torch.rand(B, H, T, generator=generator)
    return (q, k, v, g, beta), randn(B, H, Dk, Dv)


# per_channel: Kimi Delta Attention's decay, one per key channel rather than one per head
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("T, chunk", [(1, 64), (7, 64), (64, 64), (150, 64), (37, 5)])
def test_chunked_equals_token_by_token(T, chunk, per_channel):
    args, state = inputs(T, per_channel=per_channel)
    expected_state, got_state = state.clone(), state.clone()
    expected = gated_delta_rule(*args, expected_state)
    got = gated_delta_rule_chunked(*args, got_state, chunk=chunk)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_state, expected_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_channel", [False, True])
def test_a_sequence_split_in_two_carries_its_state(per_channel):
    args, state = inputs(40, per_channel=per_channel)
    whole_state, split_state = state.clone(), state.clone()
    whole = gated_delta_rule_chunked(*args, whole_state, chunk=16)
    first = gated_delta_rule_chunked(*(x[:, :, :25] for x in args), split_state, chunk=16)
    second = gated_delta_rule(*(x[:, :, 25:] for x in args), split_state)
    torch.testing.assert_close(torch.cat((first, second), dim=2), whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split_state, whole_state, atol=1e-5, rtol=1e-5)


def test_zero_write_rate_leaves_only_decay():
    """beta = 0 writes nothing: the state only decays, and the output reads the decayed state."""
    (q, k, v, g, _), state = inputs(6)
    before = state.clone()
    out = gated_delta_rule_chunked(q, k, v, g, torch.zeros_like(g), state)
    decay = g.sum(-1).exp()[..., None, None]
    torch.testing.assert_close(state, before * decay)
    expected_first = (q[..., 0, None, :] @ (before * g[..., 0, None, None].exp())).squeeze(-2)
    torch.testing.assert_close(out[..., 0, :], expected_first)


def test_a_decay_shared_by_every_channel_is_a_decay_per_head():
    """Kimi Delta Attention with the same decay on every key channel is the gated delta rule."""
    (q, k, v, g, beta), state = inputs(70)
    per_head, per_channel = state.clone(), state.clone()
    expected = gated_delta_rule_chunked(q, k, v, g, beta, per_head)
    got = gated_delta_rule_chunked(q, k, v, g[..., None].expand(*g.shape, k.shape[-1]), beta, per_channel)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(per_channel, per_head, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("T, chunk", [(5, 64), (37, 16)])
def test_the_state_after_each_position(T, chunk, per_channel):
    """A speculative check's trail: the chunked form's state after each position is the token-by-token
    one's, and the last of them is the state the pass leaves."""
    args, state = inputs(T, per_channel=per_channel)
    expected, got = [], []
    gated_delta_rule(*args, state.clone(), trail=expected)
    final = state.clone()
    gated_delta_rule_chunked(*args, final, chunk=chunk, trail=got)
    assert len(got) == -(-T // chunk) and len(expected) == T
    torch.testing.assert_close(torch.cat(got, dim=2), torch.cat(expected, dim=2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[-1][:, :, -1], final)
