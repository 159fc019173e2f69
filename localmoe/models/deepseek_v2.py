"""DeepSeek-V2 (DeepSeek-V2-Lite, DeepSeek-Coder-V2): multi-head latent attention with its rotary dims in
interleaved pairs, dense first layers, shared experts, and softmax routing limited to the best groups
of experts, scaled by `routed_scaling_factor`. DeepSeek-V3 builds on this file."""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from localmoe.models.attention import LatentAttention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs, causal_lm
from localmoe.models.layers import MLP, CausalLM, DecoderLayer
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, GatedActivation, GroupedTopKRouter, SparseMoE
from localmoe.models.mtp import NormedMTPLayer


@dataclass
class DeepseekV2Args(ModelArgs):
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"n_routed_experts": ("num_experts", "num_local_experts")}

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_experts_per_tok: int
    n_routed_experts: int = 64
    n_shared_experts: int | None = 2
    moe_intermediate_size: int = 1407
    first_k_dense_replace: int = 0
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)

    def router(self) -> nn.Module:
        grouped = self.topk_method == "group_limited_greedy"
        return GroupedTopKRouter(
            self.hidden_size,
            self.n_routed_experts,
            self.num_experts_per_tok,
            scoring="softmax",
            n_group=self.n_group if grouped else 1,
            topk_group=self.topk_group if grouped else 1,
            normalize=False,  # transformers' V2 never renormalises, whatever norm_topk_prob says
            scaling=self.routed_scaling_factor,
            correction_bias=False,
        )

    @property
    def interleaved_rope(self) -> bool:
        return True

    @property
    def rotary_dim(self) -> int:
        """The head size the rotary is built for (times its partial factor, the dims it rotates)."""
        return self.qk_rope_head_dim

    @property
    def position_scaling(self) -> tuple[float, int] | None:
        return None

    def is_dense(self, i: int) -> bool:
        return i < self.first_k_dense_replace

    def attention(self, i: int) -> nn.Module:
        return LatentAttention(
            self.hidden_size,
            self.num_attention_heads,
            q_lora_rank=self.q_lora_rank,
            kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
            bias=self.attention_bias,
            interleaved_rope=self.interleaved_rope,
            scale=attention_scale(self),
            position_scaling=self.position_scaling,
        )


def attention_scale(args: DeepseekV2Args) -> float:
    """1/sqrt(query-key head dim), times yarn's mscale squared where the config asks for it."""
    scale = (args.qk_nope_head_dim + args.qk_rope_head_dim) ** -0.5
    rope = args.rope
    if rope["rope_type"] != "default" and rope.get("mscale_all_dim"):
        factor = rope["factor"]
        mscale = 1.0 if factor <= 1 else 0.1 * rope["mscale_all_dim"] * math.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


def build(
    args: DeepseekV2Args, moe: Callable[..., SparseMoE] = SparseMoE, layer=DecoderLayer, mtp: int = 0, **stack
) -> CausalLM:
    """`moe` the MoE block's class, where a family adds to it (A.X-K1's norm after it); `layer` the decoder
    layer's (A.X-K2's gated norms); `mtp` the multi-token-prediction layers to build after the last decoder
    layer, as the following layers, each passing its final norm's output on to the next draft (vLLM's
    deepseek_mtp.py since its PR 45895, SGLang's deepseek_nextn.py, transformers' MtpModel); `stack`:
    `causal_lm`'s options (Mistral Large 4's learned rotary and logit capping)."""
    hidden = args.hidden_size

    def feed_forward(i: int) -> nn.Module:
        if args.is_dense(i):
            return MLP(hidden, args.intermediate_size, args.hidden_act, bias=args.mlp_bias)
        shared = args.moe_intermediate_size * (args.n_shared_experts or 0)
        return moe(
            i,
            hidden,
            args.moe_intermediate_size,
            args.n_routed_experts,
            args.num_experts_per_tok,
            args.router(),
            act=GatedActivation(act=args.hidden_act),
            shared_expert=MLP(hidden, shared, args.hidden_act, bias=args.mlp_bias) if shared else None,
        )

    layers = [
        layer(args.attention(i), feed_forward(i), hidden, args.rms_norm_eps)
        for i in range(args.num_hidden_layers + mtp)
    ]
    mtp_layers = layers[args.num_hidden_layers :]
    return causal_lm(
        args, layers[: args.num_hidden_layers], args.rotary_dim, mtp=mtp_layers, mtp_layer=NormedMTPLayer, **stack
    )


FAMILY = Family(
    architectures=("DeepseekV2ForCausalLM",),
    model_type="deepseek_v2",
    args=DeepseekV2Args,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    hub_aliases=((".mlp.shared_expert.", ".mlp.shared_experts."),),
    example="deepseek-ai/DeepSeek-V2-Lite-Chat",
)
