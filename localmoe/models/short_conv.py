"""Short causal convolutions: the depthwise convolution over the last few inputs that Gated DeltaNet,
Mamba-2 and Kimi Delta Attention put before their sequence mixing, and LFM2 uses as a mixer itself.

A layer keeps the last K - 1 inputs of its convolution (K the kernel width) between forward passes,
so that prefill in chunks and one-token decode steps see the same window as one pass over everything.
"""

import torch
import torch.nn.functional as F


def causal_conv(x: torch.Tensor, window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """x [B, T, C] convolved per channel with weight [C, 1, K] over each position and the K - 1 before
    it, continuing from `window` [B, C, K - 1] (the inputs before x; updated in place to the last K - 1
    inputs): [B, T, C], before any activation."""
    inputs = torch.cat((window, x.transpose(1, 2)), dim=-1)  # [B, C, K - 1 + T]
    window.copy_(inputs[..., inputs.shape[-1] - window.shape[-1] :])
    return F.conv1d(inputs, weight, bias, groups=inputs.shape[1]).transpose(1, 2)
