"""Gemma 4 with its MoE block (Gemma4ForCausalLM with `enable_moe_block`, and the language model of
Gemma4ForConditionalGeneration, e.g. google/gemma-4-26B-A4B-it).

Sliding-window layers and global layers with their own head size, KV heads and rotary (proportional:
part of each head rotates); q, k and v RMS-normalised per head (v without a weight) and attention
unscaled; on global layers the keys may double as values (`attention_k_eq_v`). Each layer runs a dense
MLP and the routed experts side by side, each with its own norms, and sums them: the router reads
the residual stream, normalised and scaled, and scales each chosen expert by a learned factor.
Embeddings are scaled by sqrt(hidden); optional per-layer embeddings feed every layer a vector of
its own; the logits are soft-capped.
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.errors import LocalMoEError
from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import Fused
from localmoe.models.family import Family, ModelArgs, Multimodal
from localmoe.models.layers import MLP, Backbone, CausalLM, Step, UpcastRMSNorm, activation, rms_normalize
from localmoe.models.moe import GatedActivation, Routing, SparseMoE
from localmoe.models.rotary import RotaryEmbedding, rope_parameters
from localmoe.models.state import AttentionKV, WindowKV

EXPERTS = "model.layers.{layer}.experts"


@dataclass
class Gemma4Args(ModelArgs):
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 4
    head_dim: int = 256
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = None
    per_layer_config: dict | None = None  # as transformers saves it: {layer: {head_dim, num_key_value_heads}}
    attention_k_eq_v: bool = False
    sliding_window: int = 512
    layer_types: list[str] | None = None
    rope_parameters: dict | None = None
    enable_moe_block: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    hidden_size_per_layer_input: int | None = 256
    vocab_size_per_layer_input: int = 262_144
    num_kv_shared_layers: int = 0
    use_bidirectional_attention: str | None = None
    final_logit_softcapping: float | None = None
    attention_bias: bool = False
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131_072
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if not self.enable_moe_block:
            raise LocalMoEError("this Gemma 4 checkpoint has no MoE block (a dense model): localmoe runs MoE models")
        for name in ("num_experts", "top_k_experts", "moe_intermediate_size"):
            if getattr(self, name) is None:
                raise LocalMoEError(f"config.json enables Gemma 4's MoE block but lacks {name}: the config is damaged")
        if self.num_kv_shared_layers:
            raise LocalMoEError("Gemma 4 with KV shared across layers (num_kv_shared_layers) is not supported")
        if self.use_bidirectional_attention == "all":
            raise LocalMoEError("Gemma 4 with bidirectional attention is an encoder, not a causal LM")
        if self.layer_types is None:
            self.layer_types = [
                "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(self.num_hidden_layers)
            ]
        self.layer_types[-1] = "full_attention"  # as transformers forces it

    def attention_shape(self, i: int) -> tuple[int, int]:
        """(head dim, KV heads) of layer i."""
        if self.layer_types[i] != "full_attention":
            return self.head_dim, self.num_key_value_heads
        if self.per_layer_config is not None:
            override = self.per_layer_config.get(str(i), {})
            return override.get("head_dim", self.head_dim), override.get(
                "num_key_value_heads", self.num_key_value_heads
            )
        kv_heads = self.num_global_key_value_heads if self.attention_k_eq_v else None
        return self.global_head_dim, kv_heads or self.num_key_value_heads

    def rope(self, layer_type: str) -> dict[str, Any]:
        defaults = {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
        }
        given = (self.rope_parameters or defaults)[layer_type]
        return rope_parameters({"rope_parameters": given}, defaults[layer_type]["rope_theta"])


class Gemma4Attention(Attention):
    """q and k RMS-normalised per head before the rotary, v after it without a weight, no 1/sqrt(d) scale;
    keys double as values where the layer has no v_proj; a rotary of the layer's own kind."""

    def __init__(self, args: Gemma4Args, i: int, rotary: RotaryEmbedding | None):
        head_dim, kv_heads = args.attention_shape(i)
        sliding = args.layer_types[i] == "sliding_attention"
        super().__init__(
            args.hidden_size,
            args.num_attention_heads,
            kv_heads,
            head_dim,
            qkv_bias=args.attention_bias,
            out_bias=args.attention_bias,
            qk_norm="head",
            norm_eps=args.rms_norm_eps,
            sliding_window=args.sliding_window if sliding else None,
            norm=UpcastRMSNorm,
            rotary=rotary,
        )
        if args.attention_k_eq_v and not sliding:
            del self.v_proj
        self.eps = args.rms_norm_eps

    def prepare_decode(self) -> None:
        pass  # its own forward projects q, k and v apart

    def forward(self, x: torch.Tensor, step: Step, kv: AttentionKV | WindowKV) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim) if hasattr(self, "v_proj") else k
        k = self.k_norm(k).transpose(1, 2)
        v = rms_normalize(v, self.eps).transpose(1, 2)
        cos, sin = (step.cos, step.sin) if self.rotary is None else step.rotary(self.rotary)
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        k, v, positions = kv.update(k, v, step)
        mask, is_causal = step.mask(self.sliding_window, positions)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=1.0, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class Gemma4Router(nn.Module):
    """Softmax top-k over proj(rms_norm(x) * scale / sqrt(hidden)), renormalised, then each weight
    multiplied by its expert's `per_expert_scale`."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, eps: float):
        super().__init__()
        self.proj = nn.Linear(hidden, num_experts, bias=False)
        self.scale = nn.Parameter(torch.empty(hidden))
        self.per_expert_scale = nn.Parameter(torch.empty(num_experts))
        self.top_k, self.eps = top_k, eps

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        x = rms_normalize(x, self.eps) * self.scale * x.shape[-1] ** -0.5
        return self.proj(x).softmax(dim=-1, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> Routing:
        scores = self.scores(x)
        weights, ids = scores.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(weights * self.per_expert_scale[ids], ids, scores)


class Gemma4MoE(SparseMoE):
    """Routes on the residual stream, runs the experts on their own normalisation of it."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        routing = self.gate(residual.reshape(-1, residual.shape[-1]))
        return self.experts(self.layer_idx, x.reshape(-1, x.shape[-1]), routing).view(x.shape)


