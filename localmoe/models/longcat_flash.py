"""LongCat-Flash (LongcatFlashForCausalLM, e.g. meituan-longcat/LongCat-Flash-Chat): each layer is two
sublayers of latent attention and a dense MLP, plus one shortcut MoE that reads the first sublayer's MLP
input and whose output joins the residual after the second. The router scores `zero_expert_num`
zero-computation experts past the routed ones (softmax over all, a correction bias steering the choice,
weights scaled, not renormalised): an identity expert returns its input, so the block adds it itself and
the runtime never sees, caches or copies one. The attention is DeepSeek-V3's with its query and latent
scaled by sqrt(hidden / LoRA rank).

Its multi-token-prediction layer (`model.mtp.*`, one in the release) is loaded as `mtp` for drafts, as vLLM's
longcat_flash_mtp.py (LongCatMultiTokenPredictorLayer) and SGLang's longcat_flash_nextn.py
(LongcatFlashModelNextN) build it: enorm and hnorm (`enorm.m`, `hnorm.m`), eh_proj, then one plain pre-norm
decoder layer of the same latent attention and a dense MLP (`transformer_layer.mlp`, ffn_hidden_size wide; no
MoE, no shortcut), then its final norm (`model.mtp.norm`). Both pass the normed output on to the next draft,
as `NormedMTPLayer` does; the model's own embedding and LM head serve it (SGLang skips the release's copy of
the embedding, `model.mtp.embed_tokens`)."""

from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
from torch import nn

from localmoe.models.attention import LatentAttention
from localmoe.models.deepseek_v2 import attention_scale
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs, MtpLayout, causal_lm
from localmoe.models.layers import MLP, CausalLM, DecoderLayer, RMSNorm, Step
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, GatedActivation, GroupedTopKRouter, SparseMoE
from localmoe.models.mtp import NormedMTPLayer
from localmoe.models.state import CombinedState


@dataclass
class LongcatFlashArgs(ModelArgs):
    default_rope_theta: ClassVar[float] = 10_000_000.0

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    ffn_hidden_size: int = 12288
    expert_ffn_hidden_size: int = 2048
    n_routed_experts: int = 512
    zero_expert_num: int | None = 256
    moe_topk: int = 12
    routed_scaling_factor: float = 6.0
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    head_dim: int = 64  # the rotary's width: the rotated part of each query and key head
    attention_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = (
        0  # the release's config says nothing: the loader counts `model.mtp.*` (LONGCAT_MTP)
    )
    rope: dict = field(default_factory=dict)

    @property
    def num_hidden_layers(self) -> int:
        """The decoder layers stored (transformers counts their attention sublayers, twice as many)."""
        return self.num_layers

    def _contradictions(self):
        yield from super()._contradictions()
        if self.head_dim != self.qk_rope_head_dim:
            yield f"has head_dim {self.head_dim}, not its qk_rope_head_dim {self.qk_rope_head_dim}"


class ScaledRMSNorm(RMSNorm):
    """RMSNorm times a constant: LongCat's query and latent LoRA scaling (the query's up-projection has no
    bias, so scaling its input scales the query)."""

    def __init__(self, dim: int, eps: float, scale: float):
        super().__init__(dim, eps)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


class AttentionPair(nn.ModuleList):
    """A layer's two attention sublayers, with one state holding both of theirs."""

    @property
    def static(self) -> bool:
        return all(attention.static for attention in self)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> CombinedState:
        return CombinedState(**{str(i): a.new_state(batch, max_len, dtype, device) for i, a in enumerate(self)})

    def state_bytes_per_token(self, dtype: torch.dtype) -> int:
        return sum(attention.state_bytes_per_token(dtype) for attention in self)


