"""Where a family's routed experts are stored in a checkpoint, and how to read one expert from there.

A family lists the layouts its checkpoints come in; the loader uses, per layer, the first one present.
Whatever the layout, an expert comes back as roles gate and up [I, E] and down [E, I], plus gate_bias,
up_bias [I] and down_bias [E] for experts with biases (ungated experts have no gate roles): views of
the memory-mapped shards where the layout allows, a fresh tensor where it must be decoded (MXFP4).
"""

from dataclasses import dataclass

import torch

from localmoe.checkpoint import Checkpoint
from localmoe.errors import LocalMoEError
from localmoe.kernels.quantized import MXFP4, Mxfp4Weights, dequantize_mxfp4

MXFP4_DTYPES = frozenset({torch.uint8})  # FP4 codes two to a byte, and exponents


def role_shapes(hidden: int, intermediate: int, bias: bool, gated: bool = True) -> dict[str, tuple[int, ...]]:
    """Each role's shape, in the order an expert's row holds them: its input projections (gate and up, or
    up alone for an ungated expert), down, then the biases."""
    inputs = input_roles(gated)
    shapes = {**{role: (intermediate, hidden) for role in inputs}, "down": (hidden, intermediate)}
    if bias:
        shapes.update({f"{role}_bias": (intermediate,) for role in inputs}, down_bias=(hidden,))
    return shapes


def input_roles(gated: bool) -> tuple[str, ...]:
    """The roles an expert's input projection stacks, in order."""
    return ("gate", "up") if gated else ("up",)


def matrix_roles(block) -> tuple[str, ...]:
    """The roles of an MoE block's experts that are matrices, in a row's order."""
    return (*input_roles(block.gated), "down")


def block_shapes(block) -> dict[str, tuple[int, ...]]:
    """`role_shapes` of an MoE block's experts."""
    return role_shapes(block.hidden_size, block.intermediate_size, block.expert_bias, block.gated)


@dataclass(frozen=True)
class PerExpert:
    """One tensor per expert and role, named by templates with {layer} and {expert}: the Hub layout of
    most families. A quantized checkpoint may store each in its own format (localmoe/quantization.py)."""

    names: dict[str, str]

    def present(self, ckpt: Checkpoint, block) -> bool:
        return ckpt.has_weight(self.names["up"].format(layer=block.layer_idx, expert=0))

    def check(self, ckpt: Checkpoint, block) -> None:
        shapes = block_shapes(block)
        for expert in range(block.num_experts):
            for role, shape in shapes.items():
                ckpt.check_weight(self.names[role].format(layer=block.layer_idx, expert=expert), shape)

    def stored_form(self, ckpt: Checkpoint, block):
        """The form every expert of the layer is stored in (a QuantSpec or StoredFormat), or None where
        they are plain or not all alike."""
        layer, forms = block.layer_idx, set()
        for expert in range(block.num_experts):
            names = (self.names[role].format(layer=layer, expert=expert) for role in matrix_roles(block))
            forms |= {ckpt.stored_form(name) for name in names}
        return forms.pop() if len(forms) == 1 else None

    def read(self, ckpt: Checkpoint, block, expert: int) -> dict[str, torch.Tensor]:
        roles = block_shapes(block)
        return {role: ckpt.weight(self.names[role].format(layer=block.layer_idx, expert=expert)) for role in roles}

    def read_packed(self, ckpt: Checkpoint, block, expert: int) -> dict:
        """The expert as stored: each role a stack of one matrix in its stored form (kernels/quantized.py)."""
        names = {role: self.names[role].format(layer=block.layer_idx, expert=expert) for role in matrix_roles(block)}
        return {role: ckpt.stored(name) for role, name in names.items()}


