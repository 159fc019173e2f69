"""Hy4 (HYV4ForCausalLM, Tencent): DeepSeek-V3.2's sparse latent attention (deepseek_v32.py) with rotary on
halves, the indexer rotating the last rope dims of its heads, layers marked "shared" reusing the last
computed selection, learned sinks and a sigmoid output gate per head and channel; DeepSeek-V3's sigmoid
routing (renormalised, scaled) over experts whose SwiGLU is clamped, a shared expert, dense first layer.

The residual is `hc_mult` streams, as DeepSeek-V4's (deepseek_v4.py), mixed more simply: before each
block a learned sigmoid mix collapses them into its input, and its output is added back to every stream
with a weight of its own (`hc_magnitude` times a sigmoid); no mixing of the streams among themselves.
transformers keeps the hyper-connections, the router, the indexer's head weights and key norm, the sinks
and the LM head in float32.

Its multi-token-prediction layers (`model.mtp_layers.{k}.*`: enorm, hnorm, eh_proj, final_layernorm, and a
decoder layer's tensors directly under that prefix) are loaded as `mtp`, for drafts, as vLLM's hy_v4_mtp.py
(HYV4MultiTokenPredictorLayer, built with enable_ihc=False) and SGLang's hunyuan_v4_nextn.py build them: a
plain pre-norm decoder layer (the release stores no hyper-connections for it) of the model's gated sparse
attention, computing its own selection, and its MoE; the final norm's output goes to the LM head and to the
next draft (`NormedMTPLayer`). They take the streams collapsed by `hc_head`, before the final norm.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.errors import LocalMoEError
from localmoe.models.deepseek_v4 import CollapsedLM
from localmoe.models.deepseek_v32 import DeepseekV32Args, SparseLatentAttention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, MtpLayout
from localmoe.models.layers import MLP, DecoderLayer, RMSNorm, Step
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, GatedActivation, SparseMoE
from localmoe.models.mtp import MultiTokenPredictor, NormedMTPLayer
from localmoe.models.rotary import RotaryEmbedding
from localmoe.models.state import LatentKV


@dataclass
class HYV4Args(DeepseekV32Args):
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"n_routed_experts": ("num_local_experts",)}

    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    n_group: int | None = 1
    topk_group: int | None = 1
    routed_scaling_factor: float = 2.827
    q_lora_rank: int | None = 1536
    qk_nope_head_dim: int = 192
    v_head_dim: int = 256
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 262144
    index_n_heads: int = 16
    indexer_types: list[str] | None = None
    hc_mult: int = 4
    hc_magnitude: float = 2.0
    hc_eps: float = 1e-6
    swiglu_limit: float = 10.0

    def __post_init__(self):
        super().__post_init__()
        n = self.num_hidden_layers
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["dense"] * min(1, n) + ["sparse"] * max(n - 1, 0)
        if self.indexer_types is None:
            self.indexer_types = ["full" if i == 0 or (i - 1) % 4 == 0 else "shared" for i in range(n)]
        if self.indexer_types and self.indexer_types[0] != "full":
            raise LocalMoEError("Hy4's first layer must compute its own sparse-attention selection (indexer 'full')")

    @property
    def interleaved_rope(self) -> bool:
        return False

    @property
    def index_rope_last(self) -> bool:
        return True

    @property
    def index_norm_eps(self) -> float:
        return self.rms_norm_eps

    @property
    def latent_eps(self) -> float:
        """The eps of the latents' norms: their default, not the config's (the VL model's take the config's)."""
        return 1e-6

    def attention(self, i: int) -> nn.Module:
        return GatedSparseLatentAttention(self, self.indexer_types[i] == "full")


class GatedSparseLatentAttention(SparseLatentAttention):
    """Sparse latent attention with sinks, each head's output scaled channel by channel by sigmoid(gate_proj(x))."""

    def __init__(self, args: HYV4Args, computes_selection: bool):
        super().__init__(args, computes_selection, sinks=True, latent_eps=args.latent_eps)
        self.gate_proj = nn.Linear(args.hidden_size, args.num_attention_heads * args.v_head_dim, bias=False)

    def output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.o_proj(out * torch.sigmoid(self.gate_proj(x)))


class HyperConnection(nn.Module):
    """From the streams [B, T, N, E], in float32: the block input (their mix by `pre`) and the weight of the
    block's output on each stream (`post`)."""

    def __init__(self, args: HYV4Args):
        super().__init__()
        n = args.hc_mult
        self.streams, self.eps, self.norm_eps, self.magnitude = n, args.hc_eps, args.rms_norm_eps, args.hc_magnitude
        self.fn = nn.Parameter(torch.empty(2 * n, n * args.hidden_size))
        self.base = nn.Parameter(torch.empty(2 * n))
        self.scale = nn.Parameter(torch.empty(2))

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = streams.flatten(2).float()
        mixes = F.linear(flat, self.fn.float()) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + self.norm_eps)
        pre, post = mixes.split(self.streams, dim=-1)
        pre_b, post_b = self.base.float().split(self.streams)
        pre_s, post_s = self.scale.float().unbind(0)
        pre = torch.sigmoid(pre * pre_s + pre_b) + self.eps
        post = self.magnitude * torch.sigmoid(post * post_s + post_b) + self.eps
        return post, (pre[..., None] * streams).sum(dim=2).to(streams.dtype)


