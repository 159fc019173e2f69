"""The runtime's settings, one default each, read from what users write: the CLI's flags and the keywords
of `localmoe.load` share the names, units and spellings here. No torch import: the CLI builds its flags
and its help from this module alone, so `localmoe --help` starts at once."""

import re
from dataclasses import dataclass
from pathlib import Path

from localmoe.errors import LocalMoEError, setting

UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
BINARY_UNITS = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*", re.IGNORECASE)
DEFAULT_CONTEXT = 4096  # tokens of KV cache when none is asked for (fewer where the model allows fewer)
GENERATE_TOKENS = 128  # new tokens by default: `Engine.generate` and `stream`, `localmoe generate`
CHAT_TOKENS = 1024  # per answer by default: `Engine.chat`, `localmoe chat`
EXPERT_BITS = (16, 8, 4)
GIGA = 1e9  # bandwidths are written in GB/s
CUDA_GRAPHS = ("auto", "on", "off")
# what drafts the tokens that speculative decoding checks: the checkpoint's multi-token-prediction layers,
# n-gram matches in the prompt and the output so far, or nothing (plain decoding)
SPECULATIVE = ("mtp", "lookup", "off")
DRAFT_TOKENS = 4  # drafted tokens checked per forward pass by default: a choice, not a measured optimum
MOST_DRAFT_TOKENS = 64  # a draft rolls back within the rings' rewind slack (models.state.REWIND_SLACK)


def parse_size(text: str) -> int:
    """Bytes from '24GiB', '512MiB', '1.5G' (binary), '24GB' (decimal) or '4096B'. A bare number is refused:
    '--vram-budget 12' meant as gigabytes would otherwise plan for 12 bytes."""
    match = SIZE.fullmatch(text)
    if not match:
        raise LocalMoEError(f"cannot read the size {text!r}: write it like 12GiB, 512MiB or 24GB")
    number, unit, binary, byte = float(match[1]), match[2].lower(), match[3], match[4]
    if not unit and not byte:
        raise LocalMoEError(
            f"the size {text!r} has no unit: write {text.strip()}GiB, {text.strip()}GB or, in bytes, {text.strip()}B"
        )
    # A bare K/M/G/T means the binary unit, as memory sizes usually do; GB is decimal.
    if binary or (unit and not byte):
        return int(number * BINARY_UNITS[unit])
    return int(number * UNITS[unit])


@dataclass
class RuntimeOptions:
    """How the runtime places the model: budgets, the expert cache and prefetch. Each field is a flag of the
    CLI (`vram_budget`: `--vram-budget`) and a keyword of `localmoe.load`, and takes what the flag takes:
    sizes as bytes or as text with a unit ("12GiB"), bandwidths in GB/s, `expert_bits` as 4 or "4"."""

    vram_budget: int | str | None = None  # bytes for everything on the device; default: its free memory
    host_budget: int | str | None = None  # bytes of host RAM for the experts' host copy; default: what is available
    expert_slots: int | None = None  # overrides the plan's slot count
    policy: str = "score"  # one of POLICIES
    pin_hot: int = 0  # experts pinned: the profile's hottest, or else those the first prompt used most
    profile: str | Path | None = None  # routing profile: "auto" (this checkpoint's, in the cache folder), a file,
    # or none ("off")
    prefetch: int | None = None  # MoE layers to look ahead; None: 1 where the miss policy decides on the host,
    # else 0; 0 turns prefetch off
    prefetch_margin: int = 0  # experts predicted beyond the top-k
    context: int | None = None  # tokens of KV cache; default: DEFAULT_CONTEXT, or the model's maximum if smaller
    prefill_chunk: int = 512
    trace: str | Path | None = None  # write the routing of every token here (JSON lines)
    miss_policy: str | None = None  # one of MISS_POLICIES; None: direct where the host copy can be read in place,
    # else copy
    kernels: str = "auto"  # one of KERNELS: reference, triton (CUDA), cpu (compiled CPU kernels), or the fastest here
    threads: int | None = None  # CPU threads (torch.set_num_threads); default: the physical cores
    cuda_graphs: str = "auto"  # one of CUDA_GRAPHS: decode steps captured as CUDA graphs
    expert_bits: int | str = 16  # 8 or 4: routed experts quantized group-wise, kept so on disk between runs
    expert_group_size: int | None = None  # columns per scale, with expert_bits 8 or 4; default: the largest up to
    # 64 that divides the experts' widths
    copy_bandwidth: float | None = None  # GB/s for the miss policy's cost model; default: measured
    cpu_bandwidth: float | None = None
    speculative: str | None = None  # one of SPECULATIVE; None: mtp where the checkpoint has MTP layers, else off
    draft_tokens: int | None = None  # at most this many drafted tokens checked per forward pass; None: DRAFT_TOKENS

    def __post_init__(self):
        for name in ("vram_budget", "host_budget"):
            if isinstance(value := getattr(self, name), str):
                setattr(self, name, parse_size(value))
        if self.profile == "off":
            self.profile = None
        if isinstance(self.trace, str):
            self.trace = Path(self.trace)
        if str(self.expert_bits) not in {str(bits) for bits in EXPERT_BITS}:
            raise LocalMoEError(f"{setting('expert_bits')} {self.expert_bits} is not supported: use 16, 8 or 4")
        self.expert_bits = int(self.expert_bits)
        if self.speculative is not None and self.speculative not in SPECULATIVE:
            raise LocalMoEError(
                f"unknown {setting('speculative')} {self.speculative!r}: choose one of {', '.join(SPECULATIVE)}"
            )
        draft = self.draft_tokens
        if draft is not None and (
            not isinstance(draft, int) or isinstance(draft, bool) or not 1 <= draft <= MOST_DRAFT_TOKENS
        ):
            raise LocalMoEError(
                f"{setting('draft_tokens')} must be an integer from 1 to {MOST_DRAFT_TOKENS}, not {draft!r}"
            )
        if any(rate is not None and not rate > 0 for rate in (self.copy_bandwidth, self.cpu_bandwidth)):
            raise LocalMoEError(f"{setting('copy_bandwidth')} and {setting('cpu_bandwidth')} must be positive (GB/s)")

    @classmethod
    def named(cls, settings: dict) -> "RuntimeOptions":
        """Options from keywords, refusing a name that is no setting in one line."""
        fields = cls.__dataclass_fields__
        if unknown := sorted(set(settings) - set(fields)):
            raise LocalMoEError(f"unknown setting {unknown[0]!r}: the settings are {', '.join(fields)}")
        return cls(**settings)

    def bandwidths(self) -> tuple[float | None, float | None]:
        """The copy and CPU bandwidths given, in bytes/s (None: measure)."""
        return tuple(None if rate is None else rate * GIGA for rate in (self.copy_bandwidth, self.cpu_bandwidth))
