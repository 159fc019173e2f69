"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): q/k/v biases, and a shared expert beside the routed ones whose
output is scaled by sigmoid(shared_expert_gate(x))."""

from dataclasses import dataclass, field
from typing import ClassVar

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs, causal_lm
from localmoe.models.layers import MLP, CausalLM, DecoderLayer
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, GatedActivation, SparseMoE, TopKRouter


@dataclass
class Qwen2MoeArgs(ModelArgs):
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"num_experts": ("num_local_experts",)}

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 16
    head_dim: int | None = None
    moe_intermediate_size: int = 1408
    shared_expert_intermediate_size: int = 5632
    num_experts: int = 60
    num_experts_per_tok: int = 4
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] | None = None
    qkv_bias: bool = True
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    layer_types: list[str] | None = None
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)

    def window(self, i: int) -> int | None:
        """The sliding window of layer i, as transformers derives it when the config lists no layer_types."""
        if not self.use_sliding_window:
            return None
        if self.layer_types is not None:
            return self.sliding_window if self.layer_types[i] == "sliding_attention" else None
        return self.sliding_window if (i + 1) % 2 and i < self.max_window_layers else None


def build(args: Qwen2MoeArgs) -> CausalLM:
    hidden = args.hidden_size
    head_dim = args.attention_head_dim

    def feed_forward(i: int):
        if i in (args.mlp_only_layers or []) or args.num_experts == 0 or (i + 1) % args.decoder_sparse_step:
            return MLP(hidden, args.intermediate_size, args.hidden_act)
        return SparseMoE(
            i,
            hidden,
            args.moe_intermediate_size,
            args.num_experts,
            args.num_experts_per_tok,
            TopKRouter(hidden, args.num_experts, args.num_experts_per_tok, args.norm_topk_prob),
            act=GatedActivation(act=args.hidden_act),
            shared_expert=MLP(hidden, args.shared_expert_intermediate_size, args.hidden_act),
            shared_expert_gate=True,
        )

    layers = [
        DecoderLayer(
            Attention(
                hidden,
                args.num_attention_heads,
                args.key_value_heads,
                head_dim,
                qkv_bias=args.qkv_bias,
                sliding_window=args.window(i),
            ),
            feed_forward(i),
            hidden,
            args.rms_norm_eps,
        )
        for i in range(args.num_hidden_layers)
    ]
    return causal_lm(args, layers, head_dim)


FAMILY = Family(
    architectures=("Qwen2MoeForCausalLM",),
    model_type="qwen2_moe",
    args=Qwen2MoeArgs,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    example="Qwen/Qwen1.5-MoE-A2.7B-Chat",
)
