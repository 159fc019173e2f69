"""The memory plan: what lives on the device, how many expert slots the pool gets, and where the routed
experts are kept on the host. Computed from checkpoint metadata and budgets alone, so it runs (and
explains itself) on a machine without the target GPU.
"""

from dataclasses import dataclass

import psutil
import torch

from localmoe.errors import LocalMoEError, setting
from localmoe.options import DEFAULT_CONTEXT

MIN_PREFILL_CHUNK = 64  # the prefill chunk is halved no further to make room for the experts


def format_bytes(n: int) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def format_rate(bytes_per_s: float) -> str:
    """A bandwidth with three significant figures in the unit that suits it: 24.5 MB/s, not 0.0 GB/s."""
    for unit, size in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if bytes_per_s >= size:
            return f"{bytes_per_s / size:.3g} {unit}"
    return f"{bytes_per_s:.3g} B/s"


@dataclass(frozen=True)
class Footprint:
    """Sizes the plan needs, from the model's shapes and the compute dtype; no weights are read."""

    resident_bytes: int  # every non-expert weight but the host tables
    expert_bytes: int  # one routed expert, all its roles
    moe_layers: int
    experts_per_layer: int
    top_k: int  # the largest of any layer: one layer's experts must fit the pool
    kv_bytes_per_token: int
    activation_bytes_per_token: int  # the largest activations one prefill token keeps alive at once
    max_positions: int
    fixed_state_bytes: int = 0  # generation state that does not grow with the context (recurrent layers)
    active_experts_per_token: int = 0  # experts one token runs through, all layers (0: MoE layers x top_k)
    lookup_bytes: int = 0  # resident embedding tables a token reads one row of (not an LM head too)
    lookup_row_bytes: int = 0  # what one token reads of those tables
    attention_heads: int = 0  # the most query heads of any attention layer
    attention_head_width: int = 0  # the widest key plus value width per head of any attention layer
    host_table_bytes: int = 0  # lookup tables kept in host memory (`HostEmbedding`), never on the device
    # what speculative decoding adds (see `Speculating`)
    recurrent_state_bytes: int = 0  # of fixed_state_bytes, the states that sum over every token (RecurrentState)
    pending_state_bytes: int = 0  # the most the compressors' pending tokens take (DeepSeek-V4's PooledState)
    trail_bytes_per_token: int = 0  # what the compressors keep of each token of a check (PooledTrail)
    logits_bytes_per_token: int = 0  # one position's logits, in the compute dtype
    hidden_bytes_per_token: int = 0  # one position's last hidden state, in the compute dtype

    def attention_bytes(self, queries: int, keys: int) -> int:
        """The prefill attention's transient memory for `queries` new tokens against `keys` positions, as
        scaled_dot_product_attention's math kernel spends it (what CUDA falls back to with grouped-query
        heads and a mask): scores, masked scores and their softmax in float32, [heads, queries, keys]
        each, and keys and values repeated for every head in float32."""
        heads = self.attention_heads
        return 4 * heads * (3 * queries * keys + self.attention_head_width * keys)

    @property
    def total_experts(self) -> int:
        return self.moe_layers * self.experts_per_layer

    @property
    def read_per_token(self) -> int:
        """Weight bytes one decode token reads: the resident weights (one row of each embedding table)
        and the experts it runs through."""
        active = self.active_experts_per_token or self.moe_layers * self.top_k
        resident = self.resident_bytes - self.lookup_bytes + self.lookup_row_bytes
        return resident + active * self.expert_bytes


@dataclass(frozen=True)
class Speculating:
    """Speculative decoding as the plan counts it: checks of `draft_tokens` drafted tokens and the last chosen
    one in one forward pass (0: no speculation), drafted by the checkpoint's MTP layers where `mtp`."""

    draft_tokens: int = 0
    mtp: bool = False

    def state_bytes(self, fp: Footprint, context: int) -> int:
        """Device memory kept beside the cache: a check keeps the recurrent states after each of its
        positions (at most their size each: a convolution's windows are views of its inputs), and the
        compressors' projections of its tokens after those of the tokens pending before it, with the
        overlap before it; the MTP drafter keeps the target's hidden states of the prompt until its first
        draft (its layers' own caches are in the footprint's state already)."""
        tokens = self.draft_tokens + 1 if self.draft_tokens else 0
        trail = tokens * (fp.recurrent_state_bytes + fp.trail_bytes_per_token)
        saved = trail + (fp.pending_state_bytes if tokens else 0)
        return saved + (context * fp.hidden_bytes_per_token if self.mtp else 0)

    def workspace(self, fp: Footprint, chunk: int, context: int) -> int:
        """Transient memory beyond a plain prefill chunk's: a check is a forward pass over draft_tokens + 1
        tokens with logits at every one of them; with MTP drafts, the prefill computes logits at every
        position of a chunk too."""
        tokens = self.draft_tokens + 1 if self.draft_tokens else 0
        check = fp.activation_bytes_per_token * tokens + fp.attention_bytes(tokens, context)
        check += fp.logits_bytes_per_token * tokens
        prefill = fp.activation_bytes_per_token * chunk + fp.attention_bytes(chunk, context)
        logits = fp.logits_bytes_per_token * chunk if self.mtp else 0
        return max(check - prefill, 0) + logits


