"""Inkling 2 Loop (Inkling2LoopForCausalLM, thinkingmachines/Inkling-2-Mini's language model): Inkling 2
whose middle layers (`loop_layer_index_start` to `loop_layer_index_end`, whole blocks) run
`loop_num_passes` times.

Each pass after the first restarts from the hidden and block states before the loop, with keys, values
and convolution rings of its own, and hears from the previous pass: for each loop layer, four messages
(for its queries', keys', values' and MLP's inputs) mixed from the previous pass's blocks and its last
hidden state by learned queries, as the attention residuals are. A message enters its input through a
gate of rank `loop_gate_rank`: (1 - tanh(forget)) x + tanh(gain) message. The experts are the same in
every pass.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.models import inkling2
from localmoe.models.family import Family, Multimodal
from localmoe.models.inkling2 import Inkling2Args, Inkling2DecoderLayer, Inkling2LM, attention_residual
from localmoe.models.layers import CausalLM, Step, rms_normalize
from localmoe.models.state import KVCache

MESSAGES = "inkling2_loop_messages"  # where a step keeps the messages for the loop layer it runs next
ROLES = ("attn", "k", "v", "mlp")  # the inputs messages enter, in the order of the messages: queries' first


@dataclass
class Inkling2LoopArgs(Inkling2Args):
    hidden_size: int = 2304
    num_hidden_layers: int = 24
    num_attention_heads: int = 24
    swa_num_attention_heads: int = 24
    log_scaling_n_floor: int = 8192
    moe_intermediate_size: int = 1152
    n_routed_experts: int = 128
    loop_layer_index_start: int = 6
    loop_layer_index_end: int = 18
    loop_num_passes: int = 3
    loop_gate_rank: int = 64
    loop_config: dict | None = None  # the release's spelling of the four above

    def __post_init__(self):
        super().__post_init__()
        given = self.loop_config or {}
        self.loop_layer_index_start = given.get("core_start", self.loop_layer_index_start)
        self.loop_layer_index_end = given.get("core_end", self.loop_layer_index_end)
        self.loop_num_passes = given.get("num_passes", self.loop_num_passes)
        self.loop_gate_rank = given.get("gate_rank", self.loop_gate_rank)

    @property
    def loop(self) -> range:
        return range(self.loop_layer_index_start, self.loop_layer_index_end)

    def _contradictions(self):
        yield from super()._contradictions()
        block = self.n_layers_per_attn_res_block
        if self.loop_layer_index_start % block or self.loop_layer_index_end % block:
            yield f"loops layers {self.loop.start} to {self.loop.stop}, which are not whole blocks of {block}"
        elif not 0 < self.loop.start < self.loop.stop <= self.num_hidden_layers:
            yield f"loops layers {self.loop.start} to {self.loop.stop} of its {self.num_hidden_layers}"


class MessageGate(nn.Module):
    """(1 - tanh(forget)) x + tanh(gain) message, both gates projected through rank `rank` from the
    RMS-normalised x and message side by side; in float32. Named as the checkpoints store it."""

    def __init__(self, hidden: int, rank: int, eps: float):
        super().__init__()
        self.eps = eps
        self.down_weight = nn.Parameter(torch.empty(rank, 2 * hidden))
        self.forget_weight = nn.Parameter(torch.empty(hidden, rank))
        self.gain_weight = nn.Parameter(torch.empty(hidden, rank))

    def forward(self, x: torch.Tensor, message: torch.Tensor) -> torch.Tensor:
        x, message = x.float(), message.float()
        both = torch.cat((rms_normalize(x, self.eps), rms_normalize(message, self.eps)), dim=-1)
        low = F.linear(both.to(self.down_weight.dtype), self.down_weight).float()
        forget = torch.tanh(F.linear(low, self.forget_weight.float()))
        gain = torch.tanh(F.linear(low, self.gain_weight.float()))
        return (1 - forget) * x + gain * message


class LoopLayer(Inkling2DecoderLayer):
    """An Inkling 2 layer whose inputs take the step's messages through gates, where there are messages."""

    def __init__(self, args: Inkling2LoopArgs, i: int):
        super().__init__(args, i)
        self.controllers = nn.ModuleDict(
            {role: MessageGate(args.hidden_size, args.loop_gate_rank, args.rms_norm_eps) for role in ROLES}
        )

    def attention_inputs(self, queries, blocks: torch.Tensor, h: torch.Tensor, step: Step):
        messages = step._memo.get(MESSAGES)
        if messages is None:
            return super().attention_inputs(queries, blocks, h, step)
        inputs = self.mixes(queries, blocks, h)
        gated = [
            self.controllers[role](inputs[..., n if self.full else 0, :], messages[..., n, :])
            for n, role in enumerate(ROLES[:3])
        ]
        norms = (self.q_input_norm, self.k_input_norm, self.v_input_norm) if self.full else (self.attn_norm,) * 3
        return tuple(norm(x).to(h.dtype) for norm, x in zip(norms, gated, strict=True))

    def mlp_input(self, mixed: torch.Tensor, step: Step) -> torch.Tensor:
        messages = step._memo.get(MESSAGES)
        return mixed if messages is None else self.controllers["mlp"](mixed, messages[..., 3, :])


