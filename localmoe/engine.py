"""`load` a checkpoint into an `Engine` that generates text: the entry point of the CLI and the API.

Loading is two steps: `prepare` (open the checkpoint, build the model skeleton, plan memory, choose the
row layout; no weights read) and `place` (load the weights, fill the host store and the slots, bind the
experts). `plan` and the CLI's disk-speed check look at a preparation before anything is placed.
"""

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import psutil
import torch

from localmoe.checkpoint import Checkpoint
from localmoe.errors import LocalMoEError, setting
from localmoe.files import sweep_temporaries
from localmoe.grammar import ANY_OBJECT, JsonConstraint
from localmoe.kernels import KERNELS, host_kernel, pair_kernel
from localmoe.kernels.quantized import QuantSpec
from localmoe.kernels.reference import expert_pair_outputs
from localmoe.loader import DTYPES, ModelParts, footprint, load_resident_weights, model_skeleton, open_checkpoint
from localmoe.models.expert_source import ExpertSource
from localmoe.models.layers import host_tables
from localmoe.models.moe import MoESpec, moe_blocks
from localmoe.models.state import KVCache
from localmoe.options import CHAT_TOKENS, CUDA_GRAPHS, DRAFT_TOKENS, GENERATE_TOKENS, RuntimeOptions
from localmoe.paths import cache_dir
from localmoe.runtime.cpu_experts import Bandwidths, calibrated
from localmoe.runtime.expert_cache import POLICIES, ExpertCache, SlotTable
from localmoe.runtime.expert_store import ExpertStore, quantized_here
from localmoe.runtime.generate import GenerationStats, StepHooks, check_fits, generate_tokens
from localmoe.runtime.layouts import layout_of
from localmoe.runtime.memory import MemoryPlan, Speculating, format_bytes, format_rate, plan_memory
from localmoe.runtime.miss_policy import DEFAULT, FALLBACK, MISS_POLICIES, miss_policy
from localmoe.runtime.offload import OffloadedExperts
from localmoe.runtime.profile import default_profile_path
from localmoe.runtime.quantized_cache import QuantizedLayers, cache_folder
from localmoe.runtime.resident import ResidentExperts
from localmoe.runtime.sampling import Constraint, Sampler, SamplingParams
from localmoe.runtime.speculative import DRAFTERS, Drafter
from localmoe.runtime.stats import CacheSnapshot, cache_report
from localmoe.runtime.trace import RoutingTrace
from localmoe.tokenizer import StopStrings, Tokenizer

# where the plan keeps the experts' host copy and the lookup tables, in the load summary
HOMES = {"none": "none needed", "pinned": "pinned RAM", "ram": "RAM", "mmap": "checkpoint files (mmap)"}


def fit_new_tokens(
    prompt_tokens: int, asked: int | None, default: int, plan: MemoryPlan, name: str = "max_new_tokens"
) -> int:
    """New tokens for a generation: those `asked` (by the setting `name`), refused when the prompt and they
    overflow the planned context (never cut short); where none are asked, `default`, lowered to what the
    context leaves."""
    new_tokens = max(min(default, plan.context - prompt_tokens), 1) if asked is None else asked
    check_fits(prompt_tokens, new_tokens, plan.context, plan.footprint.max_positions, name)
    return new_tokens


def encode_prompt(tokenizer: Tokenizer, prompt: str | list[dict], raw: bool = False) -> list[int]:
    """Token ids of a text prompt (with the special tokens the tokenizer adds, unless `raw`), or of a list
    of messages rendered by the chat template."""
    if isinstance(prompt, list):
        if raw:
            raise LocalMoEError("raw encodes text as written: a list of messages goes through the chat template")
        return tokenizer.encode_chat(prompt)
    if not isinstance(prompt, str):
        raise LocalMoEError(f"the prompt is a {type(prompt).__name__}: give text or a list of messages")
    return tokenizer.encode(prompt, add_special_tokens=not raw)