@dataclass(frozen=True)
class MemoryPlan:
    device: str
    footprint: Footprint
    context: int
    prefill_chunk: int
    slots: int
    store: str  # "none" (all experts in the pool), "pinned", "ram" or "mmap"
    device_budget: int
    host_budget: int
    host_margin: int = 0  # RAM left to the OS and the load out of what was available (pinned stores)
    tables: str | None = None  # where the host tables are: "ram" or "mmap" (None: the model has none)
    notices: tuple[str, ...] = ()  # what the plan changed from what was asked, a line each
    speculating: Speculating = Speculating()

    @property
    def kv_bytes(self) -> int:
        return self.footprint.kv_bytes_per_token * self.context + self.footprint.fixed_state_bytes

    @property
    def speculation_bytes(self) -> int:
        """What speculative decoding keeps and computes beyond plain decoding (0: it is off)."""
        return self.speculating.state_bytes(self.footprint, self.context) + self.speculating.workspace(
            self.footprint, self.prefill_chunk, self.context
        )

    @property
    def workspace_bytes(self) -> int:
        return _workspace(self.footprint, self.prefill_chunk, self.context)

    @property
    def pool_bytes(self) -> int:
        return self.slots * self.footprint.expert_bytes

    @property
    def device_bytes(self) -> int:
        fixed = self.footprint.resident_bytes + self.kv_bytes + self.workspace_bytes + self.speculation_bytes
        return fixed + self.pool_bytes

    @property
    def all_resident(self) -> bool:
        return self.slots == self.footprint.total_experts

    def disk_tokens_per_s(self, read_bandwidth: float) -> float:
        """Decode tokens per second at most, when experts come from disk: the experts a token uses
        that have no slot, as if routing were uniform, each read at `read_bandwidth` bytes/s."""
        fp = self.footprint
        misses = fp.active_experts_per_token * (1 - self.slots / fp.total_experts)
        return float("inf") if misses <= 0 else read_bandwidth / (misses * fp.expert_bytes)

    def disk_notice(self, disk_bandwidth: float) -> str:
        return (
            f"disk tier: the experts without a slot are read from disk at about {disk_bandwidth / 1e6:.0f} MB/s "
            f"(measured): at most about {self.disk_tokens_per_s(disk_bandwidth):.2g} decode tokens/s"
        )

    def describe(self, disk_bandwidth: float | None = None, slots_in_use: int | None = None) -> str:
        """The plan as a table (what, where, bytes) followed by the flags that reproduce it, and, for
        experts read from disk, the speed that allows (`disk_bandwidth`: measured, bytes/s). `slots_in_use`:
        how many of the allocated slots the cache uses now, where it was resized since."""
        fp = self.footprint
        slots = f"{self.slots}" if slots_in_use in (None, self.slots) else f"{slots_in_use} in use of {self.slots}"
        home = {"none": "-", "pinned": "host RAM (pinned)", "ram": "host RAM", "mmap": "checkpoint files (mmap)"}
        rows = [
            ("non-expert weights", self.device, fp.resident_bytes),
            (f"KV cache ({self.context} tokens)", self.device, self.kv_bytes),
            (f"workspace ({self.prefill_chunk}-token prefill chunks)", self.device, self.workspace_bytes),
            *self._speculation_rows(),
            (f"expert slots ({slots} of {fp.total_experts} experts)", self.device, self.pool_bytes),
            (f"total on {self.device} (budget {format_bytes(self.device_budget)})", "", self.device_bytes),
        ]
        if not self.all_resident:
            rows.append(
                (f"all {fp.total_experts} routed experts", home[self.store], fp.total_experts * fp.expert_bytes)
            )
        if self.tables is not None:
            rows.append(("lookup tables (rows gathered per token)", home[self.tables], fp.host_table_bytes))
        width = max(len(what) for what, _, _ in rows)
        lines = [f"{'what':<{width}}  {'where':<24}  bytes"]
        lines += [f"{what:<{width}}  {where:<24}  {format_bytes(size)}" for what, where, size in rows]
        lines.append(
            f"one expert: {format_bytes(fp.expert_bytes)}; {fp.moe_layers} MoE layers x {fp.experts_per_layer} "
            f"experts, top-{fp.top_k}"
        )
        if self.host_margin and (not self.all_resident or self.tables is not None):
            lines.append(
                f"host budget {format_bytes(self.host_budget)}: the RAM available at start less "
                f"{format_bytes(self.host_margin)} kept for the OS and the load"
            )
        lines += self.notices
        if self.store == "mmap" and disk_bandwidth:
            lines.append(self.disk_notice(disk_bandwidth))
        if self.store in ("pinned", "ram"):
            lines.append("default miss policy: direct (misses read where they lie, in the host copy, by the kernel)")
        elif self.store == "mmap":
            lines.append(
                "default miss policy: copy (misses copied into slots): the experts are read from disk, where the "
                "kernel cannot read them in place as direct does"
            )
        lines.append(
            f"flags: --device {self.device} --vram-budget {flag_size(self.device_budget)} "
            f"--host-budget {flag_size(self.host_budget)} --expert-slots {slots_in_use or self.slots} "
            f"--context {self.context}"
        )
        return "\n".join(lines)

    def _speculation_rows(self) -> list[tuple[str, str, int]]:
        drafts = self.speculating.draft_tokens
        if not drafts:
            return []
        drafter = "MTP" if self.speculating.mtp else "lookup"
        what = f"speculative decoding ({drafter}, {drafts}-token drafts: saved states, checks)"
        return [(what, self.device, self.speculation_bytes)]


