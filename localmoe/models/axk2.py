"""A.X-K2 (AXK2ForCausalLM, e.g. skt/A.X-K2): DeepSeek-V3.2 (latent attention over the tokens its indexer
selects, a shared expert) whose queries and an output gate per channel come from one projection of the
query's bottleneck, normalised and not, side by side; whose norms before attention (every layer) and
before the MoE are gated by a low-rank sigmoid of their own output; and whose sigmoid routing keeps
the best expert groups only where `n_group` is set (dropped groups score 0, not -inf)."""

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.models.deepseek_v2 import build as deepseek_build
from localmoe.models.deepseek_v32 import KEEP_FLOAT32, DeepseekV32Args, SparseLatentAttention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family
from localmoe.models.layers import CausalLM, DecoderLayer, RMSNorm
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, SparseMoE


@dataclass
class AXK2Args(DeepseekV32Args):
    dropped_group_score: ClassVar[float | None] = 0.0  # as its reference implementation

    n_routed_experts: int = 128
    n_shared_experts: int | None = 1
    moe_intermediate_size: int = 512
    q_lora_rank: int | None = 384
    kv_lora_rank: int = 128
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    n_group: int | None = None  # A.X-K2-Light: no groups
    topk_group: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131072
    index_n_heads: int = 16
    gated_norm_rank: int = 16
    first_k_dense_replace: int = 1  # with moe_layer_freq, the older spelling of mlp_layer_types
    moe_layer_freq: int = 1

    def is_dense(self, i: int) -> bool:
        if self.mlp_layer_types is None:
            return not (i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0)
        return self.mlp_layer_types[i] == "dense"

    def attention(self, i: int) -> nn.Module:
        return GatedQueryLatentAttention(self)

    def _contradictions(self):
        yield from super()._contradictions()
        if (self.n_group is None) != (self.topk_group is None):
            yield "sets one of n_group and topk_group without the other"


class GatedQueryLatentAttention(SparseLatentAttention):
    """Queries and an output gate from q_gate_proj over the query's bottleneck, normalised and raw."""

    def __init__(self, args: AXK2Args):
        super().__init__(args, computes_selection=True)
        del self.q_b_proj  # q_gate_proj projects the queries
        width = self.nope_dim + self.rope_dim + self.v_dim
        self.q_gate_proj = nn.Linear(2 * args.q_lora_rank, self.heads * width, bias=False)

    def queries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        q_a = self.q_a_proj(x)
        q_low = self.q_a_layernorm(q_a)
        q, gate = (
            self.q_gate_proj(torch.cat((q_low, q_a), dim=-1))
            .view(B, T, self.heads, -1)
            .split((self.nope_dim + self.rope_dim, self.v_dim), dim=-1)
        )
        return q.reshape(B, T, -1), q_low, gate.reshape(B, T, -1)


class LowRankGate(nn.Module):
    def __init__(self, hidden: int, rank: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, rank, bias=False)
        self.fc2 = nn.Linear(rank, hidden, bias=False)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(y)))


class GatedRMSNorm(nn.Module):
    """y = RMSNorm(x), times sigmoid(fc2(silu(fc1(y))))."""

    def __init__(self, hidden: int, eps: float, rank: int):
        super().__init__()
        self.norm = RMSNorm(hidden, eps)
        self.mlp = LowRankGate(hidden, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return (y * torch.sigmoid(self.mlp(y).float())).to(y.dtype)


class GatedNormDecoderLayer(DecoderLayer):
    """The gated norm before attention, and before the MoE on MoE layers (dense ones keep a plain norm)."""

    def __init__(self, attention: nn.Module, mlp: nn.Module, hidden: int, eps: float, rank: int):
        super().__init__(attention, mlp, hidden, eps)
        self.input_layernorm = GatedRMSNorm(hidden, eps, rank)
        if isinstance(mlp, SparseMoE):
            self.post_attention_layernorm = GatedRMSNorm(hidden, eps, rank)


def build(args: AXK2Args) -> CausalLM:
    return deepseek_build(args, layer=partial(GatedNormDecoderLayer, rank=args.gated_norm_rank))


FAMILY = Family(
    architectures=("AXK2ForCausalLM",),
    model_type="axk2",
    args=AXK2Args,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    # the Hub's names: the fused query and gate projection as q_b_proj, the norms' gates as W_down and W_up
    hub_aliases=(
        (".mlp.shared_expert.", ".mlp.shared_experts."),
        (".self_attn.q_gate_proj.", ".self_attn.q_b_proj."),
        (".mlp.fc1.", ".W_down."),
        (".mlp.fc2.", ".W_up."),
    ),
    keep_float32=KEEP_FLOAT32,
    example="skt/A.X-K2",
)