class Engine:
    """A model with its experts placed, its stop tokens and sampling defaults, and the checkpoint's
    tokenizer when text is used. Callers learn about the expert cache from `expert_cache` (None when every
    expert is resident), `miss_policy` and `bandwidths`, and change it with `reconfigure`."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        parts: ModelParts,
        plan: MemoryPlan,
        experts: ResidentExperts,
        options: RuntimeOptions,
        kernels: str = "reference",
        offloaded: OffloadedExperts | None = None,
        tokenizer: Tokenizer | None = None,
        graphs_barred: list[str] = (),
    ):
        """`experts` computes the routed experts; `offloaded`, the same object when they go through the
        expert cache, else None; `tokenizer`, the checkpoint's where it was read already. `graphs_barred`:
        why decode steps cannot be CUDA graphs, whatever the miss policy (none: they can)."""
        self.checkpoint = checkpoint
        self.parts = parts
        self.model = parts.model
        self.plan = plan
        self.experts = experts
        self._offloaded = offloaded
        self.options = options
        self.kernels = kernels  # which expert kernels run, and why
        self._graphs_barred = list(graphs_barred)
        self.eos_ids = eos_ids(checkpoint)
        self.speculative = speculation(options, self.model)  # what drafts tokens: one of SPECULATIVE
        self.stats = GenerationStats()
        self._tokenizer = tokenizer
        self.sampler: Sampler | None = None  # the last run's, with its record of log-probabilities

    def use_device(self) -> None:
        """Make the engine's CUDA device the current one of the calling thread (the current device is per
        thread: a worker thread that generates calls this first); nothing on the CPU."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def close(self) -> None:
        """Release what outlives the Python objects: the experts' host copy is unpinned. The engine is not
        used after."""
        if self._offloaded is not None:
            self._offloaded.cache.store.close()

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.checkpoint.path)
        return self._tokenizer

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
        constraint: Constraint | None = None,
        top_logprobs: int | None = None,
        drafter: Drafter | None = None,
        draft_tokens: int | None = None,
        speculative: bool = True,
    ) -> Iterator[int]:
        """Token ids after `prompt` (greedy unless `sampling` says otherwise); `self.stats` describes the
        run as it goes. `cache` and `reuse`: see `generate_tokens`; `on_prefill` runs once the prompt is in.
        A `constraint` (`json_constraint`) limits the tokens and ends the run once complete; with
        `top_logprobs`, `self.sampler.steps` records each token's log-probabilities as it comes. Decoding
        is speculative where the options say so (`self.speculative`), or with the `drafter` given, checking
        up to `draft_tokens` (default: the options') per forward pass; plain where not `speculative`."""
        self.stats = stats = GenerationStats()
        drafter = (drafter or self.new_drafter()) if speculative else None
        runtime = self._offloaded
        loaded_before = 0
        self.sampler = sampler = Sampler(
            sampling or SamplingParams(), self.device, constraint=constraint, top_logprobs=top_logprobs
        )

        def after_prefill() -> None:
            nonlocal loaded_before
            if runtime is not None:
                runtime.after_prefill()
                runtime.settle()  # the prompt's experts are not counted as the decode's
                loaded_before = runtime.cache.totals().loaded
            if on_prefill:
                on_prefill()

        tokens = generate_tokens(
            self.model,
            prompt,
            max_new_tokens,
            sampler=sampler,
            eos_ids=self.eos_ids,
            stats=self.stats,
            cache=cache,
            reuse=reuse,
            context=self.plan.context,
            prefill_chunk=self.plan.prefill_chunk,
            on_prefill=after_prefill,
            hooks=self._step_hooks(),
            graphs=not self.graphs_barred(),
            drafter=drafter,
            draft_tokens=draft_tokens or self.options.draft_tokens or DRAFT_TOKENS,
        )
        try:
            for token in tokens:
                yield token
                if sampler.finished:
                    break
        finally:
            tokens.close()
            if runtime is not None:
                runtime.settle()
                stats.experts_loaded = runtime.cache.totals().loaded - loaded_before
            if self.experts.trace:
                self.experts.trace.flush()

    def new_drafter(self) -> Drafter | None:
        """A drafter for one generation, as `self.speculative` says (None: plain decoding)."""
        drafts = self.options.draft_tokens or DRAFT_TOKENS
        graphs = not self.graphs_barred()
        return DRAFTERS[self.speculative](self.model, self.plan.context, self._step_hooks(), drafts, graphs)

    def _step_hooks(self) -> StepHooks | None:
        """What runs around each forward step: the expert cache's, where experts are offloaded."""
        runtime = self._offloaded
        return None if runtime is None else StepHooks(runtime.begin_step, runtime.end_step, runtime.step_tokens)

    def graphs_barred(self) -> list[str]:
        """Why decode steps run eagerly, not as CUDA graphs (empty: they are captured)."""
        barred = list(self._graphs_barred)
        if self._offloaded is not None and not self._offloaded.miss_policy.in_place:
            barred.append(f"the {self.miss_policy} miss policy reads the routing on the host at every layer")
        if self.options.cuda_graphs == "on" and barred:
            raise LocalMoEError(
                f"{setting('cuda_graphs')} on: decode steps cannot be captured here: {'; '.join(barred)}"
            )
        return barred if self.options.cuda_graphs != "off" else ["off as asked"]

    def json_constraint(self, schema: dict | None = None) -> JsonConstraint:
        """Output that is JSON valid under `schema` (any JSON object without one), for `generate_ids`."""
        tokenizer = self.tokenizer
        eos = min(self.eos_ids, default=tokenizer.token_id(tokenizer.special_tokens.get("eos_token", "")) or 0)
        vocab = max(self.model.model.embed_tokens.weight.shape[0], tokenizer.vocab_size)
        return JsonConstraint(self.checkpoint.path / "tokenizer.json", vocab, eos, schema or ANY_OBJECT)

    def text(
        self, ids: Iterator[int], stop: Sequence[str] | StopStrings = (), keep: frozenset[int] = frozenset()
    ) -> Iterator[str]:
        """Stream `ids` as text pieces, without EOS tokens, ending before the first of the `stop` strings
        (given as StopStrings, it tells which one matched); special tokens are left out but for those in
        `keep`."""
        stops = stop if isinstance(stop, StopStrings) else StopStrings(stop)
        for piece in self.tokenizer.stream((token for token in ids if token not in self.eos_ids), keep):
            if text := stops.feed(piece):
                yield text
            if stops.stopped:
                ids.close()
                return
        if rest := stops.flush():
            yield rest

    def stream(
        self,
        prompt: str | list[dict],
        max_new_tokens: int | None = None,
        *,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        raw: bool = False,
        json_schema: dict | None = None,
    ) -> Iterator[str]:
        """Stream the continuation of `prompt` as text pieces. A list of messages ({"role": ..., "content":
        ...}) goes through the checkpoint's chat template; text is encoded with the special tokens the
        tokenizer adds (BOS), or, `raw`, with none (code completion). `max_new_tokens` left out:
        GENERATE_TOKENS, or what the context leaves where that is less. A sampling setting left out keeps
        the checkpoint's (generation_config.json: greedy unless it sets do_sample); temperature 0 is greedy.
        The text ends at an EOS token or before the first `stop` string; `self.stats` times the run. With
        `json_schema`, the text is JSON that the schema validates (needs localmoe[json])."""
        ids = self.prompt_ids(prompt, raw)
        new_tokens = fit_new_tokens(len(ids), max_new_tokens, GENERATE_TOKENS, self.plan)
        sampling = self.sampling(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
        )
        constraint = self.json_constraint(json_schema) if json_schema is not None else None
        tokens = self.generate_ids(ids, new_tokens, sampling, constraint=constraint)
        return self.text(tokens, [stop] if isinstance(stop, str) else stop)

    def generate(self, prompt: str | list[dict], max_new_tokens: int | None = None, **settings) -> str:
        """The continuation of `prompt`, whole: `stream`'s text joined (same arguments)."""
        return "".join(self.stream(prompt, max_new_tokens, **settings))

    def chat(self, messages: list[dict], max_new_tokens: int | None = None, **settings) -> str:
        """The assistant's answer to `messages`, rendered by the chat template: `generate` with up to
        CHAT_TOKENS new tokens by default (as `localmoe chat`)."""
        if not isinstance(messages, list):
            raise LocalMoEError("chat takes a list of messages such as [{'role': 'user', 'content': 'Hi'}]")
        if max_new_tokens is None:
            max_new_tokens = fit_new_tokens(len(self.prompt_ids(messages)), None, CHAT_TOKENS, self.plan)
        return self.generate(messages, max_new_tokens, **settings)

    def prompt_ids(self, prompt: str | list[dict], raw: bool = False) -> list[int]:
        """Token ids of a text prompt, or of a list of messages rendered by the chat template."""
        return encode_prompt(self.tokenizer, prompt, raw)

    def expert_cache(self) -> CacheSnapshot | None:
        """The expert cache's slots and counters so far, or None when every expert is resident."""
        return None if self._offloaded is None else self._offloaded.snapshot()

    @property
    def miss_policy(self) -> str | None:
        """What a miss does (None: every expert is resident, there are no misses)."""
        return None if self._offloaded is None else str(self._offloaded.miss_policy)

    def can_use(self, miss_policy: str) -> bool:
        """Whether the expert cache can run this miss policy (direct needs a host copy it can read in place)."""
        if self._offloaded is None:
            return False
        return not MISS_POLICIES[miss_policy].in_place or self._offloaded.cache.store.readable_in_place

    @property
    def bandwidths(self) -> Bandwidths | None:
        """The copy and CPU bandwidths the miss policy weighs, where it weighs them."""
        return None if self._offloaded is None else getattr(self._offloaded.miss_policy, "bandwidths", None)

    def summary(self) -> str:
        """One line: what was loaded, where, and how the experts are placed; then a line for each thing the
        plan changed from what was asked, and any warning about the kernels."""
        plan, fp = self.plan, self.plan.footprint
        model = self.checkpoint.part or self.parts.family.name
        barred = self.graphs_barred()
        decode = "static steps" if self.model.static_decode else "eager (the model has layers without static steps)"
        graphs = "CUDA graphs" if not barred else f"no CUDA graphs ({'; '.join(barred)})"
        return (
            f"{self.checkpoint.name}: {model} on {plan.device}, {self.parts.dtype}; "
            f"resident {format_bytes(fp.resident_bytes)}; expert slots {plan.slots}/{fp.total_experts}; "
            f"experts' host copy: {HOMES[plan.store]}{self._tables()}; context {plan.context}{self._misses()}; "
            f"kernels: {self.kernels}; {torch.get_num_threads()} CPU threads; decode: {decode}, {graphs}"
            f"{self._speculation()}"
        ) + "".join(f"\n{notice}" for notice in plan.notices)

    def _tables(self) -> str:
        if self.plan.tables is None:
            return ""
        return f"; lookup tables ({format_bytes(self.plan.footprint.host_table_bytes)}): {HOMES[self.plan.tables]}"

    def _speculation(self) -> str:
        if self.speculative == "off":
            return ""
        drafts = self.options.draft_tokens or DRAFT_TOKENS
        checks = "static steps" if self.model.static_decode else "eager"
        barred = self.drafts_barred()
        mtp = "" if self.speculative != "mtp" else "; MTP drafts: " + (f"eager ({barred[0]})" if barred else checks)
        return f"; speculative: {self.speculative}, up to {drafts} drafted tokens per check (checks: {checks}{mtp})"

    def drafts_barred(self) -> list[str]:
        """Why the MTP layers' draft steps run eagerly where the checks are static steps, captured as the
        decode steps are (empty: they run static too, or nothing drafts with MTP layers)."""
        if self.speculative != "mtp" or not self.model.static_decode or self.model.static_mtp:
            return []
        return ["an MTP layer has no static steps"]

    def _misses(self) -> str:
        if self.miss_policy is None:
            return ""
        rates = self.bandwidths
        measured = f" (copy {format_rate(rates.copy)}, CPU {format_rate(rates.cpu)})" if rates else ""
        why = self._offloaded.cache.store.not_in_place()
        fallback = f" ({DEFAULT} cannot be: {why})" if self.options.miss_policy is None and why else ""
        return f"; misses: {self.miss_policy}{measured}{fallback}"

    def cache_report(self) -> str:
        """The memory plan and, when experts are offloaded, the cache counters so far."""
        if self._offloaded is None:
            return self.plan.describe() + "\nall experts resident: no expert is copied while generating"
        cache = self._offloaded.snapshot()
        return self.plan.describe(slots_in_use=cache.slots) + "\n" + cache_report(self._offloaded.cache)

    def reconfigure(
        self,
        *,
        slots: int | None = None,
        policy: str | None = None,
        prefetch: int | None = None,
        prefetch_margin: int | None = None,
        pin_hot: int | None = None,
        miss_policy: str | None = None,
        cold: bool = False,
    ) -> None:
        """Change the expert cache's settings without reloading (None: keep): the `slots` in use, within
        those allocated at load (`/cache`); and for `tune`, the policy, prefetch, pinning and miss policy.
        A new policy, or `cold`, empties the cache and its counters, and makes the next prompt the
        warm-up that `pin_hot` ranks experts by."""
        if self._offloaded is None:
            raise LocalMoEError("every expert is resident on the device: there is no expert cache to resize or tune")
        changes = {
            "policy": policy,
            "prefetch": prefetch,
            "prefetch_margin": prefetch_margin,
            "pin_hot": pin_hot,
            "miss_policy": miss_policy,
        }
        options = replace(self.options, **{key: value for key, value in changes.items() if value is not None})
        _check_settings(options)
        runtime = self._offloaded
        if miss_policy is not None:
            runtime.settle()  # what the old policy left to learn
            spec = next(iter(runtime.specs.values()))
            runtime.miss_policy, runtime.host.kernel = _miss_policy(options, runtime.cache, spec, runtime.pair_outputs)
        runtime.configure_prefetch(*_prefetch(options, runtime.miss_policy))
        if cold or policy is not None:
            runtime.clear(options.policy)
        if slots is not None:
            self._resize(slots)
        runtime.pin_hot = options.pin_hot
        self.options = options

    def _resize(self, slots: int) -> None:
        cache, top_k = self._offloaded.cache, self.plan.footprint.top_k
        allocated, least = cache.rows.shape[0], top_k + len(cache.pinned)
        if slots > allocated:
            raise LocalMoEError(
                f"the memory plan allocated {allocated} expert slots at start-up: {slots} do not fit; to have more, "
                f"restart with a larger {setting('vram_budget')} or {setting('expert_slots')}"
            )
        if slots < least:
            raise LocalMoEError(
                f"{slots} slots leave no room for one layer's {top_k} experts beside the {len(cache.pinned)} "
                f"pinned: use at least {least}"
            )
        cache.resize(slots)

    def save_profile(self) -> None:
        """Add the routing seen since the last save to the routing profile, and write it (where one is kept)."""
        if self._offloaded is not None:
            self._offloaded.save_profile(self.plan.footprint.top_k)


