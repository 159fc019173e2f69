"""Flint (FlintForCausalLM, e.g. RecursiveSI/flint): Qwen3-MoE's layers with a learned attention sink per
head everywhere, rotary on the sliding-window layers only (the full ones have no position embeddings),
sigmoid top-k routing renormalised, a shared expert added unweighted, and dense first layers
(`mlp_only_layers`). Its norms scale in float32; the Hub calls the sinks `softmax_offset`."""

from dataclasses import dataclass

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, causal_lm
from localmoe.models.layers import MLP, CausalLM, DecoderLayer, UpcastRMSNorm
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, GatedActivation, SparseMoE, biased_sigmoid_router
from localmoe.models.qwen3_moe import Qwen3MoeArgs


@dataclass
class FlintArgs(Qwen3MoeArgs):
    head_dim: int | None = 128
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 1024
    num_experts: int = 256
    num_experts_per_tok: int = 6
    norm_topk_prob: bool = True
    sliding_window: int | None = 513
    max_position_embeddings: int = 262144
    layer_types: list[str] | None = None

    def sliding(self, i: int) -> bool:
        if self.layer_types is None:  # transformers' default pattern
            return not (i < 2 or i % 4 == 1 or i == self.num_hidden_layers - 1)
        return self.layer_types[i] == "sliding_attention"

    def is_moe_layer(self, i: int) -> bool:
        dense = [0, 1] if self.mlp_only_layers is None else self.mlp_only_layers
        return i not in dense and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0


def build(args: FlintArgs) -> CausalLM:
    hidden, head_dim = args.hidden_size, args.attention_head_dim

    def feed_forward(i: int):
        if not args.is_moe_layer(i):
            return MLP(hidden, args.intermediate_size, args.hidden_act)
        experts, top_k = args.num_experts, args.num_experts_per_tok
        return SparseMoE(
            i,
            hidden,
            args.moe_intermediate_size,
            experts,
            top_k,
            biased_sigmoid_router(hidden, experts, top_k, normalize=args.norm_topk_prob, bias=False),
            act=GatedActivation(act=args.hidden_act),
            shared_expert=MLP(hidden, args.shared_expert_intermediate_size, args.hidden_act),
        )

    def attention(i: int) -> Attention:
        sliding = args.sliding(i)
        return Attention(
            hidden,
            args.num_attention_heads,
            args.key_value_heads,
            head_dim,
            qkv_bias=args.attention_bias,
            out_bias=args.attention_bias,
            qk_norm="head",
            norm_eps=args.rms_norm_eps,
            norm=UpcastRMSNorm,
            sliding_window=args.sliding_window if sliding else None,
            sinks=True,
            rope=sliding,
        )

    layers = [
        DecoderLayer(attention(i), feed_forward(i), hidden, args.rms_norm_eps, norm=UpcastRMSNorm)
        for i in range(args.num_hidden_layers)
    ]
    return causal_lm(args, layers, head_dim, norm=UpcastRMSNorm)


FAMILY = Family(
    architectures=("FlintForCausalLM",),
    model_type="flint",
    args=FlintArgs,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    hub_aliases=((".self_attn.sinks", ".self_attn.softmax_offset"),),
    keep_float32=("mlp.gate.weight", "sinks"),
    example="RecursiveSI/flint",
)