def flag_size(n: int) -> str:
    """A size as a flag value that parse_size reads back (rounded to MiB or to a hundredth of a GiB)."""
    return f"{n / 2**20:.0f}MiB" if n < 2**30 else f"{n / 2**30:.2f}GiB"


def plan_memory(
    footprint: Footprint,
    device: torch.device,
    *,
    vram_budget: int | None = None,
    host_budget: int | None = None,
    expert_slots: int | None = None,
    context: int | None = None,
    prefill_chunk: int = 512,
    speculating: Speculating = Speculating(),
) -> MemoryPlan:
    """Decide the slot count and the experts' host tier.

    Everything but the routed experts is resident on the device; the rest of the device budget
    becomes expert slots, at least one layer's top-k. The device budget is what is free (less a
    headroom), and an explicit one larger than that is lowered to it, with a notice. The workspace
    counts the prefill attention at the full context; where it leaves no room for one layer's experts,
    the prefill chunk is halved (down to MIN_PREFILL_CHUNK) until it does. The experts' host copy lives
    in RAM (pinned for CUDA, leaving a margin of the available RAM to the OS) when the host budget
    holds it, else it is read from the checkpoint through mmap; when every expert has a slot, no host
    copy is kept at all. `context`: tokens of KV cache, at most the model's maximum; None: DEFAULT_CONTEXT,
    or the maximum where it is smaller. `speculating`: what speculative decoding adds is counted with the
    rest (see `Speculating`).
    """
    fp = footprint
    context = _context(context, fp.max_positions)
    notices = []
    device_budget = _device_budget(device, vram_budget, notices)
    host_margin = 0
    if host_budget is None:
        available = psutil.virtual_memory().available
        host_margin = host_ram_margin() if device.type == "cuda" else 0
        host_budget = max(available - host_margin, 0)
    asked = min(prefill_chunk, context)
    chunk = _prefill_chunk(fp, asked, context, device_budget, speculating)
    if chunk < asked:
        notices.append(
            f"prefill in chunks of {chunk} tokens, not {asked}: the prefill attention of a {context}-token "
            "context leaves no room for the experts otherwise"
        )
    fixed = _fixed_bytes(fp, chunk, context, speculating)
    if expert_slots is None:
        slots = min(fp.total_experts, max(device_budget - fixed, 0) // fp.expert_bytes)
    else:
        if not fp.top_k <= expert_slots <= fp.total_experts:
            raise LocalMoEError(
                f"{setting('expert_slots')} {expert_slots} is out of range: this model needs at least {fp.top_k} "
                f"(its top-k) and has {fp.total_experts} experts in all"
            )
        slots = expert_slots
    needed = fixed + fp.top_k * fp.expert_bytes
    drafts = ", speculative decoding" if speculating.draft_tokens else ""
    over_budget = vram_budget is not None and fixed + slots * fp.expert_bytes > device_budget
    if slots < fp.top_k or over_budget:
        raise LocalMoEError(
            f"a device budget of {format_bytes(device_budget)} is too small: this model needs at least "
            f"{format_bytes(needed)} ({format_bytes(fp.resident_bytes)} of non-expert weights, the KV cache and "
            f"workspace for {context} tokens{drafts}, and {max(slots, fp.top_k)} expert slots of "
            f"{format_bytes(fp.expert_bytes)}); raise {setting('vram_budget')}, or lower {setting('context')} or "
            f"{setting('expert_slots')}"
        )
    store = _expert_home(fp, device, slots, fixed, host_budget)
    tables = _table_home(fp, device, slots, fixed, host_budget, store)
    return MemoryPlan(
        str(device),
        fp,
        context,
        chunk,
        slots,
        store,
        device_budget,
        host_budget,
        host_margin,
        tables,
        tuple(notices),
        speculating,
    )


def _device_budget(device: torch.device, vram_budget: int | None, notices: list[str]) -> int:
    """What is free on the device (less a headroom); or the explicit budget, lowered to what is free with
    a notice when it is more (it would fail to allocate)."""
    if vram_budget is None:
        return _free_device_memory(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return vram_budget  # planning for a device that is not here
    free = _free_device_memory(device)
    if vram_budget <= free:
        return vram_budget
    notices.append(
        f"the device budget of {format_bytes(vram_budget)} is more than the {format_bytes(free)} free on {device} "
        "(less a headroom): planning for that"
    )
    return free


def _fixed_bytes(fp: Footprint, chunk: int, context: int, speculating: Speculating) -> int:
    """Everything on the device but the expert slots."""
    state = fp.kv_bytes_per_token * context + fp.fixed_state_bytes + speculating.state_bytes(fp, context)
    return fp.resident_bytes + state + _workspace(fp, chunk, context) + speculating.workspace(fp, chunk, context)


def _workspace(fp: Footprint, chunk: int, context: int) -> int:
    """Transient device memory of a prefill chunk: its activations and its attention over the context."""
    return fp.activation_bytes_per_token * chunk + fp.attention_bytes(chunk, context)


def _prefill_chunk(fp: Footprint, chunk: int, context: int, device_budget: int, speculating: Speculating) -> int:
    """The requested prefill chunk, halved while its workspace leaves no room for one layer's experts."""
    while (
        chunk > MIN_PREFILL_CHUNK
        and _fixed_bytes(fp, chunk, context, speculating) + fp.top_k * fp.expert_bytes > device_budget
    ):
        chunk = max(chunk // 2, MIN_PREFILL_CHUNK)
    return chunk


def host_ram_margin() -> int:
    """RAM a pinned expert store leaves to the OS and the load (page cache for the checkpoint's shards,
    the resident weights on their way to the device, the interpreter): a tenth of the machine's RAM,
    at least 2 GiB. Pinned pages cannot be swapped out, so taking them all starves everything else."""
    return max(psutil.virtual_memory().total // 10, 2 * 2**30)


def _context(asked: int | None, most: int) -> int:
    if asked is None:
        return min(DEFAULT_CONTEXT, most)
    if not 1 <= asked <= most:
        raise LocalMoEError(
            f"{setting('context')} {asked} is out of range: this model has {most} positions, use 1 to {most}"
        )
    return asked


def _expert_home(fp: Footprint, device: torch.device, slots: int, fixed: int, host_budget: int) -> str:
    if slots == fp.total_experts:
        return "none"
    room = host_budget - (fixed + slots * fp.expert_bytes if device.type == "cpu" else 0)
    if room < fp.total_experts * fp.expert_bytes:
        return "mmap"
    return "pinned" if device.type == "cuda" else "ram"


def _table_home(
    fp: Footprint, device: torch.device, slots: int, fixed: int, host_budget: int, store: str
) -> str | None:
    """Host tables in RAM when the host budget holds them beside the experts' copy (which comes first: a
    token reads whole experts, and a few rows of a table), else mapped from the checkpoint's shards."""
    if not fp.host_table_bytes:
        return None
    taken = fixed + slots * fp.expert_bytes if device.type == "cpu" else 0
    if store in ("pinned", "ram"):
        taken += fp.total_experts * fp.expert_bytes
    return "ram" if host_budget - taken >= fp.host_table_bytes else "mmap"


def _free_device_memory(device: torch.device) -> int:
    """What is free, less a headroom for what the plan does not count (allocator slack, library
    workspaces): 5%, and at least 512 MiB."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    return max(free - max(free // 20, 512 * 2**20), 0)
