"""All-resident experts: every routed expert on the device, stacked per layer.

This is the reference the offloading runtime must reproduce token for token.
"""

import torch

from localmoe.kernels.reference import expert_mlp
from localmoe.loader import ExpertSource


class ResidentExperts:
    """Per MoE layer, gate_up [E, 2I, H] (gate rows first) and down [E, H, I], indexed by expert id."""

    def __init__(self, source: ExpertSource, device: torch.device | str, dtype: torch.dtype):
        self.gate_up: dict[int, torch.Tensor] = {}
        self.down: dict[int, torch.Tensor] = {}
        self.act: dict[int, str] = {}
        for layer, block in source.blocks.items():
            inter, hidden = block.intermediate_size, block.hidden_size
            gate_up = torch.empty(block.num_experts, 2 * inter, hidden, dtype=dtype, device=device)
            down = torch.empty(block.num_experts, hidden, inter, dtype=dtype, device=device)
            for expert in range(block.num_experts):
                roles = source.read(layer, expert)
                gate_up[expert, :inter].copy_(roles["gate"])
                gate_up[expert, inter:].copy_(roles["up"])
                down[expert].copy_(roles["down"])
            self.gate_up[layer], self.down[layer], self.act[layer] = gate_up, down, block.act

    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return expert_mlp(x, self.gate_up[layer], self.down[layer], weights, ids, self.act[layer])
