"""Ling 3 / Ring 3 (BailingHybridForCausalLM, inclusionAI): in each group of `layer_group_size` layers,
Kimi Delta Attention in all but the last, which is DeepSeek's latent attention with rotary on
interleaved pairs and each head's output scaled by a sigmoid gate of its own; on DeepSeek-V3's MoE
(dense first layers, a shared expert, sigmoid routing with a correction bias over the best groups).
Its delta attention differs from Kimi-Linear's in its projections: one for the forget gate, bounded
below by `kda_lower_bound` where `kda_safe_gate`, and one for the output gate. Stored under the
release's names (`word_embeddings`, `attention`, `dense`, `expert_bias`); an LM head of its own
always, as transformers keeps it. Its multi-token-prediction layers after the last one
(`model.layers.{num_hidden_layers + k}`, DeepSeek-V3's layout with its final norm named final_layernorm) are
loaded as `mtp`, for drafts (see localmoe/models/mtp.py), as vLLM's bailing_moe_v3_mtp.py builds them: latent
attention whatever the layer groups say, and MoE; the output of its final norm is passed on to the next
draft, as vLLM's returns it (`NormedMTPLayer`, as DeepSeek-V3's)."""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from localmoe.models.attention import LatentAttention
from localmoe.models.deepseek_v2 import attention_scale, build
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family
from localmoe.models.kimi_delta_attention import BoundedDeltaAttention
from localmoe.models.kimi_linear import KimiLinearArgs
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS


@dataclass
class BailingHybridArgs(KimiLinearArgs):
    default_rope_theta: ClassVar[float] = 6_000_000.0
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {
        **KimiLinearArgs.config_aliases,
        "n_routed_experts": ("num_local_experts", "num_experts"),
    }

    moe_intermediate_size: int = 768
    num_experts_per_tok: int = 8
    n_routed_experts: int = 512
    n_group: int | None = 8
    topk_group: int | None = 4
    first_k_dense_replace: int = 2
    routed_scaling_factor: float = 2.5
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144
    head_dim: int = 128  # the delta attention's heads (the latent attention's are qk_*_head_dim)
    short_conv_kernel_size: int = 4
    layer_group_size: int = 6
    kda_safe_gate: bool = True
    kda_lower_bound: float = -5.0
    # transformers saves the delta attention's sizes under these names too, head_dim then being the rope dims
    linear_head_dim: int | None = None
    linear_num_heads: int | None = None
    linear_conv_kernel_dim: int | None = None

    def linear(self, i: int) -> bool:
        if self.layer_types is not None:
            return self.layer_types[i] == "linear_attention"
        return (i + 1) % self.layer_group_size != 0

    @property
    def interleaved_rope(self) -> bool:
        return True

    def is_dense(self, i: int) -> bool:
        """Whether layer i's feed-forward is dense; an MTP layer's (past the model's) is MoE."""
        return i < self.num_hidden_layers and super().is_dense(i)

    def attention(self, i: int) -> nn.Module:
        """Layer i's; an MTP layer's (past the model's) latent attention."""
        if i < self.num_hidden_layers and self.linear(i):
            return BailingDeltaAttention(self)
        return HeadGatedLatentAttention(
            self.hidden_size,
            self.num_attention_heads,
            q_lora_rank=self.q_lora_rank,
            kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
            bias=self.attention_bias,
            interleaved_rope=True,
            scale=attention_scale(self),
        )


class BailingDeltaAttention(BoundedDeltaAttention):
    """Bounded Kimi Delta Attention (where the gate is safe) with full-width projections for its forget and
    output gates."""

    def __init__(self, args: BailingHybridArgs):
        heads = args.linear_num_heads or args.num_attention_heads
        head_dim = args.linear_head_dim or args.head_dim
        kernel = args.linear_conv_kernel_dim or args.short_conv_kernel_size
        bound = args.kda_lower_bound if args.kda_safe_gate else None
        super().__init__(args.hidden_size, heads, head_dim, kernel, args.rms_norm_eps, args.hidden_act, bound)
        del self.f_a_proj, self.f_b_proj, self.g_a_proj, self.g_b_proj
        width = heads * head_dim
        self.f_proj = nn.Linear(args.hidden_size, width, bias=False)
        self.g_proj = nn.Linear(args.hidden_size, width, bias=False)

    def forget(self, x: torch.Tensor) -> torch.Tensor:
        return self.f_proj(x)

    def output_gate(self, x: torch.Tensor) -> torch.Tensor:
        return self.g_proj(x)


class HeadGatedLatentAttention(LatentAttention):
    """Latent attention whose heads' outputs are each scaled by sigmoid(g_proj(x)), one gate per head."""

    def __init__(self, hidden: int, heads: int, **options):
        super().__init__(hidden, heads, **options)
        self.g_proj = nn.Linear(hidden, heads, bias=False)

    def output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        B, T, _ = out.shape
        gate = torch.sigmoid(self.g_proj(x).float()).to(out.dtype)
        return self.o_proj((out.view(B, T, self.heads, -1) * gate[..., None]).view(B, T, -1))


def build_with_mtp(args: BailingHybridArgs) -> nn.Module:
    return build(args, mtp=args.num_nextn_predict_layers)


FAMILY = Family(
    architectures=("BailingHybridForCausalLM",),
    model_type="bailing_hybrid",
    args=BailingHybridArgs,
    model=build_with_mtp,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    hub_aliases=(
        ("model.embed_tokens.", "model.word_embeddings."),
        (".self_attn.o_proj.", ".attention.dense."),
        (".self_attn.", ".attention."),
        (".mlp.gate.e_score_correction_bias", ".mlp.gate.expert_bias"),
        (".mlp.shared_expert.", ".mlp.shared_experts."),
    ),
    keep_float32=("e_score_correction_bias", ".mlp.gate.weight", "dt_bias", "A_log"),
    example="inclusionAI/Ling-3.0-Flash",
)