@dataclass(frozen=True)
class Fused:
    """One 3-D tensor per layer for gate and up, one for down, named by templates with {layer}.

    As transformers 5 keeps experts in memory: gate_up [E, 2I, H] with the gate rows first, down
    [E, H, I]. `transposed`: gate_up [E, H, 2I] and down [E, I, H] (Llama 4, gpt-oss); `interleaved`:
    gate and up alternate instead of the gate coming first (gpt-oss). Biases, where the experts have
    them: [E, 2I] (same order as gate_up) and [E, H]. For ungated experts `gate_up` names up alone,
    [E, I, H] (Nemotron-H). `identity_rows`: gate_up holds rows for the block's identity experts too, past
    the routed ones ([E + identities, 2I, H], LongCat-Flash in transformers' memory): never read, they are
    no experts.
    """

    gate_up: str
    down: str
    gate_up_bias: str | None = None
    down_bias: str | None = None
    transposed: bool = False
    interleaved: bool = False
    identity_rows: bool = False

    def present(self, ckpt: Checkpoint, block) -> bool:
        """Its tensors are there, in its orientation: Qwen3-VL-MoE's Hub files store transposed experts
        under the names transformers keeps them under untransposed, and down's shape tells them apart."""
        down = self.down.format(layer=block.layer_idx)
        return (
            self.gate_up.format(layer=block.layer_idx) in ckpt
            and down in ckpt
            and ckpt.info(down).shape == self._shapes(block)[1]
        )

    def _shapes(self, block) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of gate_up and down."""
        count, hidden, inter = block.num_experts, block.hidden_size, block.intermediate_size
        inputs = len(input_roles(block.gated)) * inter
        rows = count + block.identity_experts if self.identity_rows else count
        if self.transposed:
            return (rows, hidden, inputs), (count, inter, hidden)
        return (rows, inputs, hidden), (count, hidden, inter)

    def check(self, ckpt: Checkpoint, block) -> None:
        layer, count = block.layer_idx, block.num_experts
        gate_up, down = self._shapes(block)
        ckpt.check_tensor(self.gate_up.format(layer=layer), gate_up)
        ckpt.check_tensor(self.down.format(layer=layer), down)
        if block.expert_bias:
            inputs = len(input_roles(block.gated)) * block.intermediate_size
            ckpt.check_tensor(_required(self.gate_up_bias, "gate_up_bias").format(layer=layer), (count, inputs))
            ckpt.check_tensor(_required(self.down_bias, "down_bias").format(layer=layer), (count, block.hidden_size))

    def stored_form(self, ckpt: Checkpoint, block) -> None:
        return None  # read as floats (quantized checkpoints store experts one matrix each)

    def read(self, ckpt: Checkpoint, block, expert: int) -> dict[str, torch.Tensor]:
        layer = block.layer_idx
        gate_up = ckpt.tensor(self.gate_up.format(layer=layer))[expert]
        down = ckpt.tensor(self.down.format(layer=layer))[expert]
        if gate_up.dtype == torch.float8_e4m3fn:
            raise LocalMoEError(f"{ckpt.path}: FP8 experts stored fused per layer are not supported yet")
        if self.transposed:
            gate_up, down = gate_up.T, down.T  # [2I, H] with interleaved rows, [H, I]
        roles = {**_split_gate_up(gate_up, block, self.interleaved), "down": down}
        if block.expert_bias:
            bias = _split_gate_up(ckpt.tensor(self.gate_up_bias.format(layer=layer))[expert], block, self.interleaved)
            roles.update({f"{role}_bias": b for role, b in bias.items()})
            roles["down_bias"] = ckpt.tensor(self.down_bias.format(layer=layer))[expert]
        return roles


@dataclass(frozen=True)
class Stacked:
    """One 3-D tensor per layer and role, the experts first: gate and up [E, I, H], down [E, H, I], named
    by templates with {layer} (Step-3.7's checkpoints)."""

    names: dict[str, str]

    def present(self, ckpt: Checkpoint, block) -> bool:
        return all(name.format(layer=block.layer_idx) in ckpt for name in self.names.values())

    def check(self, ckpt: Checkpoint, block) -> None:
        for role, shape in role_shapes(block.hidden_size, block.intermediate_size, False).items():
            ckpt.check_tensor(self.names[role].format(layer=block.layer_idx), (block.num_experts, *shape))

    def stored_form(self, ckpt: Checkpoint, block) -> None:
        return None  # read as floats

    def read(self, ckpt: Checkpoint, block, expert: int) -> dict[str, torch.Tensor]:
        roles = {role: ckpt.tensor(name.format(layer=block.layer_idx))[expert] for role, name in self.names.items()}
        if roles["gate"].dtype == torch.float8_e4m3fn:
            raise LocalMoEError(f"{ckpt.path}: FP8 experts stored stacked per layer are not supported yet")
        return roles


@dataclass(frozen=True)
class Concatenated:
    """One 2-D tensor per layer and role, the experts' rows one after another: gate, up and down each
    [E x I, H], down holding each expert's transpose (DBRX's checkpoints); named by templates with {layer}."""

    names: dict[str, str]

    def present(self, ckpt: Checkpoint, block) -> bool:
        return all(name.format(layer=block.layer_idx) in ckpt for name in self.names.values())

    def check(self, ckpt: Checkpoint, block) -> None:
        rows = block.num_experts * block.intermediate_size
        for name in self.names.values():
            ckpt.check_tensor(name.format(layer=block.layer_idx), (rows, block.hidden_size))

    def stored_form(self, ckpt: Checkpoint, block) -> None:
        return None  # read as floats

    def read(self, ckpt: Checkpoint, block, expert: int) -> dict[str, torch.Tensor]:
        shape = (block.num_experts, block.intermediate_size, block.hidden_size)
        roles = {
            role: ckpt.tensor(name.format(layer=block.layer_idx)).view(shape)[expert]
            for role, name in self.names.items()
        }
        return {**roles, "down": roles["down"].T}


@dataclass(frozen=True)
class Mxfp4:
    """gpt-oss experts as shipped on the Hub: `{prefix}.gate_up_proj_blocks` [E, 2I, H/32, 16] and
    `_scales` [E, 2I, H/32] (uint8), the same for down_proj ([E, H, I/32, ...]); gate and up in
    alternate rows; biases as in `Fused` (transposed). Decoded to the compute dtype when read, or read
    as they are stored (`read_packed`), for a runtime that keeps them in MXFP4."""

    prefix: str  # with {layer}

    def present(self, ckpt: Checkpoint, block) -> bool:
        return f"{self.prefix.format(layer=block.layer_idx)}.gate_up_proj_blocks" in ckpt

    def check(self, ckpt: Checkpoint, block) -> None:
        prefix, count = self.prefix.format(layer=block.layer_idx), block.num_experts
        hidden, inter = block.hidden_size, block.intermediate_size
        for name, rows, cols in (("gate_up_proj", 2 * inter, hidden), ("down_proj", hidden, inter)):
            if cols % 32:
                raise LocalMoEError(f"{prefix}.{name}: MXFP4 needs a multiple of 32 inputs, the config says {cols}")
            ckpt.check_tensor(f"{prefix}.{name}_blocks", (count, rows, cols // 32, 16), MXFP4_DTYPES)
            ckpt.check_tensor(f"{prefix}.{name}_scales", (count, rows, cols // 32), MXFP4_DTYPES)
        ckpt.check_tensor(f"{prefix}.gate_up_proj_bias", (count, 2 * inter))
        ckpt.check_tensor(f"{prefix}.down_proj_bias", (count, hidden))

    def read(self, ckpt: Checkpoint, block, expert: int) -> dict[str, torch.Tensor]:
        prefix = self.prefix.format(layer=block.layer_idx)

        def decoded(name: str) -> torch.Tensor:
            blocks = ckpt.tensor(f"{prefix}.{name}_blocks")[expert]
            return dequantize_mxfp4(blocks, ckpt.tensor(f"{prefix}.{name}_scales")[expert])

        bias = ckpt.tensor(f"{prefix}.gate_up_proj_bias")[expert]
        return {
            **_split_gate_up(decoded("gate_up_proj"), block, interleaved=True),
            "down": decoded("down_proj"),
            "gate_bias": bias[::2],
            "up_bias": bias[1::2],
            "down_bias": ckpt.tensor(f"{prefix}.down_proj_bias")[expert],
        }

    def read_packed(self, ckpt: Checkpoint, block, expert: int) -> dict:
        """The expert as stored: gate, up and down each a stack of one MXFP4 matrix, and its biases."""
        prefix = self.prefix.format(layer=block.layer_idx)

        def stored(name: str, rows=slice(None)) -> Mxfp4Weights:
            blocks = ckpt.tensor(f"{prefix}.{name}_blocks")[expert]
            codes, scales = blocks.reshape(blocks.shape[0], -1)[rows], ckpt.tensor(f"{prefix}.{name}_scales")[expert]
            return Mxfp4Weights(codes[None], scales[rows][None], torch.float32)

        bias = ckpt.tensor(f"{prefix}.gate_up_proj_bias")[expert]
        return {
            "gate": stored("gate_up_proj", slice(0, None, 2)),
            "up": stored("gate_up_proj", slice(1, None, 2)),
            "down": stored("down_proj"),
            "gate_bias": bias[::2],
            "up_bias": bias[1::2],
            "down_bias": ckpt.tensor(f"{prefix}.down_proj_bias")[expert],
        }

    def stored_form(self, ckpt: Checkpoint, block):
        return MXFP4


ExpertTensors = PerExpert | Fused | Stacked | Concatenated | Mxfp4


def _split_gate_up(gate_up: torch.Tensor, block, interleaved: bool) -> dict[str, torch.Tensor]:
    """gate and up from their stack [2I, ...] (rows, or a bias), or up alone for ungated experts."""
    if not block.gated:
        return {"up": gate_up}
    if interleaved:
        return {"gate": gate_up[::2], "up": gate_up[1::2]}
    return {"gate": gate_up[: block.intermediate_size], "up": gate_up[block.intermediate_size :]}


def _required(template: str | None, what: str) -> str:
    if template is None:
        raise LocalMoEError(f"the experts have biases but the family declares no {what} tensor for them")
    return template