class HYV4DecoderLayer(nn.Module):
    def __init__(self, args: HYV4Args, i: int):
        super().__init__()
        hidden = args.hidden_size
        self.self_attn = args.attention(i)
        self.mlp = feed_forward(args, i)
        self.input_layernorm = RMSNorm(hidden, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hidden, args.rms_norm_eps)
        self.attn_hc, self.ffn_hc = HyperConnection(args), HyperConnection(args)

    def forward(self, streams: torch.Tensor, step: Step, kv: LatentKV) -> torch.Tensor:
        post, collapsed = self.attn_hc(streams)
        streams = _add(self.self_attn(self.input_layernorm(collapsed), step, kv), post, streams)
        post, collapsed = self.ffn_hc(streams)
        return _add(self.mlp(self.post_attention_layernorm(collapsed)), post, streams)


def _add(out: torch.Tensor, post: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """The block's output [B, T, E] added to each stream [B, T, N, E] by its weight, in float32."""
    return (post[..., None] * out.float()[..., None, :] + streams.float()).to(streams.dtype)


def feed_forward(args: HYV4Args, i: int) -> nn.Module:
    hidden, inter = args.hidden_size, args.moe_intermediate_size
    if args.is_dense(i):
        return MLP(hidden, args.intermediate_size, args.hidden_act)
    shared = inter * (args.n_shared_experts or 0)
    return SparseMoE(
        i,
        hidden,
        inter,
        args.n_routed_experts,
        args.num_experts_per_tok,
        args.router(),
        act=GatedActivation(kind="clamped_glu", act=args.hidden_act, limit=args.swiglu_limit),
        shared_expert=MLP(hidden, shared, args.hidden_act) if shared else None,
    )


class HYV4LM(CollapsedLM):
    """The stack of streams collapsed within the layers' run, with an LM head in its own dtype (float32, as
    transformers keeps it)."""

    def head(self, h: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return super().head(h.to(weight.dtype))


def build(args: HYV4Args) -> HYV4LM:
    rotary = RotaryEmbedding(args.rope, args.qk_rope_head_dim, args.max_position_embeddings)
    n = args.num_hidden_layers
    layers = [HYV4DecoderLayer(args, i) for i in range(n)]
    mtp = [
        NormedMTPLayer(mtp_block(args, i), args.hidden_size, args.rms_norm_eps)
        for i in range(n, n + args.num_nextn_predict_layers)
    ]
    return HYV4LM(args, layers, rotary, norm=RMSNorm, mtp=MultiTokenPredictor(mtp, n) if mtp else None)


def mtp_block(args: HYV4Args, i: int) -> DecoderLayer:
    """MTP layer i's decoder layer: without hyper-connections, its sparse attention selecting for itself."""
    hidden = args.hidden_size
    return DecoderLayer(GatedSparseLatentAttention(args, True), feed_forward(args, i), hidden, args.rms_norm_eps)


# (ours, the release's) as transformers' conversion mapping renames them both ways: it loads either spelling
# of a hyper-connection (with or without `hc_pre.`) and writes the one with it; every gate_proj is a linear_gate
HUB_NAMES = (
    (".self_attn.sinks", ".self_attn.learnable_sink_param"),
    (".gate_proj.", ".linear_gate."),
    *(
        (ours, f"{deeper}{theirs}")
        for ours, theirs in ((".attn_hc.", ".hc_attn_layer.hc_"), (".ffn_hc.", ".hc_mlp_layer.hc_"))
        for deeper in ("", ".hc_pre")
    ),
    (".hc_head.hc_", ".hc_head.hc_head_"),
    (".hc_head.hc_", ".hc_pre.hc_head.hc_head_"),
    (".hc_head.hc_", ".hc_head.hc_pre.hc_head_"),  # as it writes Hy4-VL's
    (".mlp.shared_expert.", ".mlp.shared_experts."),
)
KEEP_FLOAT32 = (
    "_hc.",
    "hc_head",
    "sinks",
    "e_score_correction_bias",
    ".mlp.gate.weight",
    ".indexer.weights_proj.",
    ".indexer.k_norm.",
    "lm_head",
)

FAMILY = Family(
    architectures=("HYV4ForCausalLM",),
    model_type="hy_v4",
    args=HYV4Args,
    model=build,
    experts=(FUSED_EXPERTS, PerExpert(MLP_EXPERTS)),
    hub_aliases=HUB_NAMES,
    keep_float32=KEEP_FLOAT32,
    mtp=MtpLayout("num_nextn_predict_layers", (("model.layers.{layer}.", "model.mtp_layers.{depth}."),)),
    example="tencent/Hy4-preview",
)
