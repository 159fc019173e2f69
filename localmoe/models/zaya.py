"""ZAYA1 (ZayaForCausalLM, Zyphra): compressed convolutional attention (CCA) and an MoE layer in every
block, with the residual stream kept in float32 and scaled and shifted by learned vectors at each add.

CCA: queries and keys are projected, mixed over the last few tokens by two causal convolutions (one
per channel, one per head), and added to residuals averaged between queries and their keys; then
L2-normalised to sqrt(head_dim), the keys times a learned scale per KV head; partial rotary of the
layer's kind (full or sliding-window layers). Half of the values' width comes from the token, half
from the token before it (a delayed projection). Besides keys and values, the layer keeps rings of
the convolutions' inputs and of the delayed projections, so that it rewinds as a windowed layer does.

Routing: a small MLP over a projection of the hidden state picks one expert, or none (a "skip" class
that weighs the expert by zero); the projection of each layer after the first adds the previous
layer's, scaled (the router state carried across layers, within a forward pass)."""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.errors import LocalMoEError
from localmoe.models.family import Family, ModelArgs
from localmoe.models.layers import Backbone, CausalLM, RMSNorm, Step
from localmoe.models.moe import FUSED_EXPERTS, GatedActivation, Routing, SparseMoE
from localmoe.models.rotary import RotaryEmbedding, apply_rotary, rope_parameters
from localmoe.models.state import REWIND_SLACK, CombinedState, ConvRing, attention_state

ROUTER_STATES = "zaya_router_states"  # where a step keeps the last router's state for the next layer
DEFAULT_ROPE = {
    "hybrid": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.5},
    "hybrid_sliding": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
}


@dataclass
class ZayaArgs(ModelArgs):
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 2
    head_dim: int = 128
    cca_time0: int = 2
    cca_time1: int = 2
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    rope_parameters: dict | None = None  # one set per kind of layer
    moe_intermediate_size: int = 2048
    num_experts: int = 16
    num_experts_per_tok: int = 1
    router_hidden_size: int = 256
    attention_bias: bool = False
    lm_head_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.num_experts_per_tok != 1:
            raise LocalMoEError("ZAYA routes each token to one expert: num_experts_per_tok must be 1")
        if self.layer_types is None:
            self.layer_types = ["hybrid"] * self.num_hidden_layers
        if "hybrid_sliding" in self.layer_types and self.sliding_window is None:
            raise LocalMoEError("ZAYA's config has sliding-window layers but no sliding_window: the config is damaged")

    def rope(self, kind: str) -> dict[str, Any]:
        given = (self.rope_parameters or DEFAULT_ROPE).get(kind) or DEFAULT_ROPE[kind]
        config = {"rope_parameters": given, "max_position_embeddings": self.max_position_embeddings}
        return rope_parameters(config, DEFAULT_ROPE[kind]["rope_theta"])


