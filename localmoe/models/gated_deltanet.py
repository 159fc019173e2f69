"""Gated DeltaNet, the linear attention of Qwen3-Next and Qwen3.5: q, k and v come through a short
causal convolution and SiLU; q and k are L2-normalised; each value head has its decay
g = -exp(A_log) * softplus(a + dt_bias) and write rate beta = sigmoid(b); the delta rule mixes them
(kernels/delta_rule.py); the output is RMS-normalised per head and gated by silu(z)."""

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.kernels.delta_rule import gated_delta_rule, gated_delta_rule_chunked
from localmoe.models.layers import RMSNorm, Step, activation
from localmoe.models.short_conv import causal_conv
from localmoe.models.state import RecurrentState

# transformers names a linear layer's token mixer `linear_attn`; ours is `self_attn` in every layer
DELTANET_WEIGHTS = ("in_proj", "conv1d.", "dt_bias", "A_log", "norm.", "out_proj.")
DELTANET_ALIASES = tuple((f".self_attn.{name}", f".linear_attn.{name}") for name in DELTANET_WEIGHTS)


class GatedDeltaNet(nn.Module):
    """`args` has the linear_* sizes, hidden_size and rms_norm_eps. `grouped`: Qwen3-Next's projections,
    one for q, k, v, z and one for b, a, each laid out key head by key head (q, k, then the values and
    gates of the value heads that key head serves); `fused`: Lara's one projection, rows q, k, v, z, b, a;
    otherwise Qwen3.5's, one projection per part. `norm` the output norm's class; `gate` the output gate's
    activation (Qwen4-Exp may take sigmoid)."""

    def __init__(self, args, grouped: bool = False, fused: bool = False, norm=RMSNorm, gate: str = "silu"):
        super().__init__()
        hidden = args.hidden_size
        self.k_heads, self.v_heads = args.linear_num_key_heads, args.linear_num_value_heads
        self.k_dim, self.v_dim = args.linear_key_head_dim, args.linear_value_head_dim
        self.kernel = args.linear_conv_kernel_dim
        self.grouped, self.fused = grouped, fused
        self.gate_act = activation(gate)
        self.channels = 2 * self.k_heads * self.k_dim + self.v_heads * self.v_dim
        values = self.v_heads * self.v_dim
        if fused:
            self.in_proj = nn.Linear(hidden, self.channels + values + 2 * self.v_heads, bias=False)
        elif grouped:
            self.in_proj_qkvz = nn.Linear(hidden, self.channels + values, bias=False)
            self.in_proj_ba = nn.Linear(hidden, 2 * self.v_heads, bias=False)
        else:
            self.in_proj_qkv = nn.Linear(hidden, self.channels, bias=False)
            self.in_proj_z = nn.Linear(hidden, values, bias=False)
            self.in_proj_b = nn.Linear(hidden, self.v_heads, bias=False)
            self.in_proj_a = nn.Linear(hidden, self.v_heads, bias=False)
        self.conv1d = nn.Conv1d(self.channels, self.channels, self.kernel, groups=self.channels, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(self.v_heads))
        self.A_log = nn.Parameter(torch.empty(self.v_heads))
        self.norm = norm(self.v_dim, args.rms_norm_eps)
        self.out_proj = nn.Linear(values, hidden, bias=False)

    recurrent = True  # its state is a RecurrentState (see CausalLM.recurrent_state_bytes)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> RecurrentState:
        conv = torch.zeros(batch, self.channels, self.kernel - 1, dtype=dtype, device=device)
        matrix = torch.zeros(batch, self.v_heads, self.k_dim, self.v_dim, dtype=torch.float32, device=device)
        return RecurrentState(conv=conv, matrix=matrix)

    def state_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 0

    def fixed_state_bytes(self, dtype: torch.dtype) -> int:
        return self.channels * (self.kernel - 1) * dtype.itemsize + self.v_heads * self.k_dim * self.v_dim * 4

    def projections(self, x: torch.Tensor):
        """(q, k, v before the convolution [B, T, channels], z [B, T, H, Dv], b and a [B, T, H])."""
        B, T, _ = x.shape
        if self.fused:
            qkv, z, b, a = self.in_proj(x).split(
                (self.channels, self.v_heads * self.v_dim, self.v_heads, self.v_heads), -1
            )
            return qkv, z.view(B, T, self.v_heads, self.v_dim), b, a
        if not self.grouped:
            z = self.in_proj_z(x).view(B, T, self.v_heads, self.v_dim)
            return self.in_proj_qkv(x), z, self.in_proj_b(x), self.in_proj_a(x)
        per_key_head = self.v_heads // self.k_heads * self.v_dim
        qkvz = self.in_proj_qkvz(x).view(B, T, self.k_heads, -1)
        q, k, v, z = qkvz.split((self.k_dim, self.k_dim, per_key_head, per_key_head), dim=-1)
        b, a = self.in_proj_ba(x).view(B, T, self.k_heads, -1).chunk(2, dim=-1)
        qkv = torch.cat([t.reshape(B, T, -1) for t in (q, k, v)], dim=-1)
        return qkv, z.reshape(B, T, self.v_heads, self.v_dim), b.reshape(B, T, -1), a.reshape(B, T, -1)

    def forward(self, x: torch.Tensor, step: Step, state: RecurrentState) -> torch.Tensor:
        B, T, _ = x.shape
        qkv, z, b, a = self.projections(x)
        state.begin(step)
        mixed = F.silu(causal_conv(qkv, state.conv, self.conv1d.weight, trail=state.pieces["conv"]))  # [B, T, C]
        q, k, v = mixed.split((self.k_heads * self.k_dim, self.k_heads * self.k_dim, self.v_heads * self.v_dim), -1)
        groups = self.v_heads // self.k_heads  # each q/k head serves this many consecutive value heads
        q, k = (l2_normalize(heads(t, self.k_dim).repeat_interleave(groups, dim=1)) for t in (q, k))
        q = q * self.k_dim**-0.5
        v = heads(v, self.v_dim)
        beta = torch.sigmoid(b).float().transpose(1, 2)  # [B, H, T]
        g = (-self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)).transpose(1, 2)
        rule = gated_delta_rule if T == 1 else gated_delta_rule_chunked
        out = rule(q, k, v, g, beta, state.matrix, trail=state.pieces["matrix"]).transpose(1, 2).to(x.dtype)
        out = (self.norm(out) * self.gate_act(z.float())).to(x.dtype)
        return self.out_proj(out.reshape(B, T, -1))


def heads(x: torch.Tensor, dim: int) -> torch.Tensor:
    """[B, T, H * dim] -> [B, H, T, dim] in float32."""
    return x.view(*x.shape[:2], -1, dim).transpose(1, 2).float()


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)