@dataclass
class Prepared:
    """What `place` needs, decided without reading a weight: the checkpoint, the model skeleton, the
    memory plan and the experts' row layout."""

    checkpoint: Checkpoint
    parts: ModelParts
    device: torch.device
    options: RuntimeOptions
    plan: MemoryPlan
    quant: QuantSpec | None

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The checkpoint's tokenizer, read before the weights where a caller checks a prompt or a chat
        template first; the engine then takes it over."""
        return Tokenizer(self.checkpoint.path)


def prepare(
    source: str,
    *,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    options: RuntimeOptions | None = None,
    headers_only: bool = False,
) -> Prepared:
    """Open a checkpoint (folder or Hub repo id) and plan its placement on `device`; the device need not
    be here when `vram_budget` says how much memory it has (to plan for it). `headers_only`: a Hub
    checkpoint's shards are not downloaded, only their headers read (enough to plan; see `Checkpoint.open`)."""
    options = options or RuntimeOptions()
    target = _parse_device(device) if device else resolve_device(None)
    if target.type == "cuda" and not torch.cuda.is_available() and options.vram_budget is None:
        raise LocalMoEError(f"this machine has no CUDA device: give {setting('vram_budget')} to plan for one")
    checkpoint, family = open_checkpoint(source, revision, weights=not headers_only)
    mtp = options.speculative in (None, "mtp")
    parts = model_skeleton(checkpoint, family, _dtype(dtype), mtp=mtp)
    speculation(options, parts.model)  # an impossible choice is refused before any weight is read
    quant = _quant(options, parts.experts)
    return Prepared(checkpoint, parts, target, options, _plan(parts, target, options, quant), quant)


