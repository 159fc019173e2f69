"""DBRX (DbrxForCausalLM, databricks/dbrx-instruct): one fused q/k/v projection clipped to
+-clip_qkv, LayerNorms without biases, softmax top-k routing whose weights are divided by their p-norm
(`moe_normalize_expert_weights`: p, or none). Stored under DBRX's own names (`transformer.blocks.N`,
`norm_attn_norm`, `ffn`), the experts as one [experts x intermediate, hidden] tensor per role."""

from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn

from localmoe.models.expert_tensors import Concatenated
from localmoe.models.family import Family, ModelArgs, causal_lm
from localmoe.models.layers import CausalLM, DecoderLayer
from localmoe.models.moe import GatedActivation, Routing, SparseMoE, TopKRouter
from localmoe.models.sarvam_moe import FusedQKVAttention

LayerNorm = partial(nn.LayerNorm, bias=False)


@dataclass
class DbrxArgs(ModelArgs):
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {
        "hidden_size": ("d_model",),
        "num_attention_heads": ("n_heads",),
        "num_hidden_layers": ("n_layers",),
        "max_position_embeddings": ("max_seq_len",),
        "num_key_value_heads": ("kv_n_heads",),
    }

    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    num_key_value_heads: int = 1
    max_position_embeddings: int = 2048
    clip_qkv: float | None = None
    ffn_hidden_size: int = 3584
    moe_num_experts: int = 4
    moe_top_k: int = 1
    moe_normalize_expert_weights: float | None = 1.0
    ffn_act_fn: dict | None = None
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)

    rms_norm_eps: ClassVar[float] = 1e-5  # nn.LayerNorm's default, which DBRX keeps

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "DbrxArgs":
        """The settings of `attn_config` and `ffn_config` read as if at the top level. The rotary base is
        attn_config's `rope_theta` where the config has none of its own, as the model was trained:
        transformers 5.24 reads only a top-level one and otherwise rotates at 10000."""
        attn, ffn = config.get("attn_config") or {}, config.get("ffn_config") or {}
        nested = {key: value for key, value in {**attn, **ffn}.items() if key != "hidden_size"}
        if "rope_theta" in attn and not (config.get("rope_parameters") or config.get("rope_theta")):
            nested["rope_theta"] = attn["rope_theta"]
        return super().from_config({**nested, **config})


class PNormRouter(TopKRouter):
    """Softmax over all experts, the top k, divided by their p-norm (none: as they are)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, p: float | None):
        super().__init__(hidden, num_experts, top_k, normalize=False)
        self.p = p

    def forward(self, x: torch.Tensor) -> Routing:
        weights, ids, scores = super().forward(x)
        if self.p is not None:
            weights = weights / weights.norm(p=self.p, dim=-1, keepdim=True)
        return Routing(weights, ids, scores)


def build(args: DbrxArgs) -> CausalLM:
    hidden, heads, experts, top_k = args.hidden_size, args.num_attention_heads, args.moe_num_experts, args.moe_top_k
    head_dim = hidden // heads
    act = (args.ffn_act_fn or {}).get("name", "silu")
    layers = [
        DecoderLayer(
            FusedQKVAttention(
                hidden, heads, args.num_key_value_heads, head_dim, qkv_bias=False, clip_qkv=args.clip_qkv
            ),
            SparseMoE(
                i,
                hidden,
                args.ffn_hidden_size,
                experts,
                top_k,
                PNormRouter(hidden, experts, top_k, args.moe_normalize_expert_weights),
                act=GatedActivation(act=act),
            ),
            hidden,
            args.rms_norm_eps,
            norm=LayerNorm,
        )
        for i in range(args.num_hidden_layers)
    ]
    return causal_lm(args, layers, head_dim, norm=LayerNorm)


FAMILY = Family(
    architectures=("DbrxForCausalLM",),
    model_type="dbrx",
    args=DbrxArgs,
    model=build,
    experts=(
        Concatenated(
            {
                role: f"transformer.blocks.{{layer}}.ffn.experts.mlp.{name}"
                for role, name in (("gate", "w1"), ("up", "v1"), ("down", "w2"))
            }
        ),
    ),
    hub_aliases=(
        ("model.embed_tokens.", "transformer.wte."),
        ("model.norm.", "transformer.norm_f."),
        ("model.layers.", "transformer.blocks."),
        (".self_attn.query_key_value.", ".norm_attn_norm.attn.Wqkv."),
        (".self_attn.o_proj.", ".norm_attn_norm.attn.out_proj."),
        (".input_layernorm.", ".norm_attn_norm.norm_1."),
        (".post_attention_layernorm.", ".norm_attn_norm.norm_2."),
        (".mlp.gate.", ".ffn.router.layer."),
    ),
    example="databricks/dbrx-instruct",
)
