"""Inkling 2 (Inkling2ForCausalLM, thinkingmachines/Inkling-2-Small's language model): Inkling's attention
(no rotary, a learned relative bias, short convolutions on keys, values and both layer outputs), with
attention residuals between layers instead of a plain residual stream.

Attention residuals: the layers are grouped in blocks of `n_layers_per_attn_res_block`; the input of a
block's first layer joins a list of block states. Each layer's attention input (three of them, for
queries, keys and values, in full layers) and its MLP input are a softmax mix of the RMS-normalised
block states and the current partial block, by a learned query per input; the final norm reads such a
mix too. Between layers, the hidden state carries the block states beside it: [B, T, blocks + 1, E].

Attention: queries scaled per channel and L2-clipped; keys L2-clipped, values RMS-normalised (neither
weighted); the relative states scaled and clipped too; in full layers queries and relative states are
scaled up logarithmically with the position, and the key and value convolutions add taps projected
per token from their inputs (dynamic convolutions). A sink logit per token and head (projected from
the input) takes part in the softmax; the output is gated by sigmoid(gate_attn(x)) before `wo_ud`.

Experts: sigmoid routing with a learned bias for the choice, renormalised and scaled; a SwiGLU whose
gate factor and up projection are each capped by tanh. Logits are capped by tanh too.

Read in the layout transformers saves and thinkingmachines releases (`model.llm.*`, `attn.wq_du`,
gate and up interleaved in `w13_weight`), the experts in the compute dtype or as the releases quantize
them (MXFP8, and NVFP4 in Inkling 2 Loop's: see expert_tensors.FusedScaled).
"""

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.models.expert_tensors import Fused, FusedScaled
from localmoe.models.family import Family, ModelArgs, Multimodal
from localmoe.models.inkling import NormedEmbedding, RelativeLogits
from localmoe.models.layers import Backbone, CausalLM, Step, UpcastRMSNorm, activation, rms_normalize
from localmoe.models.moe import GatedActivation, Routing, SparseMoE, softcap
from localmoe.models.rotary import RotaryEmbedding
from localmoe.models.short_conv import causal_conv
from localmoe.models.state import REWIND_SLACK, CombinedState, ConvRing, attention_state

ATTENTION_RESIDUALS = "inkling2_attn_res"  # where a step keeps the model's attention-residual queries


@dataclass
class Inkling2Args(ModelArgs):
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {
        "n_routed_experts": ("num_local_experts",),
        "moe_intermediate_size": ("intermediate_size",),
        "route_scale": ("routed_scaling_factor",),
        "conv_kernel_size": ("sconv_kernel_size",),
        "max_position_embeddings": ("model_max_length",),
        "sliding_window_size": ("sliding_window",),
    }

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    unpadded_vocab_size: int = 200058
    num_attention_heads: int = 48
    num_key_value_heads: int = 8
    head_dim: int = 128
    swa_num_attention_heads: int = 48
    swa_num_key_value_heads: int = 8
    swa_head_dim: int = 128
    sliding_window_size: int = 1024
    d_rel: int = 16
    rel_extent: int = 1024
    log_scaling_n_floor: int = 128000
    log_scaling_alpha: float = 0.1
    layer_types: list[str] | None = None
    max_position_embeddings: int = 1048576
    rms_norm_eps: float = 1e-6
    conv_kernel_size: int = 4
    moe_intermediate_size: int = 2304
    n_routed_experts: int = 384
    num_experts_per_tok: int = 8
    route_scale: float = 8.0
    qk_l2_clip_threshold: float = 22.627416997969522
    rel_l2_clip_threshold: float = 8.0
    n_layers_per_attn_res_block: int = 6
    mlp_gate_softcap: float = 4.0
    mlp_up_softcap: float = 25.0
    final_logit_softcapping: float = 30.0
    scoring_func: str = "sigmoid"
    rope: dict = field(default_factory=dict)  # unused: no layer rotates

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = [
                "hybrid" if (i + 1) % 6 == 0 else "hybrid_sliding" for i in range(self.num_hidden_layers)
            ]

    def full(self, i: int) -> bool:
        return self.layer_types[i] == "hybrid"


