"""Nemotron-H (NemotronHForCausalLM: NVIDIA Nemotron 3 Nano/Super, Nemotron-H): a stack of blocks with one
mixer each, as `layers_block_type` (or the older `hybrid_override_pattern`) lists them: Mamba-2, attention
without position embeddings, a dense ungated MLP, or MoE. The MoE's experts are ungated (ReLU-squared by
default), optionally in a narrower latent space, routed as DeepSeek-V3 routes (sigmoid, correction bias,
groups), beside an ungated shared expert. Tensors are stored under `backbone.`.

Its multi-token-prediction layer (Nemotron 3 Super's: `mtp.layers.0` and `mtp.layers.1`) is loaded as `mtp`, for
drafts (see localmoe/models/mtp.py), as vLLM's nemotron_h_mtp.py builds it: the blocks
`mtp_layers_block_type` (or `mtp_hybrid_override_pattern`, "*E" in the release) lists, attention then MoE, one
after another between DeepSeek-V3's eh_proj over [enorm(embedding); hnorm(hidden)] (stored on the first
block) and a final norm (`final_layernorm`, stored on the last), whose output is passed on to the next draft
as vLLM's returns it (`NormedMTPLayer`). Its attention is the layer's only state:
the model's Mamba states are rolled back as every draft check's are."""

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from localmoe.errors import LocalMoEError
from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import Fused, PerExpert
from localmoe.models.family import Family, ModelArgs, MtpLayout, causal_lm
from localmoe.models.layers import CausalLM, Step, UngatedMLP, UpcastRMSNorm
from localmoe.models.mamba2 import Mamba2Mixer
from localmoe.models.moe import GatedActivation, GroupedTopKRouter, SparseMoE
from localmoe.models.mtp import NormedMTPLayer
from localmoe.models.state import NoState

# one letter per block in `hybrid_override_pattern`, and the older names of `layers_block_type`
PATTERN = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}
LEGACY_NAMES = {"mamba": "linear_attention", "attention": "full_attention"}
MTP_DEFAULT = ["full_attention", "moe"]  # transformers' default MTP blocks, and the release's


@dataclass
class NemotronHArgs(ModelArgs):
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {
        "n_routed_experts": ("num_local_experts",),
        "n_groups": ("mamba_n_groups",),
        "conv_kernel": ("mamba_d_conv",),
        "time_step_min": ("mamba_dt_min",),
        "use_conv_bias": ("mamba_conv_bias",),
        "layers_block_type": ("layer_types",),
    }

    vocab_size: int
    hidden_size: int
    layers_block_type: list[str] | None = None
    hybrid_override_pattern: str | None = None
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    head_dim: int = 128
    intermediate_size: int = 21504
    mlp_hidden_act: str = "relu2"
    mlp_bias: bool = False
    ssm_state_size: int = 128
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    mamba_hidden_act: str = "silu"
    n_groups: int = 8
    conv_kernel: int = 4
    time_step_min: float = 0.001
    use_conv_bias: bool = True
    use_bias: bool = False
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 7688
    moe_shared_expert_intermediate_size: int = 7688
    moe_latent_size: int | None = None
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    layer_norm_epsilon: float = 1e-5
    max_position_embeddings: int = 4096
    num_nextn_predict_layers: int = 0
    mtp_layers_block_type: list[str] | None = None
    mtp_hybrid_override_pattern: str | None = None
    rope: dict = field(default_factory=dict)  # unused: no layer has position embeddings

    @property
    def rms_norm_eps(self) -> float:
        return self.layer_norm_epsilon

    @property
    def tie_word_embeddings(self) -> bool:
        """Never: transformers 5.24 keeps Nemotron-H's LM head apart whatever the config says (it declares
        no tied weights, and save_pretrained writes lm_head.weight)."""
        return False

    @property
    def num_hidden_layers(self) -> int:
        return len(self.kinds())

    def kinds(self) -> list[str]:
        """Each block's mixer: linear_attention (Mamba-2), full_attention, mlp or moe."""
        if self.layers_block_type is None and self.hybrid_override_pattern is None:
            return ["linear_attention", "moe", "full_attention", "mlp"]  # transformers' default
        if self.layers_block_type is not None:
            kinds = [LEGACY_NAMES.get(kind, kind) for kind in self.layers_block_type]
        else:
            kinds = [PATTERN.get(letter, letter) for letter in self.hybrid_override_pattern]
        unknown = sorted(set(kinds) - set(PATTERN.values()))
        if unknown:
            raise LocalMoEError(f"config.json names block types localmoe does not know: {', '.join(unknown)}")
        return kinds

    def mtp_kinds(self) -> list[str]:
        """The blocks of each MTP layer, as transformers reads them: the list, else the pattern, else
        attention and MoE (its default, and the release's "*E")."""
        listed = [LEGACY_NAMES.get(kind, kind) for kind in self.mtp_layers_block_type or []]
        if listed and (listed != MTP_DEFAULT or self.mtp_hybrid_override_pattern is None):
            return listed
        if self.mtp_hybrid_override_pattern is not None:
            return [PATTERN.get(letter, letter) for letter in self.mtp_hybrid_override_pattern]
        return MTP_DEFAULT

    def _contradictions(self):
        yield from super()._contradictions()
        kinds = self.mtp_kinds()
        one_each = sorted(kinds) == sorted(set(kinds)) and "full_attention" in kinds
        if self.num_nextn_predict_layers and not (one_each and set(kinds) <= set(MTP_DEFAULT)):
            yield (
                f"lists MTP blocks {kinds}: localmoe builds them as vLLM's nemotron_h_mtp.py does from attention "
                "and MoE blocks, with one attention (its state) and at most one MoE per MTP layer"
            )


