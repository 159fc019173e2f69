"""`load` a checkpoint into an `Engine` that generates text: the entry point of the CLI and the API."""

import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import psutil
import torch

from localmoe.checkpoint import Checkpoint
from localmoe.errors import LocalMoEError
from localmoe.kernels import host_kernel, pair_kernel
from localmoe.kernels.quantized import MXFP4, QuantSpec, StoredFormat
from localmoe.loader import ModelParts, footprint, load_resident_weights, model_skeleton, open_checkpoint
from localmoe.models.moe import moe_blocks
from localmoe.runtime.cpu_experts import MISS_POLICIES, calibrated
from localmoe.runtime.expert_cache import POLICIES, ExpertCache
from localmoe.runtime.expert_store import ExpertStore, layout_of
from localmoe.runtime.generate import GenerationStats, generate_tokens
from localmoe.runtime.kv_cache import KVCache
from localmoe.runtime.memory import MemoryPlan, format_bytes, plan_memory
from localmoe.runtime.offload import OffloadedExperts
from localmoe.runtime.profile import RoutingProfile, default_profile_path, start_from_profile
from localmoe.runtime.quantized_cache import QuantizedLayers, cache_folder
from localmoe.runtime.resident import ResidentExperts
from localmoe.runtime.sampling import Sampler, SamplingParams
from localmoe.runtime.stats import cache_report
from localmoe.runtime.trace import RoutingTrace
from localmoe.tokenizer import StopStrings, Tokenizer


@dataclass
class RuntimeOptions:
    """How the runtime places the model: budgets, the expert cache and prefetch (the CLI's flags)."""

    vram_budget: int | None = None  # bytes for everything on the device; default: its free memory
    host_budget: int | None = None  # bytes of host RAM for the experts' host copy; default: what is available
    expert_slots: int | None = None  # overrides the plan's slot count
    policy: str = "score"
    pin_hot: int = 0  # experts pinned: the profile's hottest, or else those the first prompt used most
    profile: str | None = None  # routing profile: "auto" (this checkpoint's, in the cache folder), a file, or none
    prefetch: int = 1  # MoE layers to look ahead; 0 turns prefetch off
    prefetch_margin: int = 0  # experts predicted beyond the top-k
    context: int = 4096  # tokens of KV cache planned for (capped at the model's maximum)
    prefill_chunk: int = 512
    trace: Path | None = None  # write the routing of every token here (JSON lines)
    miss_policy: str = "auto"  # a miss is copied to the device, computed on the CPU, or whichever is faster
    kernels: str = "auto"  # the expert kernels: reference, triton, cpu, or the fastest that works here
    threads: int | None = None  # CPU threads (torch.set_num_threads); default: the physical cores
    expert_bits: int = 16  # 8 or 4: routed experts quantized group-wise, kept so on disk between runs
    expert_group_size: int = 64
    copy_bandwidth: float | None = None  # bytes/s for the miss policy's cost model; default: measured
    cpu_bandwidth: float | None = None


