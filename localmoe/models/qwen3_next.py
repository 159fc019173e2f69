"""Qwen3-Next (Qwen3NextForCausalLM, e.g. Qwen/Qwen3-Next-80B-A3B-Instruct, Qwen3-Coder-Next): Qwen3.5's
layers before it (Gated DeltaNet in three layers of four, gated full attention with partial rotary,
norms scaling by 1 + weight, a sigmoid-gated shared expert), with the DeltaNet's projections fused and
laid out key head by key head, optional top-k renormalisation, and dense layers where `mlp_only_layers`
or `decoder_sparse_step` say so. Its multi-token-prediction layers are Qwen3.5's (`mtp.*`)."""

from dataclasses import dataclass

from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family
from localmoe.models.gated_deltanet import DELTANET_ALIASES
from localmoe.models.layers import MLP, CausalLM, DecoderLayer, ZeroCenteredRMSNorm
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS
from localmoe.models.qwen3_5_moe import QWEN_MTP, Qwen3_5MoeArgs, decoder, sparse_moe, token_mixer


@dataclass
class Qwen3NextArgs(Qwen3_5MoeArgs):
    intermediate_size: int = 5632
    num_experts: int = 512
    num_experts_per_tok: int = 10
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] | None = None

    def is_moe_layer(self, i: int) -> bool:
        return (
            i not in (self.mlp_only_layers or []) and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0
        )


def build(args: Qwen3NextArgs) -> CausalLM:
    def feed_forward(i: int, sparse: bool):
        if sparse:
            return sparse_moe(args, i, normalize=args.norm_topk_prob)
        return MLP(args.hidden_size, args.intermediate_size, args.hidden_act)

    layers = [
        DecoderLayer(
            token_mixer(args, i, grouped=True),
            feed_forward(i, args.is_moe_layer(i)),
            args.hidden_size,
            args.rms_norm_eps,
            norm=ZeroCenteredRMSNorm,
        )
        for i in range(args.num_hidden_layers)
    ]
    # vLLM numbers an MTP layer by its depth where it decides whether it is MoE
    return decoder(args, layers, lambda i, depth: feed_forward(i, args.is_moe_layer(depth)))


FAMILY = Family(
    architectures=("Qwen3NextForCausalLM",),
    model_type="qwen3_next",
    args=Qwen3NextArgs,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    hub_aliases=DELTANET_ALIASES,
    mtp=QWEN_MTP,
    example="Qwen/Qwen3-Next-80B-A3B-Instruct",
)
