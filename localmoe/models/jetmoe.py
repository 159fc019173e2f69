"""JetMoE (JetMoeForCausalLM, e.g. jetmoe/jetmoe-8b): a mixture of attention heads and a mixture of MLPs.

Each token's queries come from the top-k of `num_local_experts` query projections (each kv_channels x
num_key_value_heads wide), all attending to the same keys and values; each expert's output projection
maps its heads back, weighted by the router, plus a bias. The MLP experts are routed alike (top-k logits,
softmax over them) and their sum has a bias too. The attention experts are small and stay resident;
the MLP experts are the offloaded ones, stored fused (input_linear holds gate then up)."""

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.models.expert_tensors import Fused
from localmoe.models.family import Family, ModelArgs, causal_lm
from localmoe.models.layers import CausalLM, DecoderLayer, Step
from localmoe.models.moe import GatedActivation, SparseMoE, TopKRouter
from localmoe.models.rotary import apply_rotary
from localmoe.models.state import AttentionKV, attention_state


@dataclass
class JetMoeArgs(ModelArgs):
    # the release's own config names, beside transformers'
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {
        "intermediate_size": ("ffn_hidden_size",),
        "num_local_experts": ("moe_num_experts",),
        "num_experts_per_tok": ("moe_top_k",),
    }

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_key_value_heads: int = 16
    kv_channels: int = 128
    intermediate_size: int = 5632
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    activation_function: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True
    rope: dict = field(default_factory=dict)


class TopKGate(TopKRouter):
    """The top k logits of `layer`, softmax over them (the same as renormalising a softmax over all)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int):
        super().__init__(hidden, num_experts, top_k, normalize=True)
        del self.weight
        self.layer = nn.Linear(hidden, num_experts, bias=False)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x).softmax(dim=-1, dtype=torch.float32)


class ParallelExperts(nn.Module):
    """One linear map per expert, weight [experts, out, in], applied to each row by its expert."""

    def __init__(self, experts: int, inputs: int, outputs: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, outputs, inputs))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [N, in] mapped by the experts ids [N]: [N, out]."""
        out = x.new_empty(x.shape[0], self.weight.shape[1])
        for expert in ids.unique().tolist():
            rows = ids == expert
            out[rows] = F.linear(x[rows], self.weight[expert])
        return out


class AttentionExperts(nn.Module):
    def __init__(self, hidden: int, width: int, experts: int, top_k: int):
        super().__init__()
        self.router = TopKGate(hidden, experts, top_k)
        self.input_linear = ParallelExperts(experts, hidden, width)
        self.output_linear = ParallelExperts(experts, width, hidden)
        self.bias = nn.Parameter(torch.empty(hidden))


class MixtureOfAttentionHeads(nn.Module):
    def __init__(self, hidden: int, kv_heads: int, head_dim: int, experts: int, top_k: int):
        super().__init__()
        self.kv_heads, self.head_dim, self.top_k = kv_heads, head_dim, top_k
        self.experts = AttentionExperts(hidden, kv_heads * head_dim, experts, top_k)
        self.kv_proj = nn.Linear(hidden, 2 * kv_heads * head_dim, bias=False)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> AttentionKV:
        return attention_state(batch, self.kv_heads, self.head_dim, max_len, None, dtype, device)

    def state_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.kv_heads * self.head_dim * dtype.itemsize

    def forward(self, x: torch.Tensor, step: Step, kv: AttentionKV) -> torch.Tensor:
        B, T, E = x.shape
        kv_heads, D, k = self.kv_heads, self.head_dim, self.top_k
        flat = x.reshape(-1, E)
        weights, ids, _ = self.experts.router(flat)  # [BT, k]
        q = self.experts.input_linear(flat.repeat_interleave(k, dim=0), ids.flatten())  # [BT k, kv_heads D]
        # each key-value head's queries from the k experts side by side: head h reads key-value head h // k
        q = q.view(B, T, k, kv_heads, D).permute(0, 3, 2, 1, 4).reshape(B, kv_heads * k, T, D)
        keys, values = (t.view(B, T, kv_heads, D).transpose(1, 2) for t in self.kv_proj(x).chunk(2, dim=-1))
        q, keys = apply_rotary(q, step.cos, step.sin), apply_rotary(keys, step.cos, step.sin)
        keys, values, positions = kv.update(keys, values, step)
        mask, is_causal = step.mask(None, positions)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        out = out.view(B, kv_heads, k, T, D).permute(0, 3, 2, 1, 4).reshape(B * T * k, kv_heads * D)
        out = self.experts.output_linear(out, ids.flatten()) * weights.flatten()[:, None].to(out.dtype)
        return (out.view(B * T, k, E).sum(dim=1) + self.experts.bias).view(B, T, E)


class BiasedMoE(SparseMoE):
    """The routed experts' weighted sum plus a bias."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bias = nn.Parameter(torch.empty(self.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.bias


def build(args: JetMoeArgs) -> CausalLM:
    hidden, experts, top_k = args.hidden_size, args.num_local_experts, args.num_experts_per_tok
    layers = [
        DecoderLayer(
            MixtureOfAttentionHeads(hidden, args.num_key_value_heads, args.kv_channels, experts, top_k),
            BiasedMoE(
                i,
                hidden,
                args.intermediate_size,
                experts,
                top_k,
                TopKGate(hidden, experts, top_k),
                act=GatedActivation(act=args.activation_function),
            ),
            hidden,
            1e-6,  # the layers' norms keep their default, whatever rms_norm_eps (the final norm's) says
        )
        for i in range(args.num_hidden_layers)
    ]
    return causal_lm(args, layers, args.kv_channels)


FAMILY = Family(
    architectures=("JetMoeForCausalLM", "JetMoEForCausalLM"),  # transformers' spelling, then the release's
    model_type="jetmoe",
    args=JetMoeArgs,
    model=build,
    experts=(Fused("model.layers.{layer}.mlp.input_linear.weight", "model.layers.{layer}.mlp.output_linear.weight"),),
    hub_aliases=((".self_attn.", ".self_attention."), (".mlp.gate.", ".mlp.router.")),
    example="jetmoe/jetmoe-8b",
)