class Engine:
    """A model with its experts placed, its stop tokens and sampling defaults, and the checkpoint's
    tokenizer when text is used."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        parts: ModelParts,
        plan: MemoryPlan,
        experts: ResidentExperts | OffloadedExperts,
        options: RuntimeOptions,
        kernels: str = "reference",
    ):
        self.checkpoint = checkpoint
        self.parts = parts
        self.model = parts.model
        self.plan = plan
        self.experts = experts
        self.options = options
        self.kernels = kernels  # which expert kernels run, and why
        self.eos_ids = eos_ids(checkpoint)
        self.stats = GenerationStats()
        self._warmed_up = False
        self.profile_path: Path | None = None  # set by `load` when a routing profile is kept
        self.profile = RoutingProfile()
        self._profiled = Counter()  # what of the cache's token counts the profile has

    def save_profile(self) -> None:
        """Add the routing seen since the last save to the routing profile, and write it."""
        if self.profile_path is None:
            return
        counts = self.experts.cache.token_counts
        if any(counts[key] < n for key, n in self._profiled.items()):
            self._profiled = Counter()  # the cache was emptied since: its counts start again
        self.profile.add(counts - self._profiled, self.plan.footprint.top_k)
        self._profiled = Counter(counts)
        self.profile.save(self.profile_path)

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer(self.checkpoint.path)

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    def sampling(self, **overrides) -> SamplingParams:
        """The checkpoint's sampling defaults (generation_config.json) with `overrides` (None: keep)."""
        return SamplingParams.from_generation_config(self.checkpoint.generation_config, **overrides)

    def new_cache(self) -> KVCache:
        """A KV cache for the planned context, for conversations that keep theirs between turns."""
        return self.model.new_cache(1, self.plan.context)

    def generate_ids(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        *,
        cache: KVCache | None = None,
        reuse: int = 0,
        on_prefill: Callable[[], None] | None = None,
    ) -> Iterator[int]:
        """Token ids after `prompt` (greedy unless `sampling` says otherwise); `self.stats` describes the
        run as it goes. `cache` and `reuse`: see `generate_tokens`; `on_prefill` runs once the prompt is in."""
        self.stats = GenerationStats()

        def after_prefill() -> None:
            self._after_prefill()
            if on_prefill:
                on_prefill()

        tokens = generate_tokens(
            self.model,
            prompt,
            max_new_tokens,
            sampler=Sampler(sampling or SamplingParams(), self.device),
            eos_ids=self.eos_ids,
            stats=self.stats,
            cache=cache,
            reuse=reuse,
            context=self.plan.context,
            prefill_chunk=self.plan.prefill_chunk,
            on_prefill=after_prefill,
        )
        try:
            yield from tokens
        finally:
            if self.experts.trace:
                self.experts.trace.flush()

    def text(self, ids: Iterator[int], stop: Sequence[str] = ()) -> Iterator[str]:
        """Stream `ids` as text pieces, without EOS tokens, ending before the first of the `stop` strings."""
        stops = StopStrings(stop)
        for piece in self.tokenizer.stream(token for token in ids if token not in self.eos_ids):
            if text := stops.feed(piece):
                yield text
            if stops.stopped:
                ids.close()
                return
        if rest := stops.flush():
            yield rest

    def generate(
        self,
        prompt: str,
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
        *,
        chat: bool = False,
        raw: bool = False,
        system: str | None = None,
    ) -> Iterator[str]:
        """Stream the continuation of `prompt` as text; with `chat`, of the prompt as a user message
        rendered by the checkpoint's chat template; `raw`, of exactly its tokens, with no special token
        added (code completion). `sampling` defaults to the checkpoint's."""
        if chat:
            messages = [
                *([{"role": "system", "content": system}] if system else []),
                {"role": "user", "content": prompt},
            ]
            ids = self.tokenizer.encode_chat(messages)
        else:
            ids = self.tokenizer.encode(prompt, add_special_tokens=not raw)
        return self.text(self.generate_ids(ids, max_new_tokens, sampling or self.sampling()), stop)

    def summary(self) -> str:
        """One line: what was loaded, where, and how the experts are placed."""
        plan, fp = self.plan, self.plan.footprint
        home = {"none": "none needed", "pinned": "pinned RAM", "ram": "RAM", "mmap": "checkpoint files (mmap)"}
        model = self.checkpoint.part or self.parts.family.architectures[0]
        return (
            f"{self.checkpoint.path.name}: {model} on {plan.device}, {self.parts.dtype}; "
            f"resident {format_bytes(fp.resident_bytes)}; expert slots {plan.slots}/{fp.total_experts}; "
            f"experts' host copy: {home[plan.store]}; context {plan.context}{self._misses()}; "
            f"kernels: {self.kernels}; {torch.get_num_threads()} CPU threads"
        )

    def _misses(self) -> str:
        if not isinstance(self.experts, OffloadedExperts):
            return ""
        rates = self.experts.bandwidths
        measured = f" (copy {rates.copy / 1e9:.1f} GB/s, CPU {rates.cpu / 1e9:.1f} GB/s)" if rates else ""
        return f"; misses: {self.experts.miss_policy}{measured}"

    def cache_report(self) -> str:
        """The memory plan and, when experts are offloaded, the cache counters so far."""
        if isinstance(self.experts, ResidentExperts):
            return self.plan.describe() + "\nall experts resident: no expert is copied while generating"
        return self.plan.describe() + "\n" + cache_report(self.experts.cache)

    def resize_cache(self, slots: int) -> None:
        """Use `slots` of the expert pool allocated at load: grow or shrink it without reloading."""
        if not isinstance(self.experts, OffloadedExperts):
            raise LocalMoEError("every expert is resident on the device: there is no expert cache to resize")
        cache, top_k = self.experts.cache, self.plan.footprint.top_k
        allocated, least = cache.rows.shape[0], top_k + len(cache.pinned)
        if slots > allocated:
            raise LocalMoEError(
                f"the memory plan allocated {allocated} expert slots at start-up: {slots} do not fit; to have more, "
                "restart with a larger --vram-budget or --expert-slots"
            )
        if slots < least:
            raise LocalMoEError(
                f"{slots} slots leave no room for one layer's {top_k} experts beside the {len(cache.pinned)} "
                f"pinned: use at least {least}"
            )
        cache.resize(slots)

    def rewarm(self) -> None:
        """Let the next prompt be the warm-up again (after the cache was emptied)."""
        self._warmed_up = False

    def _after_prefill(self) -> None:
        # The first prompt is the warm-up that --pin-hot ranks experts by.
        if self.options.pin_hot and not self._warmed_up and isinstance(self.experts, OffloadedExperts):
            self.experts.pin_hottest(self.options.pin_hot)
        self._warmed_up = True


