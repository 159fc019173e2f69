"""Llama 4 (Llama4ForCausalLM, and the language model of Llama4ForConditionalGeneration: Scout,
Maverick): MoE layers every `interleave_moe_layer_step` layers, each a sigmoid-scored top-k router
whose weight scales the expert's input, plus a shared expert; three layers in four use rotary on
adjacent pairs, a weightless RMS norm of q and k, and attention within fixed chunks, the fourth has
no rotary, full attention and queries scaled up with position (temperature tuning)."""

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import Fused
from localmoe.models.family import Family, ModelArgs, Multimodal, causal_lm
from localmoe.models.layers import MLP, CausalLM, DecoderLayer, Step, rms_normalize
from localmoe.models.moe import GatedActivation, Routing, SparseMoE
from localmoe.models.state import AttentionKV, WindowKV

EXPERTS = "model.layers.{layer}.feed_forward.experts"


@dataclass
class Llama4Args(ModelArgs):
    default_rope_theta: ClassVar[float] = 500_000.0

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # routed and shared experts
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size_mlp: int = 16384  # dense layers
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    num_local_experts: int = 16
    num_experts_per_tok: int = 1
    moe_layers: list[int] | None = None
    interleave_moe_layer_step: int = 1
    no_rope_layers: list[int] | None = None  # 1 where the layer uses rotary, despite the name
    no_rope_layer_interval: int = 4
    layer_types: list[str] | None = None
    attention_chunk_size: int | None = 8192
    use_qk_norm: bool = True
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1
    attention_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)

    def uses_rope(self, i: int) -> bool:
        if self.no_rope_layers:
            return bool(self.no_rope_layers[i])
        return (i + 1) % self.no_rope_layer_interval != 0

    def chunk(self, i: int) -> int | None:
        chunked = self.layer_types[i] == "chunked_attention" if self.layer_types else self.uses_rope(i)
        return self.attention_chunk_size if chunked else None

    def is_moe_layer(self, i: int) -> bool:
        if self.moe_layers is not None:
            return i in self.moe_layers
        return i % self.interleave_moe_layer_step == self.interleave_moe_layer_step - 1


class Llama4Attention(Attention):
    """Grouped-query attention with Llama 4's per-layer variations: rotary or none; after the rotary,
    q and k RMS-normalised without a weight; attention within chunks of `chunk` tokens; and, on the
    layers without rotary, queries scaled by 1 + attn_scale * log(1 + floor((pos + 1) / floor_scale))."""

    static = False  # chunked attention and query temperatures from host positions

    def __init__(self, args: Llama4Args, i: int, head_dim: int):
        super().__init__(
            args.hidden_size,
            args.num_attention_heads,
            args.key_value_heads,
            head_dim,
            qkv_bias=args.attention_bias,
            out_bias=args.attention_bias,
            interleaved_rope=True,
        )
        self.use_rope, self.chunk = args.uses_rope(i), args.chunk(i)
        self.norm_qk = args.use_qk_norm and self.use_rope
        self.eps = args.rms_norm_eps
        self.temperature = (
            (args.floor_scale, args.attn_scale) if args.attn_temperature_tuning and not self.use_rope else None
        )

    @property
    def span(self) -> int | None:
        return self.chunk

    def forward(self, x: torch.Tensor, step: Step, kv: AttentionKV | WindowKV) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.use_rope:
            q, k = self.rotate(q, step.cos, step.sin), self.rotate(k, step.cos, step.sin)
        if self.norm_qk:
            q, k = rms_normalize(q, self.eps), rms_normalize(k, self.eps)
        if self.temperature is not None:
            floor_scale, attn_scale = self.temperature
            positions = torch.arange(step.start, step.start + T, device=x.device, dtype=torch.float32)
            scale = torch.log1p(torch.floor((positions + 1) / floor_scale)) * attn_scale + 1
            q = (q * scale[:, None]).to(q.dtype)
        k, v, positions = kv.update(k, v, step)
        mask, is_causal = _mask(step, self.chunk, positions)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.head_dim**-0.5, enable_gqa=True
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def _mask(step: Step, chunk: int | None, positions: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
    """`Step.mask`, cut to the chunk of each query where the step reaches past the first chunk."""
    if chunk is None or (positions is None and step.start + step.length <= chunk):
        return step.mask(None)
    if positions is None:
        positions = torch.arange(step.start + step.length, device=step.cos.device)
    return step.visible(None, positions) & (positions // chunk == step.positions()[:, None] // chunk), False


class SigmoidTopKRouter(nn.Module):
    """The top k by logit, each weighted by the sigmoid of its logit (rounded to the logits' dtype, as
    Llama 4 does, then float32)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.top_k = top_k

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.scores(x)
        values, ids = logits.topk(self.top_k, dim=-1)
        return Routing(values.float().sigmoid().to(logits.dtype).float(), ids, logits.float())


def build(args: Llama4Args) -> CausalLM:
    hidden = args.hidden_size
    head_dim = args.attention_head_dim

    def feed_forward(i: int) -> nn.Module:
        if not args.is_moe_layer(i):
            return MLP(hidden, args.intermediate_size_mlp, args.hidden_act)
        experts, top_k = args.num_local_experts, args.num_experts_per_tok
        return SparseMoE(
            i,
            hidden,
            args.intermediate_size,
            experts,
            top_k,
            SigmoidTopKRouter(hidden, experts, top_k),
            act=GatedActivation(act=args.hidden_act),
            weights_on_input=True,
            shared_expert=MLP(hidden, args.intermediate_size, args.hidden_act),
        )

    layers = [
        DecoderLayer(Llama4Attention(args, i, head_dim), feed_forward(i), hidden, args.rms_norm_eps)
        for i in range(args.num_hidden_layers)
    ]
    return causal_lm(args, layers, head_dim)


FAMILY = Family(
    architectures=("Llama4ForCausalLM",),
    model_type="llama4_text",
    args=Llama4Args,
    model=build,
    experts=(Fused(f"{EXPERTS}.gate_up_proj", f"{EXPERTS}.down_proj", transposed=True),),
    hub_aliases=((".mlp.gate.", ".feed_forward.router."), (".mlp.", ".feed_forward.")),
    multimodal=(
        Multimodal(
            "Llama4ForConditionalGeneration",
            (("model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")),
        ),
    ),
    example="meta-llama/Llama-4-Scout-17B-16E-Instruct",
)
