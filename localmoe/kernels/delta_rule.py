"""The gated delta rule, the linear attention of Gated DeltaNet layers (Qwen3.5, Qwen3-Next), in plain
PyTorch and float32.

Per head, a state S [Dk, Dv] is decayed by exp(g_t), then corrected towards v_t along k_t at rate
beta_t: S <- a S + beta k (v - a S^T k)^T with a = exp(g_t), and the output is S^T q.
`gated_delta_rule` runs it token by token (the reference, and the decode step); the chunked form gives
the same result with matrix products over chunks of tokens (the prefill).

Shapes: q, k [B, H, T, Dk]; v [B, H, T, Dv]; g (log decay, <= 0) and beta [B, H, T]; state [B, H, Dk, Dv],
updated in place.
"""

import torch


def gated_delta_rule(q, k, v, g, beta, state: torch.Tensor) -> torch.Tensor:
    """Token by token: out [B, H, T, Dv]."""
    out = v.new_empty(v.shape)
    for t in range(q.shape[2]):
        state.mul_(g[..., t, None, None].exp())
        predicted = (k[..., t, None, :] @ state).squeeze(-2)  # S^T k [B, H, Dv]
        correction = (v[..., t, :] - predicted) * beta[..., t, None]
        state.add_(k[..., t, :, None] * correction[..., None, :])
        out[..., t, :] = (q[..., t, None, :] @ state).squeeze(-2)
    return out


def gated_delta_rule_chunked(q, k, v, g, beta, state: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Chunk by chunk: out [B, H, T, Dv], equal to `gated_delta_rule` up to rounding."""
    pieces = [
        _one_chunk(*(x[:, :, start : start + chunk] for x in (q, k, v, g, beta)), state)
        for start in range(0, q.shape[2], chunk)
    ]
    return torch.cat(pieces, dim=2)


def _one_chunk(q, k, v, g, beta, state: torch.Tensor) -> torch.Tensor:
    """With c_t the cumulative log decay inside the chunk and S0 the state before it, the values written
    u_t = beta_t (v_t - exp(c_t) S0^T k_t - sum_{j<t} exp(c_t - c_j) (k_t . k_j) u_j) solve a unit lower
    triangular system; outputs and the next state follow from u by matrix products."""
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
    total = decay[..., -1:]
    state.mul_(total.exp()[..., None]).add_((k * (total - decay).exp()[..., None]).transpose(-1, -2) @ u)
    return out
