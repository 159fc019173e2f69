"""Command A+ (Cohere2MoeForCausalLM, Cohere): a parallel block, in which attention and the feed-forward
both read the same normalised input and add to the residual together; sliding-window layers with
rotary on adjacent pairs and global layers without positions (except dense prefix layers, which keep
their rotary); MoE layers that take the top k experts by logit, weighted by a softmax over those k (or
their sigmoid), beside shared experts whose output is averaged with theirs (or added); a weight-only
LayerNorm unless the config gives `rms_norm_eps`; logits scaled by `logit_scale`; tied embeddings."""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.errors import LocalMoEError
from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs
from localmoe.models.layers import MLP, Backbone, CausalLM, RMSNorm, Step
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, GatedActivation, Routing, SparseMoE
from localmoe.models.rotary import RotaryEmbedding

COMBINATIONS = ("average", "sum")  # how the shared experts' output joins the routed experts'


@dataclass
class Cohere2MoeArgs(ModelArgs):
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # routed and shared experts
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = 128
    num_experts: int = 8
    num_experts_per_tok: int = 2
    num_shared_experts: int = 0
    shared_expert_combination_strategy: str = "average"
    expert_selection_fn: str = "softmax"
    norm_topk_prob: bool = True
    prefix_dense_intermediate_size: int | None = None
    first_k_dense_replace: int = 0  # older configs: dense prefix layers, when mlp_layer_types is absent
    mlp_layer_types: list[str] | None = None
    layer_types: list[str] | None = None
    sliding_window: int | None = 4096
    sliding_window_pattern: int = 4
    prefix_dense_sliding_window_pattern: int = 1
    logit_scale: float = 0.0625
    attention_bias: bool = False
    hidden_act: str = "silu"
    layer_norm_eps: float = 1e-5
    rms_norm_eps: float | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    rope: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.shared_expert_combination_strategy not in COMBINATIONS:
            raise LocalMoEError(
                f"shared_expert_combination_strategy {self.shared_expert_combination_strategy!r} is not one of "
                f"{', '.join(COMBINATIONS)}"
            )
        if self.expert_selection_fn not in ("softmax", "sigmoid"):
            raise LocalMoEError(f"expert_selection_fn {self.expert_selection_fn!r} is not softmax or sigmoid")
        dense = self.first_k_dense_replace
        if self.layer_types is None:  # as transformers derives them: the dense prefix has its own pattern
            self.layer_types = [self._kind(i, self.prefix_dense_sliding_window_pattern) for i in range(dense)] + [
                self._kind(i, self.sliding_window_pattern) for i in range(self.num_hidden_layers - dense)
            ]
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["dense" if i < dense else "sparse" for i in range(self.num_hidden_layers)]

    @staticmethod
    def _kind(i: int, pattern: int) -> str:
        return "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"

    @property
    def norm(self) -> tuple[type[nn.Module], float]:
        """The model's norm and its epsilon: RMSNorm where the config gives rms_norm_eps, else Cohere's LayerNorm."""
        if self.rms_norm_eps is not None:
            return RMSNorm, self.rms_norm_eps
        return CohereLayerNorm, self.layer_norm_eps

    def attention(self, i: int) -> Attention:
        sliding = self.layer_types[i] == "sliding_attention"
        # a dense prefix whose window pattern is 1 has no windowed layers, and keeps rotary on its global ones
        dense_prefix_rope = self.mlp_layer_types[i] == "dense" and self.prefix_dense_sliding_window_pattern == 1
        return Attention(
            self.hidden_size,
            self.num_attention_heads,
            self.key_value_heads,
            self.attention_head_dim,
            qkv_bias=self.attention_bias,
            out_bias=self.attention_bias,
            sliding_window=self.sliding_window if sliding else None,
            interleaved_rope=True,
            rope=sliding or dense_prefix_rope,
        )

    def feed_forward(self, i: int) -> nn.Module:
        hidden, act = self.hidden_size, self.hidden_act
        if self.mlp_layer_types[i] == "dense":
            return MLP(hidden, self.prefix_dense_intermediate_size or self.intermediate_size, act)
        shared = self.intermediate_size * self.num_shared_experts
        return Cohere2MoeBlock(
            i,
            hidden,
            self.intermediate_size,
            self.num_experts,
            self.num_experts_per_tok,
            TopLogitsRouter(hidden, self.num_experts, self.num_experts_per_tok, self),
            act=GatedActivation(act=act),
            shared_expert=MLP(hidden, shared, act) if shared else None,
            average=self.shared_expert_combination_strategy == "average",
        )


class CohereLayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = (x32 - x32.mean(-1, keepdim=True)) * torch.rsqrt(x32.var(-1, keepdim=True, unbiased=False) + self.eps)
        return (self.weight.float() * x32).to(x.dtype)


class TopLogitsRouter(nn.Module):
    """The top k experts by logit, weighted by a softmax over those k logits, or by their sigmoid
    (renormalised if `norm_topk_prob`); the weights rounded to the input's dtype, as Cohere does."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, args: Cohere2MoeArgs):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.top_k, self.sigmoid, self.normalize = top_k, args.expert_selection_fn == "sigmoid", args.norm_topk_prob

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight).float()

    def forward(self, x: torch.Tensor) -> Routing:
        every = F.linear(x, self.weight)
        logits, ids = every.topk(self.top_k, dim=-1)
        scores = every.float().sigmoid() if self.sigmoid else every.float().softmax(dim=-1)
        if not self.sigmoid:
            return Routing(logits.softmax(dim=-1, dtype=torch.float32).to(x.dtype).float(), ids, scores)
        weights = logits.sigmoid()
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(weights.to(x.dtype).float(), ids, scores)


class Cohere2MoeBlock(SparseMoE):
    """Routed experts plus shared experts, their outputs averaged (or summed)."""

    def __init__(self, *args, average: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.average = average

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        routing = self.gate(flat)
        shared = self.shared(flat)  # queued first: it does not depend on the routing
        out = self.experts(self.layer_idx, flat, routing)
        if shared is not None:
            out = out + shared
            if self.average:
                out = out / 2
        return out.view(x.shape)


class ParallelDecoderLayer(nn.Module):
    """Attention and feed-forward side by side on one normalised input: h + attn(n(h)) + mlp(n(h))."""

    def __init__(self, attention: nn.Module, mlp: nn.Module, norm: nn.Module):
        super().__init__()
        self.self_attn, self.mlp, self.input_layernorm = attention, mlp, norm

    def forward(self, h: torch.Tensor, step: Step, kv) -> torch.Tensor:
        x = self.input_layernorm(h)
        return h + self.self_attn(x, step, kv) + self.mlp(x)


class ScaledLogitsLM(CausalLM):
    """A causal LM whose logits are multiplied by a constant."""

    def __init__(self, *args, logit_scale: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.logit_scale = logit_scale

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return super().logits(h) * self.logit_scale


def build(args: Cohere2MoeArgs) -> CausalLM:
    norm, eps = args.norm
    layers = [
        ParallelDecoderLayer(args.attention(i), args.feed_forward(i), norm(args.hidden_size, eps))
        for i in range(args.num_hidden_layers)
    ]
    head_dim = args.attention_head_dim
    return ScaledLogitsLM(
        Backbone(args.vocab_size, args.hidden_size, layers, eps, norm=norm),
        RotaryEmbedding(args.rope, head_dim, args.max_position_embeddings),
        tie_word_embeddings=args.tie_word_embeddings,
        max_position_embeddings=args.max_position_embeddings,
        logit_scale=args.logit_scale,
    )


FAMILY = Family(
    architectures=("Cohere2MoeForCausalLM",),
    model_type="cohere2_moe",
    args=Cohere2MoeArgs,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    hub_aliases=((".mlp.shared_expert.", ".mlp.shared_experts."),),
    example="CohereLabs/command-a-plus-05-2026",
)
