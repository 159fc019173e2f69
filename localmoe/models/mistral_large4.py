"""Mistral Large 4's language model (MistralLarge4ForConditionalGeneration, text only; transformers defines no
text-only class): latent attention without a query bottleneck, rotary on adjacent pairs whose frequencies
are scaled by learned factors (LeRoPE: exp(alpha)), every fourth layer without position embeddings (as
`no_rope_layers` says), queries scaled per head by scale * log(position + 1) + bias; DeepSeek sparse
attention whose indexer projects its queries from the normalised hidden state (scaled the same way, rotated
only where the layer rotates), its selection shared by the "shared" layers; softmax routing over the best
groups of experts ranked by their top-two sums, always renormalised, a shared expert, dense first layers;
logits capped by tanh. Checkpoints are read in Mistral's own names (`layers.N.attention.wq`,
`experts.E.w1`, `lerope.alpha`), as transformers writes them. Layers that reuse an earlier layer's keys
and values (`kv_source_layers`) are refused."""

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from localmoe.errors import LocalMoEError
from localmoe.models.deepseek_v2 import build as deepseek_build
from localmoe.models.deepseek_v32 import DeepseekV32Args, Indexer, SparseLatentAttention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs, Multimodal
from localmoe.models.layers import CausalLM, Step
from localmoe.models.mistral4 import top2_group_router
from localmoe.models.rotary import RotaryEmbedding


@dataclass
class MistralLarge4TextArgs(DeepseekV32Args):
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"n_routed_experts": ("num_experts",)}

    num_experts_per_tok: int = 4
    n_routed_experts: int = 128
    moe_intermediate_size: int = 6144
    first_k_dense_replace: int = 1
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 64
    n_group: int | None = 1
    topk_group: int | None = 1
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 1048576
    index_n_heads: int = 32
    indexer_types: list[str] | None = None
    no_rope_layers: list[int] | None = None
    kv_source_layers: list[int] | None = None
    final_logit_softcapping: float | None = 30.0

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelArgs:
        if not (config.get("rope_parameters") or config.get("rope_scaling")):  # transformers' default
            config = {**config, "rope_parameters": DEFAULT_ROPE}
        return super().from_config(config)

    def __post_init__(self):
        n = self.num_hidden_layers
        self.mlp_bias, self.q_lora_rank = False, None  # its MLPs have no biases, its queries no bottleneck
        if self.no_rope_layers is None:
            self.no_rope_layers = [int((i + 1) % 4 != 0) for i in range(n)]
        if self.indexer_types is None:
            self.indexer_types = ["full"] * n
        if self.indexer_types and self.indexer_types[0] != "full":
            raise LocalMoEError("Mistral Large 4's first layer must compute its own selection (indexer 'full')")
        if self.kv_source_layers not in (None, list(range(n))):
            raise LocalMoEError(
                "Mistral Large 4 with keys and values shared across layers (kv_source_layers) is not supported"
            )

    @property
    def interleaved_index_rope(self) -> bool:
        return True

    def router(self) -> nn.Module:
        return top2_group_router(self, normalize=True)

    def attention(self, i: int) -> nn.Module:
        return MistralLarge4Attention(self, i)


# transformers' rotary where the config gives none: yarn over a 512-token window, without scaling cos and sin
DEFAULT_ROPE = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 2048.0,
    "original_max_position_embeddings": 512,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "attention_factor": 1.0,
}


class SoftmaxScaling(nn.Module):
    """Scales each head's queries [B, H, T, D] by scale_h * log(position + 1) + bias_h, in their dtype."""

    def __init__(self, heads: int):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(heads))
        self.bias = nn.Parameter(torch.empty(heads))

    def forward(self, q: torch.Tensor, step: Step) -> torch.Tensor:
        log_position = (step.positions() + 1).float().log().to(q.dtype)  # [T]
        factor = self.scale.to(q.dtype)[:, None] * log_position + self.bias.to(q.dtype)[:, None]  # [H, T]
        return q * factor[..., None]