def place(prepared: Prepared) -> Engine:
    """Load a preparation onto its device as the plan says: the non-expert weights resident, the routed
    experts resident too when they fit, else in an expert cache fed from host RAM or the checkpoint files."""
    checkpoint, parts, plan, options, quant = (
        prepared.checkpoint,
        prepared.parts,
        prepared.plan,
        prepared.options,
        prepared.quant,
    )
    device = resolve_device(str(prepared.device))
    torch.set_num_threads(options.threads or physical_cores())
    if device.type == "cuda":  # Triton launches, streams and events on this device, not device 0
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    sweep_temporaries(cache_dir(), recursive=True)  # left by runs killed while writing
    blocks = moe_blocks(parts.model)
    trace = RoutingTrace(options.trace, blocks[0].layer_idx) if options.trace else None  # an unwritable path fails now
    load_resident_weights(parts, checkpoint, device, plan.tables)
    layout = layout_of(parts.experts, quant, parts.dtype)
    kernel, kernels = pair_kernel(options.kernels, device, parts.dtype, [block.act for block in blocks], layout.format)
    quantized = _quantized_layers(checkpoint, parts, quant, layout)
    offloaded = None
    if plan.all_resident:
        experts = ResidentExperts(parts.experts, device, parts.dtype, trace, kernel, quant, quantized)
    else:
        mode = "mmap" if plan.store == "mmap" else "ram"
        store = ExpertStore(parts.experts, parts.dtype, mode, device, quant, quantized)
        specs = [block.spec for block in blocks]
        table = SlotTable([spec.layer for spec in specs], specs[0].experts, device)
        cache = ExpertCache(store, plan.slots, device, options.policy, layers=len(blocks), table=table)
        misses, on_cpu = _miss_policy(options, cache, specs[0], kernel)
        depth, margin = _prefetch(options, misses)
        experts = offloaded = OffloadedExperts(
            cache,
            specs,
            {block.layer_idx: block.scores for block in blocks},
            prefetch=depth,
            margin=margin,
            trace=trace,
            miss_policy=misses,
            pair_outputs=kernel,
            pin_hot=options.pin_hot,
            host_kernel=on_cpu,
        )
    for block in blocks:
        block.experts = experts
    if options.profile and offloaded is not None:
        own = options.profile == "auto"
        offloaded.start_from_profile(default_profile_path(checkpoint) if own else Path(options.profile), own)
    tokenizer = prepared.__dict__.get("tokenizer")  # where the preparation has read it already
    barred = _graphs_barred(device, kernel, parts.model, options)
    return Engine(checkpoint, parts, plan, experts, options, kernels, offloaded, tokenizer, barred)