class Gemma4DecoderLayer(nn.Module):
    def __init__(self, args: Gemma4Args, i: int, rotary: RotaryEmbedding | None):
        super().__init__()
        hidden, eps = args.hidden_size, args.rms_norm_eps
        self.index = i
        self.self_attn = Gemma4Attention(args, i, rotary)
        self.mlp = MLP(hidden, args.intermediate_size, args.hidden_activation)
        self.moe = Gemma4MoE(
            i,
            hidden,
            args.moe_intermediate_size,
            args.num_experts,
            args.top_k_experts,
            Gemma4Router(hidden, args.num_experts, args.top_k_experts, eps),
            act=GatedActivation(act=args.hidden_activation),
        )
        for name in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
            "post_feedforward_layernorm_1",
            "pre_feedforward_layernorm_2",
            "post_feedforward_layernorm_2",
        ):
            setattr(self, name, UpcastRMSNorm(hidden, eps))
        if args.hidden_size_per_layer_input:
            self.act = activation(args.hidden_activation)
            self.per_layer_input_gate = nn.Linear(hidden, args.hidden_size_per_layer_input, bias=False)
            self.per_layer_projection = nn.Linear(args.hidden_size_per_layer_input, hidden, bias=False)
            self.post_per_layer_input_norm = UpcastRMSNorm(hidden, eps)
        self.layer_scalar = nn.Parameter(torch.empty(1))

    def forward(self, h: torch.Tensor, step: Step, kv: AttentionKV) -> torch.Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), step, kv))
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(h)))
        routed = self.post_feedforward_layernorm_2(self.moe(self.pre_feedforward_layernorm_2(h), h))
        h = h + self.post_feedforward_layernorm(dense + routed)
        if step.layer_inputs is not None:
            gated = self.act(self.per_layer_input_gate(h)) * step.layer_inputs[:, :, self.index]
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(gated))
        return h * self.layer_scalar


class Gemma4LM(CausalLM):
    """The causal LM plus the per-layer embeddings: for layer i, a token's own embedding slice and a
    projection of its hidden state, normalised, averaged (scaled by 1/sqrt 2)."""

    def __init__(self, args: Gemma4Args, layers: list[nn.Module], rotary: RotaryEmbedding):
        super().__init__(
            Backbone(args.vocab_size, args.hidden_size, layers, args.rms_norm_eps, norm=UpcastRMSNorm),
            rotary,
            tie_word_embeddings=args.tie_word_embeddings,
            max_position_embeddings=args.max_position_embeddings,
            embed_scale=args.hidden_size**0.5,
            logit_softcap=args.final_logit_softcapping,
        )
        self.per_layer = args.hidden_size_per_layer_input or 0
        if self.per_layer:
            width = args.num_hidden_layers * self.per_layer
            self.model.embed_tokens_per_layer = nn.Embedding(args.vocab_size_per_layer_input, width)
            self.model.per_layer_model_projection = nn.Linear(args.hidden_size, width, bias=False)
            self.model.per_layer_projection_norm = UpcastRMSNorm(self.per_layer, args.rms_norm_eps)

    def embed(self, ids: torch.Tensor, step: Step) -> torch.Tensor:
        h = super().embed(ids, step)
        if self.per_layer:
            shape = (*ids.shape, -1, self.per_layer)
            own = self.model.embed_tokens_per_layer(ids)
            own = (own * torch.tensor(self.per_layer**0.5, dtype=own.dtype)).view(shape)
            projected = self.model.per_layer_model_projection(h) * h.shape[-1] ** -0.5
            step.layer_inputs = (self.model.per_layer_projection_norm(projected.view(shape)) + own) * 2**-0.5
        return h


def build(args: Gemma4Args) -> CausalLM:
    def rotary(layer_type: str) -> RotaryEmbedding:
        head_dim = args.attention_shape(args.layer_types.index(layer_type))[0]
        return RotaryEmbedding(args.rope(layer_type), head_dim, args.max_position_embeddings)

    # the model's rotary serves the sliding layers; global layers share one of their own
    kinds = set(args.layer_types)
    main = rotary("sliding_attention" if "sliding_attention" in kinds else "full_attention")
    other = rotary("full_attention") if "sliding_attention" in kinds else None
    layers = [
        Gemma4DecoderLayer(args, i, other if args.layer_types[i] == "full_attention" else None)
        for i in range(args.num_hidden_layers)
    ]
    return Gemma4LM(args, layers, main)


FAMILY = Family(
    architectures=("Gemma4ForCausalLM",),
    model_type="gemma4_text",
    args=Gemma4Args,
    model=build,
    experts=(Fused(f"{EXPERTS}.gate_up_proj", f"{EXPERTS}.down_proj"),),
    hub_aliases=((".moe.gate.", ".router."),),
    multimodal=(
        Multimodal(
            "Gemma4ForConditionalGeneration",
            (("model.", "model.language_model."), ("lm_head.", "lm_head.")),
        ),
    ),
    example="google/gemma-4-26B-A4B-it",
)
