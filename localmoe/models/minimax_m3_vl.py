"""MiniMax-M3 (the language model of MiniMaxM3SparseForConditionalGeneration): per-head q/k RMSNorm
that scales by 1 + weight, rotary on the first `rotary_dim` dims of each head, and on the layers
`layer_types` marks sparse, block-sparse attention: a small indexer scores every earlier key for each
query (one score per indexer head, a plain dot product), pools the scores by blocks of keys (their
maximum), and each query attends only to the best `index_topk_blocks` blocks, its own block always
among them; each indexer head's choice serves its group of attention heads. Dense first layers, then
MoE layers with sigmoid routing whose correction bias steers the choice of experts, the routed sum
scaled, plus a shared expert; every MLP a clamped SwiGLU as gpt-oss's (gate and up not interleaved).

transformers saves the text-only MiniMaxM3VLForCausalLM under its in-memory names (one `gate_up_proj`
for the dense and shared MLPs), which no release uses: localmoe reads the release's layout, that of
the multimodal checkpoint. Its multi-token-prediction layers (`model.mtp.layers.{k}`, `num_mtp_modules`
of them) are loaded as `mtp`, for drafts (see localmoe/models/mtp.py), as vLLM's minimax_m3/nvidia/mtp.py
builds them: DeepSeek-V3's enorm, hnorm (scaling by 1 + weight) and eh_proj, a decoder layer
(`transformer_layer.*`, as rtp-llm's MiniMax-M3 loader names it) with block-sparse attention and MoE
whatever the model's layer types say, and final_layernorm."""

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs, MtpLayout, Multimodal, causal_lm
from localmoe.models.layers import DecoderLayer, Step, ZeroCenteredRMSNorm
from localmoe.models.moe import MIXTRAL_EXPERTS, GatedActivation, GatedMLP, GroupedTopKRouter, SparseMoE
from localmoe.models.rotary import apply_rotary
from localmoe.models.state import IndexedKV

SPARSE = "minimax_m3_sparse"  # the layer type with block-sparse attention


@dataclass
class MiniMaxM3Args(ModelArgs):
    default_rope_theta: ClassVar[float] = 5_000_000.0

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # routed experts
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 4
    head_dim: int = 128
    rotary_dim: int = 64
    dense_intermediate_size: int = 12288
    shared_intermediate_size: int = 3072
    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    routed_scaling_factor: float = 2.0
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    layer_types: list[str] | None = None
    mlp_layer_types: list[str] | None = None
    index_n_heads: int = 4
    index_head_dim: int = 128
    index_block_size: int = 128
    index_topk_blocks: int = 16
    index_local_blocks: int = 1
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 524288
    tie_word_embeddings: bool = False
    num_mtp_modules: int = 0
    rope: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["sparse"] * self.num_hidden_layers
        # rotary on `rotary_dim` dims of each head, as the config documents it, unless it says otherwise
        self.rope.setdefault("partial_rotary_factor", self.rotary_dim / self.head_dim)

    @property
    def glu(self) -> GatedActivation:
        return GatedActivation("clamped_swiglu", alpha=self.swiglu_alpha, limit=self.swiglu_limit)