def l2_clip(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Vectors along the last dim of x (float32) longer than `threshold` scaled down to it."""
    return x * (threshold / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + 1e-6)).clamp(max=1.0)


def log_scale(step: Step, n_floor: int, alpha: float) -> torch.Tensor:
    """1 + alpha log(max((position + 1) / n_floor, 1)) per new token [T, 1, 1], in float32."""
    return (1.0 + alpha * torch.log(((step.positions() + 1).float() / n_floor).clamp(min=1.0)))[:, None, None]


class ScaledClip(nn.Module):
    """Heads [B, T, H, D] scaled per channel (`scale` [H, D]), L2-clipped, and where `log_scaling` (a
    floor and a strength) scaled up with the position; in float32, back in the input's dtype."""

    def __init__(self, heads: int, dim: int, threshold: float, log_scaling: tuple[int, float] | None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(heads, dim))
        self.threshold, self.log_scaling = threshold, log_scaling

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        clipped = l2_clip(x.float() * self.scale.float(), self.threshold).to(x.dtype)
        if self.log_scaling is None:
            return clipped
        return (clipped.float() * log_scale(step, *self.log_scaling)).to(x.dtype)


class StaticConv(nn.Module):
    """(x + its causal depthwise convolution) / sqrt(kernel + 1), in float32, earlier inputs from a ring."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))

    def forward(self, x: torch.Tensor, step: Step, ring: ConvRing, source: torch.Tensor | None = None) -> torch.Tensor:
        """As DynamicConv's, whose `source` it has no use for."""
        past = ring.window(step.start).float()
        ring.write(x.transpose(1, 2), step.start)
        x32 = x.float()
        kernel = self.weight.shape[-1]
        return ((causal_conv(x32, past, self.weight.float()) + x32) / math.sqrt(kernel + 1)).to(x.dtype)


class DynamicConv(nn.Module):
    """(x + a causal convolution per channel whose taps are static ones plus per-token ones projected
    from `source`, shared by each head's channels) / sqrt(2 kernel + 1), in float32. Tap 0 weighs the
    current token."""

    def __init__(self, channels: int, source: int, heads: int, kernel: int):
        super().__init__()
        self.heads, self.kernel = heads, kernel
        self.static_w = nn.Parameter(torch.zeros(kernel, channels))
        self.weight_proj = nn.Parameter(torch.empty(heads * kernel, source))

    def forward(self, x: torch.Tensor, step: Step, ring: ConvRing, source: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # cast: the checkpoints' float32 convolution weights stay so, this projection runs in the compute dtype
        dynamic = F.linear(source, self.weight_proj.to(source.dtype)).float().view(B, T, self.heads, 1, self.kernel)
        taps = self.static_w.float().T.reshape(self.heads, -1, self.kernel) + dynamic  # [B, T, heads, C/heads, K]
        context = torch.cat((ring.window(step.start).float(), x.transpose(1, 2).float()), dim=-1)  # [B, C, K-1+T]
        ring.write(x.transpose(1, 2), step.start)
        windows = context.unfold(-1, self.kernel, 1).flip(-1).transpose(1, 2)  # [B, T, C, K], lag 0 first
        mixed = (windows.reshape(B, T, self.heads, -1, self.kernel) * taps).sum(-1).reshape(B, T, C)
        return ((mixed + x.float()) / math.sqrt(2 * self.kernel + 1)).to(x.dtype)


class Inkling2Attention(nn.Module):
    """See the module's docstring. Its state also holds the rings of the layer's two output convolutions.
    Parameters are named as the checkpoints store them."""

    def __init__(self, args: Inkling2Args, full: bool):
        super().__init__()
        self.heads = args.num_attention_heads if full else args.swa_num_attention_heads
        self.kv_heads = args.num_key_value_heads if full else args.swa_num_key_value_heads
        self.head_dim = args.head_dim if full else args.swa_head_dim
        self.window = None if full else args.sliding_window_size
        self.hidden, self.kernel, self.eps = args.hidden_size, args.conv_kernel_size, args.rms_norm_eps
        self.qk_threshold = args.qk_l2_clip_threshold
        hidden, q_width, kv_width = args.hidden_size, self.heads * self.head_dim, self.kv_heads * self.head_dim
        log_scaling = (args.log_scaling_n_floor, args.log_scaling_alpha) if full else None
        self.wq_du = nn.Linear(hidden, q_width, bias=False)
        self.wk_dv = nn.Linear(hidden, kv_width, bias=False)
        self.wv_dv = nn.Linear(hidden, kv_width, bias=False)
        self.wr_du = nn.Linear(hidden, self.heads * args.d_rel, bias=False)
        self.wo_ud = nn.Linear(q_width, hidden, bias=False)
        self.gate_attn = nn.Linear(hidden, q_width, bias=False)
        self.attn_sink_proj = nn.Linear(hidden, self.heads, bias=False)
        self.q_l2_clip = ScaledClip(self.heads, self.head_dim, args.qk_l2_clip_threshold, log_scaling)
        self.rel_l2_clip = ScaledClip(self.heads, args.d_rel, args.rel_l2_clip_threshold, log_scaling)
        self.rel_logits_proj = RelativeLogits(args.d_rel, args.rel_extent if full else args.sliding_window_size)
        if full:
            self.k_sconv = DynamicConv(kv_width, hidden, self.kv_heads, self.kernel)
            self.v_sconv = DynamicConv(kv_width, hidden, self.kv_heads, self.kernel)
        else:
            self.k_sconv, self.v_sconv = StaticConv(kv_width, self.kernel), StaticConv(kv_width, self.kernel)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> CombinedState:
        width = self.kv_heads * self.head_dim
        return CombinedState(
            kv=attention_state(batch, self.kv_heads, self.head_dim, max_len, self.window, dtype, device),
            k_conv=ConvRing(batch, width, self.kernel, dtype, device),
            v_conv=ConvRing(batch, width, self.kernel, dtype, device),
            attn_out=ConvRing(batch, self.hidden, self.kernel, dtype, device),
            mlp_out=ConvRing(batch, self.hidden, self.kernel, dtype, device),
        )

    def state_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 0 if self.window is not None else 2 * self.kv_heads * self.head_dim * dtype.itemsize

    def fixed_state_bytes(self, dtype: torch.dtype) -> int:
        """A window's keys and values (at most), and the four rings of convolution inputs."""
        width = self.kv_heads * self.head_dim
        kv = 0 if self.window is None else 2 * width * (self.window + REWIND_SLACK)
        return (kv + 2 * (width + self.hidden) * (self.kernel - 1 + REWIND_SLACK)) * dtype.itemsize

    def prefill_attention_shape(self) -> tuple[int, int]:
        return self.heads, 2 * self.head_dim

    def forward(self, x, x_key, x_value, step: Step, state: CombinedState) -> torch.Tensor:
        """x: the queries' input (and the relative states', sinks' and gate's), x_key and x_value the keys'
        and values' (in sliding layers all three are one)."""
        B, T, _ = x.shape
        q = self.q_l2_clip(self.wq_du(x).view(B, T, self.heads, -1), step).transpose(1, 2)
        k = self.k_sconv(self.wk_dv(x_key), step, state.k_conv, x_key).view(B, T, self.kv_heads, -1)
        k = l2_clip(k.float(), self.qk_threshold).to(k.dtype)
        v = self.v_sconv(self.wv_dv(x_value), step, state.v_conv, x_value).view(B, T, self.kv_heads, -1)
        v = rms_normalize(v, self.eps)
        k, v, positions = state.kv.update(k.transpose(1, 2), v.transpose(1, 2), step)
        queries = step.positions()
        keys = torch.arange(k.shape[2], device=x.device) if positions is None else positions
        relative = self.rel_l2_clip(self.wr_du(x).view(B, T, self.heads, -1), step)
        bias = self.rel_logits_proj(relative, queries[:, None] - keys[None, :])  # [B, H, T, S]
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5 + bias
        scores = scores.masked_fill(~step.visible(self.window, positions), float("-inf"))
        sinks = self.attn_sink_proj(x).transpose(1, 2).unsqueeze(-1)  # [B, H, T, 1]
        weights = torch.cat((scores, sinks), dim=-1).float().softmax(dim=-1)[..., :-1].to(q.dtype)
        out = (weights @ v).transpose(1, 2).reshape(B, T, -1)
        out = (out.float() * torch.sigmoid(self.gate_attn(x).float())).to(out.dtype)
        return self.wo_ud(out)


def attention_residual(query: torch.Tensor, blocks: torch.Tensor, partial: torch.Tensor) -> torch.Tensor:
    """A softmax mix of the RMS-normalised block states [B, T, N, E] and partial block [B, T, E] for each
    query [Q, E] (or [E]): [B, T, Q, E], in float32."""
    stacked = rms_normalize(torch.cat((blocks, partial.unsqueeze(-2)), dim=-2).float(), 1e-6)
    query = query.float().view(-1, stacked.shape[-1])
    weights = ((query @ stacked.transpose(-1, -2)) * stacked.shape[-1] ** -0.5).softmax(dim=-1)
    return weights @ stacked


class AttentionResiduals(nn.Module):
    """Every layer's attention-residual queries, kept together as the checkpoints store them: the
    attention inputs' of layers 1.. ([3, E] for full layers: queries, keys, values), the MLP inputs',
    the final norm's."""

    def __init__(self, args: Inkling2Args):
        super().__init__()
        hidden, layers = args.hidden_size, range(args.num_hidden_layers)
        self.attn_queries = nn.ParameterList(
            [nn.Parameter(torch.zeros(*((3,) if args.full(i) else ()), hidden)) for i in layers[1:]]
        )
        self.mlp_queries = nn.ParameterList([nn.Parameter(torch.zeros(hidden)) for _ in layers])
        self.output_query = nn.Parameter(torch.zeros(hidden))


class Inkling2Router(nn.Module):
    """Scores (sigmoid by default) in float32; the top k by score plus a learned bias, their scores
    renormalised and scaled."""

    def __init__(self, args: Inkling2Args):
        super().__init__()
        self.top_k, self.scaling, self.score = args.num_experts_per_tok, args.route_scale, activation(args.scoring_func)
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size))
        self.bias = nn.Parameter(torch.zeros(args.n_routed_experts))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(F.linear(x.float(), self.weight.float()))

    def forward(self, x: torch.Tensor) -> Routing:
        scores = self.scores(x)
        ids = (scores + self.bias.float()).topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
        return Routing(weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * self.scaling, ids, scores)


