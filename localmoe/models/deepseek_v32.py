"""DeepSeek-V3.2 (DeepseekV32ForCausalLM): DeepSeek-V3's latent attention, routing and shared experts,
with DeepSeek sparse attention in every layer: a small "indexer" scores every earlier token for each
query, and the query attends only to the `index_topk` best (all of them while the context is that
short). GLM-5 builds on this file. The multi-token-prediction layer after the last one
(`model.layers.{num_hidden_layers}`, DeepSeek-V3's layout) is loaded as `mtp`, for drafts, with an indexer
of its own (vLLM's deepseek_mtp.py builds its decoder layer as any V3.2 layer's)."""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.errors import LocalMoEError
from localmoe.models.attention import LatentAttention
from localmoe.models.deepseek_v2 import attention_scale, build
from localmoe.models.deepseek_v3 import DeepseekV3Args
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import DEEPSEEK_MTP, Family
from localmoe.models.layers import CausalLM, Step
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS
from localmoe.models.rotary import apply_rotary, apply_rotary_interleaved
from localmoe.models.state import IndexedLatentKV, LatentKV

SELECTION = "dsa_selection"  # where a step keeps the last indexer's choice, for layers that share it
# transformers keeps these in float32 whatever the compute dtype: routing and the indexer's head weights
KEEP_FLOAT32 = ("e_score_correction_bias", ".mlp.gate.weight", ".indexer.weights_proj.")


@dataclass
class DeepseekV32Args(DeepseekV3Args):
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"n_routed_experts": ("num_local_experts", "num_experts")}

    max_position_embeddings: int = 163840
    index_topk: int = 2048
    index_head_dim: int = 128
    index_n_heads: int = 64
    mlp_layer_types: list[str] | None = None

    def __post_init__(self):
        self.mlp_bias = False  # read by the shared build; these MLPs have none, whatever the config says
        if self.q_lora_rank is None:
            raise LocalMoEError("DeepSeek sparse attention needs q_lora_rank: its indexer reads the query's bottleneck")

    @property
    def interleaved_rope(self) -> bool:
        return True

    @property
    def interleaved_index_rope(self) -> bool:
        """Whether the indexer rotates adjacent pairs (GLM-5) or halves (DeepSeek-V3.2)."""
        return False

    @property
    def index_rope_last(self) -> bool:
        """Whether the indexer rotates the last rope dims of its heads (Hy4) or the first."""
        return False

    @property
    def index_norm_eps(self) -> float:
        return 1e-6

    def is_dense(self, i: int) -> bool:
        """The config's mlp_layer_types where it lists layer i (not an MTP layer's: those are MoE)."""
        if self.mlp_layer_types is not None and i < len(self.mlp_layer_types):
            return self.mlp_layer_types[i] == "dense"
        return super().is_dense(i)

    def attention(self, i: int) -> nn.Module:
        return SparseLatentAttention(self, computes_selection=True)


