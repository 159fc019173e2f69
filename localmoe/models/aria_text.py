"""Aria's language model (AriaTextForCausalLM; AriaForConditionalGeneration, e.g. rhymes-ai/Aria): Llama's
attention with an MoE block on every layer, softmax over the top-k logits, SiLU-gated routed experts
whatever `hidden_act` says (the shared experts, one MLP `moe_num_shared_experts` times as wide, follow
it). The experts are stored fused and transposed, as fc1 (gate then up) and fc2."""

from dataclasses import dataclass, field

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import Fused
from localmoe.models.family import Family, ModelArgs, Multimodal, causal_lm
from localmoe.models.layers import MLP, CausalLM, DecoderLayer
from localmoe.models.moe import GatedActivation, SparseMoE, TopKRouter


@dataclass
class AriaTextArgs(ModelArgs):
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    moe_num_experts: int = 8
    moe_topk: int = 2
    moe_num_shared_experts: int = 2
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)


def build(args: AriaTextArgs) -> CausalLM:
    hidden, experts, top_k = args.hidden_size, args.moe_num_experts, args.moe_topk
    head_dim = args.attention_head_dim
    shared = args.intermediate_size * args.moe_num_shared_experts
    layers = [
        DecoderLayer(
            Attention(
                hidden,
                args.num_attention_heads,
                args.key_value_heads,
                head_dim,
                qkv_bias=args.attention_bias,
                out_bias=args.attention_bias,
            ),
            SparseMoE(
                i,
                hidden,
                args.intermediate_size,
                experts,
                top_k,
                TopKRouter(hidden, experts, top_k, normalize=True),
                act=GatedActivation(act="silu"),
                shared_expert=MLP(hidden, shared, args.hidden_act, bias=args.mlp_bias) if shared else None,
            ),
            hidden,
            args.rms_norm_eps,
        )
        for i in range(args.num_hidden_layers)
    ]
    return causal_lm(args, layers, head_dim)


FAMILY = Family(
    architectures=("AriaTextForCausalLM",),
    model_type="aria_text",
    args=AriaTextArgs,
    model=build,
    experts=(
        Fused(
            "model.layers.{layer}.mlp.experts.fc1.weight",
            "model.layers.{layer}.mlp.experts.fc2.weight",
            transposed=True,
        ),
        Fused(
            "model.layers.{layer}.mlp.experts.gate_up_proj",
            "model.layers.{layer}.mlp.experts.down_proj",
            transposed=True,
        ),
    ),
    hub_aliases=((".mlp.gate.", ".mlp.router."), (".mlp.shared_expert.", ".mlp.shared_experts.")),
    # the vision tower and the projector are left on disk
    multimodal=(
        Multimodal(
            "AriaForConditionalGeneration",
            (("model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")),
        ),
    ),
    example="rhymes-ai/Aria",
)
