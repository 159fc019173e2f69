"""Kimi Delta Attention (Kimi-Linear): the gated delta rule (kernels/delta_rule.py) with a decay per key
channel. q, k and v each come through their own short causal convolution and SiLU; q and k are
L2-normalised; the log decay is -exp(A_log) * softplus(f_b(f_a(x)) + dt_bias) per head and channel, the
write rate sigmoid(b_proj(x)); the output is RMS-normalised per head and gated by sigmoid(g_b(g_a(x)))."""

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.kernels.delta_rule import gated_delta_rule, gated_delta_rule_chunked
from localmoe.models.layers import Step, activation
from localmoe.models.short_conv import causal_conv
from localmoe.models.state import RecurrentState


class KimiDeltaAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, head_dim: int, kernel: int, eps: float, act: str = "silu"):
        super().__init__()
        self.heads, self.head_dim, self.kernel = heads, head_dim, kernel
        self.act = activation(act)
        width = heads * head_dim
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(hidden, width, bias=False) for _ in range(3))
        self.q_conv1d, self.k_conv1d, self.v_conv1d = (
            nn.Conv1d(width, width, kernel, groups=width, bias=False) for _ in range(3)
        )
        self.f_a_proj = nn.Linear(hidden, head_dim, bias=False)
        self.f_b_proj = nn.Linear(head_dim, width, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(width))
        self.A_log = nn.Parameter(torch.empty(1, 1, heads, 1))
        self.b_proj = nn.Linear(hidden, heads, bias=False)
        self.g_a_proj = nn.Linear(hidden, head_dim, bias=False)
        self.g_b_proj = nn.Linear(head_dim, width, bias=False)
        self.o_norm = SigmoidGatedRMSNorm(head_dim, eps)
        self.o_proj = nn.Linear(width, hidden, bias=False)

    recurrent = True  # its state is a RecurrentState (see CausalLM.recurrent_state_bytes)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> RecurrentState:
        width = self.heads * self.head_dim
        conv = torch.zeros(batch, 3 * width, self.kernel - 1, dtype=dtype, device=device)  # q, k, v
        matrix = torch.zeros(batch, self.heads, self.head_dim, self.head_dim, dtype=torch.float32, device=device)
        return RecurrentState(conv=conv, matrix=matrix)

    def state_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 0

    def fixed_state_bytes(self, dtype: torch.dtype) -> int:
        width = self.heads * self.head_dim
        return 3 * width * (self.kernel - 1) * dtype.itemsize + self.heads * self.head_dim**2 * 4

    def forward(self, x: torch.Tensor, step: Step, state: RecurrentState) -> torch.Tensor:
        B, T, _ = x.shape
        state.begin(step)
        windows = state.conv.chunk(3, dim=1)  # views: each convolution keeps its own inputs
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        trails = None if state.pieces["conv"] is None else []
        q, k, v = (
            self._heads(self.act(causal_conv(proj(x), window, conv.weight, trail=trails)))
            for proj, window, conv in zip((self.q_proj, self.k_proj, self.v_proj), windows, convs, strict=True)
        )
        if trails is not None:
            state.pieces["conv"].append(torch.cat(trails, dim=1))
        q, k = _l2_normalize(q) * self.head_dim**-0.5, _l2_normalize(k)
        g = self.log_decay(x).view(B, T, self.heads, self.head_dim)  # [B, T, H, D] float32
        beta = torch.sigmoid(self.b_proj(x)).float().transpose(1, 2)  # [B, H, T]
        rule = gated_delta_rule if T == 1 else gated_delta_rule_chunked
        out = rule(q, k, v, g.transpose(1, 2), beta, state.matrix, trail=state.pieces["matrix"]).transpose(1, 2)
        gate = self.output_gate(x).view(B, T, self.heads, self.head_dim)
        return self.o_proj(self.o_norm(out, gate).to(x.dtype).reshape(B, T, -1))

    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        """The state's log decay per head and key channel, [B, T, H x D] float32: -exp(A_log) * softplus(...)."""
        return (-self.A_log.float().exp() * F.softplus(self._forget(x))).flatten(2)

    def forget(self, x: torch.Tensor) -> torch.Tensor:
        """The forget gate's projection, [B, T, H x D]."""
        return self.f_b_proj(self.f_a_proj(x))

    def _forget(self, x: torch.Tensor) -> torch.Tensor:
        """forget(x) + dt_bias per head, [B, T, H, D] float32."""
        return (self.forget(x).float() + self.dt_bias.float()).view(*x.shape[:2], self.heads, -1)

    def output_gate(self, x: torch.Tensor) -> torch.Tensor:
        """The output norm's gate, [B, T, H x D]."""
        return self.g_b_proj(self.g_a_proj(x))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, H * D] -> [B, H, T, D] in float32."""
        return t.view(*t.shape[:2], self.heads, self.head_dim).transpose(1, 2).float()


class BoundedDeltaAttention(KimiDeltaAttention):
    """Kimi Delta Attention with one decay rate per head (A_log [H]) whose log decay, where `lower_bound` is
    set, is lower_bound * sigmoid(exp(A_log) * (f(x) + dt_bias)): bounded below, never the softplus's
    unbounded -exp(A_log) * softplus(...) (Ling 3's safe gate, GLM-5.3-Flash)."""

    def __init__(self, hidden: int, heads: int, head_dim: int, kernel: int, eps: float, act: str, lower_bound):
        super().__init__(hidden, heads, head_dim, kernel, eps, act)
        self.A_log = nn.Parameter(torch.empty(heads))
        self.lower_bound = lower_bound

    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        g, rate = self._forget(x), self.A_log.float().exp()[:, None]  # [B, T, H, D], [H, 1]
        if self.lower_bound is not None:
            return (self.lower_bound * torch.sigmoid(rate * g)).flatten(2)
        return (-rate * F.softplus(g)).flatten(2)


class SigmoidGatedRMSNorm(nn.Module):
    """RMS-normalised x times the weight, gated by sigmoid(gate), all in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        x = x.float()
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return normed * torch.sigmoid(gate.float())


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)
