"""The Mamba-1 mixer (Jamba): one projection gives the inputs x and the gate z; x goes through a short
causal convolution and the activation, then gives each token its step dt (through a low-rank
projection), B and C; a selective scan (kernels/selective_scan.py) mixes x over the sequence per channel
with decay exp(dt A), reading with C what B wrote; the result plus D x is gated by silu(z) and projected
back. Jamba RMS-normalises dt, B and C before use (`inner_norm_eps`)."""

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.kernels.selective_scan import selective_chunked, selective_scan
from localmoe.models.layers import RMSNorm, Step, activation
from localmoe.models.short_conv import causal_conv
from localmoe.models.state import RecurrentState


class Mamba1Mixer(nn.Module):
    """Sizes: `inner` channels, a state of `state_size` per channel, dt through a projection of rank
    `dt_rank`, a convolution `kernel` wide."""

    def __init__(
        self,
        hidden: int,
        *,
        inner: int,
        state_size: int,
        dt_rank: int,
        kernel: int,
        act: str = "silu",
        proj_bias: bool = False,
        conv_bias: bool = True,
        inner_norm_eps: float | None = None,
    ):
        super().__init__()
        self.inner, self.state_size, self.dt_rank, self.kernel = inner, state_size, dt_rank, kernel
        self.act = activation(act)
        self.in_proj = nn.Linear(hidden, 2 * inner, bias=proj_bias)
        self.conv1d = nn.Conv1d(inner, inner, kernel, groups=inner, bias=conv_bias)
        self.x_proj = nn.Linear(inner, dt_rank + 2 * state_size, bias=False)
        self.dt_proj = nn.Linear(dt_rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(inner, state_size))
        self.D = nn.Parameter(torch.empty(inner))
        self.out_proj = nn.Linear(inner, hidden, bias=proj_bias)
        if inner_norm_eps is not None:
            self.dt_layernorm = RMSNorm(dt_rank, inner_norm_eps)
            self.b_layernorm = RMSNorm(state_size, inner_norm_eps)
            self.c_layernorm = RMSNorm(state_size, inner_norm_eps)

    recurrent = True  # its state is a RecurrentState (see CausalLM.recurrent_state_bytes)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> RecurrentState:
        conv = torch.zeros(batch, self.inner, self.kernel - 1, dtype=dtype, device=device)
        ssm = torch.zeros(batch, self.inner, self.state_size, dtype=torch.float32, device=device)
        return RecurrentState(conv=conv, ssm=ssm)

    def state_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 0

    def fixed_state_bytes(self, dtype: torch.dtype) -> int:
        return self.inner * (self.kernel - 1) * dtype.itemsize + self.inner * self.state_size * 4

    def forward(self, x: torch.Tensor, step: Step, state: RecurrentState) -> torch.Tensor:
        xs, gate = self.in_proj(x).chunk(2, dim=-1)  # [B, T, inner]
        state.begin(step)
        xs = self.act(causal_conv(xs, state.conv, self.conv1d.weight, self.conv1d.bias, state.pieces["conv"]))
        dt, B, C = self.x_proj(xs).split((self.dt_rank, self.state_size, self.state_size), dim=-1)
        if hasattr(self, "dt_layernorm"):
            dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        dt = F.softplus(F.linear(dt, self.dt_proj.weight).float() + self.dt_proj.bias.float())  # [B, T, inner]
        inputs = xs.transpose(1, 2).float()  # [B, inner, T]
        scan = selective_scan if x.shape[1] == 1 else selective_chunked
        A = -self.A_log.float().exp()
        out = scan(inputs, dt.transpose(1, 2), A, B.float(), C.float(), state.ssm, trail=state.pieces["ssm"])
        out = (out + inputs * self.D.float()[:, None]) * F.silu(gate.transpose(1, 2).float())
        return self.out_proj(out.transpose(1, 2).to(x.dtype))