class BlockIndexer(nn.Module):
    """Picks, for each query and indexer head, the blocks of earlier keys to attend to: keys scored by
    q_h . k (q, k RMS-normalised and rotated), pooled by their maximum over each block of `block`
    keys; the `top_k` best blocks, the `local` blocks ending with the query's own always among them."""

    def __init__(self, args: MiniMaxM3Args):
        super().__init__()
        self.heads, self.dim, self.block = args.index_n_heads, args.index_head_dim, args.index_block_size
        self.top_k, self.local = args.index_topk_blocks, args.index_local_blocks
        self.q_proj = nn.Linear(args.hidden_size, self.heads * self.dim, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, self.dim, bias=False)
        self.q_norm = ZeroCenteredRMSNorm(self.dim, args.rms_norm_eps)
        self.k_norm = ZeroCenteredRMSNorm(self.dim, args.rms_norm_eps)

    def keys(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """[B, T, dim], normalised and rotated."""
        return self._rotate(self.k_norm(self.k_proj(x))[:, None], step)[:, 0]

    def selection(self, x: torch.Tensor, keys: torch.Tensor, step: Step) -> torch.Tensor:
        """Which keys [S] each new token [T] may see, per indexer head: [B, heads, T, S] booleans."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.heads, self.dim)).transpose(1, 2)
        q = self._rotate(q, step)  # [B, heads, T, dim]
        visible = step.visible(None)  # [T, S]
        scores = (q.float() @ keys.float()[:, None].transpose(-1, -2)).masked_fill(~visible, float("-inf"))
        S = keys.shape[1]
        blocks = -(-S // self.block)
        scores = F.pad(scores, (0, blocks * self.block - S), value=float("-inf"))
        pooled = scores.view(B, self.heads, T, blocks, self.block).amax(dim=-1)  # [B, heads, T, blocks]
        own = step.positions() // self.block  # [T]
        local = (own[:, None] - torch.arange(self.local, device=own.device)).clamp(min=0)  # [T, local]
        pooled = pooled.scatter(-1, local.expand(B, self.heads, -1, -1), float("inf"))
        best, chosen = pooled.topk(min(self.top_k, blocks), dim=-1)
        kept = torch.zeros_like(pooled, dtype=torch.bool).scatter_(-1, chosen, best > float("-inf"))
        key_blocks = torch.arange(S, device=keys.device) // self.block
        return kept[..., key_blocks] & visible

    def _rotate(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        # the attention's cos and sin, cut to this head size as transformers cuts them
        return apply_rotary(x, step.cos[..., : self.dim], step.sin[..., : self.dim])


class BlockSparseAttention(Attention):
    """Attention over the blocks of keys its indexer picks, each indexer head's pick shared by a group
    of attention heads."""

    static = False  # the block indexer's selection depends on how many keys there are

    def __init__(self, args: MiniMaxM3Args, *other, **options):
        super().__init__(*other, **options)
        self.indexer = BlockIndexer(args)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> IndexedKV:
        return IndexedKV(batch, self.kv_heads, self.head_dim, self.indexer.dim, max_len, dtype, device)

    def state_bytes_per_token(self, dtype: torch.dtype) -> int:
        return super().state_bytes_per_token(dtype) + self.indexer.dim * dtype.itemsize

    def mask(self, x: torch.Tensor, step: Step, kv: IndexedKV, positions) -> tuple[torch.Tensor, bool]:
        keys = kv.update_index(self.indexer.keys(x, step), step.start)
        selection = self.indexer.selection(x, keys, step)  # [B, index heads, T, S]
        return selection.repeat_interleave(self.heads // self.indexer.heads, dim=1), False


def build(args: MiniMaxM3Args) -> "CausalLM":  # noqa: F821
    hidden, eps = args.hidden_size, args.rms_norm_eps

    def attention(sparse: bool) -> nn.Module:
        shape = (hidden, args.num_attention_heads, args.num_key_value_heads, args.head_dim)
        options = dict(qk_norm="head", norm_eps=eps, norm=ZeroCenteredRMSNorm)
        if sparse:
            return BlockSparseAttention(args, *shape, **options)
        return Attention(*shape, **options)

    def moe(i: int) -> nn.Module:
        router = GroupedTopKRouter(
            hidden,
            args.num_local_experts,
            args.num_experts_per_tok,
            scoring="sigmoid",
            n_group=1,
            topk_group=1,
            normalize=True,
            scaling=args.routed_scaling_factor,
            correction_bias=True,
        )
        return SparseMoE(
            i,
            hidden,
            args.intermediate_size,
            args.num_local_experts,
            args.num_experts_per_tok,
            router,
            act=args.glu,
            shared_expert=GatedMLP(hidden, args.shared_intermediate_size, args.glu),
        )

    def feed_forward(i: int) -> nn.Module:
        if args.mlp_layer_types[i] == "dense":
            return GatedMLP(hidden, args.dense_intermediate_size, args.glu)
        return moe(i)

    layers = [
        DecoderLayer(attention(args.layer_types[i] == SPARSE), feed_forward(i), hidden, eps, norm=ZeroCenteredRMSNorm)
        for i in range(args.num_hidden_layers)
    ]
    first = args.num_hidden_layers
    mtp = [
        DecoderLayer(attention(True), moe(first + k), hidden, eps, norm=ZeroCenteredRMSNorm)
        for k in range(args.num_mtp_modules)
    ]
    return causal_lm(args, layers, args.head_dim, norm=ZeroCenteredRMSNorm, mtp=mtp)


# the release's MTP layers, `model.mtp.layers.{k}.*` (the decoder layer's tensors under `transformer_layer.`),
# seen under DeepSeek-V3's names
MINIMAX_M3_MTP = MtpLayout(
    "num_mtp_modules",
    (
        *(
            (f"model.layers.{{layer}}.{name}.", f"model.mtp.layers.{{depth}}.{name}.")
            for name in ("enorm", "hnorm", "eh_proj")
        ),
        ("model.layers.{layer}.shared_head.norm.", "model.mtp.layers.{depth}.final_layernorm."),
        ("model.layers.{layer}.", "model.mtp.layers.{depth}.transformer_layer."),
    ),
)


FAMILY = Family(
    architectures=(),
    model_type="minimax_m3_vl_text",
    args=MiniMaxM3Args,
    model=build,
    experts=(PerExpert(MIXTRAL_EXPERTS),),
    # the release keeps the MoE block as `block_sparse_moe`, its correction bias on the block, the
    # indexer's weights on the attention
    hub_aliases=(
        (".mlp.gate.e_score_correction_bias", ".block_sparse_moe.e_score_correction_bias"),
        (".mlp.gate.", ".block_sparse_moe.gate."),
        (".mlp.shared_expert.", ".block_sparse_moe.shared_experts."),
        *(
            (f".self_attn.indexer.{name}.", f".self_attn.index_{name}.")
            for name in ("q_proj", "k_proj", "q_norm", "k_norm")
        ),
    ),
    keep_float32=("e_score_correction_bias",),
    mtp=MINIMAX_M3_MTP,
    # the vision tower, its projector and patch merger stay on disk
    multimodal=(
        Multimodal(
            "MiniMaxM3SparseForConditionalGeneration",
            (("model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")),
        ),
    ),
    example="MiniMaxAI/MiniMax-M3",
)
