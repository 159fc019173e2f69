"""The Mamba-2 mixer (Nemotron-H, Granite 4.0-H): one projection gives the gate z, the inputs x, B and C
(through a short causal convolution and SiLU) and the step dt per head; a selective state space scan
(kernels/ssd.py) mixes x over the sequence with decay exp(dt A), reading with C what B wrote; the result
plus D x is gated by silu(z), RMS-normalised per group of heads, and projected back."""

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.kernels.ssd import ssd_chunked, ssd_scan
from localmoe.models.layers import Step, activation
from localmoe.models.short_conv import causal_conv
from localmoe.models.state import RecurrentState


class GroupGatedRMSNorm(nn.Module):
    """x * silu(gate), RMS-normalised over groups of `group` channels, times the weight (in float32)."""

    def __init__(self, dim: int, group: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group, self.eps = group, eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        gated = x.float() * F.silu(gate.float())
        groups = gated.view(*x.shape[:-1], -1, self.group)
        normed = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)).view(x.shape)
        return self.weight * normed.to(x.dtype)


class Mamba2Mixer(nn.Module):
    """Sizes: `heads` of `head_dim` channels (the inner width), a state of `state_size` per head, B and C
    shared by heads in `groups`; `kernel` the convolution's width; dt clamped to `dt_limit` (the range
    the chunked scan of the original implementation clamps it to; its one-token step does not, which
    only differs below the lower limit: localmoe clamps both, as the model was trained)."""

    def __init__(
        self,
        hidden: int,
        *,
        heads: int,
        head_dim: int,
        state_size: int,
        groups: int,
        kernel: int,
        eps: float,
        act: str = "silu",
        proj_bias: bool = False,
        conv_bias: bool = True,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
    ):
        super().__init__()
        self.heads, self.head_dim, self.state_size, self.groups = heads, head_dim, state_size, groups
        self.kernel, self.dt_limit = kernel, dt_limit
        self.act = activation(act)
        inner = heads * head_dim
        self.channels = inner + 2 * groups * state_size  # x, B, C: what the convolution sees
        self.in_proj = nn.Linear(hidden, inner + self.channels + heads, bias=proj_bias)
        self.conv1d = nn.Conv1d(self.channels, self.channels, kernel, groups=self.channels, bias=conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(heads))
        self.A_log = nn.Parameter(torch.empty(heads))
        self.D = nn.Parameter(torch.empty(heads))
        self.norm = GroupGatedRMSNorm(inner, inner // groups, eps)
        self.out_proj = nn.Linear(inner, hidden, bias=proj_bias)

    recurrent = True  # its state is a RecurrentState (see CausalLM.recurrent_state_bytes)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> RecurrentState:
        conv = torch.zeros(batch, self.channels, self.kernel - 1, dtype=dtype, device=device)
        ssm = torch.zeros(batch, self.heads, self.head_dim, self.state_size, dtype=torch.float32, device=device)
        return RecurrentState(conv=conv, ssm=ssm)

    def state_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 0

    def fixed_state_bytes(self, dtype: torch.dtype) -> int:
        return self.channels * (self.kernel - 1) * dtype.itemsize + self.heads * self.head_dim * self.state_size * 4

    def forward(self, x: torch.Tensor, step: Step, state: RecurrentState) -> torch.Tensor:
        B_, T, _ = x.shape
        inner, shared = self.heads * self.head_dim, self.groups * self.state_size
        gate, conv_in, dt = self.in_proj(x).split((inner, self.channels, self.heads), dim=-1)
        state.begin(step)
        mixed = self.act(causal_conv(conv_in, state.conv, self.conv1d.weight, self.conv1d.bias, state.pieces["conv"]))
        xs, B, C = mixed.split((inner, shared, shared), dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.dt_limit).transpose(1, 2)  # [B, H, T]
        per_group = self.heads // self.groups
        B, C = (t.view(B_, T, self.groups, -1).repeat_interleave(per_group, 2).transpose(1, 2).float() for t in (B, C))
        heads = xs.view(B_, T, self.heads, self.head_dim).transpose(1, 2).float()  # [B, H, T, P]
        scan = ssd_scan if T == 1 else ssd_chunked
        out = scan(heads, dt, -self.A_log.float().exp(), B, C, state.ssm, trail=state.pieces["ssm"])
        out = out + heads * self.D.float()[:, None, None]
        out = out.transpose(1, 2).reshape(B_, T, inner)  # float32 through the norm, as transformers' prefill
        return self.out_proj(self.norm(out, gate).to(x.dtype))
