"""The plain-PyTorch expert computation against a per-token loop written from the definition."""

import pytest
import torch
import torch.nn.functional as F

from localmoe.kernels.reference import ExpertStack, expert_mlp, expert_pair_outputs
from localmoe.models.moe import GatedActivation

HIDDEN, INTER = 16, 24
SWIGLU = GatedActivation()


def per_token(x, gate_up, down, weights, slots, biases=None, clamped=False):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, s in zip(weights[t].tolist(), slots[t].tolist(), strict=True):
            gate, up = gate_up[s, :INTER] @ x[t], gate_up[s, INTER:] @ x[t]
            if biases is not None:
                gate, up = gate + biases[0][s, :INTER], up + biases[0][s, INTER:]
            if clamped:  # gpt-oss, written out
                gate, up = gate.clamp(max=7.0), up.clamp(-7.0, 7.0)
                hidden = gate * torch.sigmoid(1.702 * gate) * (up + 1)
            else:
                hidden = F.silu(gate) * up
            y = down[s] @ hidden
            out[t] += w * (y + biases[1][s] if biases is not None else y)
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
    got = expert_mlp(x, gate_up, down, weights, chosen, SWIGLU)
    torch.testing.assert_close(got, per_token(x, gate_up, down, weights, chosen), rtol=1e-5, atol=1e-5)


def test_biases_and_the_clamped_activation():
    """gpt-oss experts: biases on both projections, and the clamped SwiGLU (inputs big enough to clamp)."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(7, HIDDEN, generator=g) * 3
    gate_up, down = torch.randn(5, 2 * INTER, HIDDEN, generator=g), torch.randn(5, HIDDEN, INTER, generator=g) / 4
    biases = (torch.randn(5, 2 * INTER, generator=g), torch.randn(5, HIDDEN, generator=g))
    chosen = torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(7)])
    weights = torch.rand(7, 2, generator=g)
    clamped = GatedActivation(kind="clamped_swiglu", alpha=1.702, limit=7.0)
    got = expert_mlp(x, gate_up, down, weights, chosen, clamped, *biases)
    expected = per_token(x, gate_up, down, weights, chosen, biases, clamped=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_all_tokens_to_one_slot():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, HIDDEN, generator=g)
    gate_up, down = torch.randn(3, 2 * INTER, HIDDEN, generator=g), torch.randn(3, HIDDEN, INTER, generator=g)
    slots = torch.full((6, 1), 2)
    weights = torch.ones(6, 1)
    got = expert_mlp(x, gate_up, down, weights, slots, SWIGLU)
    # batched and one-row products round differently: the same tolerance as the other cases
    torch.testing.assert_close(got, per_token(x, gate_up, down, weights, slots), rtol=1e-5, atol=1e-4)


def test_pairs_outside_the_pool_are_computed_from_the_host_stack():
    """A slot of -1 reads the expert where it lies (the host stack, by expert id), bit for bit what the
    same expert gives from a slot; without a host stack such a pair is skipped."""
    torch.manual_seed(0)
    experts, hidden, inter, tokens, k = 6, 8, 4, 3, 2
    host = ExpertStack(torch.randn(experts, 2 * inter, hidden), torch.randn(experts, hidden, inter))
    pool = ExpertStack(host.gate_up[[4, 1]].clone(), host.down[[4, 1]].clone())  # experts 4 and 1 in slots 0, 1
    x = torch.randn(tokens, hidden)
    ids = torch.tensor([[4, 2], [1, 5], [2, 4]])
    slots = torch.tensor([[0, -1], [1, -1], [-1, 0]])
    act = GatedActivation()
    everything = torch.zeros(tokens * k, hidden)
    expert_pair_outputs(everything, x, *host[:2], ids, act)
    mixed = torch.zeros(tokens * k, hidden)
    expert_pair_outputs(mixed, x, *pool[:2], slots, act, ids=ids, host=host)
    assert torch.equal(mixed, everything)
    skipped = torch.full((tokens * k, hidden), 7.0)
    expert_pair_outputs(skipped, x, *pool[:2], slots, act)
    assert torch.equal(skipped[slots.reshape(-1) < 0], torch.full((3, hidden), 7.0))