def load(
    source: str,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    options: RuntimeOptions | None = None,
) -> Engine:
    """Open a checkpoint (folder or Hub repo id) and place it on `device` as the memory plan says: the
    non-expert weights resident, the routed experts resident too when they fit, else in an expert cache
    fed from host RAM or the checkpoint files."""
    options = options or RuntimeOptions()
    device = resolve_device(device)
    torch.set_num_threads(options.threads or physical_cores())
    checkpoint = open_checkpoint(source, revision)
    parts = model_skeleton(checkpoint, dtype)
    plan = _plan(parts, device, options)
    load_resident_weights(parts, checkpoint, device)
    blocks = moe_blocks(parts.model)
    trace = RoutingTrace(options.trace, blocks[0].layer_idx) if options.trace else None
    quant = _quant(options)
    weights = quant or _stored_format(parts.experts)  # what the kernels will read
    kernel, kernels = pair_kernel(options.kernels, device, parts.dtype, [block.act for block in blocks], weights)
    quantized = QuantizedLayers(cache_folder(checkpoint, _quant_settings(quant, parts.dtype))) if quant else None
    if plan.all_resident:
        experts = ResidentExperts(parts.experts, device, parts.dtype, trace, kernel, quant, quantized)
    else:
        mode = "mmap" if plan.store == "mmap" else "ram"
        store = ExpertStore(parts.experts, parts.dtype, mode, device, quant, quantized)
        cache = ExpertCache(store, plan.slots, device, options.policy, layers=len(blocks))
        bandwidths = None
        # the CPU's share of the misses: on a CPU device the device's kernel, so both give the same bits;
        # copying all of them needs none (and no build of the CPU kernels)
        on_cpu = kernel if device.type == "cpu" else None if options.miss_policy == "copy" else host_kernel()
        if options.miss_policy == "auto":
            bandwidths = calibrated(
                store, cache.rows[0], blocks[0], on_cpu, options.copy_bandwidth, options.cpu_bandwidth
            )
        experts = OffloadedExperts(
            cache,
            blocks,
            prefetch=options.prefetch,
            margin=options.prefetch_margin,
            trace=trace,
            miss_policy=options.miss_policy,
            bandwidths=bandwidths,
            pair_outputs=kernel,
            host_kernel=on_cpu,
        )
    for block in blocks:
        block.experts = experts
    engine = Engine(checkpoint, parts, plan, experts, options, kernels)
    if options.profile and isinstance(experts, OffloadedExperts):
        _start_from_profile(engine, blocks)
    return engine


