"""ERNIE 4.5 MoE (Ernie4_5_MoeForCausalLM): rotary on adjacent pairs of dims, biases everywhere or nowhere
(`use_bias`, the LM head included even when tied), dense first layers, shared experts, and softmax
routing whose choice (not weights) a learned correction bias steers; the router stays in float32.

Its multi-token-prediction layers (`model.mtp_emb_norm.{k}`, `model.mtp_hidden_norm.{k}`,
`model.mtp_linear_proj.{k}`, `model.mtp_block.{k}.*`) are loaded as `mtp` for drafts, as vLLM's ernie_mtp.py
and SGLang's ernie4_eagle.py build them: DeepSeek-V3's design with a decoder layer of the model's attention
and a dense MLP, the projection biased where the model's layers are (SGLang's), and no norm between the
layer's output and the LM head (nor on what is passed on)."""

from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs, MtpLayout, causal_lm
from localmoe.models.layers import MLP, CausalLM, DecoderLayer, RMSNorm
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, GatedActivation, Routing, SparseMoE
from localmoe.models.mtp import MTPLayer, SharedHead


class ErnieRouter(nn.Module):
    """softmax in float32; top-k of (probabilities + correction bias); weights are the plain
    probabilities of the chosen, renormalised (the sum floored at `norm_min`)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, norm_min: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.moe_statics = nn.Module()
        self.moe_statics.e_score_correction_bias = nn.Parameter(torch.empty(1, num_experts))
        self.top_k, self.norm_min = top_k, norm_min

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float()).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> Routing:
        probs = self.scores(x)
        ids = (probs + self.moe_statics.e_score_correction_bias.float()).topk(self.top_k, dim=-1).indices
        weights = probs.gather(-1, ids)
        return Routing(weights / weights.sum(dim=-1, keepdim=True).clamp(min=self.norm_min), ids, probs)


@dataclass
class Ernie45MoeArgs(ModelArgs):
    default_rope_theta: ClassVar[float] = 500_000.0
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {
        "moe_num_experts": ("num_experts",),
        "moe_k": ("num_experts_per_tok",),
    }

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = 4
    head_dim: int | None = None
    moe_intermediate_size: int = 1536
    moe_num_experts: int = 64
    moe_k: int = 6
    moe_num_shared_experts: int = 2
    moe_layer_start_index: int = 1
    moe_layer_end_index: int = -1
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12
    use_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    num_nextn_predict_layers: int = 0
    rope: dict = field(default_factory=dict)

    def is_moe_layer(self, i: int) -> bool:
        end = self.num_hidden_layers - 1 if self.moe_layer_end_index == -1 else self.moe_layer_end_index
        return (i + 1) % self.moe_layer_interval == 0 and self.moe_layer_start_index <= i <= end

    def expert_size(self) -> int:
        """The routed experts' intermediate size (of the text experts, where there are others)."""
        return self.moe_intermediate_size


class ErnieMTPLayer(MTPLayer):
    """An MTP layer whose projection may have a bias, and whose output goes to the LM head unnormed."""

    def __init__(self, block: nn.Module, hidden: int, eps: float, norm=RMSNorm, bias: bool = False):
        super().__init__(block, hidden, eps, norm)
        self.eh_proj = nn.Linear(2 * hidden, hidden, bias=bias)
        self.shared_head = SharedHead(nn.Identity())


def build(args: Ernie45MoeArgs, router=ErnieRouter, lm_head_bias: bool | None = None, mtp: bool = True) -> CausalLM:
    """`router` its class (ERNIE-4.5-VL stores its weight transposed); `lm_head_bias` where it is not use_bias;
    `mtp`: the checkpoint's MTP layers are built (ERNIE-4.5-VL's are not read)."""
    hidden, bias = args.hidden_size, args.use_bias
    head_dim = args.attention_head_dim

    def attention() -> Attention:
        return Attention(
            hidden,
            args.num_attention_heads,
            args.key_value_heads,
            head_dim,
            qkv_bias=bias,
            out_bias=bias,
            interleaved_rope=True,
        )

    def feed_forward(i: int) -> nn.Module:
        if not args.is_moe_layer(i):
            return MLP(hidden, args.intermediate_size, args.hidden_act, bias=bias)
        shared = args.expert_size() * args.moe_num_shared_experts
        return SparseMoE(
            i,
            hidden,
            args.expert_size(),
            args.moe_num_experts,
            args.moe_k,
            router(hidden, args.moe_num_experts, args.moe_k, args.moe_norm_min),
            act=GatedActivation(act=args.hidden_act),
            shared_expert=MLP(hidden, shared, args.hidden_act, bias=bias) if shared else None,
        )

    layers = [
        DecoderLayer(attention(), feed_forward(i), hidden, args.rms_norm_eps) for i in range(args.num_hidden_layers)
    ]
    dense = [
        DecoderLayer(
            attention(), MLP(hidden, args.intermediate_size, args.hidden_act, bias=bias), hidden, args.rms_norm_eps
        )
        for _ in range(args.num_nextn_predict_layers if mtp else 0)
    ]
    return causal_lm(
        args,
        layers,
        head_dim,
        lm_head_bias=bias if lm_head_bias is None else lm_head_bias,
        mtp=dense,
        mtp_layer=partial(ErnieMTPLayer, bias=bias),
    )


# the release's MTP layers (vLLM's and SGLang's name tables), seen under DeepSeek-V3's names
ERNIE_MTP = MtpLayout(
    "num_nextn_predict_layers",
    (
        ("model.layers.{layer}.enorm.", "model.mtp_emb_norm.{depth}."),
        ("model.layers.{layer}.hnorm.", "model.mtp_hidden_norm.{depth}."),
        ("model.layers.{layer}.eh_proj.", "model.mtp_linear_proj.{depth}."),
        ("model.layers.{layer}.", "model.mtp_block.{depth}."),
    ),
)


FAMILY = Family(
    architectures=("Ernie4_5_MoeForCausalLM",),
    model_type="ernie4_5_moe",
    args=Ernie45MoeArgs,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    hub_aliases=(
        (".mlp.gate.moe_statics.", ".mlp.moe_statics."),
        (".mlp.shared_expert.", ".mlp.shared_experts."),
        ("lm_head_bias", "lm_head.bias"),
    ),
    keep_float32=("mlp.gate.weight", "moe_statics"),
    mtp=ERNIE_MTP,
    example="baidu/ERNIE-4.5-21B-A3B-PT",
)
