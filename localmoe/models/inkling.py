"""Inkling (InklingForCausalLM, thinkingmachines/Inkling's language model): attention without rotary,
positions given by a learned relative bias, and short convolutions around it; routed experts beside
shared experts that sit in the routing softmax.

Attention: per-head RMS-normalised queries and keys scaled by 1/head_dim; keys and values each pass
through a short causal convolution (with a residual) after their projections; each head adds a bias
per backward distance below `rel_extent`, mixed per token from a learned bank of profiles by its own
`r_proj` states. Sliding layers (`hybrid_sliding`) have their own head counts, and a bias as long as
their window; full layers (`hybrid`) may scale queries and the bias logarithmically with the position.
The attention's and the MLP's outputs each pass through a short convolution before their residual adds.

Routing: sigmoid scores (plus a learned bias for the choice) pick the top k routed experts; the weights
are a softmax over the log-sigmoids of their logits and of the shared experts' logits, so the shared
experts take part as a sink, and each shared expert is weighed by its share. The embeddings are
RMS-normalised; the final hidden states are divided by a muP width multiplier before the LM head,
whose padded rows past `unpadded_vocab_size` are dropped.

Read in the layout transformers saves InklingForCausalLM in, or as thinkingmachines releases Inkling
(InklingForConditionalGeneration, its language model under `model.llm.`, attention under `attn.` with
`wq_du`-style names): there gate and up alternate by rows in `w13` tensors, which are split when loaded
(the dense MLP's `w13_dn`, the shared experts' `shared_w13_weight`) or read so (the routed experts'
`w13_weight`), as transformers' conversion for `inkling_mm_model` does (conversion_mapping.py).

Its multi-token-prediction layers (`model.mtp.layers.{k}.{hidden_norm, embed_norm, input_proj, transformer_block.*}`
in the release's names, and `model.mtp.chain_norm`; counted by `mtp_config`) are loaded as `mtp` for drafts, as
vLLM's inkling/nvidia/mtp.py builds them: input_proj([hidden_norm(h); embed_norm(e)]) (the hidden state first;
e the embedding after the model's own embed_norm), then a decoder layer with a dense MLP, full or sliding by
`mtp_config.local_layer_ids`; its output goes to the LM head (after the muP division) and to the next depth as
it is, or both after the shared chain_norm where `chain_hidden_post_norm`. The first depth takes the model's
last hidden states after its final norm (transformers' MtpModel takes `hidden_states[-1]`, which is that).
"""

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import Fused
from localmoe.models.family import Family, Interleaved, ModelArgs, MtpLayout, Multimodal, causal_lm
from localmoe.models.layers import MLP, CausalLM, RMSNorm, Step, activation
from localmoe.models.moe import FUSED_EXPERTS, GatedActivation, Routing, SparseMoE
from localmoe.models.mtp import MTPLayer, NormedMTPLayer, SharedHead
from localmoe.models.short_conv import causal_conv
from localmoe.models.state import REWIND_SLACK, CombinedState, ConvRing, attention_state