class CCAProjection(nn.Module):
    """Queries, keys and values of compressed convolutional attention (see the module's docstring)."""

    def __init__(self, args: ZayaArgs):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        q_width, kv_width, bias = self.heads * self.head_dim, self.kv_heads * self.head_dim, args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, q_width, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, kv_width, bias=bias)
        self.v_proj_current = nn.Linear(args.hidden_size, kv_width // 2, bias=bias)
        self.v_proj_delayed = nn.Linear(args.hidden_size, kv_width // 2, bias=bias)
        channels = q_width + kv_width
        self.conv_qk_depthwise = nn.Conv1d(channels, channels, args.cca_time0, groups=channels)
        self.conv_qk_grouped = nn.Conv1d(channels, channels, args.cca_time1, groups=self.heads + self.kv_heads)
        self.window = (args.cca_time0 - 1) + (args.cca_time1 - 1)  # past inputs the convolutions read

    def forward(self, x: torch.Tensor, step: Step, state: CombinedState):
        """q [B, T, H, D], k and v [B, T, H_kv, D] of x [B, T, E]; `state.conv` rings the convolutions'
        inputs, `state.delayed` the delayed value projections."""
        B, T, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        groups = self.heads // self.kv_heads
        q_residual = (q.view(B, T, self.heads, -1) + k.view(B, T, self.kv_heads, -1).repeat_interleave(groups, 2)) / 2
        k_residual = q_residual.view(B, T, self.kv_heads, groups, -1).mean(dim=-2)
        new = torch.cat((q, k), dim=-1).transpose(1, 2)  # [B, C, T]
        inputs = torch.cat((state.conv.window(step.start), new), dim=-1)
        state.conv.write(new, step.start)
        mixed = self.conv_qk_grouped(self.conv_qk_depthwise(inputs)).transpose(1, 2)  # [B, T, C]
        q_mixed, k_mixed = mixed.split((q.shape[-1], k.shape[-1]), dim=-1)
        q = q_mixed.view(B, T, self.heads, -1) + q_residual
        k = k_mixed.view(B, T, self.kv_heads, -1) + k_residual
        delayed = self.v_proj_delayed(x)
        # before the first token, the delayed projection of a zero input (its bias)
        first = self.v_proj_delayed(x.new_zeros(B, 1, x.shape[-1]))
        before = first if step.start == 0 else state.delayed.window(step.start).transpose(1, 2)  # [B, 1, W]
        state.delayed.write(delayed.transpose(1, 2), step.start)
        previous = torch.cat((before, delayed[:, :-1]), dim=1)
        v = torch.cat((self.v_proj_current(x), previous), dim=-1).view(B, T, self.kv_heads, -1)
        return q, k, v


class KeyScaledNorm(nn.Module):
    """q and k L2-normalised to length sqrt(head_dim), the keys then scaled per KV head by `temp`."""

    def __init__(self, args: ZayaArgs):
        super().__init__()
        self.length = args.head_dim**0.5
        self.temp = nn.Parameter(torch.zeros(args.num_key_value_heads))

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = torch.finfo(q.dtype).eps
        q = q * (self.length / q.norm(dim=-1, keepdim=True).clamp_min(eps))
        k = k * (self.length / k.norm(dim=-1, keepdim=True).clamp_min(eps))
        return q, k * self.temp[:, None]


class ZayaAttention(nn.Module):
    def __init__(self, args: ZayaArgs, window: int | None, rotary: RotaryEmbedding | None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.sliding_window, self.rotary = window, rotary
        self.qkv_proj = CCAProjection(args)
        self.qk_norm = KeyScaledNorm(args)
        self.o_proj = nn.Linear(self.heads * self.head_dim, args.hidden_size, bias=args.attention_bias)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> CombinedState:
        channels, width = (self.heads + self.kv_heads) * self.head_dim, self.kv_heads * self.head_dim // 2
        return CombinedState(
            kv=attention_state(batch, self.kv_heads, self.head_dim, max_len, self.sliding_window, dtype, device),
            conv=ConvRing(batch, channels, self.qkv_proj.window + 1, dtype, device),
            delayed=ConvRing(batch, width, 2, dtype, device),  # the token before
        )

    def state_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 0 if self.sliding_window is not None else 2 * self.kv_heads * self.head_dim * dtype.itemsize

    def fixed_state_bytes(self, dtype: torch.dtype) -> int:
        """A windowed layer's ring of keys and values, and every layer's rings of convolution inputs and
        delayed values (at most: a shorter context allocates less)."""
        width = self.kv_heads * self.head_dim
        kv = 0 if self.sliding_window is None else 2 * width * (self.sliding_window + REWIND_SLACK)
        conv = (self.heads + self.kv_heads) * self.head_dim * (self.qkv_proj.window + REWIND_SLACK)
        return (kv + conv + width // 2 * (1 + REWIND_SLACK)) * dtype.itemsize

    def forward(self, x: torch.Tensor, step: Step, state: CombinedState) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x, step, state)
        q, k = self.qk_norm(q, k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        cos, sin = (step.cos, step.sin) if self.rotary is None else step.rotary(self.rotary)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v, positions = state.kv.update(k, v, step)
        mask, is_causal = step.mask(self.sliding_window, positions)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.head_dim**-0.5, enable_gqa=True
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class ZayaRouter(nn.Module):
    """Softmax over the experts and a skip class from a small MLP (RMSNorm, two GELU layers) on a down
    projection of the hidden state, plus the previous layer's projection scaled (layers after the
    first); the top choice by probability plus a learned balancing bias. Choosing skip weighs expert 0
    by zero, as transformers does."""

    def __init__(self, args: ZayaArgs, carries_state: bool):
        super().__init__()
        width, self.num_experts, self.top_k = args.router_hidden_size, args.num_experts, args.num_experts_per_tok
        self.down_proj = nn.Linear(args.hidden_size, width, bias=True)
        if carries_state:
            self.router_states_scale = nn.Parameter(torch.ones(width))
        self.router_mlp = nn.Module()
        self.router_mlp.norm = RMSNorm(width, args.rms_norm_eps)
        self.router_mlp.fc1 = nn.Linear(width, width, bias=True)
        self.router_mlp.fc2 = nn.Linear(width, width, bias=True)
        self.router_mlp.out_proj = nn.Linear(width, self.num_experts + 1, bias=False)
        self.balancing_biases = nn.Parameter(torch.zeros(self.num_experts + 1))

    def probabilities(self, projected: torch.Tensor) -> torch.Tensor:
        """[T, experts + 1], the last column the skip class, from the down projection [T, width]."""
        mlp = self.router_mlp
        hidden = F.gelu(mlp.fc2(F.gelu(mlp.fc1(mlp.norm(projected)))))
        return mlp.out_proj(hidden).softmax(dim=-1)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """The experts' probabilities [T, experts] without the previous layer's state (which the runtime's
        predictions do not have): a ranking for prefetch and the cache policy only."""
        return self.probabilities(self.down_proj(x))[:, :-1].float()

    def forward(self, x: torch.Tensor, carried: torch.Tensor | None) -> tuple[Routing, torch.Tensor]:
        """(the routing, this layer's state for the next [T, width])."""
        projected = self.down_proj(x)
        if carried is not None and hasattr(self, "router_states_scale"):
            projected = projected + carried * self.router_states_scale
        probs = self.probabilities(projected)
        ids = (probs.float() + self.balancing_biases.float()).topk(self.top_k, dim=-1).indices
        skip = ids == self.num_experts
        weights = probs.gather(1, ids).masked_fill(skip, 0)
        return Routing(weights.float(), ids.masked_fill(skip, 0), probs[:, :-1].float()), projected


class ZayaMoE(SparseMoE):
    def forward(self, x: torch.Tensor, carried: torch.Tensor | None):
        flat = x.reshape(-1, x.shape[-1])
        routing, state = self.gate(flat, carried)
        return self.experts(self.layer_idx, flat, routing).view(x.shape), state


class ResidualScaling(nn.Module):
    """(out + out_bias) * out_scale + (residual + residual_bias) * residual_scale, the sum in float32."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden_states_scale = nn.Parameter(torch.ones(hidden))
        self.hidden_states_bias = nn.Parameter(torch.zeros(hidden))
        self.residual_scale = nn.Parameter(torch.ones(hidden))
        self.residual_bias = nn.Parameter(torch.zeros(hidden))

    def forward(self, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out = (out + self.hidden_states_bias) * self.hidden_states_scale
        return out + (residual + self.residual_bias) * self.residual_scale


class ZayaDecoderLayer(nn.Module):
    def __init__(self, args: ZayaArgs, i: int, rotary: RotaryEmbedding | None):
        super().__init__()
        hidden, eps = args.hidden_size, args.rms_norm_eps
        window = args.sliding_window if args.layer_types[i] == "hybrid_sliding" else None
        self.self_attn = ZayaAttention(args, window, rotary)
        self.mlp = ZayaMoE(
            i,
            hidden,
            args.moe_intermediate_size,
            args.num_experts,
            args.num_experts_per_tok,
            ZayaRouter(args, carries_state=i > 0),
            act=GatedActivation(act=args.hidden_act),
        )
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(hidden, eps), RMSNorm(hidden, eps)
        self.post_attention_residual_scale, self.post_mlp_residual_scale = (
            ResidualScaling(hidden),
            ResidualScaling(hidden),
        )

    def forward(self, h: torch.Tensor, step: Step, state: CombinedState) -> torch.Tensor:
        dtype = self.input_layernorm.weight.dtype  # h, the residual stream, is float32
        h = self.post_attention_residual_scale(self.self_attn(self.input_layernorm(h.to(dtype)), step, state), h)
        out, step._memo[ROUTER_STATES] = self.mlp(
            self.post_attention_layernorm(h.to(dtype)), step._memo.get(ROUTER_STATES)
        )
        return self.post_mlp_residual_scale(out, h)


class ZayaLM(CausalLM):
    """Embeddings shifted and scaled into a float32 residual stream, which the final norm reads back in
    the compute dtype."""

    def embed(self, ids: torch.Tensor, step: Step) -> torch.Tensor:
        h = super().embed(ids, step)
        return ((h + self.model.input_hidden_states_bias) * self.model.input_hidden_states_scale).float()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return super().logits(h.to(self.model.norm.weight.dtype))


def build(args: ZayaArgs) -> CausalLM:
    kinds = sorted(set(args.layer_types))
    rotaries = {kind: RotaryEmbedding(args.rope(kind), args.head_dim, args.max_position_embeddings) for kind in kinds}
    main = kinds[0]  # the model's rotary; layers of the other kind use theirs through the step
    layers = [
        ZayaDecoderLayer(args, i, None if args.layer_types[i] == main else rotaries[args.layer_types[i]])
        for i in range(args.num_hidden_layers)
    ]
    backbone = Backbone(args.vocab_size, args.hidden_size, layers, args.rms_norm_eps)
    backbone.input_hidden_states_scale = nn.Parameter(torch.ones(args.hidden_size))
    backbone.input_hidden_states_bias = nn.Parameter(torch.zeros(args.hidden_size))
    return ZayaLM(
        backbone,
        rotaries[main],
        tie_word_embeddings=args.tie_word_embeddings,
        max_position_embeddings=args.max_position_embeddings,
        lm_head_bias=args.lm_head_bias,
    )


FAMILY = Family(
    architectures=("ZayaForCausalLM",),
    model_type="zaya",
    args=ZayaArgs,
    model=build,
    experts=(FUSED_EXPERTS,),
    hub_aliases=(("lm_head_bias", "lm_head.bias"),),
    keep_float32=("balancing_biases",),
    example="Zyphra/ZAYA1-8B",
)