class ShortcutDecoderLayer(nn.Module):
    """Two pre-norm attention + MLP sublayers; the MoE reads the first MLP's input, and its output is added
    with the second MLP's."""

    def __init__(self, args: LongcatFlashArgs, i: int):
        super().__init__()
        hidden, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = AttentionPair([latent_attention(args) for _ in range(2)])
        self.mlps = nn.ModuleList([MLP(hidden, args.ffn_hidden_size, args.hidden_act) for _ in range(2)])
        self.input_layernorm = nn.ModuleList([RMSNorm(hidden, eps) for _ in range(2)])
        self.post_attention_layernorm = nn.ModuleList([RMSNorm(hidden, eps) for _ in range(2)])
        experts, identities, top_k = args.n_routed_experts, args.zero_expert_num or 0, args.moe_topk
        self.mlp = SparseMoE(
            i,
            hidden,
            args.expert_ffn_hidden_size,
            experts,
            top_k,
            GroupedTopKRouter(
                hidden,
                experts + identities,
                top_k,
                scoring="softmax",
                n_group=1,
                topk_group=1,
                normalize=False,
                scaling=args.routed_scaling_factor,
                correction_bias=True,
            ),
            act=GatedActivation(act=args.hidden_act),
            identity_experts=identities,
        )

    def forward(self, h: torch.Tensor, step: Step, kv: CombinedState) -> torch.Tensor:
        shortcut = None
        for i in range(2):
            h = h + self.self_attn[i](self.input_layernorm[i](h), step, kv.states[str(i)])
            x = self.post_attention_layernorm[i](h)
            if i == 0:
                shortcut = self.mlp(x)
            h = h + self.mlps[i](x)
        return h + shortcut


def latent_attention(args: LongcatFlashArgs, latent_eps: float = 1e-6) -> LatentAttention:
    """`latent_eps`: the eps of the query's and latent's norms (transformers' 1e-6 for the model's layers;
    vLLM's and SGLang's MTP layer, a DeepSeek-V2 attention, take rms_norm_eps)."""
    attention = LatentAttention(
        args.hidden_size,
        args.num_attention_heads,
        q_lora_rank=args.q_lora_rank,
        kv_lora_rank=args.kv_lora_rank,
        qk_nope_head_dim=args.qk_nope_head_dim,
        qk_rope_head_dim=args.qk_rope_head_dim,
        v_head_dim=args.v_head_dim,
        bias=args.attention_bias,
        interleaved_rope=True,
        scale=attention_scale(args),
    )
    for name, rank in (("q_a_layernorm", args.q_lora_rank), ("kv_a_layernorm", args.kv_lora_rank)):
        setattr(attention, name, ScaledRMSNorm(rank, latent_eps, (args.hidden_size / rank) ** 0.5))
    return attention


def build(args: LongcatFlashArgs) -> CausalLM:
    hidden, eps = args.hidden_size, args.rms_norm_eps
    layers = [ShortcutDecoderLayer(args, i) for i in range(args.num_layers)]
    mtp = [
        DecoderLayer(latent_attention(args, eps), MLP(hidden, args.ffn_hidden_size, args.hidden_act), hidden, eps)
        for _ in range(args.num_nextn_predict_layers)
    ]
    return causal_lm(args, layers, args.head_dim, mtp=mtp, mtp_layer=NormedMTPLayer)


# the release's MTP layer (vLLM's and SGLang's name tables), seen under DeepSeek-V3's names; its final norm is
# model.mtp.norm (one layer in the release, and one norm). The release's config.json names no count: one layer
# where `model.mtp.layers.0.*` is stored, as vLLM (its speculative config's default of 1) and SGLang (its
# LongcatFlashConfig's) read it
LONGCAT_MTP = MtpLayout(
    "num_nextn_predict_layers",
    (
        ("model.layers.{layer}.enorm.", "model.mtp.layers.{depth}.enorm.m."),
        ("model.layers.{layer}.hnorm.", "model.mtp.layers.{depth}.hnorm.m."),
        ("model.layers.{layer}.final_layernorm.", "model.mtp.norm."),
        ("model.layers.{layer}.mlp.", "model.mtp.layers.{depth}.transformer_layer.mlp."),
        ("model.layers.{layer}.", "model.mtp.layers.{depth}."),
    ),
    layers="num_layers",
    implied=1,
)


FAMILY = Family(
    architectures=("LongcatFlashForCausalLM",),
    model_type="longcat_flash",
    args=LongcatFlashArgs,
    model=build,
    # transformers keeps gate_up for the identity experts too in memory ([routed + identities, 2I, H])
    experts=(PerExpert(MLP_EXPERTS), replace(FUSED_EXPERTS, identity_rows=True)),
    hub_aliases=((".mlp.gate.weight", ".mlp.router.classifier.weight"), (".mlp.gate.e_score", ".mlp.router.e_score")),
    keep_float32=("mlp.gate.weight", "e_score_correction_bias"),
    mtp=LONGCAT_MTP,
    example="meituan-longcat/LongCat-Flash-Chat",
)
