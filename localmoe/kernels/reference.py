"""Plain-PyTorch expert computation: the CPU path, and the oracle for the fused kernels."""

import torch
import torch.nn.functional as F

from localmoe.models.layers import activation


def expert_mlp(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    weights: torch.Tensor,
    slots: torch.Tensor,
    act: str = "silu",
) -> torch.Tensor:
    """sum_k weights[t, k] * down[s] @ (act(gate[s] @ x[t]) * up[s] @ x[t]) with s = slots[t, k].

    x [T, E]; gate_up [N, 2I, E] with gate rows first; down [N, E, I]; weights and slots [T, k].
    Loops over the distinct slots in use, so each selected expert's weights are read once.
    """
    act_fn = activation(act)
    out = torch.zeros_like(x)
    flat_slots = slots.reshape(-1)
    flat_weights = weights.reshape(-1)
    token_of_pair = torch.arange(x.shape[0], device=x.device).repeat_interleave(slots.shape[1])
    for slot in flat_slots.unique().tolist():
        pairs = (flat_slots == slot).nonzero().squeeze(1)
        tokens = token_of_pair[pairs]
        gate, up = F.linear(x[tokens], gate_up[slot]).chunk(2, dim=-1)
        y = F.linear(act_fn(gate) * up, down[slot])
        out.index_add_(0, tokens, (y * flat_weights[pairs, None]).to(out.dtype))
    return out
