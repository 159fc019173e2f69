"""Plain-PyTorch expert computation: the CPU path, and the oracle for the fused kernels.

Work is split in two so that experts can be computed in rounds (when the slot pool cannot hold a
layer's experts at once) with results identical to one pass: `expert_pair_outputs` fills in the
output of every (token, choice) pair whose expert has a slot, and `combine_pairs` sums each token's
choices with their router weights, always in the same order.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F


class ExpertStack(NamedTuple):
    """Experts stacked in one row layout, indexed by their position in the stack (a slot of the pool, or
    an expert id of the host store): gate_up [N, 2I, E] with gate rows first (up alone, [N, I, E], for
    ungated experts), down [N, E, I] (tensors in
    the compute dtype, or the quantized stacks of kernels/quantized.py), and biases [N, 2I] and [N, E]
    where the experts have them."""

    gate_up: object
    down: object
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


def expert_pair_outputs(
    out: torch.Tensor,
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    slots: torch.Tensor,
    act,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
    *,
    ids: torch.Tensor | None = None,
    host: ExpertStack | None = None,
) -> None:
    """out[t * k + j] = down[s] @ act(gate[s] @ x[t], up[s] @ x[t]) with s = slots[t, j].

    out [T*k, E]; x [T, E]; gate_up [N, 2I, E] with gate rows first; down [N, E, I]; slots [T, k];
    `act` (a `GatedActivation`) combines the two projections (`act.combine`, which also takes up alone,
    gate_up [N, I, E], for ungated experts); biases [N, 2I] and [N, E] where
    the experts have them; `input_scale` [T*k] multiplies each pair's input (Llama 4 weights the
    expert's input, not its output). A pair whose slot is -1 is computed from `host` (the layer's
    experts where they lie, in the same layout, indexed by expert id) at its expert `ids[t, j]` when
    both are given, and skipped (its row untouched) otherwise. Loops over the distinct experts in use,
    so each expert's weights are read once.
    """
    flat = slots.reshape(-1)
    token_of_pair = torch.arange(x.shape[0], device=x.device).repeat_interleave(slots.shape[1])
    sources = [(flat, ExpertStack(gate_up, down, gate_up_bias, down_bias))]
    if host is not None and ids is not None:
        sources.append((torch.where(flat < 0, ids.reshape(-1).to(flat.dtype), -1), host))
    for index, stack in sources:
        for row in index.unique().tolist():
            if row < 0:
                continue
            pairs = (index == row).nonzero().squeeze(1)
            inputs = x[token_of_pair[pairs]]
            if input_scale is not None:
                inputs = (inputs * input_scale[pairs, None]).to(x.dtype)
            out[pairs] = _expert(inputs, stack, row, act)


def _expert(inputs: torch.Tensor, stack: ExpertStack, row: int, act) -> torch.Tensor:
    """One expert of `stack` (at `row`) applied to inputs [P, E]; a host row is brought to the inputs'
    device (the reference's way of reading it where it lies: the same bytes)."""

    def weights(rows):
        return None if rows is None else rows[row].to(inputs.device)

    gate_up = F.linear(inputs, weights(stack.gate_up), weights(stack.gate_up_bias))
    return F.linear(act.combine(gate_up), weights(stack.down), weights(stack.down_bias))


def combine_pairs(pair_outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_j weights[t, j] * pair_outputs[t * k + j], in float32, cast back: [T, E]."""
    tokens, k = weights.shape
    per_token = pair_outputs.view(tokens, k, -1).float() * weights.unsqueeze(-1)
    return per_token.sum(dim=1).to(pair_outputs.dtype)


def expert_mlp(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    weights: torch.Tensor,
    slots: torch.Tensor,
    act,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    weights_on_input: bool = False,
    pair_outputs=expert_pair_outputs,
    per_choice: bool = False,
) -> torch.Tensor:
    """sum_j weights[t, j] * expert slots[t, j] applied to x[t] (or, `weights_on_input`, the sum of the
    experts applied to weights[t, j] * x[t]): the whole MoE sum in one call, its pairs computed by
    `pair_outputs` (this module's, or a fused kernel with its signature). [T, E]; with `per_choice`, each
    choice's output unweighted, [T, k, E]."""
    pairs = x.new_zeros(slots.numel(), x.shape[1])
    scale = weights.reshape(-1) if weights_on_input else None
    pair_outputs(pairs, x, gate_up, down, slots, act, gate_up_bias, down_bias, scale)
    if per_choice:
        return pairs.view(*slots.shape, -1)
    return combine_pairs(pairs, torch.ones_like(weights) if weights_on_input else weights)
