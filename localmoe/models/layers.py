"""Shared layers: norms, rotary embeddings, SwiGLU, the decoder stack (attention lives in attention.py).

Parameter names follow transformers' in-memory module names (`model.layers.0.self_attn.q_proj.weight`),
so most checkpoints load without renaming.

Shapes in comments use B batch, T new tokens, S tokens in the cache, H heads, D head dim, E hidden size.
"""

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.errors import LocalMoEError
from localmoe.runtime.kv_cache import KVCache

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu2": lambda x: F.relu(x).square(),  # Nemotron-H's experts
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise LocalMoEError(f"activation {name!r} is not supported; localmoe knows {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the scale, as the reference implementations do.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class UpcastRMSNorm(RMSNorm):
    """Scales in float32 before casting back to the input dtype (gpt-oss, Gemma 4)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight * rms_normalize(x.float(), self.eps)).to(x.dtype)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation without a weight, computed in float32."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class ZeroCenteredRMSNorm(RMSNorm):
    """Scales by 1 + weight (the checkpoint stores the offset from one), in float32 before casting back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (rms_normalize(x.float(), self.eps) * (1 + self.weight.float())).to(x.dtype)


# --- rotary position embeddings ---------------------------------------------------------------------------


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
    def __init__(self, params: dict[str, Any], head_dim: int, max_positions: int):
        super().__init__()
        with torch.device("cpu"):  # real values even when the model is being built on `meta`
            inv_freq, self.scaling = rope_inv_freq(params, head_dim, max_positions)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def scale(self, start: int, length: int) -> float:
        """The factor on cos and sin for a forward pass over positions start .. start + length - 1."""
        return self.scaling

    def forward(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, rotary dim] for positions start .. start + length - 1."""
        positions = torch.arange(start, start + length, device=self.inv_freq.device)
        return self.at(positions, dtype, self.scale(start, length))

    def at(self, positions: torch.Tensor, dtype: torch.dtype, scale: float | None = None):
        """cos and sin [N, rotary dim] for any positions [N]."""
        freqs = torch.outer(positions.to(self.inv_freq.device, torch.float32), self.inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)
        scale = self.scaling if scale is None else scale
        return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x [B, H, T, D] in halves; the rest pass through."""
    rot, rest = x[..., : cos.shape[-1]], x[..., cos.shape[-1] :]
    half = rot.shape[-1] // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by pairs of adjacent dims (x0, x1), (x2, x3), ... as DeepSeek lays them out.

    The result lists the rotated first members of the pairs, then the second ones: a fixed permutation
    of the dims, harmless since queries and keys get the same one.
    """
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1)


# --- where a forward pass is --------------------------------------------------------------------------------


@dataclass
class Step:
    """Where one forward call sits in the sequence; shared by all its layers."""

    start: int
    length: int
    cos: torch.Tensor
    sin: torch.Tensor
    layer_inputs: torch.Tensor | None = None  # [B, T, layers, D]: Gemma 4's per-layer embeddings
    ids: torch.Tensor | None = None  # [B, T] the tokens, where routing reads them (DeepSeek-V4's hash layers)
    _memo: dict = field(default_factory=dict)

    def rotary(self, rotary: "RotaryEmbedding") -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin from a rotary embedding other than the model's (for layers of another kind),
        computed once per step."""
        if rotary not in self._memo:
            self._memo[rotary] = rotary(self.start, self.length, self.cos.dtype)
        return self._memo[rotary]

    def mask(self, window: int | None, positions: torch.Tensor | None = None) -> tuple[torch.Tensor | None, bool]:
        """(boolean mask [T, S] or None, is_causal) for scaled_dot_product_attention; keys as `visible` takes them.

        The common cases need no mask tensor: a first chunk with no window to cut, or one new token that
        sees the whole cache.
        """
        if positions is None:
            start, length = self.start, self.length
            within_window = window is None or start + length <= window
            if within_window and start == 0:
                return None, length > 1
            if within_window and length == 1:
                return None, False
        return self.visible(window, positions), False

    def visible(self, window: int | None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Which keys each new token sees, [T, S] booleans, for keys at `positions` [S] (-1: an empty
        slot), or at 0 .. S-1 when None (then computed once per step)."""
        queries = self.positions()[:, None]
        if positions is not None:
            visible = (positions >= 0) & (positions <= queries)
            return visible & (positions > queries - window) if window is not None else visible
        if window not in self._memo:
            keys = torch.arange(self.start + self.length, device=self.cos.device)[None, :]
            visible = keys <= queries
            if window is not None:
                visible &= keys > queries - window
            self._memo[window] = visible
        return self._memo[window]

    def positions(self) -> torch.Tensor:
        """The positions of the new tokens [T]."""
        return torch.arange(self.start, self.start + self.length, device=self.cos.device)


# --- feed-forward and the decoder stack --------------------------------------------------------------------


class MLP(nn.Module):
    """Dense SwiGLU feed-forward: down(act(gate(x)) * up(x)). Also the shared experts of MoE layers."""

    def __init__(self, hidden: int, intermediate: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class UngatedMLP(nn.Module):
    """Feed-forward without a gate: down(act(up(x))) (Nemotron-H's shared expert and dense layers)."""

    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool = False):
        super().__init__()
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm attention, then pre-norm feed-forward (dense or MoE), each with a residual.

    `norm` is RMSNorm, or nn.LayerNorm for families that use it (both take (dim, eps)).
    """

    def __init__(self, attention: nn.Module, mlp: nn.Module, hidden: int, eps: float, norm=RMSNorm):
        super().__init__()
        self.self_attn = attention
        self.mlp = mlp
        self.input_layernorm = norm(hidden, eps)
        self.post_attention_layernorm = norm(hidden, eps)

    def forward(self, h: torch.Tensor, step: Step, kv) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), step, kv)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, layers: list[DecoderLayer], eps: float, norm=RMSNorm):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, hidden)
        self.layers = nn.ModuleList(layers)
        self.norm = norm(hidden, eps)


class CausalLM(nn.Module):
    """Embeddings, decoder layers, final norm and LM head, run over a KV cache."""

    def __init__(
        self,
        backbone: Backbone,
        rotary: RotaryEmbedding,
        *,
        tie_word_embeddings: bool,
        max_position_embeddings: int,
        lm_head_bias: bool = False,
        embed_scale: float = 1.0,
        logit_softcap: float | None = None,
    ):
        super().__init__()
        self.embed_scale, self.logit_softcap = embed_scale, logit_softcap  # Gemma: sqrt(hidden), tanh capping
        self.model = backbone
        self.rotary = rotary
        vocab_size, hidden = backbone.embed_tokens.weight.shape
        self.lm_head = None if tie_word_embeddings else nn.Linear(hidden, vocab_size, bias=lm_head_bias)
        if tie_word_embeddings and lm_head_bias:  # ERNIE: tied weights, and still a bias of its own
            self.lm_head_bias = nn.Parameter(torch.empty(vocab_size))
        self.max_position_embeddings = max_position_embeddings

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        weight = self.model.embed_tokens.weight
        states = [layer.self_attn.new_state(batch, max_len, weight.dtype, weight.device) for layer in self.model.layers]
        return KVCache(states, max_len)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return sum(layer.self_attn.state_bytes_per_token(dtype) for layer in self.model.layers)

    def fixed_state_bytes(self, dtype: torch.dtype) -> int:
        """Generation state whose size does not grow with the context (recurrent layers)."""
        return sum(getattr(layer.self_attn, "fixed_state_bytes", lambda _: 0)(dtype) for layer in self.model.layers)

    def forward(self, ids: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """Logits [B, T, V] for ids [B, T] following what the cache holds (only the last position unless
        `all_logits`); the cache advances by T."""
        start, length = cache.pos, ids.shape[1]
        if start + length > cache.max_len:
            raise LocalMoEError(
                f"{start + length} tokens do not fit the {cache.max_len}-token context allocated for this run"
            )
        step = Step(start, length, *self.rotary(start, length, self.model.embed_tokens.weight.dtype))
        h = self.embed(ids, step)
        cache.writing = True
        for layer, kv in zip(self.model.layers, cache.layers, strict=True):
            h = layer(h, step, kv)
        cache.pos += length
        cache.writing = False
        return self.logits(h if all_logits else h[:, -1:])

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] from the last layer's hidden states."""
        h = self.model.norm(h)
        if self.lm_head is None:
            logits = F.linear(h, self.model.embed_tokens.weight, getattr(self, "lm_head_bias", None))
        else:
            logits = self.lm_head(h)
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def embed(self, ids: torch.Tensor, step: Step) -> torch.Tensor:
        """The hidden states [B, T, E] the first layer takes, for ids [B, T]."""
        h = self.model.embed_tokens(ids)
        if self.embed_scale != 1.0:
            h = h * torch.tensor(self.embed_scale, dtype=h.dtype)  # rounded to the dtype first, as Gemma does
        return h
