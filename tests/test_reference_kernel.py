"""The plain-PyTorch expert computation against a per-token loop written from the definition."""

import pytest
import torch
import torch.nn.functional as F

from localmoe.kernels.reference import expert_mlp

HIDDEN, INTER = 16, 24


def per_token(x, gate_up, down, weights, slots):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, s in zip(weights[t].tolist(), slots[t].tolist(), strict=True):
            gate, up = gate_up[s, :INTER] @ x[t], gate_up[s, INTER:] @ x[t]
            out[t] += w * (down[s] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize(
    "tokens,slots,top_k",
    [
        (1, 8, 2),  # one decode token
        (17, 7, 3),  # a prime number of slots and of tokens
        (9, 4, 4),  # k equal to the number of slots: every slot for every token
        (5, 6, 1),  # top-1
    ],
)
def test_matches_the_definition(tokens, slots, top_k):
    g = torch.Generator().manual_seed(tokens * 100 + slots)
    x = torch.randn(tokens, HIDDEN, generator=g)
    gate_up = torch.randn(slots, 2 * INTER, HIDDEN, generator=g) / 4
    down = torch.randn(slots, HIDDEN, INTER, generator=g) / 4
    chosen = torch.stack([torch.randperm(slots, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g)
    got = expert_mlp(x, gate_up, down, weights, chosen)
    torch.testing.assert_close(got, per_token(x, gate_up, down, weights, chosen), rtol=1e-5, atol=1e-5)


def test_all_tokens_to_one_slot():
    x = torch.randn(6, HIDDEN)
    gate_up, down = torch.randn(3, 2 * INTER, HIDDEN), torch.randn(3, HIDDEN, INTER)
    slots = torch.full((6, 1), 2)
    weights = torch.ones(6, 1)
    torch.testing.assert_close(
        expert_mlp(x, gate_up, down, weights, slots), per_token(x, gate_up, down, weights, slots)
    )
