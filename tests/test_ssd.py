"""The chunked state space scan (Mamba-2) against the token-by-token one it must equal."""

import pytest
import torch

from localmoe.kernels.ssd import ssd_chunked, ssd_scan


def inputs(T: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batch, H, P, N = 2, 3, 5, 4

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    x, B, C = randn(batch, H, T, P), randn(batch, H, T, N), randn(batch, H, T, N)
    dt = torch.rand(batch, H, T, generator=generator)
    A = -torch.rand(H, generator=generator) * 2
    return (x, dt, A, B, C), randn(batch, H, P, N)


@pytest.mark.parametrize("T, chunk", [(1, 128), (7, 128), (128, 128), (150, 128), (37, 5)])
def test_chunked_equals_token_by_token(T, chunk):
    args, state = inputs(T)
    expected_state, got_state = state.clone(), state.clone()
    expected = ssd_scan(*args, expected_state)
    got = ssd_chunked(*args, got_state, chunk=chunk)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_state, expected_state, atol=1e-5, rtol=1e-5)


def test_a_sequence_split_in_two_carries_its_state():
    args, state = inputs(40)
    whole_state, split_state = state.clone(), state.clone()
    whole = ssd_chunked(*args, whole_state, chunk=16)
    x, dt, A, B, C = args
    first = ssd_chunked(x[:, :, :25], dt[:, :, :25], A, B[:, :, :25], C[:, :, :25], split_state, chunk=16)
    second = ssd_scan(x[:, :, 25:], dt[:, :, 25:], A, B[:, :, 25:], C[:, :, 25:], split_state)
    torch.testing.assert_close(torch.cat((first, second), dim=2), whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split_state, whole_state, atol=1e-5, rtol=1e-5)


def test_zero_steps_leave_the_state_and_read_it():
    """dt = 0: nothing decays and nothing is written; each output reads the state as it was."""
    (x, dt, A, B, C), state = inputs(6)
    before = state.clone()
    out = ssd_chunked(x, torch.zeros_like(dt), A, B, C, state)
    torch.testing.assert_close(state, before)
    torch.testing.assert_close(out, (before[:, :, None] @ C[..., None]).squeeze(-1))


@pytest.mark.parametrize("T, chunk", [(5, 128), (37, 16)])
def test_the_state_after_each_position(T, chunk):
    """A speculative check's trail: the chunked form's state after each position is the token-by-token
    one's, and the last of them is the state the pass leaves."""
    args, state = inputs(T)
    expected, got = [], []
    ssd_scan(*args, state.clone(), trail=expected)
    final = state.clone()
    ssd_chunked(*args, final, chunk=chunk, trail=got)
    assert len(got) == -(-T // chunk) and len(expected) == T
    torch.testing.assert_close(torch.cat(got, dim=2), torch.cat(expected, dim=2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[-1][:, :, -1], final)