@dataclass
class InklingArgs(ModelArgs):
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {
        "n_routed_experts": ("num_local_experts",),
        "conv_kernel_size": ("sconv_kernel_size",),
        "max_position_embeddings": ("model_max_length",),
        "logits_mup_width_multiplier": ("embedding_multiplier",),
        "sliding_window_size": ("sliding_window",),
    }
    tie_word_embeddings: ClassVar[bool] = False  # the checkpoints' embed and unembed are separate tensors

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 128
    swa_num_attention_heads: int = 64
    swa_num_key_value_heads: int = 16
    swa_head_dim: int = 128
    sliding_window_size: int = 512
    d_rel: int = 16
    rel_extent: int = 1024
    log_scaling_n_floor: int | None = None
    log_scaling_alpha: float = 0.1
    local_layer_ids: list[int] | None = None
    layer_types: list[str] | None = None
    mlp_layer_types: list[str] | None = None
    dense_mlp_idx: int = 0
    intermediate_size: int = 24576
    dense_intermediate_size: int | None = None
    moe_intermediate_size: int = 3072
    n_routed_experts: int = 256
    num_experts_per_tok: int = 6
    n_shared_experts: int = 2
    route_scale: float = 8.0
    conv_kernel_size: int = 4
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    logits_mup_width_multiplier: float = 24.0
    unpadded_vocab_size: int | None = None
    max_position_embeddings: int = 131072
    rope: dict = field(default_factory=dict)  # unused: no layer rotates
    mtp_config: dict | None = None  # the release's top-level section on its MTP layers (INKLING_MTP)

    def __post_init__(self):
        if self.layer_types is None:  # as transformers derives them
            layers = range(self.num_hidden_layers)
            local = {i for i in layers if (i + 1) % 6} if self.local_layer_ids is None else set(self.local_layer_ids)
            self.layer_types = ["hybrid_sliding" if i in local else "hybrid" for i in layers]
        if self.mlp_layer_types is None:
            self.mlp_layer_types = [
                "dense" if i < self.dense_mlp_idx else "sparse" for i in range(self.num_hidden_layers)
            ]
        if self.dense_intermediate_size is not None:  # then intermediate_size is the experts' width
            self.moe_intermediate_size, self.intermediate_size = self.intermediate_size, self.dense_intermediate_size
        mtp = self.mtp_config or {}
        self.num_nextn_predict_layers = mtp.get("num_nextn_predict_layers", 0)
        self.mtp_local_layer_ids = mtp.get("local_layer_ids") or []
        self.chain_hidden_post_norm = mtp.get("chain_hidden_post_norm", False)

    def _contradictions(self):
        yield from super()._contradictions()
        count, local = self.num_nextn_predict_layers, self.mtp_local_layer_ids
        if not (type(count) is int and count >= 0):
            yield f"gives mtp_config.num_nextn_predict_layers {count!r}, not a count"
        if not (isinstance(local, list) and all(type(i) is int and i >= 0 for i in local)):
            yield f"gives mtp_config.local_layer_ids {local!r}, not a list of MTP layers' indices"
        if not isinstance(self.chain_hidden_post_norm, bool):
            yield f"gives mtp_config.chain_hidden_post_norm {self.chain_hidden_post_norm!r}, not true or false"


