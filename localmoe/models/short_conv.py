"""Short causal convolutions: the depthwise convolution over the last few inputs that Gated DeltaNet,
Mamba-2 and Kimi Delta Attention put before their sequence mixing, and LFM2 uses as a mixer itself.

A layer keeps the last K - 1 inputs of its convolution (K the kernel width) between forward passes,
so that prefill in chunks and one-token decode steps see the same window as one pass over everything.
"""

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.models.layers import Step
from localmoe.models.state import REWIND_SLACK, ConvRing


def causal_conv(
    x: torch.Tensor,
    window: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    trail: list | None = None,
):
    """x [B, T, C] convolved per channel with weight [C, 1, K] over each position and the K - 1 before
    it, continuing from `window` [B, C, K - 1] (the inputs before x; updated in place to the last K - 1
    inputs): [B, T, C], before any activation. Where a list is given as `trail`, the window after each
    position is appended to it, [B, C, T, K - 1] (views of the inputs)."""
    inputs = torch.cat((window, x.transpose(1, 2)), dim=-1)  # [B, C, K - 1 + T]
    window.copy_(inputs[..., inputs.shape[-1] - window.shape[-1] :])
    if trail is not None:
        trail.append(inputs.unfold(-1, window.shape[-1], 1)[:, :, 1:])
    return F.conv1d(inputs, weight, bias, groups=inputs.shape[1]).transpose(1, 2)


class GatedShortConv(nn.Module):
    """LFM2's convolution layer: in_proj gives B, C and x; B * x is convolved causally per channel over
    the last `kernel` positions, gated by C, and projected back. Its state is a ring of past inputs, so
    it can be rewound (see ConvRing)."""

    def __init__(self, hidden: int, kernel: int, bias: bool):
        super().__init__()
        self.hidden, self.kernel = hidden, kernel
        self.in_proj = nn.Linear(hidden, 3 * hidden, bias=bias)
        self.conv = nn.Conv1d(hidden, hidden, kernel, groups=hidden, bias=bias)
        self.out_proj = nn.Linear(hidden, hidden, bias=bias)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> ConvRing:
        return ConvRing(batch, self.hidden, self.kernel, dtype, device)

    def state_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 0

    def fixed_state_bytes(self, dtype: torch.dtype) -> int:
        return self.hidden * (self.kernel - 1 + REWIND_SLACK) * dtype.itemsize

    def forward(self, x: torch.Tensor, step: Step, state: ConvRing) -> torch.Tensor:
        b, c, inputs = self.in_proj(x).chunk(3, dim=-1)
        gated = b * inputs  # [B, T, C]
        out = causal_conv(gated, state.window(step.start), self.conv.weight, self.conv.bias)
        state.write(gated.transpose(1, 2), step.start)
        return self.out_proj(c * out)
