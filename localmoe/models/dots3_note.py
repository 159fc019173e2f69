"""dots3-note (Dots3NoteForCausalLM, dots-studio/dots3-note-prev's language model): DeepSeek-V3's latent
attention and sigmoid routing over groups with shared experts, where most layers attend within a
sliding window, with head counts, ranks and a rotary base of their own, and the others attend to what
DeepSeek sparse attention's indexer selects (GLM-5's: rotary on adjacent pairs).

Besides: the normalised query and key-value latents are scaled by sqrt(hidden / rank); the shared
rotary key is RMS-normalised before it is rotated; each head's output is gated by sigmoid(g_proj(x)).
Sliding layers keep every position's latent (the window is a mask, not a ring).

Its multi-token-prediction layer is loaded as `mtp` for drafts, as vLLM's dots3_note/nvidia/mtp.py
(Dots3NoteMultiTokenPredictorLayer, on deepseek_v32/nvidia/mtp.py) builds it: DeepSeek-V3's layer and names
(`model.layers.{num_hidden_layers}.{enorm,hnorm,eh_proj,shared_head.norm}` beside its decoder layer's tensors),
whose decoder layer is a sliding one with a dense MLP (the layer past the model's is not MoE there; llama.cpp's
convert_hf_to_gguf.py: "the NextN/MTP block uses the sliding-attention MLA"). Its output passes shared_head.norm
and goes on as it is, to the LM head and to the next draft (`NormedMTPLayer`). The model's embedding serves it
(vLLM reads the release's copy, `model.mtp.embed_tokens`, instead) and its LM head.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from localmoe.errors import LocalMoEError
from localmoe.models.attention import LatentAttention
from localmoe.models.deepseek_v32 import KEEP_FLOAT32, Indexer, SparseLatentAttention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import DEEPSEEK_MTP, Family, ModelArgs
from localmoe.models.layers import MLP, Backbone, CausalLM, DecoderLayer, RMSNorm, Step
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, GatedActivation, GroupedTopKRouter, SparseMoE
from localmoe.models.mtp import MultiTokenPredictor, NormedMTPLayer
from localmoe.models.rotary import RotaryEmbedding, rope_parameters
from localmoe.models.state import LatentKV

# the sliding layers' sizes where the config gives them as the release does (`swa_*`), as transformers reads them
RELEASE_SLIDING = {
    "num_attention_heads": 64,
    "q_lora_rank": 1024,
    "kv_lora_rank": 1024,
    "head_dim": 256,
    "qk_nope_head_dim": 192,
    "v_head_dim": 128,
}


@dataclass
class Dots3NoteArgs(ModelArgs):
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {
        "n_routed_experts": ("num_local_experts",),
        "shared_experts_intermediate_size": ("moe_shared_expert_intermediate_size",),
        "sliding_window": ("sliding_window_size",),
    }
    # the indexer (deepseek_v32.Indexer) rotates the first rope dims of its heads in adjacent pairs, as GLM-5's
    interleaved_index_rope: ClassVar[bool] = True
    index_rope_last: ClassVar[bool] = False
    index_norm_eps: ClassVar[float] = 1e-6

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int = 13824
    moe_intermediate_size: int = 1536
    num_attention_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int = 512
    q_lora_rank: int = 1024
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    head_dim: int = 256
    n_group: int = 1
    topk_group: int = 1
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 524288
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    index_topk: int = 2048
    index_head_dim: int = 128
    index_n_heads: int = 64
    sliding_window: int = 512
    shared_experts_intermediate_size: int = 1536
    layer_types: list[str] | None = None
    mlp_layer_types: list[str] | None = None
    per_layer_config: dict | None = None
    rope_parameters: dict | None = None  # one set per kind of layer
    num_nextn_predict_layers: int = 0  # the release's config may say nothing: the loader counts them (DOTS3_MTP)
    # the release's spellings, which transformers turns into the fields above
    first_k_dense_replace: int = 1
    moe_layer_freq: int | list[int] = 1
    use_dsa: bool = True
    use_sliding_window: bool = True
    rope_theta: float = 80_000_000.0
    swa_rope_theta: float = 50_000.0
    swa_num_attention_heads: int | None = None
    swa_q_lora_rank: int | None = None
    swa_kv_lora_rank: int | None = None
    swa_head_dim: int | None = None
    swa_qk_nope_head_dim: int | None = None
    swa_v_head_dim: int | None = None
    swa_qk_rope_head_dim: int | None = None

    def __post_init__(self):
        layers = range(self.num_hidden_layers)
        if self.mlp_layer_types is None:
            freq = self.moe_layer_freq
            every = [bool(freq[i]) if isinstance(freq, list) else i % freq == 0 for i in layers]
            self.mlp_layer_types = [
                "sparse" if i >= self.first_k_dense_replace and every[i] else "dense" for i in layers
            ]
        if self.layer_types is None:
            full = "indexed_attention" if self.use_dsa else "full_attention"
            sliding = self.use_sliding_window
            self.layer_types = [full if not sliding or i < 2 or i % 4 == 1 else "sliding_attention" for i in layers]
        if self.per_layer_config is None:
            given = {name: getattr(self, f"swa_{name}") for name in RELEASE_SLIDING}
            sizes = {name: default if given[name] is None else given[name] for name, default in RELEASE_SLIDING.items()}
            if self.swa_qk_rope_head_dim is not None:
                sizes["qk_rope_head_dim"] = self.swa_qk_rope_head_dim
            self.per_layer_config = {str(i): sizes for i in layers if self.layer_types[i] == "sliding_attention"}

    def layer(self, i: int) -> "Dots3NoteArgs":
        """The args of layer i: the model's, with its own sizes from `per_layer_config`."""
        own = self.per_layer_config.get(str(i)) or {}  # num_key_value_heads: latent attention has none
        sizes = (
            "num_attention_heads",
            "q_lora_rank",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
        )
        args = dataclasses.replace(self, **{k: v for k, v in own.items() if k in sizes})
        if "qk_rope_head_dim" not in own and "head_dim" in own:  # the rest of the head rotates
            args.qk_rope_head_dim = own["head_dim"] - args.qk_nope_head_dim
        return args

    def rope(self, kind: str) -> dict[str, Any]:
        """The rotary settings of layers of `kind`, for their rotary dims alone."""
        default = self.swa_rope_theta if kind == "sliding_attention" else self.rope_theta
        given = dict((self.rope_parameters or {}).get(kind) or {"rope_type": "default", "rope_theta": default})
        given.pop("partial_rotary_factor", None)  # built for the rotary dims alone
        return rope_parameters(
            {"rope_parameters": given, "max_position_embeddings": self.max_position_embeddings}, default
        )


