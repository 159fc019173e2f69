"""GLM-5.3-Flash's language model (Glm5NextForConditionalGeneration, zai-org; text only: transformers defines
no text-only causal LM class).

- Three layers in four are Kimi Delta Attention with one decay rate per head, bounded below by
  `linear_lower_bound` (kimi_delta_attention.py); the fourth is DeepSeek's latent attention without any
  rotary, sparse: its indexer pools the keys of each complete block of `index_kpool` tokens (a softmax
  per channel over the block of a learned gate plus a learned offset per slot) and scores the blocks;
  a query attends to the `index_topk / index_kpool` best of the blocks it has seen to their end, and to
  the tokens of its own incomplete block. Layers marked "shared" reuse the previous layer's selection.
- The residual is `hc_mult` streams with DeepSeek-V4's hyper-connections (deepseek_v4.py), collapsed
  before the final norm by their plain mean.
- DeepSeek-V3's sigmoid routing with a correction bias, a shared expert, and dense first layers; every
  SwiGLU (experts, shared expert, dense layers) clamped at `swiglu_limit`.

Its multi-token-prediction layer (DeepSeek-V3's layout, `model.layers.{num_hidden_layers}.*`: enorm, hnorm,
eh_proj, shared_head.norm beside the decoder layer's tensors; transformers skips it) is loaded as `mtp`, for
drafts, as vLLM's glm5_next_mtp.py builds it (Glm5NextMTPBlock): a plain pre-norm decoder layer (the release
stores no hyper-connections for it) of the model's pooled sparse attention, computing its own selection, and
its MoE. It takes the streams' mean, before the final norm.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.errors import LocalMoEError
from localmoe.models.attention import LatentAttention
from localmoe.models.deepseek_v4 import CollapsedLM, HyperConnection, spread_streams
from localmoe.models.deepseek_v32 import SELECTION, Indexer
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, Multimodal
from localmoe.models.glm_moe_dsa import GlmMoeDsaArgs
from localmoe.models.kimi_delta_attention import BoundedDeltaAttention
from localmoe.models.layers import DecoderLayer, RMSNorm, Step
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, GatedActivation, GatedMLP, SparseMoE
from localmoe.models.mtp import MTPLayer, MultiTokenPredictor
from localmoe.models.rotary import RotaryEmbedding
from localmoe.models.state import IndexedLatentKV, LatentKV

LINEAR, INDEXED = "linear_attention", "indexed_attention"


@dataclass
class Glm5NextTextArgs(GlmMoeDsaArgs):
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"n_routed_experts": ("num_local_experts",)}

    n_routed_experts: int = 288
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 256
    max_position_embeddings: int = 1048576
    swiglu_limit: float = 10.0
    layer_types: list[str] | None = None
    index_kpool: int = 16
    index_kpool_always_select_tail: bool = True
    linear_attn_config: dict | None = None
    linear_head_dim: int = 128
    linear_num_heads: int = 64
    linear_conv_kernel_dim: int = 4
    linear_lower_bound: float | None = -5.0
    hc_mult: int = 4
    hc_eps: float = 1e-6
    hc_sinkhorn_iters: int = 20

    def __post_init__(self):
        """transformers' derivations: the layer kinds, and the release's `linear_attn_config`."""
        super().__post_init__()
        n = self.num_hidden_layers
        if self.qk_rope_head_dim:
            raise LocalMoEError("GLM-5.3-Flash's latent attention has no rotary dims (qk_rope_head_dim must be 0)")
        if self.layer_types is None:
            self.layer_types = [LINEAR if i % 4 != 3 else INDEXED for i in range(n)]
        self.layer_types = [INDEXED if kind == "full_attention" else kind for kind in self.layer_types]
        for i, kind in enumerate(self.layer_types):
            if kind == INDEXED and self.indexer_types[i] == "shared" and (i == 0 or self.layer_types[i - 1] != INDEXED):
                raise LocalMoEError(f"GLM-5.3-Flash's layer {i} shares a selection no attention layer before it made")
        if (given := self.linear_attn_config) is not None:  # the release's spelling
            self.linear_head_dim = given.get("head_dim", self.linear_head_dim)
            self.linear_num_heads = given.get("num_heads", self.linear_num_heads)
            self.linear_conv_kernel_dim = given.get("short_conv_kernel_size", self.linear_conv_kernel_dim)
            self.linear_lower_bound = given.get("gate_lower_bound", self.linear_lower_bound)
            if given.get("safe_gate", True) and self.linear_lower_bound is None:
                self.linear_lower_bound = -5.0
        if self.index_topk % self.index_kpool:
            raise LocalMoEError(
                f"index_topk ({self.index_topk}) must be a multiple of index_kpool ({self.index_kpool})"
            )

    def attention(self, i: int) -> nn.Module:
        if self.layer_types[i] == LINEAR:
            return BoundedDeltaAttention(
                self.hidden_size,
                self.linear_num_heads,
                self.linear_head_dim,
                self.linear_conv_kernel_dim,
                self.rms_norm_eps,
                self.hidden_act,
                self.linear_lower_bound,
            )
        return PooledSparseLatentAttention(self, self.indexer_types[i] == "full")


class PooledIndexer(Indexer):
    """DeepSeek's indexer without rotary, scoring blocks of `kpool` tokens rather than tokens: each complete
    block's key is the sum over its tokens of softmax(gate(x) + offset per slot) * key, channel by channel."""

    def __init__(self, args: Glm5NextTextArgs):
        super().__init__(args)
        self.kpool, self.blocks = args.index_kpool, args.index_topk // args.index_kpool
        self.with_tail = args.index_kpool_always_select_tail
        self.index_kpool_compress_ape = nn.Parameter(torch.empty(self.kpool, self.dim))
        self.index_kpool_compress_gate = nn.Parameter(torch.empty(self.dim, args.hidden_size))

    def _rotate(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        return x

    def entries(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """What the state keeps of each token [B, T, 2 dim]: its key and its pooling gate."""
        return torch.cat((self.keys(x, step), F.linear(x, self.index_kpool_compress_gate)), dim=-1)

    def visible(self, x: torch.Tensor, q_low: torch.Tensor, entries: torch.Tensor, step: Step):
        """[B, 1, T, S] booleans: the tokens each new token attends to; None when that is all before it."""
        B, S, _ = entries.shape
        blocks = S // self.kpool  # complete blocks among the keys so far
        if self.with_tail and blocks <= self.blocks:  # every block is chosen: plain causal attention
            return None
        keys, gates = entries[:, : blocks * self.kpool].unflatten(1, (blocks, self.kpool)).split(self.dim, dim=-1)
        weights = (gates.float() + self.index_kpool_compress_ape.float()).softmax(dim=2).to(keys.dtype)
        scores = self.scores(x, q_low, (weights * keys).sum(dim=2), step)  # [B, T, blocks]
        seen = (step.positions() + 1) // self.kpool  # blocks complete up to each new token [T]
        complete = torch.arange(blocks, device=seen.device) < seen[:, None]  # [T, blocks]
        chosen = scores.masked_fill(~complete, float("-inf")).topk(min(self.blocks, blocks), dim=-1).indices
        picked = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, chosen, True) & complete
        visible = torch.zeros(B, scores.shape[1], S, dtype=torch.bool, device=x.device)
        visible[..., : blocks * self.kpool] = picked.repeat_interleave(self.kpool, dim=-1)
        if self.with_tail:  # the query's own incomplete block
            visible |= step.visible(None) & (torch.arange(S, device=seen.device) >= seen[:, None] * self.kpool)
        return visible[:, None]


class PooledSparseLatentAttention(LatentAttention):
    """Latent attention without rotary over the blocks its indexer selects, or (`computes_selection` False)
    over those the previous layer's selected."""

    static = False  # the selection depends on how many keys there are

    def __init__(self, args: Glm5NextTextArgs, computes_selection: bool):
        super().__init__(
            args.hidden_size,
            args.num_attention_heads,
            q_lora_rank=args.q_lora_rank,
            kv_lora_rank=args.kv_lora_rank,
            qk_nope_head_dim=args.qk_nope_head_dim,
            qk_rope_head_dim=0,
            v_head_dim=args.v_head_dim,
            bias=args.attention_bias,
            interleaved_rope=False,
            scale=args.qk_nope_head_dim**-0.5,
            latent_eps=args.rms_norm_eps,
            rope=False,
        )
        if computes_selection:
            self.indexer = PooledIndexer(args)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> LatentKV:
        if not hasattr(self, "indexer"):
            return super().new_state(batch, max_len, dtype, device)
        return IndexedLatentKV(batch, self.kv_lora_rank, 0, 2 * self.indexer.dim, max_len, dtype, device)

    def state_bytes_per_token(self, dtype: torch.dtype) -> int:
        index = 2 * self.indexer.dim if hasattr(self, "indexer") else 0
        return super().state_bytes_per_token(dtype) + index * dtype.itemsize

    def mask(self, x: torch.Tensor, q_low: torch.Tensor, step: Step, kv: LatentKV):
        if hasattr(self, "indexer"):
            entries = kv.update_index(self.indexer.entries(x, step), step.start)
            step._memo[SELECTION] = self.indexer.visible(x, q_low, entries, step)
        selection = step._memo[SELECTION]
        return step.mask(None) if selection is None else (selection, False)


class Glm5NextDecoderLayer(nn.Module):
    def __init__(self, args: Glm5NextTextArgs, i: int):
        super().__init__()
        hidden = args.hidden_size
        self.self_attn = args.attention(i)
        self.mlp = GatedMLP(hidden, args.intermediate_size, clamped_glu(args)) if args.is_dense(i) else moe(args, i)
        self.input_layernorm = RMSNorm(hidden, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hidden, args.rms_norm_eps)
        self.attn_hc, self.ffn_hc = HyperConnection(args), HyperConnection(args)

    def forward(self, streams: torch.Tensor, step: Step, state) -> torch.Tensor:
        post, comb, collapsed = self.attn_hc(streams)
        streams = spread_streams(self.self_attn(self.input_layernorm(collapsed), step, state), post, comb, streams)
        post, comb, collapsed = self.ffn_hc(streams)
        return spread_streams(self.mlp(self.post_attention_layernorm(collapsed)), post, comb, streams)


def clamped_glu(args: Glm5NextTextArgs) -> GatedActivation:
    return GatedActivation(kind="clamped_glu", act=args.hidden_act, limit=args.swiglu_limit)


def moe(args: Glm5NextTextArgs, i: int) -> SparseMoE:
    hidden, inter, glu = args.hidden_size, args.moe_intermediate_size, clamped_glu(args)
    shared = GatedMLP(hidden, inter * args.n_shared_experts, glu)
    experts, top_k = args.n_routed_experts, args.num_experts_per_tok
    return SparseMoE(i, hidden, inter, experts, top_k, args.router(), act=glu, shared_expert=shared)


def mtp_block(args: Glm5NextTextArgs, i: int) -> DecoderLayer:
    """MTP layer i's decoder layer: without hyper-connections, its sparse attention selecting for itself."""
    attention = PooledSparseLatentAttention(args, computes_selection=True)
    return DecoderLayer(attention, moe(args, i), args.hidden_size, args.rms_norm_eps)


class StreamMean(nn.Module):
    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        return streams.mean(dim=2)


def build(args: Glm5NextTextArgs) -> CollapsedLM:
    n, hidden, eps = args.num_hidden_layers, args.hidden_size, args.rms_norm_eps
    layers = [Glm5NextDecoderLayer(args, i) for i in range(n)]
    mtp = [MTPLayer(mtp_block(args, i), hidden, eps) for i in range(n, n + args.num_nextn_predict_layers)]
    rotary = RotaryEmbedding(args.rope, 0, args.max_position_embeddings)
    model = CollapsedLM(args, layers, rotary, norm=RMSNorm, mtp=MultiTokenPredictor(mtp, n) if mtp else None)
    model.model.hc_head = StreamMean()  # the last collapse: a plain mean of the streams
    return model


FAMILY = Family(
    architectures=(),
    model_type="glm5_next_text",
    args=Glm5NextTextArgs,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    hub_aliases=(
        *((f".{kind}_hc.{part}", f".hc_{kind}_{part}") for kind in ("attn", "ffn") for part in ("fn", "base", "scale")),
        (".mlp.shared_expert.", ".mlp.shared_experts."),
    ),
    # as transformers keeps them (its convolution too, which localmoe runs in the compute dtype)
    keep_float32=("e_score_correction_bias", ".mlp.gate.weight", "dt_bias", "A_log", "_hc.base", "_hc.scale"),
    # the language model under model.language_model.; the vision tower (model.visual.) stays on disk
    multimodal=(
        Multimodal("Glm5NextForConditionalGeneration", (("model.", "model.language_model."), ("lm_head.", "lm_head."))),
    ),
    example="zai-org/GLM-5.3-Flash",
)
