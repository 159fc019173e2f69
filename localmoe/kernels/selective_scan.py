"""The selective scan of Mamba-1 layers (Jamba), in plain PyTorch and float32.

Per channel d, a state h [N] decays by exp(dt_t A_d), a rate per state entry, and takes dt_t x_t B_t;
the output is h . C_t. B and C are shared by all channels. `selective_scan` runs it token by token (the
reference, and the decode step); `selective_chunked` gives the same result with products over short
chunks of tokens (the prefill): inside a chunk each output reads every earlier input through the decay
between them, across chunks the running state. Unlike Mamba-2's scan (ssd.py) the decay differs per
state entry, so a chunk holds [T, T, N] decays per channel: chunks stay short.

Shapes: x, dt [B, D, T] (positive steps); A [D, N] (negative rates); B, C [B, T, N]; state [B, D, N],
updated in place. Where a list is given as `trail` (a speculative check, which may be cut back to any of
its positions), the states after each position are appended to it, [B, D, n, N] for n positions at a
time; nothing is computed for it otherwise.
"""

import torch


def selective_scan(x, dt, A, B, C, state: torch.Tensor, trail: list | None = None) -> torch.Tensor:
    """Token by token: out [B, D, T]."""
    out = x.new_empty(x.shape)
    for t in range(x.shape[2]):
        state.mul_((dt[..., t, None] * A).exp())
        state.add_((dt[..., t] * x[..., t])[..., None] * B[:, None, t])
        out[..., t] = (state @ C[:, t, :, None]).squeeze(-1)
        if trail is not None:
            trail.append(state[:, :, None].clone())
    return out


def selective_chunked(x, dt, A, B, C, state: torch.Tensor, chunk: int = 16, trail: list | None = None) -> torch.Tensor:
    """Chunk by chunk: out [B, D, T], equal to `selective_scan` up to rounding."""
    pieces = [
        _one_chunk(
            x[..., s : s + chunk], dt[..., s : s + chunk], B[:, s : s + chunk], C[:, s : s + chunk], A, state, trail
        )
        for s in range(0, x.shape[2], chunk)
    ]
    return torch.cat(pieces, dim=2)


def _one_chunk(x, dt, B, C, A, state: torch.Tensor, trail: list | None) -> torch.Tensor:
    """With c_t the cumulative log decay inside the chunk (per channel and state entry) and h0 the state
    before it: out_t = sum_{s<=t} sum_n C_tn exp(c_tn - c_sn) B_sn dt_s x_s + sum_n C_tn exp(c_tn) h0_n;
    the state after position t is h_tn = exp(c_tn) h0_n + sum_{s<=t} exp(c_tn - c_sn) B_sn dt_s x_s."""
    n = x.shape[2]
    decay = (dt[..., None] * A[:, None, :]).cumsum(2)  # [B, D, n, N]
    causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()[..., None]
    between = (decay[:, :, :, None] - decay[:, :, None]).masked_fill(~causal, float("-inf")).exp()  # [B, D, t, s, N]
    pairs = (between * (C[:, None, :, None] * B[:, None, None])).sum(-1)  # [B, D, t, s]
    written = dt * x  # [B, D, n]
    out = (pairs @ written[..., None]).squeeze(-1) + ((decay.exp() * state[:, :, None]) * C[:, None]).sum(-1)
    if trail is not None:
        trail.append(decay.exp() * state[:, :, None] + torch.einsum("bdtsn,bds,bsn->bdtn", between, written, B))
    total = decay[:, :, -1]  # [B, D, N]
    state.mul_(total.exp()).add_((((total[:, :, None] - decay).exp() * written[..., None]) * B[:, None]).sum(2))
    return out
