"""All-resident experts: every routed expert on the device, packed per layer in the same row layout as
the expert cache's slots.

This is the reference the offloading runtime must reproduce token for token, and the runtime itself
when the memory plan finds room for every expert.
"""

import torch

from localmoe.kernels.quantized import QuantSpec
from localmoe.kernels.reference import ExpertStack, expert_mlp, expert_pair_outputs
from localmoe.models.expert_source import ExpertSource
from localmoe.models.moe import Routing
from localmoe.runtime.expert_store import host_rows
from localmoe.runtime.layouts import layout_of
from localmoe.runtime.quantized_cache import QuantizedLayers
from localmoe.runtime.trace import RoutingTrace


class ResidentExperts:
    """Per MoE layer, rows [E, numel] indexed by expert id."""

    def __init__(
        self,
        source: ExpertSource,
        device: torch.device | str,
        dtype: torch.dtype,
        trace: RoutingTrace | None = None,
        pair_outputs=expert_pair_outputs,
        quant: QuantSpec | None = None,
        quantized: QuantizedLayers | None = None,
    ):
        """`quant`: keep the experts quantized, their rows from the on-disk cache `quantized`."""
        self.layout = layout_of(source, quant, dtype)
        self.specs = {layer: block.spec for layer, block in source.blocks.items()}
        self.trace = trace
        self.pair_outputs = pair_outputs  # the kernel (see localmoe.kernels.pair_kernel)
        # Packed in host memory, then moved in one copy: the mapped shards are read sequentially.
        self.rows = {layer: rows.to(device) for layer, rows in host_rows(source, self.layout, dtype, quantized)}
        # the typed views of each layer's rows, made once: a decode step would otherwise rebuild them per layer
        self.stacks = {
            layer: ExpertStack(self.layout.gate_up(rows), self.layout.down(rows), *self.layout.biases(rows))
            for layer, rows in self.rows.items()
        }

    def __call__(self, layer: int, x: torch.Tensor, routing: Routing, routed=None) -> torch.Tensor:
        """The layer's experts applied to x (`routed`, the router's inputs, is for runtimes that predict)."""
        spec, stack, (weights, ids, _) = self.specs[layer], self.stacks[layer], routing
        if self.trace:  # a host read per layer: a trace is for analysis, not speed
            self.trace.record(layer, ids.reshape(-1).tolist(), weights.reshape(-1).tolist(), spec.top_k)
        return expert_mlp(
            x, *stack[:2], weights, ids, spec.act, *stack[2:], spec.weights_on_input, self.pair_outputs, spec.per_choice
        )