def speculation(options: RuntimeOptions, model) -> str:
    """What drafts the tokens speculative decoding checks: as the options say, by default the checkpoint's
    MTP layers where it has them, else nothing."""
    has_mtp = getattr(model, "mtp", None) is not None
    if options.speculative == "mtp" and not has_mtp:
        raise LocalMoEError(
            f"{setting('speculative')} mtp drafts with the checkpoint's multi-token-prediction layers, and this "
            f"checkpoint has none that load (a line above says why where it promises some): use "
            f"{setting('speculative')} lookup (n-gram matches) or off"
        )
    chosen = options.speculative or ("mtp" if has_mtp else "off")
    if chosen == "off" and options.draft_tokens is not None:
        why = "is off" if options.speculative else "is off by default where a checkpoint has no MTP layers"
        raise LocalMoEError(
            f"{setting('draft_tokens')} sets how many tokens speculative decoding drafts, which {why}: add "
            f"{setting('speculative')} lookup or mtp"
        )
    return chosen


def physical_cores() -> int:
    """The CPU's cores, not counting the second thread of a hyper-threaded core (which adds little to
    memory-bound kernels and slows them by sharing a core's caches)."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def load(
    source: str,
    *,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    options: RuntimeOptions | None = None,
    **settings,
) -> Engine:
    """Open a checkpoint (a folder, or a Hub repo id, downloaded through the Hugging Face cache) and place
    it on `device` ("cpu", "cuda" or "cuda:N"; default: CUDA when present) in `dtype` ("bfloat16",
    "float16", "float32", a torch dtype; default: the checkpoint's). `settings` are the runtime's, named
    and written as `localmoe generate`'s flags: vram_budget="12GiB", host_budget, expert_slots, context,
    policy, profile, pin_hot, prefetch, prefetch_margin, miss_policy, copy_bandwidth and cpu_bandwidth
    (GB/s), expert_bits, expert_group_size, kernels, trace (see `RuntimeOptions`); or `options`, a
    RuntimeOptions, instead."""
    if options is not None and settings:
        raise LocalMoEError("give the settings as keywords or as options=RuntimeOptions(...), not both")
    options = options or RuntimeOptions.named(settings)
    return place(prepare(source, device=str(resolve_device(device)), dtype=dtype, revision=revision, options=options))


def plan_for(
    source: str,
    *,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    options: RuntimeOptions | None = None,
) -> MemoryPlan:
    """The memory plan `load` would follow, from the checkpoint's headers alone (see `prepare`)."""
    return prepare(source, device=device, dtype=dtype, revision=revision, options=options, headers_only=True).plan


def _host_kernel(device: torch.device, kernel: Callable, policy: str) -> Callable:
    """The kernel for the CPU's share of the misses: on a CPU device the device's own `kernel`, so that both
    give the same bits; elsewhere the compiled CPU kernels, but none to build where the policy computes no
    miss on the CPU."""
    if device.type == "cpu":
        return kernel
    return host_kernel() if MISS_POLICIES[policy].computes_on_cpu else expert_pair_outputs


def _miss_policy(options: RuntimeOptions, cache: ExpertCache, spec: MoESpec, kernel: Callable):
    """(the miss policy the options name (by default, direct where the host copy can be read in place,
    else copy), with the bandwidths it weighs, measured once per machine with the kernel that computes
    the CPU's share; that kernel), `kernel` being the device's."""
    why = cache.store.not_in_place()
    name = options.miss_policy or (FALLBACK if why else DEFAULT)
    if MISS_POLICIES[name].in_place and why:
        raise LocalMoEError(
            f"{setting('miss_policy')} {name} reads each miss where it lies, which cannot be done here: {why}; "
            f"use {setting('miss_policy')} {FALLBACK}"
        )
    on_cpu = _host_kernel(cache.rows.device, kernel, name)
    if not MISS_POLICIES[name].weighs_bandwidths:
        return miss_policy(name), on_cpu
    rates = calibrated(cache.store, cache.rows[0], spec, on_cpu, *options.bandwidths())
    return miss_policy(name, rates), on_cpu


def _prefetch(options: RuntimeOptions, misses) -> tuple[int, int]:
    """Prefetch depth and margin: by default one layer ahead where misses are decided on the host. The
    direct miss policy has no host decision in the middle of a step to prefetch with: it admits misses
    one step later instead."""
    if misses.in_place and options.prefetch:
        raise LocalMoEError(
            f"{setting('prefetch')} predicts the next layer's experts on the host in the middle of a step, which the "
            f"{misses} miss policy never does (it admits misses a step later): use {setting('miss_policy')} copy "
            f"to prefetch, or {setting('prefetch')} 0"
        )
    return misses.prefetch if options.prefetch is None else options.prefetch, options.prefetch_margin


def _graphs_barred(device: torch.device, kernel, model, options: RuntimeOptions) -> list[str]:
    """Why decode steps cannot be CUDA graphs whatever the miss policy."""
    barred = []
    if device.type != "cuda":
        barred.append("not on CUDA")
    if kernel is expert_pair_outputs:
        barred.append("the reference expert kernel reads which experts are chosen on the host")
    if not model.static_decode:
        barred.append("the model has layers without static steps")
    if host_tables(model):
        barred.append("the model gathers rows of its lookup tables on the host each step")
    if options.trace:
        barred.append("a trace reads the routing on the host")
    return barred


def _quant(options: RuntimeOptions, source) -> QuantSpec | None:
    if options.expert_bits == 16:
        return None
    block = next(iter(source.blocks.values()))
    return QuantSpec.fitting(options.expert_bits, options.expert_group_size, block.hidden_size, block.intermediate_size)


def _quant_settings(quant: QuantSpec, dtype: torch.dtype) -> str:
    return f"bits={quant.bits} group={quant.group} dtype={dtype}"


def _quantized_layers(
    checkpoint: Checkpoint, parts: ModelParts, quant: QuantSpec | None, layout
) -> QuantizedLayers | None:
    """The on-disk cache of the experts localmoe quantizes: every one (`quant`), or the MTP layers' that it
    quantizes into the form the model's are kept in as stored; None where it quantizes none."""
    if quant is not None:
        settings = _quant_settings(quant, parts.dtype)
    elif any(quantized_here(parts.experts, layout, layer) for layer in parts.experts.layers):
        settings = f"MTP layers' experts as {layout}"  # the layout's every field: form, shapes and dtype
    else:
        return None
    return QuantizedLayers(cache_folder(checkpoint, settings), settings)


def _mtp_quantized(source: ExpertSource, layout) -> str | None:
    """A line where localmoe quantizes the MTP layers' experts into the form the model's are kept in."""
    layers = [layer for layer in source.drafting if quantized_here(source, layout, layer)]
    if not layers or not layout.reads_packed:  # none, or every expert (expert_bits)
        return None
    form = source.forms[layers[0]]
    stored = "unquantized" if form is None else f"as {form.words}"
    return (
        f"the MTP layers' routed experts, stored {stored}, are quantized by localmoe to the model's "
        f"{source.stored_form.words} to share its expert slots: they only draft, and the model checks every "
        "drafted token"
    )


def _plan(parts: ModelParts, device: torch.device, options: RuntimeOptions, quant: QuantSpec | None) -> MemoryPlan:
    fp = footprint(parts)
    layout = layout_of(parts.experts, quant, parts.dtype)
    if layout.row_dtype is not None:  # quantized or stored byte rows (the MTP layers' too): the plan counts their size
        fp = replace(fp, expert_bytes=layout.numel)
    _check_settings(options)
    plan = plan_memory(
        fp,
        device,
        vram_budget=options.vram_budget,
        host_budget=options.host_budget,
        expert_slots=options.expert_slots,
        context=options.context,
        prefill_chunk=options.prefill_chunk,
        speculating=_speculating(options, parts.model),
    )
    if notice := _mtp_quantized(parts.experts, layout):
        plan = replace(plan, notices=(*plan.notices, notice))
    most = plan.slots - plan.footprint.top_k
    if options.pin_hot > most and not plan.all_resident:
        raise LocalMoEError(
            f"{setting('pin_hot')} {options.pin_hot} must leave one layer's {plan.footprint.top_k} experts of the "
            f"{plan.slots} slots free: use at most {max(most, 0)}, or more slots"
        )
    return plan


def _speculating(options: RuntimeOptions, model) -> Speculating:
    """What the plan counts for speculative decoding, as the options choose it (nothing where it is off)."""
    chosen = speculation(options, model)
    if chosen == "off":
        return Speculating()
    return Speculating(options.draft_tokens or DRAFT_TOKENS, mtp=chosen == "mtp")


def _check_settings(options: RuntimeOptions) -> None:
    """Settings that are wrong whatever the model."""
    for name, table in (
        ("policy", POLICIES),
        ("miss_policy", MISS_POLICIES),
        ("kernels", KERNELS),
        ("cuda_graphs", CUDA_GRAPHS),
    ):
        if getattr(options, name) not in table and not (name == "miss_policy" and options.miss_policy is None):
            raise LocalMoEError(f"unknown {setting(name)} {getattr(options, name)!r}: choose one of {', '.join(table)}")
    if (options.prefetch or 0) < 0 or options.prefetch_margin < 0 or options.pin_hot < 0:
        raise LocalMoEError(
            f"{setting('prefetch')}, {setting('prefetch_margin')} and {setting('pin_hot')} cannot be negative"
        )


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A compute dtype from its name ("bfloat16"; "auto": the checkpoint's, as None) or as a torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto" and dtype not in DTYPES:
        raise LocalMoEError(f"unknown {setting('dtype')} {dtype!r}: choose auto, {', '.join(DTYPES)}")
    return DTYPES.get(dtype)


def resolve_device(device: str | None) -> torch.device:
    """The requested device, or CUDA when present and the CPU otherwise."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = _parse_device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise LocalMoEError(
            f"{device} was asked for but this torch build sees no CUDA device: use {setting('device')} cpu"
        )
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