class MistralLarge4Indexer(Indexer):
    """DeepSeek-V3.2's indexer with queries from LayerNorm(x), scaled per head, rotated only with rope."""

    def __init__(self, args: MistralLarge4TextArgs, rope: bool):
        super().__init__(args, query_width=args.hidden_size)
        self.q_input_norm = nn.LayerNorm(args.hidden_size, eps=1e-6)
        self.softmax_scaling = SoftmaxScaling(self.heads)
        self.rope = rope

    def queries(self, x: torch.Tensor, q_low: torch.Tensor | None, step: Step) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq_b(self.q_input_norm(x)).view(B, T, self.heads, self.dim).transpose(1, 2)
        return self._rotate(self.softmax_scaling(q, step), step)

    def _rotate(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        return super()._rotate(x, step) if self.rope else x


class MistralLarge4Attention(SparseLatentAttention):
    """Sparse latent attention with per-head position-scaled queries; a layer without rotary has no rotary
    key, its queries and keys all `nope` wide."""

    def __init__(self, args: MistralLarge4TextArgs, i: int):
        rope = bool(args.no_rope_layers[i])
        nope, rotated = args.qk_nope_head_dim, args.qk_rope_head_dim
        super().__init__(
            args,
            computes_selection=False,
            qk_nope_head_dim=nope if rope else nope + rotated,
            qk_rope_head_dim=rotated if rope else 0,
            rope=rope,
            latent_eps=args.rms_norm_eps,
        )
        self.softmax_scaling = SoftmaxScaling(args.num_attention_heads)
        if args.indexer_types[i] == "full":
            self.indexer = MistralLarge4Indexer(args, rope)

    def scale_queries(self, q_nope: torch.Tensor, q_rot: torch.Tensor, step: Step):
        return self.softmax_scaling(q_nope, step), self.softmax_scaling(q_rot, step)


class LearnedRotaryEmbedding(RotaryEmbedding):
    """LeRoPE: each frequency scaled by exp(alpha), alpha learned."""

    def __init__(self, params: dict[str, Any], head_dim: int, max_positions: int):
        super().__init__(params, head_dim, max_positions)
        self.alpha = nn.Parameter(torch.empty_like(self.inv_freq))

    def frequencies(self) -> torch.Tensor:
        return self.inv_freq * self.alpha.float().exp()


def build(args: MistralLarge4TextArgs) -> CausalLM:
    return deepseek_build(args, rotary=LearnedRotaryEmbedding, logit_softcap=args.final_logit_softcapping)


# (ours, Mistral's) within a layer; the MoE block's names before the MLP's, which they contain
HUB_NAMES = (
    (".self_attn.", ".attention."),
    (".q_proj.", ".wq."),
    (".kv_a_proj_with_mqa.", ".wkv_a_with_mqa."),
    (".kv_b_proj.", ".wkv_b."),
    (".o_proj.", ".wo."),
    (".kv_a_layernorm.", ".kv_a_norm."),
    (".softmax_scaling.scale", ".ssmax_scaling.s"),
    (".softmax_scaling.bias", ".ssmax_scaling.b"),
    (".input_layernorm.", ".attention_norm."),
    (".post_attention_layernorm.", ".ffn_norm."),
    (".mlp.gate.", ".gate."),
    (".mlp.shared_expert.", ".shared_experts."),
    (".mlp.", ".feed_forward."),
    (".gate_proj.", ".w1."),
    (".up_proj.", ".w3."),
    (".down_proj.", ".w2."),
)

FAMILY = Family(
    architectures=(),
    model_type="mistral_large4_text",
    args=MistralLarge4TextArgs,
    model=build,
    experts=(
        PerExpert(
            {
                role: f"model.layers.{{layer}}.experts.{{expert}}.{name}.weight"
                for role, name in (("gate", "w1"), ("up", "w3"), ("down", "w2"))
            }
        ),
    ),
    hub_aliases=HUB_NAMES,
    keep_float32=("rotary.alpha", ".mlp.gate.weight", ".indexer.weights_proj."),
    # Mistral's names at the top of the checkpoint; the vision tower and the projector are left on disk
    multimodal=(
        Multimodal(
            "MistralLarge4ForConditionalGeneration",
            (
                ("model.embed_tokens.", "tok_embeddings."),
                ("model.layers.", "layers."),
                ("model.norm.", "norm."),
                ("lm_head.", "output."),
                ("rotary.", "lerope."),
            ),
        ),
    ),
    example="mistralai/Mistral-Large-4-1T-A52B",
)
