"""Granite 3.x MoE (GraniteMoeForCausalLM, e.g. ibm-granite/granite-3.1-3b-a800m-instruct): Mixtral's
attention and softmax top-k routing with Granite's muP multipliers on the embeddings, each residual
branch, the attention logits and the LM head's logits. Experts are stored fused (input_linear holds gate
then up). GraniteMoeShared and GraniteMoeSWA (granitemoeshared.py, granitemoe_swa.py) build on this."""

from dataclasses import dataclass, field

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import Fused
from localmoe.models.family import Family, ModelArgs, causal_lm
from localmoe.models.granitemoehybrid import FusedGatedMLP, GraniteCausalLM, GraniteDecoderLayer
from localmoe.models.layers import CausalLM
from localmoe.models.moe import GatedActivation, SparseMoE, TopKRouter
from localmoe.models.rotary import RotaryEmbedding


@dataclass
class GraniteMoeArgs(ModelArgs):
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    hidden_act: str = "silu"
    attention_bias: bool = False
    embedding_multiplier: float = 1.0
    logits_scaling: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)

    def shared_mlp_size(self) -> int:
        """The shared MLP's width, 0 for none (GraniteMoe has none, whatever its config says)."""
        return 0

    def window(self, i: int) -> int | None:
        return None

    def rope_theta(self, i: int) -> float:
        """Layer i's rotary base; 0 for a layer without position embeddings."""
        return self.rope["rope_theta"]


def build(args: GraniteMoeArgs, sinks: bool = False) -> CausalLM:
    hidden, heads, head_dim = args.hidden_size, args.num_attention_heads, args.attention_head_dim
    thetas = sorted({args.rope_theta(i) for i in range(args.num_hidden_layers)} - {0})
    rotaries = {
        theta: RotaryEmbedding({**args.rope, "rope_theta": theta}, head_dim, args.max_position_embeddings)
        for theta in thetas
        if theta != args.rope["rope_theta"]
    }

    def attention(i: int) -> Attention:
        theta = args.rope_theta(i)
        return Attention(
            hidden,
            heads,
            args.key_value_heads,
            head_dim,
            qkv_bias=args.attention_bias,
            out_bias=args.attention_bias,
            scale=args.attention_multiplier,
            sliding_window=args.window(i),
            sinks=sinks,
            rope=theta != 0,
            rotary=rotaries.get(theta),
        )

    def moe(i: int) -> SparseMoE:
        experts, top_k, shared = args.num_local_experts, args.num_experts_per_tok, args.shared_mlp_size()
        return SparseMoE(
            i,
            hidden,
            args.intermediate_size,
            experts,
            top_k,
            TopKRouter(hidden, experts, top_k, normalize=True),
            act=GatedActivation(act=args.hidden_act),
            shared_expert=FusedGatedMLP(hidden, shared, args.hidden_act) if shared else None,
        )

    layers = [GraniteDecoderLayer(attention(i), moe(i), args) for i in range(args.num_hidden_layers)]
    return causal_lm(
        args,
        layers,
        head_dim,
        embed_scale=args.embedding_multiplier,
        model=GraniteCausalLM,
        logits_scaling=args.logits_scaling,
    )


# The experts as the Hub stores them, then transformers' in-memory names (which GraniteMoeSWA also saves)
GRANITE_EXPERTS = (
    Fused(
        "model.layers.{layer}.block_sparse_moe.input_linear.weight",
        "model.layers.{layer}.block_sparse_moe.output_linear.weight",
    ),
    Fused(
        "model.layers.{layer}.block_sparse_moe.experts.gate_up_proj",
        "model.layers.{layer}.block_sparse_moe.experts.down_proj",
    ),
)
GRANITE_ALIASES = (
    (".mlp.gate.", ".block_sparse_moe.router.layer."),
    (".mlp.gate.", ".block_sparse_moe.router."),
    (".mlp.shared_expert.", ".shared_mlp."),
)

FAMILY = Family(
    architectures=("GraniteMoeForCausalLM",),
    model_type="granitemoe",
    args=GraniteMoeArgs,
    model=build,
    experts=GRANITE_EXPERTS,
    hub_aliases=GRANITE_ALIASES,
    example="ibm-granite/granite-3.1-3b-a800m-instruct",
)