class Inkling2DecoderLayer(nn.Module):
    """See the module's docstring: the stack [B, T, blocks + 1, E] in, the stack out, with this layer's
    input added as a block state where a block starts."""

    def __init__(self, args: Inkling2Args, i: int):
        super().__init__()
        hidden, eps, kernel = args.hidden_size, args.rms_norm_eps, args.conv_kernel_size
        self.index, self.full = i, args.full(i)
        self.starts_block = i % args.n_layers_per_attn_res_block == 0
        self.self_attn = Inkling2Attention(args, self.full)
        glu = GatedActivation(kind="softcapped_glu", gate_limit=args.mlp_gate_softcap, limit=args.mlp_up_softcap)
        experts, top_k, width = args.n_routed_experts, args.num_experts_per_tok, args.moe_intermediate_size
        self.mlp = SparseMoE(i, hidden, width, experts, top_k, Inkling2Router(args), act=glu)
        if self.full:
            self.q_input_norm, self.k_input_norm, self.v_input_norm = (UpcastRMSNorm(hidden, eps) for _ in range(3))
        else:
            self.attn_norm = UpcastRMSNorm(hidden, eps)
        self.mlp_norm = UpcastRMSNorm(hidden, eps)
        self.attn_sconv, self.mlp_sconv = StaticConv(hidden, kernel), StaticConv(hidden, kernel)

    def forward(self, stack: torch.Tensor, step: Step, state: CombinedState) -> torch.Tensor:
        queries: AttentionResiduals = step._memo[ATTENTION_RESIDUALS]
        blocks, h = stack[:, :, :-1], stack[:, :, -1]
        x, x_key, x_value = self.attention_inputs(queries, blocks, h, step)
        out = self.attn_sconv(self.self_attn(x, x_key, x_value, step, state), step, state.attn_out).float()
        if self.starts_block:
            blocks = torch.cat((blocks, h.unsqueeze(-2)), dim=-2)
        else:
            out = h.float() + out
        mixed = self.mlp_input(attention_residual(queries.mlp_queries[self.index], blocks, out)[..., 0, :], step)
        mlp = self.mlp_sconv(self.mlp(self.mlp_norm(mixed).to(h.dtype)), step, state.mlp_out)
        return torch.cat((blocks, (out + mlp).to(h.dtype).unsqueeze(-2)), dim=-2)

    def attention_inputs(self, queries, blocks: torch.Tensor, h: torch.Tensor, step: Step):
        """The normalised inputs of the queries, keys and values (one, in sliding layers) [B, T, E]."""
        inputs = self.mixes(queries, blocks, h)
        if not self.full:
            x = self.attn_norm(inputs[..., 0, :]).to(h.dtype)
            return x, x, x
        norms = (self.q_input_norm, self.k_input_norm, self.v_input_norm)
        return tuple(norm(inputs[..., n, :]).to(h.dtype) for n, norm in enumerate(norms))

    def mixes(self, queries, blocks: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The attention's input mixes [B, T, 3 or 1, E] (the embeddings themselves in the first layer)."""
        if self.index == 0:
            return h.unsqueeze(-2).expand(*h.shape[:-1], 3 if self.full else 1, -1)
        return attention_residual(queries.attn_queries[self.index - 1], blocks, h)

    def mlp_input(self, mixed: torch.Tensor, step: Step) -> torch.Tensor:
        """The MLP's input from its mix [B, T, E] (as it is here)."""
        return mixed


class Inkling2LM(CausalLM):
    """The stack starts from the normalised embeddings with no block state; the final norm reads the
    final query's mix; logits of the head's padded rows dropped, then capped by tanh."""

    def __init__(self, *args, unpadded: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.unpadded = unpadded

    def embed(self, ids: torch.Tensor, step: Step) -> torch.Tensor:
        step._memo[ATTENTION_RESIDUALS] = self.model.attn_res
        return self.model.embed_tokens(ids).unsqueeze(-2)

    def logits(self, stack: torch.Tensor) -> torch.Tensor:
        h = stack[:, :, -1]
        mixed = attention_residual(self.model.attn_res.output_query, stack[:, :, :-1], h)[..., 0, :]
        logits = self.lm_head(self.model.norm(mixed).to(h.dtype)).float()[..., : self.unpadded]
        return softcap(logits, self.logit_softcap)


def build(args: Inkling2Args) -> CausalLM:
    return assemble(args, [Inkling2DecoderLayer(args, i) for i in range(args.num_hidden_layers)])


def assemble(args: Inkling2Args, layers: list[nn.Module], model=Inkling2LM, **extra) -> CausalLM:
    """The model (`model`, Inkling2LM or a subclass, given `extra` arguments of its own) around `layers`."""
    backbone = Backbone(args.vocab_size, args.hidden_size, layers, args.rms_norm_eps, norm=UpcastRMSNorm)
    backbone.embed_tokens = NormedEmbedding(args.vocab_size, args.hidden_size, args.rms_norm_eps, UpcastRMSNorm)
    backbone.attn_res = AttentionResiduals(args)
    return model(
        backbone,
        RotaryEmbedding(args.rope, args.head_dim, args.max_position_embeddings),
        tie_word_embeddings=False,  # the checkpoints' embed and unembed are separate tensors
        max_position_embeddings=args.max_position_embeddings,
        logit_softcap=args.final_logit_softcapping,
        unpadded=args.unpadded_vocab_size,
        **extra,
    )


# transformers saves (and thinkingmachines releases) the language model under `model.llm.`, the LM
# head (padded to vocab_size rows) as its `unembed`, the attention as `attn`
HUB_NAMES = (
    ("model.embed_tokens.embed_norm.", "model.llm.embed_norm."),
    ("model.embed_tokens.", "model.llm.embed."),
    ("model.layers.", "model.llm.layers."),
    ("model.norm.", "model.llm.norm."),
    ("model.attn_res.", "model.llm.attn_res."),
    ("lm_head.", "model.llm.unembed."),
    (".self_attn.", ".attn."),
)

FAMILY = Family(
    architectures=("Inkling2ForCausalLM",),
    model_type="inkling2_text",
    args=Inkling2Args,
    model=build,
    experts=(
        FusedScaled(
            "model.llm.layers.{layer}.mlp.experts.w13_weight", "model.llm.layers.{layer}.mlp.experts.w2_weight"
        ),
        Fused(
            "model.llm.layers.{layer}.mlp.experts.w13_weight",
            "model.llm.layers.{layer}.mlp.experts.w2_weight",
            interleaved=True,
        ),
    ),
    hub_aliases=HUB_NAMES,
    keep_float32=("sconv", "mlp.gate", "attn_res"),
    multimodal=(Multimodal("Inkling2ForConditionalGeneration", (("model.llm.", "model.llm."),)),),
    example="thinkingmachines/Inkling-2-Small-MXFP8",
)
