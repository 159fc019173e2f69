"""The selective state space scan of Mamba-2 layers (Nemotron-H, Granite 4.0-H), in plain PyTorch and
float32.

Per head, a state S [P, N] decays by exp(dt_t A) and takes dt_t x_t B_t^T for each token; the output
is S C_t. `ssd_scan` runs it token by token (the reference, and the decode step); the chunked form
(state space duality) gives the same result with matrix products over chunks of tokens (the prefill):
inside a chunk it is attention with a decaying causal mask, across chunks the running state.

Shapes: x [B, H, T, P]; dt [B, H, T] (positive steps); A [H] (negative rates); B, C [B, H, T, N];
state [B, H, P, N], updated in place. Where a list is given as `trail` (a speculative check, which may be
cut back to any of its positions), the states after each position are appended to it, [B, H, n, P, N]
for n positions at a time; nothing is computed for it otherwise.
"""

import torch


def ssd_scan(x, dt, A, B, C, state: torch.Tensor, trail: list | None = None) -> torch.Tensor:
    """Token by token: out [B, H, T, P]."""
    out = x.new_empty(x.shape)
    for t in range(x.shape[2]):
        state.mul_((dt[..., t] * A).exp()[..., None, None])
        state.add_((dt[..., t, None] * x[..., t, :])[..., :, None] * B[..., t, None, :])
        out[..., t, :] = (state @ C[..., t, :, None]).squeeze(-1)
        if trail is not None:
            trail.append(state[:, :, None].clone())
    return out


def ssd_chunked(x, dt, A, B, C, state: torch.Tensor, chunk: int = 128, trail: list | None = None) -> torch.Tensor:
    """Chunk by chunk: out [B, H, T, P], equal to `ssd_scan` up to rounding."""
    pieces = [
        _one_chunk(*(t[:, :, start : start + chunk] for t in (x, dt, B, C)), A, state, trail)
        for start in range(0, x.shape[2], chunk)
    ]
    return torch.cat(pieces, dim=2)


def _one_chunk(x, dt, B, C, A, state: torch.Tensor, trail: list | None) -> torch.Tensor:
    """With c_t the cumulative log decay inside the chunk and S0 the state before it,
    out_t = sum_{s<=t} exp(c_t - c_s) (C_t . B_s) dt_s x_s + exp(c_t) S0 C_t; the state after position t
    is S_t = exp(c_t) S0 + sum_{s<=t} exp(c_t - c_s) dt_s x_s B_s^T."""
    n = x.shape[2]
    decay = (dt * A[:, None]).cumsum(-1)  # [B, H, n]
    causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    between = torch.exp((decay[..., :, None] - decay[..., None, :]).masked_fill(~causal, float("-inf")))
    written = x * dt[..., None]  # [B, H, n, P]
    out = ((C @ B.transpose(-1, -2)) * between) @ written + decay.exp()[..., None] * (C @ state.transpose(-1, -2))
    if trail is not None:
        trail.append(
            decay.exp()[..., None, None] * state[:, :, None]
            + torch.einsum("bhts,bhsp,bhsn->bhtpn", between, written, B)
        )
    total = decay[..., -1:]
    state.mul_(total.exp()[..., None]).add_((written * (total - decay).exp()[..., None]).transpose(-1, -2) @ B)
    return out
