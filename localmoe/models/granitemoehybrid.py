"""Granite 4.0-H (GraniteMoeHybridForCausalLM, e.g. ibm-granite/granite-4.0-h-small): Mamba-2 layers and
attention layers (without position embeddings unless `position_embedding_type` is "rope") as
`layer_types` lists them; every layer then has softmax top-k routed experts beside a shared gated MLP.
muP multipliers scale the embeddings, each residual branch and the attention logits, and the LM head's
logits are divided by `logits_scaling`. Experts and the shared MLP are stored fused (input_linear holds
gate then up)."""

from dataclasses import dataclass, field

import torch
from torch import nn

from localmoe.errors import LocalMoEError
from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import Fused
from localmoe.models.family import Family, ModelArgs, causal_lm
from localmoe.models.layers import CausalLM, DecoderLayer, Step, activation
from localmoe.models.mamba2 import Mamba2Mixer
from localmoe.models.moe import GatedActivation, SparseMoE, TopKRouter


@dataclass
class GraniteMoeHybridArgs(ModelArgs):
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    layer_types: list[str] | None = None
    shared_intermediate_size: int = 1024
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    hidden_act: str = "silu"
    attention_bias: bool = False
    embedding_multiplier: float = 1.0
    logits_scaling: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    position_embedding_type: str | None = None
    mamba_n_heads: int = 128
    mamba_n_groups: int = 1
    mamba_d_state: int = 256
    mamba_d_head: int | str = "auto"
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    time_step_limit: list[float] | None = field(default_factory=lambda: [0.0, float("inf")])
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)

    def mamba(self, i: int) -> bool:
        return self.layer_types is None or self.layer_types[i] in ("linear_attention", "mamba")

    @property
    def mamba_head_dim(self) -> int:
        if self.mamba_d_head == "auto":
            return self.mamba_expand * self.hidden_size // self.mamba_n_heads
        return self.mamba_d_head


class FusedGatedMLP(nn.Module):
    """output_linear(act(gate) * up), gate and up from one projection (input_linear: gate rows first)."""

    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.input_linear = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.output_linear = nn.Linear(intermediate, hidden, bias=False)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.input_linear(x).chunk(2, dim=-1)
        return self.output_linear(self.act(gate) * up)


class GraniteDecoderLayer(DecoderLayer):
    """Each residual branch scaled by the residual multiplier."""

    def __init__(self, mixer: nn.Module, mlp: nn.Module, args: GraniteMoeHybridArgs):
        super().__init__(mixer, mlp, args.hidden_size, args.rms_norm_eps)
        self.residual_multiplier = args.residual_multiplier

    def forward(self, h: torch.Tensor, step: Step, kv) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), step, kv) * self.residual_multiplier
        return h + self.mlp(self.post_attention_layernorm(h)) * self.residual_multiplier


class GraniteCausalLM(CausalLM):
    def __init__(self, *args, logits_scaling: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.logits_scaling = logits_scaling

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return super().logits(h) / self.logits_scaling


def build(args: GraniteMoeHybridArgs) -> CausalLM:
    if not args.num_local_experts:
        raise LocalMoEError("this Granite 4.0-H has no experts (a dense model): localmoe runs MoE models")
    hidden, heads = args.hidden_size, args.num_attention_heads
    head_dim = hidden // heads

    def mixer(i: int) -> nn.Module:
        if args.mamba(i):
            return Mamba2Mixer(
                hidden,
                heads=args.mamba_n_heads,
                head_dim=args.mamba_head_dim,
                state_size=args.mamba_d_state,
                groups=args.mamba_n_groups,
                kernel=args.mamba_d_conv,
                eps=args.rms_norm_eps,
                act=args.hidden_act,
                proj_bias=args.mamba_proj_bias,
                conv_bias=args.mamba_conv_bias,
                dt_limit=tuple(args.time_step_limit or (0.0, float("inf"))),
            )
        return Attention(
            hidden,
            heads,
            args.num_key_value_heads or heads,
            head_dim,
            qkv_bias=args.attention_bias,
            out_bias=args.attention_bias,
            rope=args.position_embedding_type == "rope",
            scale=args.attention_multiplier,
        )

    def moe(i: int) -> SparseMoE:
        experts, top_k = args.num_local_experts, args.num_experts_per_tok
        return SparseMoE(
            i,
            hidden,
            args.intermediate_size,
            experts,
            top_k,
            TopKRouter(hidden, experts, top_k, normalize=True),
            act=GatedActivation(act=args.hidden_act),
            shared_expert=FusedGatedMLP(hidden, args.shared_intermediate_size, args.hidden_act),
        )

    layers = [GraniteDecoderLayer(mixer(i), moe(i), args) for i in range(args.num_hidden_layers)]
    return causal_lm(
        args,
        layers,
        head_dim,
        embed_scale=args.embedding_multiplier,
        model=GraniteCausalLM,
        logits_scaling=args.logits_scaling,
    )


FAMILY = Family(
    architectures=("GraniteMoeHybridForCausalLM",),
    model_type="granitemoehybrid",
    args=GraniteMoeHybridArgs,
    model=build,
    experts=(
        Fused(
            "model.layers.{layer}.block_sparse_moe.input_linear.weight",
            "model.layers.{layer}.block_sparse_moe.output_linear.weight",
        ),
        Fused(
            "model.layers.{layer}.block_sparse_moe.experts.gate_up_proj",
            "model.layers.{layer}.block_sparse_moe.experts.down_proj",
        ),
    ),
    # the Hub's names, then transformers' in-memory ones
    hub_aliases=(
        (".self_attn.", ".mamba."),
        (".mlp.gate.", ".block_sparse_moe.router.layer."),
        (".mlp.gate.", ".block_sparse_moe.router."),
        (".mlp.shared_expert.", ".shared_mlp."),
    ),
    example="ibm-granite/granite-4.0-h-small",
)