class ScaledRMSNorm(RMSNorm):
    """RMSNorm, then times a constant."""

    def __init__(self, dim: int, eps: float, scale: float):
        super().__init__(dim, eps)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


class Dots3NoteAttention(SparseLatentAttention):
    """See the module's docstring. An indexer where the layer is `indexed_attention`; a window where it
    is `sliding_attention`."""

    def __init__(self, args: Dots3NoteArgs, kind: str, rotary: RotaryEmbedding | None):
        LatentAttention.__init__(
            self,
            args.hidden_size,
            args.num_attention_heads,
            q_lora_rank=args.q_lora_rank,
            kv_lora_rank=args.kv_lora_rank,
            qk_nope_head_dim=args.qk_nope_head_dim,
            qk_rope_head_dim=args.qk_rope_head_dim,
            v_head_dim=args.v_head_dim,
            bias=args.attention_bias,
            interleaved_rope=True,
            scale=(args.qk_nope_head_dim + args.qk_rope_head_dim) ** -0.5,
            rotary=rotary,
        )
        hidden, eps = args.hidden_size, args.rms_norm_eps
        self.q_a_layernorm = ScaledRMSNorm(args.q_lora_rank, eps, (hidden / args.q_lora_rank) ** 0.5)
        self.kv_a_layernorm = ScaledRMSNorm(args.kv_lora_rank, eps, (hidden / args.kv_lora_rank) ** 0.5)
        self.k_rope_only_layernorm = RMSNorm(args.qk_rope_head_dim, eps)
        self.g_proj = nn.Linear(hidden, args.num_attention_heads, bias=False)
        self.window = args.sliding_window if kind == "sliding_attention" else None
        self.top_k = args.index_topk
        if kind == "indexed_attention":
            self.indexer = Indexer(args)

    def latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent, k_rot = super().latent(x)
        return latent, self.k_rope_only_layernorm(k_rot)

    def output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        gate = torch.sigmoid(self.g_proj(x)).view(B, T, self.heads, 1)
        return self.o_proj((out.view(B, T, self.heads, -1) * gate).reshape(B, T, -1))

    def mask(self, x: torch.Tensor, q_low: torch.Tensor | None, step: Step, kv: LatentKV):
        if hasattr(self, "indexer"):
            return super().mask(x, q_low, step, kv)
        return step.mask(self.window)


