"""Rotary position embeddings: the settings of a config in any spelling, the frequencies of each rotary
type (default, linear, llama3, yarn, longrope, proportional, NTK-alpha), and the rotations themselves."""

import math
from typing import Any

import torch
from torch import nn

from localmoe.errors import LocalMoEError
from localmoe.kernels.cpu_experts import rotary


def rope_parameters(
    config: dict[str, Any], default_theta: float, defaults: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The rotary settings of a config, whether written as 5.x `rope_parameters` or as older top-level
    `rope_theta` plus `rope_scaling`, with the family's `defaults` where the config is silent; the
    result always has `rope_type` and `rope_theta`."""
    params = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    if "type" in params:  # the oldest spelling
        params.setdefault("rope_type", params.pop("type"))
    if config.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    for key, value in (defaults or {}).items():
        params.setdefault(key, value)
    params.setdefault("rope_type", "default")
    theta = config.get("rope_theta")
    params.setdefault("rope_theta", default_theta if theta is None else theta)
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        if config.get("original_max_position_embeddings") is not None:
            params["original_max_position_embeddings"] = config["original_max_position_embeddings"]
        params.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
    return params


def rope_inv_freq(params: dict[str, Any], head_dim: int, max_positions: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the attention scaling applied to cos/sin, per `rope_type`."""
    kind = params["rope_type"]
    base = float(params["rope_theta"])
    if kind == "proportional":
        # Gemma 4: the first fraction of each half of the head rotates, at the frequencies a full-width
        # rotary would give those dims; the rest get frequency zero, so cos and sin span the whole head
        rotated = int(params.get("partial_rotary_factor", 1.0) * head_dim // 2)
        inv_freq = 1.0 / base ** (torch.arange(0, 2 * rotated, 2, dtype=torch.int64).float() / head_dim)
        return torch.cat((inv_freq, torch.zeros(head_dim // 2 - rotated))) / params.get("factor", 1.0), 1.0
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / base**exponents
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / params["factor"], 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, params), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(inv_freq, params, dim, base, max_positions)
    if kind == "longrope":
        return _longrope_inv_freq(inv_freq, params, max_positions)
    if kind == "dynamic" and "alpha" in params:
        # NTK-alpha (Hunyuan): a fixed change of base, whatever the length
        return 1.0 / (base * params["alpha"] ** (dim / (dim - 2))) ** exponents, 1.0
    raise LocalMoEError(
        f"rope_type {kind!r} is not supported yet; localmoe knows default, linear, llama3, yarn, longrope, "
        "proportional and dynamic with alpha"
    )


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_context = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(
    inv_freq: torch.Tensor, params: dict[str, Any], dim: int, base: float, max_positions: int
) -> tuple[torch.Tensor, float]:
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_positions / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(params.get("beta_fast") or 32), correction_dim(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    return inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate, float(attention_factor)


def _longrope_inv_freq(
    inv_freq: torch.Tensor, params: dict[str, Any], max_positions: int
) -> tuple[torch.Tensor, float]:
    """The short factors' frequencies (what transformers computes without a sequence length) and the
    attention factor; a family that switches to the long factors or scales does so itself."""
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_positions / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return inv_freq / torch.tensor(params["short_factor"], dtype=torch.float32), float(attention_factor)


class RotaryEmbedding(nn.Module):
    static = True  # cos and sin of a position do not depend on the rest of its forward pass

    def __init__(self, params: dict[str, Any], head_dim: int, max_positions: int):
        super().__init__()
        with torch.device("cpu"):  # real values even when the model is being built on `meta`
            inv_freq, self.scaling = rope_inv_freq(params, head_dim, max_positions)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def frequencies(self) -> torch.Tensor:
        """The angle per position of each pair of rotated dims [rotary dim / 2] (learned in Mistral Large 4)."""
        return self.inv_freq

    def scale(self, start: int, length: int) -> float:
        """The factor on cos and sin for a forward pass over positions start .. start + length - 1."""
        return self.scaling

    def forward(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, rotary dim] for positions start .. start + length - 1."""
        positions = torch.arange(start, start + length, device=self.inv_freq.device)
        return self.at(positions, dtype, self.scale(start, length))

    def at(self, positions: torch.Tensor, dtype: torch.dtype, scale: float | None = None):
        """cos and sin [N, rotary dim] for any positions [N]."""
        freqs = torch.outer(positions.to(self.inv_freq.device, torch.float32), self.frequencies())
        angles = torch.cat((freqs, freqs), dim=-1)
        scale = self.scaling if scale is None else scale
        return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x [B, H, T, D] in halves; the rest pass through. A decode
    token's bfloat16 on the CPU in one call of the library (kernels/cpu_experts.py's rotary: the same bits)."""
    if (out := rotary(x, cos, sin)) is not None:
        return out
    rot, rest = x[..., : cos.shape[-1]], x[..., cos.shape[-1] :]
    half = rot.shape[-1] // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    turned = rot * cos + rotated * sin
    return torch.cat((turned, rest), dim=-1) if rest.shape[-1] else turned


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by pairs of adjacent dims (x0, x1), (x2, x3), ... as DeepSeek lays them out.

    The result lists the rotated first members of the pairs, then the second ones: a fixed permutation
    of the dims, harmless since queries and keys get the same one.
    """
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
