"""GLM-5 (GlmMoeDsaForCausalLM): DeepSeek-V3.2's sparse latent attention (deepseek_v32.py), with the
indexer rotating adjacent pairs, and layers marked "shared" reusing the selection of the last layer
that computed one. The multi-token-prediction layer after the last one in the checkpoint
(`model.layers.{num_hidden_layers}`) is loaded as `mtp`, for drafts, computing its own selection (its
indexer's tensors are in the release; vLLM's deepseek_mtp.py runs it as a V3.2 layer with its indexer)."""

from dataclasses import dataclass

from torch import nn

from localmoe.errors import LocalMoEError
from localmoe.models.deepseek_v32 import KEEP_FLOAT32, DeepseekV32Args, SparseLatentAttention, build_with_mtp
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import DEEPSEEK_MTP, Family
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS


@dataclass
class GlmMoeDsaArgs(DeepseekV32Args):
    moe_intermediate_size: int = 2048
    n_group: int | None = 1
    topk_group: int | None = 1
    first_k_dense_replace: int = 3
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 2048
    qk_nope_head_dim: int = 192
    v_head_dim: int = 256
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 202752
    index_n_heads: int = 32
    indexer_types: list[str] | None = None
    index_topk_pattern: str | list[str] | None = None
    index_topk_freq: int | None = None
    index_skip_topk_offset: int = 2

    def __post_init__(self):
        super().__post_init__()
        if self.indexer_types is None:
            self.indexer_types = [self._indexer_type(i) for i in range(self.num_hidden_layers)]
        if self.indexer_types and self.indexer_types[0] != "full":
            raise LocalMoEError("GLM-5's first layer must compute its own sparse-attention selection (indexer 'full')")

    def _indexer_type(self, i: int) -> str:
        pattern = self.index_topk_pattern
        if isinstance(pattern, str):
            return {"F": "full", "S": "shared"}[pattern[i]]
        if isinstance(pattern, list):
            return pattern[i]
        freq = max(self.index_topk_freq or 1, 1)
        return "full" if max(i - self.index_skip_topk_offset + 1, 0) % freq == 0 else "shared"

    @property
    def interleaved_index_rope(self) -> bool:
        return True

    def attention(self, i: int) -> nn.Module:
        """Layer i's: its own selection where indexer_types says "full", or for an MTP layer (past the list)."""
        return SparseLatentAttention(self, i >= len(self.indexer_types) or self.indexer_types[i] == "full")


FAMILY = Family(
    architectures=("GlmMoeDsaForCausalLM",),
    model_type="glm_moe_dsa",
    args=GlmMoeDsaArgs,
    model=build_with_mtp,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    hub_aliases=((".mlp.shared_expert.", ".mlp.shared_experts."),),
    keep_float32=KEEP_FLOAT32,
    mtp=DEEPSEEK_MTP,
    example="zai-org/GLM-5",
)