class Indexer(nn.Module):
    """Scores earlier tokens for each query: sum over heads h of w_h(x) * relu(q_h . k) / sqrt(d), q_h from
    the query's bottleneck, k from the hidden state, both rotated on their first (or last) rope dims."""

    def __init__(self, args: DeepseekV32Args, query_width: int | None = None):
        """`query_width`: what its queries are projected from, if not the query's bottleneck."""
        super().__init__()
        self.heads, self.dim, self.rope_dim = args.index_n_heads, args.index_head_dim, args.qk_rope_head_dim
        self.rotate = apply_rotary_interleaved if args.interleaved_index_rope else apply_rotary
        self.rope_last = args.index_rope_last
        self.wq_b = nn.Linear(query_width or args.q_lora_rank, self.heads * self.dim, bias=False)
        self.wk = nn.Linear(args.hidden_size, self.dim, bias=False)
        self.k_norm = nn.LayerNorm(self.dim, eps=args.index_norm_eps)
        self.weights_proj = nn.Linear(args.hidden_size, self.heads, bias=False)

    def keys(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """[B, T, dim], rotated."""
        keys = self.k_norm(self.wk(x).to(self.k_norm.weight.dtype)).to(x.dtype)  # the norm in its own dtype
        return self._rotate(keys[:, None], step)[:, 0]

    def queries(self, x: torch.Tensor, q_low: torch.Tensor, step: Step) -> torch.Tensor:
        """[B, H, T, dim], rotated, from the query's bottleneck q_low."""
        B, T, _ = x.shape
        return self._rotate(self.wq_b(q_low).view(B, T, self.heads, self.dim).transpose(1, 2), step)

    def scores(self, x: torch.Tensor, q_low: torch.Tensor, keys: torch.Tensor, step: Step) -> torch.Tensor:
        """[B, T, S] float32 for the new tokens against keys [B, S, dim]."""
        q = self.queries(x, q_low, step)  # [B, H, T, d]
        relu = F.relu((q.float() @ keys.float()[:, None].transpose(-1, -2)) * self.dim**-0.5)  # [B, H, T, S]
        weights = self.weights_proj(x.to(self.weights_proj.weight.dtype)).float() * self.heads**-0.5  # [B, T, H]
        return (weights.transpose(1, 2)[..., None] * relu).sum(dim=1)

    def _rotate(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        if self.rope_last:
            rest, rot = x.split((x.shape[-1] - self.rope_dim, self.rope_dim), dim=-1)
            return torch.cat((rest, self.rotate(rot, step.cos, step.sin)), dim=-1)
        rot, rest = x[..., : self.rope_dim], x[..., self.rope_dim :]
        return torch.cat((self.rotate(rot, step.cos, step.sin), rest), dim=-1)


class SparseLatentAttention(LatentAttention):
    """Latent attention over the earlier tokens the indexer selects: its own indexer's choice where it
    `computes_selection`, else the choice of the last layer that computed one in this step."""

    static = False  # the indexer's selection depends on how many keys there are

    def __init__(self, args: DeepseekV32Args, computes_selection: bool, **options):
        """`options`: LatentAttention's, where a family adds to them (Hy4's sinks) or sets them otherwise."""
        shape = dict(
            q_lora_rank=args.q_lora_rank,
            kv_lora_rank=args.kv_lora_rank,
            qk_nope_head_dim=args.qk_nope_head_dim,
            qk_rope_head_dim=args.qk_rope_head_dim,
            v_head_dim=args.v_head_dim,
            bias=args.attention_bias,
            interleaved_rope=args.interleaved_rope,
            scale=attention_scale(args),
        )
        super().__init__(args.hidden_size, args.num_attention_heads, **{**shape, **options})
        self.top_k = args.index_topk
        if computes_selection:
            self.indexer = Indexer(args)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> LatentKV:
        if not hasattr(self, "indexer"):
            return super().new_state(batch, max_len, dtype, device)
        return IndexedLatentKV(batch, self.kv_lora_rank, self.rope_dim, self.indexer.dim, max_len, dtype, device)

    def state_bytes_per_token(self, dtype: torch.dtype) -> int:
        index = self.indexer.dim if hasattr(self, "indexer") else 0
        return super().state_bytes_per_token(dtype) + index * dtype.itemsize

    def mask(self, x: torch.Tensor, q_low: torch.Tensor, step: Step, kv: LatentKV):
        """Causal, and among earlier tokens only the `index_topk` the indexer scores highest."""
        if hasattr(self, "indexer"):
            keys = kv.update_index(self.indexer.keys(x, step), step.start)
            if keys.shape[1] <= self.top_k:  # every earlier token is selected: plain causal attention
                step._memo[SELECTION] = None
            else:
                scores = self.indexer.scores(x, q_low, keys, step).masked_fill(~step.visible(None), float("-inf"))
                chosen = scores.topk(self.top_k, dim=-1).indices  # [B, T, top_k]
                selected = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, chosen, True)
                step._memo[SELECTION] = (selected & step.visible(None))[:, None]  # [B, 1, T, S]
        selection = step._memo[SELECTION]
        return step.mask(None) if selection is None else (selection, False)


def build_with_mtp(args: DeepseekV32Args) -> CausalLM:
    return build(args, mtp=args.num_nextn_predict_layers)


FAMILY = Family(
    architectures=("DeepseekV32ForCausalLM",),
    model_type="deepseek_v32",
    args=DeepseekV32Args,
    model=build_with_mtp,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    hub_aliases=((".mlp.shared_expert.", ".mlp.shared_experts."),),
    keep_float32=KEEP_FLOAT32,
    mtp=DEEPSEEK_MTP,
    example="deepseek-ai/DeepSeek-V3.2",
)
