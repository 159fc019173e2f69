"""Multi-token prediction layers, as DeepSeek-V3 ships them (its report, section 2.2) and the releases that
followed its design (GLM-4.5, Qwen3-Next, Qwen3.5, MiMo-V2-Flash): MTP layer k takes the hidden state h at
position i (layer k - 1's output there as it passes it on; for layer 0 the target's, after its final norm:
`CausalLM.mtp_hidden`) and the embedding e of token i + k + 1, computes eh_proj([enorm(e); hnorm(h)]) (the
embedding first), runs one decoder layer (with its own KV state) over that, and predicts token i + k + 2
through its own final norm and the model's shared embedding and LM head. The decoder layer is of the
family's own kind, or what the release's inference code makes it (MiMo-V2-Flash's: sliding-window attention
and a dense MLP). Where that code passes the layer's output on after its final norm, as transformers'
MtpModel, vLLM's deepseek_mtp.py (since its PR 45895) and SGLang's deepseek_nextn.py do and most families'
releases follow, `NormedMTPLayer` does; `MTPLayer` passes it on before that norm, as the published code of
Step-3.5/3.7 does (SGLang's chain_mtp_hidden_states), or where there is none (ERNIE); MiniMax-M3's too, whose
published MTP code was not at hand to say otherwise.

In memory the layers are `mtp.layers.{k}.{enorm,hnorm,eh_proj,block,shared_head.norm}`; they are read
from DeepSeek-V3's names, `model.layers.{num_hidden_layers + k}.*` (the decoder layer's tensors directly
under that prefix), which a release stored otherwise is seen under (see `MtpLayout` in family.py). DeepSeek-V3 also
stores a copy of the embedding and the LM head in each MTP layer; as SGLang does, the model's own are used
(the report: "the embedding layer and the output head ... are shared with the main model")."""

import torch
from torch import nn

from localmoe.models.layers import RMSNorm, Step


class SharedHead(nn.Module):
    """What an MTP layer keeps of the output head: its final norm (the LM head is the model's)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm


class MTPLayer(nn.Module):
    hidden_first = False  # Inkling's projects [hnorm(h); enorm(e)] (transformers' mtp_hidden_states_first)

    def __init__(self, block: nn.Module, hidden: int, eps: float, norm=RMSNorm):
        """`block`: the decoder layer, of the family's own kind (attention in `self_attn`)."""
        super().__init__()
        self.enorm = norm(hidden, eps)
        self.hnorm = norm(hidden, eps)
        self.eh_proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.block = block
        self.shared_head = SharedHead(norm(hidden, eps))

    def forward(self, h: torch.Tensor, embedded: torch.Tensor, step: Step, kv) -> torch.Tensor:
        """The layer's output [B, T, E] before its final norm, for hidden states h and the next tokens'
        embeddings `embedded`, both [B, T, E]."""
        normed = [self.enorm(embedded), self.hnorm(h)]
        return self.block(self.eh_proj(torch.cat(normed[:: -1 if self.hidden_first else 1], dim=-1)), step, kv)


class NormedMTPLayer(MTPLayer):
    """An MTP layer whose output passes its final norm (`final_layernorm`) before it is passed on, to the LM
    head as it is and to the next draft as its hidden state, as LongCat-Flash's (vLLM's longcat_flash_mtp.py,
    SGLang's longcat_flash_nextn.py) and Hy3's (vLLM's hy_v3_mtp.py) published code returns it."""

    def __init__(self, block: nn.Module, hidden: int, eps: float, norm=RMSNorm):
        super().__init__(block, hidden, eps, norm)
        self.final_layernorm = norm(hidden, eps)
        self.shared_head = SharedHead(nn.Identity())

    def forward(self, h: torch.Tensor, embedded: torch.Tensor, step: Step, kv) -> torch.Tensor:
        return self.final_layernorm(super().forward(h, embedded, step, kv))


class MultiTokenPredictor(nn.Module):
    """A checkpoint's MTP layers, the first of which follows decoder layer `first_layer` - 1."""

    def __init__(self, layers: list[MTPLayer], first_layer: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.first_layer = first_layer

    def stored_name(self, name: str) -> str:
        """DeepSeek-V3's name of parameter `name` (relative to this module, `layers.{k}.*`)."""
        _, depth, rest = name.split(".", 2)
        return f"model.layers.{self.first_layer + int(depth)}.{rest.removeprefix('block.')}"
