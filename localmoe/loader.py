"""Checkpoint + family -> a model with its resident weights loaded, and its routed experts left on disk.

Everything the checkpoint must provide is checked against the shard headers before a byte of weights
is read, so a missing or misshapen tensor fails at once with its name. A tensor the model needs is
never invented: where transformers would initialise it randomly and carry on, localmoe refuses.
"""

from dataclasses import dataclass

import torch
from torch import nn

from localmoe.checkpoint import Checkpoint
from localmoe.errors import LocalMoEError
from localmoe.models import family_for
from localmoe.models.family import Family, ModelArgs
from localmoe.models.moe import ExpertNames, SparseMoE, moe_blocks

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module
    experts: "ExpertSource"
    family: Family
    args: ModelArgs
    dtype: torch.dtype


def load_model(ckpt: Checkpoint, device: torch.device | str, dtype: torch.dtype | None = None) -> LoadedModel:
    """Build the checkpoint's model on `device` with every non-expert weight loaded.

    Routed experts are not loaded: the returned `ExpertSource` reads them on demand, and the runtime
    decides where they live and binds them to the model's MoE blocks.
    """
    family = family_for(ckpt.config)
    args = family.args.from_config(ckpt.config)
    with torch.device("meta"):
        model = family.model(args)
    sources = _resident_sources(model, ckpt, family)
    experts = ExpertSource(ckpt, family.experts, moe_blocks(model))
    dtype = dtype or checkpoint_dtype(ckpt)
    state = {name: _to(ckpt.tensor(source), device, dtype) for name, source in sources.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device)  # the buffers computed at construction (rotary frequencies)
    model.requires_grad_(False).eval()
    return LoadedModel(model, experts, family, args, dtype)


def checkpoint_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The dtype the config declares (`dtype`, or `torch_dtype` in older configs), else the first the
    weights use, else float32."""
    declared = ckpt.config.get("dtype") or ckpt.config.get("torch_dtype")
    if declared in DTYPES:
        return DTYPES[declared]
    for name in ckpt.tensor_names:
        if (dtype := ckpt.info(name).dtype) in DTYPES.values():
            return dtype
    return torch.float32


def _to(tensor: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    # copy=True: the result must own its memory, not alias the read-only mapping of the shard.
    return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype, copy=True)


def _resident_sources(model: nn.Module, ckpt: Checkpoint, family: Family) -> dict[str, str]:
    """Parameter name -> checkpoint tensor name, for every parameter; shapes checked."""
    sources = {}
    for name, param in model.named_parameters():
        candidates = family.disk_names(name)
        found = next((c for c in candidates if c in ckpt), None)
        if found is None:
            raise LocalMoEError(
                f"{ckpt.path} lacks tensor {candidates[0]}, which {family.architectures[0]} needs: the checkpoint "
                "is incomplete or its index is damaged; download it again"
            )
        _check_shape(ckpt, found, tuple(param.shape))
        sources[name] = found
    return sources


def _check_shape(ckpt: Checkpoint, name: str, expected: tuple[int, ...]) -> None:
    shape = ckpt.info(name).shape
    if shape != expected:
        raise LocalMoEError(
            f"tensor {name} in {ckpt.path} has shape {list(shape)} but config.json implies {list(expected)}: "
            "the config and the weights do not belong together"
        )


class ExpertSource:
    """The routed experts of a checkpoint, read one expert at a time as memory-mapped views.

    Whatever the file layout (one tensor per expert and role, or one fused tensor per layer), an
    expert comes back as roles gate and up [I, E] and down [E, I].
    """

    def __init__(self, ckpt: Checkpoint, names: ExpertNames, blocks: list[SparseMoE]):
        self.ckpt = ckpt
        self.names = names
        self.blocks = {block.layer_idx: block for block in blocks}
        self.fused = {layer: self._check_layer(block) for layer, block in self.blocks.items()}

    @property
    def layers(self) -> list[int]:
        return list(self.blocks)

    def read(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        if self.fused[layer]:
            inter = self.blocks[layer].intermediate_size
            gate_up = self.ckpt.tensor(self.names.fused["gate_up"].format(layer=layer))[expert]
            down = self.ckpt.tensor(self.names.fused["down"].format(layer=layer))[expert]
            return {"gate": gate_up[:inter], "up": gate_up[inter:], "down": down}
        return {
            role: self.ckpt.tensor(template.format(layer=layer, expert=expert))
            for role, template in self.names.per_expert.items()
        }

    def _check_layer(self, block: SparseMoE) -> bool:
        """Check every expert tensor of a layer; True where the layer is stored fused."""
        layer, hidden, inter, count = (
            block.layer_idx,
            block.hidden_size,
            block.intermediate_size,
            block.num_experts,
        )
        first = self.names.per_expert["gate"].format(layer=layer, expert=0)
        fused = {key: template.format(layer=layer) for key, template in self.names.fused.items()}
        if first not in self.ckpt and fused and all(name in self.ckpt for name in fused.values()):
            _check_shape(self.ckpt, fused["gate_up"], (count, 2 * inter, hidden))
            _check_shape(self.ckpt, fused["down"], (count, hidden, inter))
            return True
        shapes = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
        for expert in range(count):
            for role, template in self.names.per_expert.items():
                name = template.format(layer=layer, expert=expert)
                if name not in self.ckpt:
                    raise LocalMoEError(
                        f"{self.ckpt.path} lacks expert tensor {name}: the checkpoint is incomplete or its index "
                        "is damaged; download it again"
                    )
                _check_shape(self.ckpt, name, shapes[role])
        return False