def build(args: Dots3NoteArgs) -> CausalLM:
    hidden, kinds = args.hidden_size, args.layer_types
    main = next((kind for kind in kinds if kind != "sliding_attention"), kinds[0])  # the model's rotary's kind
    dims = {kind: args.layer(kinds.index(kind)).qk_rope_head_dim for kind in set(kinds)}
    rotaries = {kind: RotaryEmbedding(args.rope(kind), dims[kind], args.max_position_embeddings) for kind in dims}

    def attention(i: int) -> nn.Module:
        return Dots3NoteAttention(args.layer(i), kinds[i], None if kinds[i] == main else rotaries[kinds[i]])

    def feed_forward(i: int) -> nn.Module:
        if args.mlp_layer_types[i] == "dense":
            return MLP(hidden, args.intermediate_size, args.hidden_act)
        router = GroupedTopKRouter(
            hidden,
            args.n_routed_experts,
            args.num_experts_per_tok,
            scoring="sigmoid",
            n_group=args.n_group,
            topk_group=args.topk_group,
            normalize=args.norm_topk_prob,
            scaling=args.routed_scaling_factor,
            correction_bias=True,
        )
        shared = MLP(hidden, args.shared_experts_intermediate_size * args.n_shared_experts, args.hidden_act)
        experts, top_k = args.n_routed_experts, args.num_experts_per_tok
        return SparseMoE(
            i,
            hidden,
            args.moe_intermediate_size,
            experts,
            top_k,
            router,
            act=GatedActivation(act=args.hidden_act),
            shared_expert=shared,
        )

    layers = [
        DecoderLayer(attention(i), feed_forward(i), hidden, args.rms_norm_eps) for i in range(args.num_hidden_layers)
    ]
    return CausalLM(
        Backbone(args.vocab_size, hidden, layers, args.rms_norm_eps),
        rotaries[main],
        tie_word_embeddings=args.tie_word_embeddings,
        max_position_embeddings=args.max_position_embeddings,
        mtp=multi_token_predictor(args, attention) if args.num_nextn_predict_layers else None,
    )


def multi_token_predictor(args: Dots3NoteArgs, attention) -> MultiTokenPredictor:
    """The MTP layers: each a sliding layer's attention (`attention` of the model's first sliding layer builds
    one of its sizes and rotary) and a dense MLP, in a NormedMTPLayer."""
    if "sliding_attention" not in args.layer_types:
        raise LocalMoEError(
            "config.json promises MTP layers, whose attention is a sliding layer's, and names no sliding layer to "
            "size it by: the config is damaged"
        )
    sliding, hidden, eps = args.layer_types.index("sliding_attention"), args.hidden_size, args.rms_norm_eps
    blocks = [
        DecoderLayer(attention(sliding), MLP(hidden, args.intermediate_size, args.hidden_act), hidden, eps)
        for _ in range(args.num_nextn_predict_layers)
    ]
    return MultiTokenPredictor([NormedMTPLayer(block, hidden, eps) for block in blocks], args.num_hidden_layers)


# the release's MTP layer, under DeepSeek-V3's names (DEEPSEEK_MTP). vLLM's config
# (transformers_utils/configs/dots3_note.py) defaults the count to 1: one layer where
# `model.layers.{num_hidden_layers}.*` is stored
DOTS3_MTP = dataclasses.replace(DEEPSEEK_MTP, implied=1)


FAMILY = Family(
    architectures=("Dots3NoteForCausalLM",),
    model_type="dots3_note_text",
    args=Dots3NoteArgs,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    hub_aliases=((".mlp.shared_expert.", ".mlp.shared_experts."),),
    keep_float32=KEEP_FLOAT32,
    mtp=DOTS3_MTP,
    example="dots-studio/dots3-note-prev",
)