def physical_cores() -> int:
    """The CPU's cores, not counting the second thread of a hyper-threaded core (which adds little to
    memory-bound kernels and slows them by sharing a core's caches)."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _start_from_profile(engine: Engine, blocks) -> None:
    """Read the routing profile; warm the pool and pin from it where it has something to say."""
    options, cache = engine.options, engine.experts.cache
    path = default_profile_path(engine.checkpoint) if options.profile == "auto" else Path(options.profile)
    profile = RoutingProfile.load(path)
    profile.check({block.layer_idx for block in blocks}, blocks[0].num_experts, path)
    engine.profile_path, engine.profile = path, profile
    if options.pin_hot and profile.counts:
        cache.pin(profile.hottest()[: options.pin_hot])
        engine._warmed_up = True  # the profile stands in for the first prompt's warm-up
    start_from_profile(cache, profile)


def plan_for(
    source: str,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    options: RuntimeOptions | None = None,
) -> MemoryPlan:
    """The memory plan `load` would follow, without loading any weights; the device need not be here
    when `vram_budget` says how much memory it has."""
    options = options or RuntimeOptions()
    target = _parse_device(device) if device else resolve_device(None)
    if target.type == "cuda" and not torch.cuda.is_available() and options.vram_budget is None:
        raise LocalMoEError("this machine has no CUDA device: give --vram-budget to plan for one")
    return _plan(model_skeleton(open_checkpoint(source, revision), dtype), target, options)


def _quant(options: RuntimeOptions) -> QuantSpec | None:
    if options.expert_bits == 16:
        return None
    return QuantSpec(options.expert_bits, options.expert_group_size)


def _stored_format(source) -> StoredFormat | None:
    """The checkpoint's own quantized format where the runtime keeps its experts so."""
    if block := source.fp8_block:
        return StoredFormat("fp8", block)
    return MXFP4 if source.all_mxfp4 else None


def _quant_settings(quant: QuantSpec, dtype: torch.dtype) -> str:
    return f"bits={quant.bits} group={quant.group} dtype={dtype}"


def _plan(parts: ModelParts, device: torch.device, options: RuntimeOptions) -> MemoryPlan:
    fp = footprint(parts)
    layout = layout_of(parts.experts, _quant(options), parts.dtype)
    if layout.row_dtype is not None:  # quantized or MXFP4 byte rows: the plan counts their size
        fp = replace(fp, expert_bytes=layout.numel)
    plan = plan_memory(
        fp,
        device,
        vram_budget=options.vram_budget,
        host_budget=options.host_budget,
        expert_slots=options.expert_slots,
        context=options.context,
        prefill_chunk=options.prefill_chunk,
    )
    _check_options(options, plan)
    return plan


def _check_options(options: RuntimeOptions, plan: MemoryPlan) -> None:
    if options.policy not in POLICIES:
        raise LocalMoEError(f"unknown cache policy {options.policy!r}: choose one of {', '.join(POLICIES)}")
    if options.miss_policy not in MISS_POLICIES:
        raise LocalMoEError(f"unknown miss policy {options.miss_policy!r}: choose one of {', '.join(MISS_POLICIES)}")
    if any(rate is not None and rate <= 0 for rate in (options.copy_bandwidth, options.cpu_bandwidth)):
        raise LocalMoEError("--copy-bandwidth and --cpu-bandwidth must be positive")
    if options.prefetch < 0 or options.prefetch_margin < 0:
        raise LocalMoEError("--prefetch and --prefetch-margin cannot be negative")
    most = plan.slots - plan.footprint.top_k
    if options.pin_hot < 0 or (options.pin_hot > most and not plan.all_resident):
        raise LocalMoEError(
            f"--pin-hot {options.pin_hot} must leave one layer's {plan.footprint.top_k} experts of the "
            f"{plan.slots} slots free: use at most {max(most, 0)}, or more slots"
        )


def resolve_device(device: str | None) -> torch.device:
    """The requested device, or CUDA when present and the CPU otherwise."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = _parse_device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise LocalMoEError(f"{device} was asked for but this torch build sees no CUDA device: use --device cpu")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise LocalMoEError(f"{device} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return resolved


def _parse_device(device: str) -> torch.device:
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise LocalMoEError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise LocalMoEError(f"device {device!r} is not supported: use cpu, cuda or cuda:N")
    return parsed


def eos_ids(checkpoint: Checkpoint) -> frozenset[int]:
    """Every EOS id that generation_config.json lists, else config.json's."""
    value = checkpoint.generation_config.get("eos_token_id")
    if value is None:
        value = checkpoint.config.get("eos_token_id")
    if value is None:
        return frozenset()
    return frozenset(value if isinstance(value, list) else [value])