class Stateless:
    """What a block that mixes nothing across positions (MLP, MoE) answers where the model asks its token
    mixer about generation state."""

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> NoState:
        return NoState()

    def state_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 0

    def fixed_state_bytes(self, dtype: torch.dtype) -> int:
        return 0


class NemotronHBlock(nn.Module):
    """Pre-norm, the block's one mixer, a residual."""

    def __init__(self, mixer: nn.Module, hidden: int, eps: float):
        super().__init__()
        self.norm = UpcastRMSNorm(hidden, eps)
        self.mixer = mixer

    @property
    def self_attn(self):
        """The block's token mixer, as the model asks every layer for its generation state."""
        return self.mixer if hasattr(self.mixer, "new_state") else Stateless()

    def forward(self, h: torch.Tensor, step: Step, state) -> torch.Tensor:
        x = self.norm(h)
        return h + (self.mixer(x, step, state) if hasattr(self.mixer, "new_state") else self.mixer(x))


class MtpBlocks(nn.Module):
    """An MTP layer's decoder layer: its blocks one after another, the attention's state the layer's."""

    def __init__(self, blocks: list[NemotronHBlock]):
        super().__init__()
        self.layers = nn.ModuleList(blocks)

    @property
    def self_attn(self) -> nn.Module:
        return next(block.mixer for block in self.layers if hasattr(block.mixer, "new_state"))

    def forward(self, h: torch.Tensor, step: Step, state) -> torch.Tensor:
        for block in self.layers:
            h = block(h, step, state)
        return h