class ShortConv(nn.Module):
    """x plus its causal depthwise convolution over the last `kernel` positions, in float32; the inputs of
    earlier positions come from a ring (ConvRing)."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.conv1d = nn.Conv1d(channels, channels, kernel, groups=channels, bias=False)

    def forward(self, x: torch.Tensor, step: Step, ring: ConvRing) -> torch.Tensor:
        past = ring.window(step.start).float()
        ring.write(x.transpose(1, 2), step.start)
        x32 = x.float()
        return (causal_conv(x32, past, self.conv1d.weight.float()) + x32).to(x.dtype)


class RelativeLogits(nn.Module):
    """Per head, a bias for each backward distance below `extent`, mixed from the `d_rel` profiles of
    `proj` by each query's relative states; zero at other distances."""

    def __init__(self, d_rel: int, extent: int):
        super().__init__()
        self.extent = extent
        self.proj = nn.Parameter(torch.empty(d_rel, extent))

    def forward(self, relative: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
        """relative [B, T, H, d_rel], distance [T, S] (query minus key position) -> bias [B, H, T, S]."""
        logits = (relative @ self.proj).transpose(1, 2)  # [B, H, T, extent]
        index = distance.clamp(0, self.extent - 1).expand(*logits.shape[:2], -1, -1)
        return logits.gather(-1, index).masked_fill((distance < 0) | (distance >= self.extent), 0.0)


class InklingAttention(Attention):
    """See the module's docstring. Its state also holds the rings of the layer's two output convolutions."""

    static = False  # the convolutions' rings are addressed by host positions

    def __init__(self, args: InklingArgs, sliding: bool):
        heads = args.swa_num_attention_heads if sliding else args.num_attention_heads
        kv_heads = args.swa_num_key_value_heads if sliding else args.num_key_value_heads
        head_dim = args.swa_head_dim if sliding else args.head_dim
        window = args.sliding_window_size if sliding else None
        super().__init__(
            args.hidden_size,
            heads,
            kv_heads,
            head_dim,
            qk_norm="head",
            norm_eps=args.rms_norm_eps,
            sliding_window=window,
            rope=False,
            scale=1.0 / head_dim,  # queries and keys are RMS-normalised
        )
        self.hidden, self.kernel = args.hidden_size, args.conv_kernel_size
        self.r_proj = nn.Linear(args.hidden_size, heads * args.d_rel, bias=False)
        self.k_sconv = ShortConv(kv_heads * head_dim, args.conv_kernel_size)
        self.v_sconv = ShortConv(kv_heads * head_dim, args.conv_kernel_size)
        self.rel_logits_proj = RelativeLogits(args.d_rel, window or args.rel_extent)
        self.log_scaling = not sliding and args.log_scaling_n_floor is not None
        self.n_floor, self.alpha = args.log_scaling_n_floor, args.log_scaling_alpha

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> CombinedState:
        width = self.kv_heads * self.head_dim
        return CombinedState(
            kv=attention_state(batch, self.kv_heads, self.head_dim, max_len, self.span, dtype, device),
            k_conv=ConvRing(batch, width, self.kernel, dtype, device),
            v_conv=ConvRing(batch, width, self.kernel, dtype, device),
            attn_out=ConvRing(batch, self.hidden, self.kernel, dtype, device),
            mlp_out=ConvRing(batch, self.hidden, self.kernel, dtype, device),
        )

    def fixed_state_bytes(self, dtype: torch.dtype) -> int:
        """Keys and values of a window (at most), and the four rings of convolution inputs."""
        rings = 2 * (self.kv_heads * self.head_dim + self.hidden) * (self.kernel - 1 + REWIND_SLACK)
        return super().fixed_state_bytes(dtype) + rings * dtype.itemsize

    def prepare_decode(self) -> None:
        """Nothing to fuse: keys and values pass through their convolutions before they are normalised."""

    def forward(self, x: torch.Tensor, step: Step, state: CombinedState) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.heads, -1)).transpose(1, 2)
        k = self.k_norm(self.k_sconv(self.k_proj(x), step, state.k_conv).view(B, T, self.kv_heads, -1))
        v = self.v_sconv(self.v_proj(x), step, state.v_conv).view(B, T, self.kv_heads, -1)
        k, v, positions = state.kv.update(k.transpose(1, 2), v.transpose(1, 2), step)
        queries = step.positions()
        keys = torch.arange(k.shape[2], device=x.device) if positions is None else positions
        distance = queries[:, None] - keys[None, :]  # [T, S]
        bias = self.rel_logits_proj(self.r_proj(x).view(B, T, self.heads, -1), distance)
        if self.log_scaling:  # in float32, as the original
            tau = 1.0 + self.alpha * torch.log(((queries + 1).float() / self.n_floor).clamp(min=1.0))
            q = (q.float() * tau[:, None]).to(q.dtype)
            bias = (bias.float() * tau[:, None]).to(bias.dtype)
        visible = step.visible(self.sliding_window, positions)
        mask = bias.masked_fill(~visible, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class InklingRouter(nn.Module):
    """Scores the routed experts and the shared ones (the last `shared` rows of `weight`), in float32."""

    def __init__(self, args: InklingArgs):
        super().__init__()
        self.experts, self.shared, self.top_k = args.n_routed_experts, args.n_shared_experts, args.num_experts_per_tok
        self.route_scale = args.route_scale
        self.weight = nn.Parameter(torch.empty(self.experts + self.shared, args.hidden_size))
        self.global_scale = nn.Parameter(torch.ones(1))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(self.experts))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight[: self.experts].float()).sigmoid()

    def forward(self, x: torch.Tensor) -> tuple[Routing, torch.Tensor]:
        """(the routed experts' routing, the shared experts' weights [T, shared])."""
        routed, shared = F.linear(x.float(), self.weight.float()).split((self.experts, self.shared), dim=-1)
        scores = routed.sigmoid()
        ids = (scores + self.e_score_correction_bias.float()).topk(self.top_k, dim=-1, sorted=False).indices
        chosen = F.logsigmoid(torch.cat((routed.gather(1, ids), shared), dim=-1))
        weights = (chosen - chosen.logsumexp(dim=-1, keepdim=True)).exp()
        weights = weights * self.route_scale * self.global_scale.float()
        return Routing(weights[:, : self.top_k], ids, scores), weights[:, self.top_k :]


