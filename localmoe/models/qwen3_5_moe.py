"""Qwen3.5-MoE (Qwen3_5MoeForCausalLM, and the language model of Qwen3_5MoeForConditionalGeneration,
e.g. Qwen/Qwen3.5-35B-A3B): three layers in four are Gated DeltaNet linear attention, the fourth full
attention with an output gate and partial rotary; norms scale by 1 + weight; every layer is MoE with
renormalised softmax top-k routing and a sigmoid-gated shared expert."""

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.kernels.delta_rule import gated_delta_rule, gated_delta_rule_chunked
from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs, Multimodal, causal_lm
from localmoe.models.layers import MLP, CausalLM, DecoderLayer, RMSNorm, Step, ZeroCenteredRMSNorm
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, GatedActivation, SparseMoE, TopKRouter
from localmoe.models.state import DeltaNetState

# transformers names a linear layer's token mixer `linear_attn`; ours is `self_attn` in every layer
DELTANET_WEIGHTS = ("in_proj_", "conv1d.", "dt_bias", "A_log", "norm.", "out_proj.")


@dataclass
class Qwen3_5MoeArgs(ModelArgs):
    default_rope: ClassVar[dict] = {"partial_rotary_factor": 0.25}

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 2
    head_dim: int | None = 256
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    num_experts: int = 256
    num_experts_per_tok: int = 8
    layer_types: list[str] | None = None
    full_attention_interval: int = 4
    attention_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)

    def linear(self, i: int) -> bool:
        if self.layer_types:
            return self.layer_types[i] == "linear_attention"
        return (i + 1) % self.full_attention_interval != 0


class GatedDeltaNet(nn.Module):
    """Linear attention by the gated delta rule. q, k and v come through a short causal depthwise
    convolution and SiLU; q and k are L2-normalised; each value head has its decay
    g = -exp(A_log) * softplus(a + dt_bias) and write rate beta = sigmoid(b); the output is
    RMS-normalised per head and gated by silu(z)."""

    def __init__(self, args: Qwen3_5MoeArgs):
        super().__init__()
        hidden = args.hidden_size
        self.k_heads, self.v_heads = args.linear_num_key_heads, args.linear_num_value_heads
        self.k_dim, self.v_dim = args.linear_key_head_dim, args.linear_value_head_dim
        self.kernel = args.linear_conv_kernel_dim
        self.channels = 2 * self.k_heads * self.k_dim + self.v_heads * self.v_dim
        self.in_proj_qkv = nn.Linear(hidden, self.channels, bias=False)
        self.in_proj_z = nn.Linear(hidden, self.v_heads * self.v_dim, bias=False)
        self.in_proj_b = nn.Linear(hidden, self.v_heads, bias=False)
        self.in_proj_a = nn.Linear(hidden, self.v_heads, bias=False)
        self.conv1d = nn.Conv1d(self.channels, self.channels, self.kernel, groups=self.channels, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(self.v_heads))
        self.A_log = nn.Parameter(torch.empty(self.v_heads))
        self.norm = RMSNorm(self.v_dim, args.rms_norm_eps)
        self.out_proj = nn.Linear(self.v_heads * self.v_dim, hidden, bias=False)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> DeltaNetState:
        return DeltaNetState(batch, self.channels, self.kernel, self.v_heads, self.k_dim, self.v_dim, dtype, device)

    def state_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 0

    def fixed_state_bytes(self, dtype: torch.dtype) -> int:
        return self.channels * (self.kernel - 1) * dtype.itemsize + self.v_heads * self.k_dim * self.v_dim * 4

    def forward(self, x: torch.Tensor, step: Step, state: DeltaNetState) -> torch.Tensor:
        B, T, _ = x.shape
        window = torch.cat((state.conv, self.in_proj_qkv(x).transpose(1, 2)), dim=-1)  # [B, C, K - 1 + T]
        state.conv.copy_(window[..., -(self.kernel - 1) :])
        mixed = F.silu(F.conv1d(window, self.conv1d.weight, groups=self.channels)).transpose(1, 2)  # [B, T, C]
        q, k, v = mixed.split((self.k_heads * self.k_dim, self.k_heads * self.k_dim, self.v_heads * self.v_dim), -1)
        groups = self.v_heads // self.k_heads  # each q/k head serves this many consecutive value heads
        q, k = (_l2_normalize(_heads(t, self.k_dim).repeat_interleave(groups, dim=1)) for t in (q, k))
        q = q * self.k_dim**-0.5
        v = _heads(v, self.v_dim)
        beta = torch.sigmoid(self.in_proj_b(x)).float().transpose(1, 2)  # [B, H, T]
        g = (-self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)).transpose(1, 2)
        rule = gated_delta_rule if T == 1 else gated_delta_rule_chunked
        out = rule(q, k, v, g, beta, state.matrix).transpose(1, 2).to(x.dtype)  # [B, T, H, Dv]
        z = self.in_proj_z(x).view(B, T, self.v_heads, self.v_dim)
        out = (self.norm(out) * F.silu(z.float())).to(x.dtype)
        return self.out_proj(out.reshape(B, T, -1))


def _heads(x: torch.Tensor, dim: int) -> torch.Tensor:
    """[B, T, H * dim] -> [B, H, T, dim] in float32."""
    return x.view(*x.shape[:2], -1, dim).transpose(1, 2).float()


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def build(args: Qwen3_5MoeArgs) -> CausalLM:
    hidden, experts, top_k = args.hidden_size, args.num_experts, args.num_experts_per_tok
    head_dim = args.attention_head_dim

    def mixer(i: int) -> nn.Module:
        if args.linear(i):
            return GatedDeltaNet(args)
        return Attention(
            hidden,
            args.num_attention_heads,
            args.key_value_heads,
            head_dim,
            qkv_bias=args.attention_bias,
            out_bias=args.attention_bias,
            qk_norm="head",
            norm_eps=args.rms_norm_eps,
            output_gate=True,
            norm=ZeroCenteredRMSNorm,
        )

    layers = [
        DecoderLayer(
            mixer(i),
            SparseMoE(
                i,
                hidden,
                args.moe_intermediate_size,
                experts,
                top_k,
                TopKRouter(hidden, experts, top_k, normalize=True),
                act=GatedActivation(act=args.hidden_act),
                shared_expert=MLP(hidden, args.shared_expert_intermediate_size, args.hidden_act),
                shared_expert_gate=True,
            ),
            hidden,
            args.rms_norm_eps,
            norm=ZeroCenteredRMSNorm,
        )
        for i in range(args.num_hidden_layers)
    ]
    return causal_lm(args, layers, head_dim, norm=ZeroCenteredRMSNorm)


FAMILY = Family(
    architectures=("Qwen3_5MoeForCausalLM",),
    model_type="qwen3_5_moe_text",
    args=Qwen3_5MoeArgs,
    model=build,
    experts=(FUSED_EXPERTS, PerExpert(MLP_EXPERTS)),
    hub_aliases=tuple((f".self_attn.{name}", f".linear_attn.{name}") for name in DELTANET_WEIGHTS),
    # the multi-token-prediction head (mtp.*) and the vision tower are left on disk
    multimodal=(
        Multimodal(
            "Qwen3_5MoeForConditionalGeneration",
            (("model.", "model.language_model."), ("lm_head.", "lm_head.")),
        ),
    ),
    example="Qwen/Qwen3.5-35B-A3B",
)
