"""MiniMax-Text-01 as transformers defines it (MiniMaxForCausalLM, e.g. MiniMaxAI/MiniMax-Text-01-hf):
lightning attention (linear attention with a per-head decay) in most layers and softmax attention in
the rest, residuals taken after the norms with configurable weights, and Mixtral-style experts.

The original repository's remote-code architecture (MiniMaxText01ForCausalLM) is not this one: use
the -hf conversion.
"""

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs, causal_lm
from localmoe.models.layers import CausalLM, RMSNorm, Step, activation
from localmoe.models.moe import FUSED_EXPERTS, MIXTRAL_EXPERTS, GatedActivation, SparseMoE, TopKRouter
from localmoe.models.state import RecurrentState


class LightningAttention(nn.Module):
    """Linear attention with decay: out_t = q_t . sum_{s<=t} r^(t-s) k_s^T v_s, per head with its own
    rate r = exp(-slope), normed, gated by sigmoid(output_gate(x)). Computed over blocks of
    `block_size` tokens (within a block as masked attention with decay, across blocks through the
    running state), which is also how one new token updates the state."""

    def __init__(self, hidden: int, heads: int, head_dim: int, act: str, block_size: int, slope: torch.Tensor):
        super().__init__()
        self.heads, self.head_dim, self.block_size = heads, head_dim, block_size
        self.act = activation(act)
        self.qkv_proj = nn.Linear(hidden, 3 * heads * head_dim, bias=False)
        self.output_gate = nn.Linear(hidden, heads * head_dim, bias=False)
        self.norm = RMSNorm(heads * head_dim, 1e-6)
        self.out_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.register_buffer("slope", slope.view(heads, 1, 1), persistent=False)

    recurrent = True  # its state is a RecurrentState (see CausalLM.recurrent_state_bytes)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> RecurrentState:
        return RecurrentState(
            kv=torch.zeros(batch, self.heads, self.head_dim, self.head_dim, dtype=dtype, device=device)
        )

    def state_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 0

    def fixed_state_bytes(self, dtype: torch.dtype) -> int:
        return self.heads * self.head_dim * self.head_dim * dtype.itemsize

    def forward(self, x: torch.Tensor, step: Step, state: RecurrentState) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.act(self.qkv_proj(x)).view(B, T, self.heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # [B, H, T, D]
        state.begin(step)
        out = torch.cat([self._block(q, k, v, state, i) for i in range(0, T, self.block_size)], dim=2)
        out = self.norm(out.transpose(1, 2).reshape(B, T, -1))
        return self.out_proj(torch.sigmoid(self.output_gate(x)) * out)

    def _block(self, q, k, v, state: RecurrentState, start: int) -> torch.Tensor:
        q, k, v = (t[:, :, start : start + self.block_size] for t in (q, k, v))
        n = q.shape[2]
        steps = torch.arange(1, n + 1, device=q.device, dtype=torch.float32)
        gaps = steps[:, None] - steps[None, :]
        within = torch.exp(torch.where(gaps >= 0, -self.slope * gaps, float("-inf"))).to(q.dtype)  # [H, n, n]
        query_decay = torch.exp(-self.slope * steps[:, None]).to(q.dtype)  # [H, n, 1]
        key_decay = torch.exp(-self.slope * (n - steps[:, None])).to(q.dtype)
        out = (q @ k.transpose(-1, -2) * within) @ v + (q * query_decay) @ state.kv
        if state.pieces["kv"] is not None:  # the state after each position of a check
            written = torch.einsum("hts,bhsd,bhse->bhtde", within, k, v)
            state.pieces["kv"].append(query_decay[..., None] * state.kv[:, :, None] + written)
        state.kv.copy_(state.kv * torch.exp(-self.slope * n).to(q.dtype) + (k * key_decay).transpose(-1, -2) @ v)
        return out


def slope_rates(heads: int, layer: int, layers: int) -> torch.Tensor:
    """Each head's decay slope: a geometric series over heads, shrinking with depth."""
    base = 1 / (2 ** (8 / heads))
    depth = 1 - layer / (layers - 1 + 1e-5) + 1e-5
    # on the CPU explicitly: the model is built on `meta`, and this is a value, not a weight to load
    return base ** torch.arange(1, heads + 1, dtype=torch.float32, device="cpu") * depth


class MiniMaxDecoderLayer(nn.Module):
    """Norm first, then the residual is the normed input: h = a * norm(h) + b * attention(norm(h)),
    and likewise for the experts, with (a, b) from the config per kind of layer."""

    def __init__(self, attention: nn.Module, mlp: nn.Module, hidden: int, eps: float, attn_ab, mlp_ab):
        super().__init__()
        self.self_attn, self.mlp = attention, mlp
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.attn_ab, self.mlp_ab = attn_ab, mlp_ab

    def forward(self, h: torch.Tensor, step: Step, state) -> torch.Tensor:
        h = self.input_layernorm(h)
        h = h * self.attn_ab[0] + self.self_attn(h, step, state) * self.attn_ab[1]
        h = self.post_attention_layernorm(h)
        return h * self.mlp_ab[0] + self.mlp(h) * self.mlp_ab[1]


@dataclass
class MiniMaxArgs(ModelArgs):
    default_rope_theta: ClassVar[float] = 10_000.0

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = 8
    head_dim: int | None = None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    layer_types: list[str] | None = None
    block_size: int = 256
    full_attn_alpha_factor: float = 1
    full_attn_beta_factor: float = 1
    linear_attn_alpha_factor: float = 1
    linear_attn_beta_factor: float = 1
    mlp_alpha_factor: float = 1
    mlp_beta_factor: float = 1
    sliding_window: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096 * 32
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)

    def linear(self, i: int) -> bool:
        if self.layer_types is not None:
            return self.layer_types[i] == "linear_attention"
        return i % 2 == 1


def build(args: MiniMaxArgs) -> CausalLM:
    hidden, heads, experts, top_k = (
        args.hidden_size,
        args.num_attention_heads,
        args.num_local_experts,
        args.num_experts_per_tok,
    )
    head_dim = args.attention_head_dim

    def layer(i: int) -> MiniMaxDecoderLayer:
        if args.linear(i):
            slope = slope_rates(heads, i, args.num_hidden_layers)
            attention = LightningAttention(hidden, heads, head_dim, args.hidden_act, args.block_size, slope)
            attn_ab = (args.linear_attn_alpha_factor, args.linear_attn_beta_factor)
        else:
            kv_heads = args.key_value_heads
            attention = Attention(hidden, heads, kv_heads, head_dim, sliding_window=args.sliding_window)
            attn_ab = (args.full_attn_alpha_factor, args.full_attn_beta_factor)
        moe = SparseMoE(
            i,
            hidden,
            args.intermediate_size,
            experts,
            top_k,
            TopKRouter(hidden, experts, top_k, normalize=True),
            act=GatedActivation(act=args.hidden_act),
        )
        return MiniMaxDecoderLayer(
            attention, moe, hidden, args.rms_norm_eps, attn_ab, (args.mlp_alpha_factor, args.mlp_beta_factor)
        )

    return causal_lm(args, [layer(i) for i in range(args.num_hidden_layers)], head_dim)


FAMILY = Family(
    architectures=("MiniMaxForCausalLM",),
    model_type="minimax",
    args=MiniMaxArgs,
    model=build,
    experts=(
        PerExpert(MIXTRAL_EXPERTS),
        FUSED_EXPERTS,
    ),
    hub_aliases=((".mlp.gate.", ".block_sparse_moe.gate."),),
    example="MiniMaxAI/MiniMax-Text-01-hf",
)