def build(args: NemotronHArgs) -> CausalLM:
    hidden = args.hidden_size

    def mixer(i: int, kind: str) -> nn.Module:
        if kind == "linear_attention":
            return Mamba2Mixer(
                hidden,
                heads=args.mamba_num_heads,
                head_dim=args.mamba_head_dim,
                state_size=args.ssm_state_size,
                groups=args.n_groups,
                kernel=args.conv_kernel,
                eps=args.layer_norm_epsilon,
                act=args.mamba_hidden_act,
                proj_bias=args.use_bias,
                conv_bias=args.use_conv_bias,
                dt_limit=(args.time_step_min, float("inf")),
            )
        if kind == "full_attention":
            kv_heads = args.num_key_value_heads or args.num_attention_heads
            return Attention(hidden, args.num_attention_heads, kv_heads, args.head_dim, rope=False)
        if kind == "mlp":
            return UngatedMLP(hidden, args.intermediate_size, args.mlp_hidden_act, bias=args.mlp_bias)
        router = GroupedTopKRouter(
            hidden,
            args.n_routed_experts,
            args.num_experts_per_tok,
            scoring="sigmoid",
            n_group=args.n_group,
            topk_group=args.topk_group,
            normalize=args.norm_topk_prob,
            scaling=args.routed_scaling_factor,
            correction_bias=True,
        )
        return SparseMoE(
            i,
            hidden,
            args.moe_intermediate_size,
            args.n_routed_experts,
            args.num_experts_per_tok,
            router,
            act=GatedActivation(kind="ungated", act=args.mlp_hidden_act),
            shared_expert=UngatedMLP(
                hidden, args.moe_shared_expert_intermediate_size, args.mlp_hidden_act, bias=args.mlp_bias
            ),
            latent=args.moe_latent_size,
            latent_bias=args.mlp_bias,
        )

    layers = [NemotronHBlock(mixer(i, kind), hidden, args.layer_norm_epsilon) for i, kind in enumerate(args.kinds())]
    # MTP layer k's MoE is layer num_hidden_layers + k of the expert cache
    mtp = [
        MtpBlocks(
            [NemotronHBlock(mixer(len(layers) + k, kind), hidden, args.layer_norm_epsilon) for kind in args.mtp_kinds()]
        )
        for k in range(args.num_nextn_predict_layers)
    ]
    return causal_lm(args, layers, args.head_dim, norm=UpcastRMSNorm, mtp=mtp, mtp_layer=NormedMTPLayer)


@dataclass(frozen=True)
class NemotronMtpLayout(MtpLayout):
    """The release's MTP layers, seen under DeepSeek-V3's names: MTP layer k's blocks are
    `mtp.layers.{k * blocks + j}` (vLLM's numbering; the release has one layer), the first holding enorm,
    hnorm and eh_proj, the last final_layernorm; the MoE block's experts are seen where the expert layouts
    look for layer num_hidden_layers + k's."""

    def aliases(self, config: dict[str, Any]) -> list[tuple[str, str]]:
        try:
            args = NemotronHArgs.from_config(config)
        except LocalMoEError:
            return []  # the config's own check refuses it
        kinds, first = args.mtp_kinds(), args.num_hidden_layers
        pairs = []
        for k in range(min(args.num_nextn_predict_layers, first)):
            ours, start = f"model.layers.{first + k}.", k * len(kinds)
            pairs += [(ours + name, f"mtp.layers.{start}.{name}") for name in ("enorm.", "hnorm.", "eh_proj.")]
            pairs.append((ours + "final_layernorm.", f"mtp.layers.{start + len(kinds) - 1}.final_layernorm."))
            for j, kind in enumerate(kinds):
                pairs.append((f"{ours}layers.{j}.", f"mtp.layers.{start + j}."))
                if kind == "moe":
                    experts = f"mtp.layers.{start + j}.mixer.experts."
                    pairs.append((f"backbone.layers.{first + k}.mixer.experts.", experts))
        return pairs


FAMILY = Family(
    architectures=("NemotronHForCausalLM",),
    model_type="nemotron_h",
    args=NemotronHArgs,
    model=build,
    experts=(
        PerExpert(
            {role: f"backbone.layers.{{layer}}.mixer.experts.{{expert}}.{role}_proj.weight" for role in ("up", "down")}
        ),
        Fused("model.layers.{layer}.mixer.experts.up_proj", "model.layers.{layer}.mixer.experts.down_proj"),
    ),
    # the Hub's names (backbone.), then transformers' in-memory ones
    hub_aliases=(
        ("model.embed_tokens.", "backbone.embeddings."),
        ("model.norm.", "backbone.norm_f."),
        ("model.layers.", "backbone.layers."),
        ("model.embed_tokens.", "model.embeddings."),
        ("model.norm.", "model.norm_f."),
        (".mixer.shared_expert.", ".mixer.shared_experts."),
    ),
    keep_float32=("e_score_correction_bias", "mixer.gate.weight"),
    mtp=NemotronMtpLayout("num_nextn_predict_layers", ()),
    example="nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16",
)
