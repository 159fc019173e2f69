"""gpt-oss (GptOssForCausalLM): attention sinks, sliding-window and full attention layers alternating,
yarn rotary, biases everywhere, a router with a bias, and experts with biases and a clamped SwiGLU,
stored fused and transposed with gate and up interleaved, or as MXFP4 blocks (the Hub checkpoints),
which are decoded to the compute dtype when read."""

from dataclasses import dataclass, field
from typing import ClassVar

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import Fused, Mxfp4
from localmoe.models.family import Family, ModelArgs, causal_lm
from localmoe.models.layers import CausalLM, DecoderLayer, UpcastRMSNorm
from localmoe.models.moe import GatedActivation, SparseMoE, TopKRouter

EXPERTS = "model.layers.{layer}.mlp.experts"


@dataclass
class GptOssArgs(ModelArgs):
    default_rope_theta: ClassVar[float] = 150_000.0
    default_rope: ClassVar[dict] = {
        "rope_type": "yarn",
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 4096,
    }

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = 8
    head_dim: int | None = 64
    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    sliding_window: int | None = 128
    layer_types: list[str] | None = None
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    attention_bias: bool = True
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)

    def window(self, i: int) -> int | None:
        sliding = self.layer_types[i] == "sliding_attention" if self.layer_types else i % 2 == 0
        return self.sliding_window if sliding else None


def build(args: GptOssArgs) -> CausalLM:
    hidden, experts, top_k = args.hidden_size, args.num_local_experts, args.num_experts_per_tok
    head_dim = args.attention_head_dim
    act = GatedActivation(kind="clamped_swiglu", alpha=args.swiglu_alpha, limit=args.swiglu_limit)
    layers = [
        DecoderLayer(
            Attention(
                hidden,
                args.num_attention_heads,
                args.key_value_heads,
                head_dim,
                qkv_bias=args.attention_bias,
                out_bias=args.attention_bias,
                sliding_window=args.window(i),
                sinks=True,
            ),
            SparseMoE(
                i,
                hidden,
                args.intermediate_size,
                experts,
                top_k,
                # softmax over the top-k logits, which is the renormalised top-k of the full softmax
                TopKRouter(hidden, experts, top_k, normalize=True, bias=True),
                act=act,
                expert_bias=True,
            ),
            hidden,
            args.rms_norm_eps,
            norm=UpcastRMSNorm,
        )
        for i in range(args.num_hidden_layers)
    ]
    return causal_lm(args, layers, head_dim, norm=UpcastRMSNorm)


FAMILY = Family(
    architectures=("GptOssForCausalLM",),
    model_type="gpt_oss",
    args=GptOssArgs,
    model=build,
    experts=(
        Mxfp4(EXPERTS),
        Fused(
            f"{EXPERTS}.gate_up_proj",
            f"{EXPERTS}.down_proj",
            gate_up_bias=f"{EXPERTS}.gate_up_proj_bias",
            down_bias=f"{EXPERTS}.down_proj_bias",
            transposed=True,
            interleaved=True,
        ),
    ),
    hub_aliases=((".mlp.gate.", ".mlp.router."),),
    quantizations=("mxfp4",),
    example="openai/gpt-oss-20b",
)