class Inkling2LoopLM(Inkling2LM):
    """Runs the loop layers once per pass, each pass after the first on states of its own (kept after
    the layers' own in the cache)."""

    def __init__(self, *args, loop: range, passes: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.loop, self.passes = loop, passes

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        cache = super().new_cache(batch, max_len)
        weight = self.model.embed_tokens.weight
        for _ in range(self.passes - 1):
            cache.layers += [
                self._loop_attention(i).new_state(batch, max_len, weight.dtype, weight.device) for i in self.loop
            ]
        return cache

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        repeated = sum(self._loop_attention(i).state_bytes_per_token(dtype) for i in self.loop)
        return super().kv_bytes_per_token(dtype) + (self.passes - 1) * repeated

    def fixed_state_bytes(self, dtype: torch.dtype) -> int:
        repeated = sum(self._loop_attention(i).fixed_state_bytes(dtype) for i in self.loop)
        return super().fixed_state_bytes(dtype) + (self.passes - 1) * repeated

    def _loop_attention(self, i: int) -> nn.Module:
        return self.model.layers[i].self_attn

    def run_layers(self, stack: torch.Tensor, step: Step, states: list) -> torch.Tensor:
        layers, loop = self.model.layers, self.loop
        step._memo[MESSAGES] = None
        for i in range(loop.start):
            stack = layers[i](stack, step, states[i])
        before = stack
        for i in loop:  # the first pass
            stack = layers[i](stack, step, states[i])
        own = iter(states[len(layers) :])  # the states of the passes after the first
        kept = before.shape[-2]  # blocks before the loop, and the first loop layer's input, which starts one
        for _ in range(self.passes - 1):
            previous_blocks, previous = stack[:, :, kept:-1], stack[:, :, -1]
            stack = before
            for n, i in enumerate(loop):
                step._memo[MESSAGES] = attention_residual(self.message_queries(n), previous_blocks, previous)
                stack = layers[i](stack, step, next(own))
            step._memo[MESSAGES] = None
        for i in range(loop.stop, len(layers)):
            stack = layers[i](stack, step, states[i])
        return stack

    def message_queries(self, n: int) -> torch.Tensor:
        """The n-th loop layer's message queries [4, E]: for its queries', keys', values' and MLP's inputs.
        The checkpoints keep them as (query, MLP) and (key, value) pairs, each pair of rows per layer."""
        query, mlp = self.model.middle_cycle_cross_pass_queries.view(len(self.loop), 2, -1)[n]
        key, value = self.model.middle_cycle_cross_pass_kv_queries.view(len(self.loop), 2, -1)[n]
        return torch.stack((query, key, value, mlp))


def build(args: Inkling2LoopArgs) -> CausalLM:
    loop = args.loop
    layers = [(LoopLayer if i in loop else Inkling2DecoderLayer)(args, i) for i in range(args.num_hidden_layers)]
    model = inkling2.assemble(args, layers, Inkling2LoopLM, loop=loop, passes=args.loop_num_passes)
    for name in ("middle_cycle_cross_pass_queries", "middle_cycle_cross_pass_kv_queries"):
        setattr(model.model, name, nn.Parameter(torch.zeros(2 * len(loop), args.hidden_size)))
    return model


FAMILY = Family(
    architectures=("Inkling2LoopForCausalLM",),
    model_type="inkling2_loop_text",
    args=Inkling2LoopArgs,
    model=build,
    experts=inkling2.FAMILY.experts,
    hub_aliases=(*inkling2.HUB_NAMES, ("model.middle_cycle_", "model.llm.middle_cycle_")),
    keep_float32=(*inkling2.FAMILY.keep_float32, "forget_weight", "gain_weight", "middle_cycle_"),
    multimodal=(Multimodal("Inkling2LoopForConditionalGeneration", (("model.llm.", "model.llm."),)),),
    example="thinkingmachines/Inkling-2-Mini",
)