class SharedExperts(nn.Module):
    """`count` SwiGLU experts every token runs, stored as [count, ...] tensors, each weighed by its share
    of the routing softmax (before its down projection), summed in float32."""

    def __init__(self, hidden: int, intermediate: int, count: int, act: str):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(count, intermediate, hidden))
        self.up_proj = nn.Parameter(torch.empty(count, intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(count, hidden, intermediate))
        self.act = activation(act)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, E], weights [T, count] -> [T, E]."""
        gate, up = x @ self.gate_proj.transpose(1, 2), x @ self.up_proj.transpose(1, 2)  # [count, T, I]
        hidden = self.act(gate) * up * weights.to(x.dtype).T[:, :, None]
        return (hidden @ self.down_proj.transpose(1, 2)).float().sum(dim=0).to(x.dtype)


class InklingMoE(SparseMoE):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        routing, shared_weights = self.gate(flat)
        shared = self.shared_experts(flat, shared_weights)
        return (self.experts(self.layer_idx, flat, routing) + shared).view(x.shape)


class ScaledMLP(MLP):
    """The dense MLP, times a learned scalar."""

    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__(hidden, intermediate, act)
        self.global_scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.global_scale


class InklingDecoderLayer(nn.Module):
    """Pre-norm attention and pre-norm feed-forward, each output convolved (ShortConv) before its residual."""

    def __init__(self, args: InklingArgs, i: int, sliding: bool, dense: bool):
        super().__init__()
        hidden, eps, kernel = args.hidden_size, args.rms_norm_eps, args.conv_kernel_size
        self.self_attn = InklingAttention(args, sliding)
        if dense:
            self.mlp = ScaledMLP(hidden, args.intermediate_size, args.hidden_act)
        else:
            self.mlp = inkling_moe(args, i)
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(hidden, eps), RMSNorm(hidden, eps)
        self.attn_sconv, self.mlp_sconv = ShortConv(hidden, kernel), ShortConv(hidden, kernel)

    def forward(self, h: torch.Tensor, step: Step, state: CombinedState) -> torch.Tensor:
        h = h + self.attn_sconv(self.self_attn(self.input_layernorm(h), step, state), step, state.attn_out)
        return h + self.mlp_sconv(self.mlp(self.post_attention_layernorm(h)), step, state.mlp_out)


def inkling_moe(args: InklingArgs, i: int) -> InklingMoE:
    experts, top_k, width = args.n_routed_experts, args.num_experts_per_tok, args.moe_intermediate_size
    moe = InklingMoE(
        i, args.hidden_size, width, experts, top_k, InklingRouter(args), act=GatedActivation(act=args.hidden_act)
    )
    moe.shared_experts = SharedExperts(args.hidden_size, width, args.n_shared_experts, args.hidden_act)
    return moe


class NormedEmbedding(nn.Embedding):
    """Embeddings, RMS-normalised (by `norm`, a class of layers.py's norms)."""

    def __init__(self, vocab_size: int, hidden: int, eps: float, norm=RMSNorm):
        super().__init__(vocab_size, hidden)
        self.embed_norm = norm(hidden, eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_norm(super().forward(ids))


class InklingLM(CausalLM):
    """The final hidden states divided by the muP width multiplier before the LM head; logits of the
    padded rows past `unpadded` dropped."""

    def __init__(self, *args, width_multiplier: float, unpadded: int | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.width_multiplier, self.unpadded = width_multiplier, unpadded

    def head(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h / self.width_multiplier)
        return logits if self.unpadded is None else logits[..., : self.unpadded]


class InklingMTPLayer(MTPLayer):
    """The hidden state first in the projection's input; no norm after the decoder layer."""

    hidden_first = True

    def __init__(self, block: nn.Module, hidden: int, eps: float, norm=RMSNorm):
        super().__init__(block, hidden, eps, norm)
        self.shared_head = SharedHead(nn.Identity())


class ChainedInklingMTPLayer(NormedMTPLayer):
    """The hidden state first; the output after the chain norm (`final_layernorm`, one tensor for every depth)."""

    hidden_first = True


def build(args: InklingArgs) -> CausalLM:
    layers = [
        InklingDecoderLayer(args, i, args.layer_types[i] == "hybrid_sliding", args.mlp_layer_types[i] == "dense")
        for i in range(args.num_hidden_layers)
    ]
    # the MTP layers' decoder layers: dense, sliding where `mtp_config.local_layer_ids` lists them
    mtp = [
        InklingDecoderLayer(args, args.num_hidden_layers + k, k in args.mtp_local_layer_ids, dense=True)
        for k in range(args.num_nextn_predict_layers)
    ]
    model = causal_lm(
        args,
        layers,
        args.head_dim,
        model=InklingLM,
        mtp=mtp,
        mtp_layer=ChainedInklingMTPLayer if args.chain_hidden_post_norm else InklingMTPLayer,
        width_multiplier=args.logits_mup_width_multiplier,
        unpadded=args.unpadded_vocab_size,
    )
    model.model.embed_tokens = NormedEmbedding(args.vocab_size, args.hidden_size, args.rms_norm_eps)
    return model


# transformers' names -> the release's (transformers 5.24's conversion_mapping.py, "inkling_mm_model")
RELEASE_NAMES = (
    ("model.embed_tokens.embed_norm.", "model.llm.embed_norm."),
    ("model.embed_tokens.", "model.llm.embed."),
    ("model.layers.", "model.llm.layers."),
    ("model.norm.", "model.llm.norm."),
    ("lm_head.", "model.llm.unembed."),
    (".self_attn.", ".attn."),
    (".q_proj.", ".wq_du."),
    (".k_proj.", ".wk_dv."),
    (".v_proj.", ".wv_dv."),
    (".r_proj.", ".wr_du."),
    (".o_proj.", ".wo_ud."),
    (".conv1d.", "."),
    (".input_layernorm.", ".attn_norm."),
    (".post_attention_layernorm.", ".mlp_norm."),
    (".gate.e_score_correction_bias", ".gate.bias"),
    (".mlp.down_proj.", ".mlp.w2_md."),
    (".shared_experts.down_proj", ".shared_experts.shared_w2_weight"),
)

# the release's MTP layers (vLLM's inkling/nvidia/mtp.py), seen under DeepSeek-V3's names as RELEASE_NAMES spell them
INKLING_MTP = MtpLayout(
    count="mtp_config.num_nextn_predict_layers",
    prefixes=(
        ("model.llm.layers.{layer}.enorm.", "model.mtp.layers.{depth}.embed_norm."),
        ("model.llm.layers.{layer}.hnorm.", "model.mtp.layers.{depth}.hidden_norm."),
        ("model.llm.layers.{layer}.eh_proj.", "model.mtp.layers.{depth}.input_proj."),
        ("model.llm.layers.{layer}.final_layernorm.", "model.mtp.chain_norm."),
        ("model.llm.layers.{layer}.", "model.mtp.layers.{depth}.transformer_block."),
    ),
)

FAMILY = Family(
    architectures=("InklingForCausalLM",),
    model_type="inkling_text",
    args=InklingArgs,
    model=build,
    experts=(
        FUSED_EXPERTS,
        Fused(
            "model.llm.layers.{layer}.mlp.experts.w13_weight",
            "model.llm.layers.{layer}.mlp.experts.w2_weight",
            interleaved=True,
        ),
    ),
    hub_aliases=RELEASE_NAMES,
    interleaved=(
        Interleaved(".mlp.gate_proj.", ".mlp.up_proj.", ".mlp.w13_dn.", dim=0),
        Interleaved(".shared_experts.gate_proj", ".shared_experts.up_proj", ".shared_experts.shared_w13_weight", dim=1),
    ),
    keep_float32=("sconv", "e_score_correction_bias", "gate.global_scale"),
    multimodal=(
        Multimodal("InklingForConditionalGeneration", (("model.llm.", "model.llm."), ("model.mtp.", "model.mtp."))),
    ),
    mtp=INKLING_MTP,
    example="thinkingmachines/Inkling",
)
