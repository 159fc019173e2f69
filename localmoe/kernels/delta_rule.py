"""The gated delta rule, the linear attention of Gated DeltaNet layers (Qwen3.5, Qwen3-Next) and of Kimi
Delta Attention (Kimi-Linear), in plain PyTorch and float32.

Per head, a state S [Dk, Dv] is decayed by exp(g_t) (one factor per head, or, in Kimi Delta Attention,
one per key channel: row d of S by exp(g_t[d])), then corrected towards v_t along k_t at rate beta_t:
S <- A S + beta k (v - (A S)^T k)^T with A the decay, and the output is S^T q.
`gated_delta_rule` runs it token by token (the reference, and the decode step); the chunked form gives
the same result with matrix products over chunks of tokens (the prefill).

Shapes: q, k [B, H, T, Dk]; v [B, H, T, Dv]; g (log decay, <= 0) [B, H, T] or [B, H, T, Dk]; beta
[B, H, T]; state [B, H, Dk, Dv], updated in place. Where a list is given as `trail` (a speculative check,
which may be cut back to any of its positions), the states after each position are appended to it,
[B, H, n, Dk, Dv] for n positions at a time; nothing is computed for it otherwise.
"""

import torch


def gated_delta_rule(q, k, v, g, beta, state: torch.Tensor, trail: list | None = None) -> torch.Tensor:
    """Token by token: out [B, H, T, Dv]."""
    decay = g.exp() if g.dim() == 4 else g.exp()[..., None]  # [B, H, T, Dk or 1]
    out = v.new_empty(v.shape)
    for t in range(q.shape[2]):
        state.mul_(decay[..., t, :, None])
        predicted = (k[..., t, None, :] @ state).squeeze(-2)  # S^T k [B, H, Dv]
        correction = (v[..., t, :] - predicted) * beta[..., t, None]
        state.add_(k[..., t, :, None] * correction[..., None, :])
        out[..., t, :] = (q[..., t, None, :] @ state).squeeze(-2)
        if trail is not None:
            trail.append(state[:, :, None].clone())
    return out


def gated_delta_rule_chunked(
    q, k, v, g, beta, state: torch.Tensor, chunk: int = 64, trail: list | None = None
) -> torch.Tensor:
    """Chunk by chunk: out [B, H, T, Dv], equal to `gated_delta_rule` up to rounding."""
    one_chunk = _one_chunk_per_channel if g.dim() == 4 else _one_chunk
    pieces = [
        one_chunk(*(x[:, :, start : start + chunk] for x in (q, k, v, g, beta)), state, trail)
        for start in range(0, q.shape[2], chunk)
    ]
    return torch.cat(pieces, dim=2)


def _one_chunk(q, k, v, g, beta, state: torch.Tensor, trail: list | None) -> torch.Tensor:
    """With c_t the cumulative log decay inside the chunk and S0 the state before it, the values written
    u_t = beta_t (v_t - exp(c_t) S0^T k_t - sum_{j<t} exp(c_t - c_j) (k_t . k_j) u_j) solve a unit lower
    triangular system; outputs and the next state follow from u by matrix products, and so does the
    state after each position, S_t = exp(c_t) S0 + sum_{j<=t} exp(c_t - c_j) k_j u_j^T."""
    n = q.shape[2]
    decay = g.cumsum(-1)  # [B, H, n]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    between = torch.exp((decay[..., :, None] - decay[..., None, :]).masked_fill(~causal, float("-inf")))
    weighted_k = k * beta[..., None]
    system = ((weighted_k @ k.transpose(-1, -2)) * between).tril(-1)
    rhs = torch.cat((v * beta[..., None], weighted_k * decay.exp()[..., None]), dim=-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    written, decayed_keys = solved.split((v.shape[-1], k.shape[-1]), dim=-1)
    u = written - decayed_keys @ state  # [B, H, n, Dv]
    out = (q * decay.exp()[..., None]) @ state + ((q @ k.transpose(-1, -2)) * between) @ u
    if trail is not None:
        trail.append(
            decay.exp()[..., None, None] * state[:, :, None] + torch.einsum("bhtj,bhjk,bhjv->bhtkv", between, k, u)
        )
    total = decay[..., -1:]
    state.mul_(total.exp()[..., None]).add_((k * (total - decay).exp()[..., None]).transpose(-1, -2) @ u)
    return out


def _one_chunk_per_channel(q, k, v, g, beta, state: torch.Tensor, trail: list | None) -> torch.Tensor:
    """`_one_chunk` with a decay per key channel: products of keys (and of queries with keys) weigh each
    channel by its own decay between the two positions, [B, H, n, n, Dk] at once."""
    n = q.shape[2]
    decay = g.cumsum(-2)  # [B, H, n, Dk]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()[..., None]
    between = torch.exp((decay[..., :, None, :] - decay[..., None, :, :]).masked_fill(~causal, float("-inf")))
    weighted_k = k * beta[..., None]
    system = (weighted_k[..., :, None, :] * k[..., None, :, :] * between).sum(-1).tril(-1)  # [B, H, n, n]
    rhs = torch.cat((v * beta[..., None], weighted_k * decay.exp()), dim=-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    written, decayed_keys = solved.split((v.shape[-1], k.shape[-1]), dim=-1)
    u = written - decayed_keys @ state  # [B, H, n, Dv]
    scores = (q[..., :, None, :] * k[..., None, :, :] * between).sum(-1)  # [B, H, n, n], zero above the diagonal
    out = (q * decay.exp()) @ state + scores @ u
    if trail is not None:
        trail.append(decay.exp()[..., None] * state[:, :, None] + torch.einsum("bhtjd,bhjd,bhjv->bhtdv", between, k, u))
    total = decay[..., -1:, :]  # [B, H, 1, Dk]
    state.mul_(total.exp().transpose(-1, -2)).add_((k * (total - decay).exp()).transpose(-1, -2) @ u)
    return out
