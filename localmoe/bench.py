"""Measuring decode speed and setting it against the physical floor: shared by `localmoe bench`,
`localmoe tune` and scripts/bench_decode.py.

The floor for one decode token is max(bytes that must cross the bus / bus bandwidth, bytes the device
must read / device memory bandwidth): the experts a token misses must be copied, and every weight it
uses must be read at least once. Bandwidths are measured on the spot.
"""

import json
import platform
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from localmoe.engine import Engine
from localmoe.files import write_atomic
from localmoe.runtime.memory import Footprint, format_bytes
from localmoe.tables import render

BANDWIDTH_BYTES = 256 * 2**20

# Qwen3-30B-A3B's routing (48 MoE layers x 128 experts, top-8) at a width where compute is nothing: what is
# left of a decode token is the host's share, and the ops it launches
QWEN3_ROUTING_TINY = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 512,
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 48,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
}


@dataclass
class RunResult:
    """One configuration's measured run."""

    name: str
    prefill_tokens_per_s: float
    time_to_first_token_s: float
    decode_tokens_per_s: float
    peak_memory_bytes: int  # CUDA: peak allocated on the device; CPU: the process's resident set after the run
    hit_rate: float | None = None
    bytes_copied_per_token: float | None = None  # decode tokens only
    miss_policy: str = ""  # localmoe with an expert cache: what it does with a miss
    host_ms_per_token: float | None = None  # decode: time the host spent queueing a step and sampling
    ops_per_layer: float | None = None  # decode: kernel-launching ops of one token per MoE layer
    loaded_per_token: float | None = None  # decode: experts loaded from outside the slots per token
    acceptance_rate: float | None = None  # speculative decoding: drafted tokens kept
    detail: str = ""
    tokens: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key != "tokens"}


def measure_bandwidth(device: torch.device) -> dict[str, float]:
    """Bytes per second: pinned host to device and device to device on CUDA; RAM copies on the CPU."""
    if device.type == "cuda":
        host = torch.empty(BANDWIDTH_BYTES, dtype=torch.uint8, pin_memory=True)
        target = torch.empty(BANDWIDTH_BYTES, dtype=torch.uint8, device=device)
        other = torch.empty_like(target)
        return {
            "host_to_device": _copy_rate(target, host, device),
            "device_memory": 2 * _copy_rate(other, target, device),
        }
    source = torch.ones(BANDWIDTH_BYTES, dtype=torch.uint8)
    target = torch.empty_like(source)
    # a copy reads and writes each byte once
    return {"ram": 2 * _copy_rate(target, source, device)}


def _copy_rate(target: torch.Tensor, source: torch.Tensor, device: torch.device, repeats: int = 5) -> float:
    target.copy_(source)  # warm up (page faults, lazy allocation)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source, non_blocking=True)
    _sync(device)
    return repeats * source.numel() / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_floor(footprint: Footprint, bandwidth: dict[str, float], copied_per_token: float) -> dict[str, float]:
    """Seconds per decode token that no runtime can beat on this machine, and what bounds it."""
    read_per_token = footprint.read_per_token
    if "ram" in bandwidth:
        # on the CPU, a copy into a slot reads and writes RAM too
        seconds = (read_per_token + 2 * copied_per_token) / bandwidth["ram"]
        return {"floor_s": seconds, "read_bytes_per_token": read_per_token, "bound": "RAM bandwidth"}
    bus = copied_per_token / bandwidth["host_to_device"]
    memory = read_per_token / bandwidth["device_memory"]
    return {
        "floor_s": max(bus, memory),
        "read_bytes_per_token": read_per_token,
        "bound": "host-to-device copies" if bus > memory else "device memory bandwidth",
    }


def run_engine(
    engine: Engine, name: str, prompt: list[int], new_tokens: int, detail: str = "", speculative: bool = True
) -> RunResult:
    """Time one greedy generation on a loaded engine, after a two-token warm-up (whose cache traffic
    is then cleared, so the run starts cold as a fresh process would); decoding speculative as the
    engine's options say, or plain where not `speculative`."""
    device = engine.device
    list(engine.generate_ids(prompt[:1], 2, speculative=speculative))
    if engine.expert_cache() is not None:
        engine.reconfigure(cold=True)  # the timed prompt, not the warm-up, decides what --pin-hot pins
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill_copies = []
    tokens = engine.generate_ids(
        prompt, new_tokens, on_prefill=lambda: prefill_copies.append(_copied(engine)), speculative=speculative
    )
    tokens = list(tokens)
    stats = engine.stats
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else psutil.Process().memory_info().rss
    result = RunResult(
        name=name,
        prefill_tokens_per_s=stats.prefill_rate,
        time_to_first_token_s=stats.prefill_seconds,
        decode_tokens_per_s=stats.decode_rate,
        peak_memory_bytes=peak,
        detail=detail,
        tokens=tokens,
        loaded_per_token=stats.loaded_per_token,
        acceptance_rate=None if stats.speculation is None else stats.speculation.acceptance_rate,
    )
    decode_steps = max(len(tokens) - 1, 1)
    result.host_ms_per_token = 1000 * stats.decode_host_seconds / decode_steps
    if (cache := engine.expert_cache()) is not None:
        result.miss_policy = engine.miss_policy
        result.hit_rate = cache.total.hit_rate
        result.bytes_copied_per_token = (_copied(engine) - prefill_copies[0]) / decode_steps
    return result


class LaunchCounter(TorchDispatchMode):
    """Counts the aten ops that launch work: views, allocations and aliases launch none. A function
    wrapped by `as_one` counts once, whatever it runs (a fused kernel stand-in)."""

    NONE = {"empty", "empty_strided", "empty_like", "new_empty", "lift_fresh", "detach", "detach_", "alias"}
    NONE |= {"_unsafe_view"}

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self._inside, self._counting = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        returned = func._schema.returns
        view = returned and returned[0].alias_info is not None and not returned[0].alias_info.is_write
        if not self._inside and not view and func.name().split("::")[-1].split(".")[0] not in self.NONE:
            self.ops[func.name()] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._counting = True
        return super().__enter__()

    def __exit__(self, *exc):
        self._counting = False
        return super().__exit__(*exc)

    def as_one(self, fn: Callable) -> Callable:
        def counted(*args, **kwargs):
            if self._counting:
                self.ops[getattr(fn, "__name__", "kernel")] += 1
            self._inside += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._inside -= 1

        return counted


def decode_ops(engine: Engine, prompt: list[int], counter: LaunchCounter | None = None) -> Counter[str]:
    """The kernel-launching ops of one decode token after `prompt`, as generation runs it (the second
    one: the first may allocate), counted by `counter` (a fresh one by default)."""
    from localmoe.runtime.generate import DecodeSteps

    counter = counter or LaunchCounter()
    model = engine.model
    cache = model.new_cache(1, len(prompt) + 2)
    steps = DecodeSteps(model, cache)
    with torch.inference_mode():
        model(torch.tensor([prompt], device=engine.device), cache)
        steps(torch.tensor([[prompt[-1]]], device=engine.device))
        with counter:
            steps(torch.tensor([[prompt[0]]], device=engine.device))
    return counter.ops


def _copied(engine: Engine) -> int:
    cache = engine.expert_cache()
    return cache.total.bytes_copied if cache is not None else 0


def machine() -> dict[str, str]:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": str(psutil.cpu_count()),
        "ram": format_bytes(psutil.virtual_memory().total),
        "gpu": gpu or "none",
        "torch": torch.__version__,
        "python": platform.python_version(),
        # other work on the machine slows every run: the spread of interleaved repeats shows how much
        "load average": ", ".join(f"{v:.1f}" for v in psutil.getloadavg()) + " (1, 5, 15 min, when written)",
    }


def results_table(
    results: list[RunResult], floor_s: float | None = None, baseline: str | None = None, markdown: bool = True
) -> str:
    """The runs as a table (Markdown, or aligned columns for a terminal), with the ratio of each decode
    speed to the baseline's and the floor's multiple where given."""
    base = next((r for r in results if r.name == baseline), None)
    columns = ["run", "misses", "prefill tok/s", "first token s", "decode tok/s", "vs baseline", "x floor"]
    columns += ["host ms/token", "ops/layer", "peak memory", "hit rate", "copied/token", "loaded/token"]
    speculative = any(r.acceptance_rate is not None for r in results)
    columns += ["accepted"] if speculative else []
    rows = []
    for r in results:
        ratio = f"{r.decode_tokens_per_s / base.decode_tokens_per_s:.2f}x" if base and base.decode_tokens_per_s else ""
        multiple = f"{(1 / r.decode_tokens_per_s) / floor_s:.1f}" if floor_s and r.decode_tokens_per_s else ""
        hit = "" if r.hit_rate is None else f"{r.hit_rate:.3f}"
        copied = "" if r.bytes_copied_per_token is None else format_bytes(int(r.bytes_copied_per_token))
        host = "" if r.host_ms_per_token is None else f"{r.host_ms_per_token:.2f}"
        ops = "" if r.ops_per_layer is None else f"{r.ops_per_layer:.0f}"
        rows.append(
            [r.name, r.miss_policy, f"{r.prefill_tokens_per_s:.1f}", f"{r.time_to_first_token_s:.2f}"]
            + [f"{r.decode_tokens_per_s:.2f}", ratio, multiple, host, ops, format_bytes(r.peak_memory_bytes)]
            + [hit, copied, "" if r.loaded_per_token is None else f"{r.loaded_per_token:.1f}"]
            + ([_share(r.acceptance_rate)] if speculative else [])
        )
    return render(columns, rows, markdown)


def _share(rate: float | None) -> str:
    return "" if rate is None else f"{rate:.1%}"


def baseline_of(runs: list[RunResult]) -> str | None:
    """The name of the transformers run among `runs`, the others' baseline."""
    return next((run.name for run in runs if run.name.startswith("transformers")), None)


def label(run: RunResult) -> str:
    return f"{run.name} (misses: {run.miss_policy})" if run.miss_policy else run.name


def write_benchmarks(results_dir: Path, docs: Path) -> None:
    """docs/benchmarks.md from every result file: decode runs (scripts/bench_decode.py, the latest per
    device and model first), then cache policies (`cache/`), expert kernels (scripts/bench_kernels.py, in
    `kernels/`), quantization quality (`quant/`), the CPU kernels beside llama.cpp (scripts/bench_cpu.py, in
    `cpu/`) and the kernels compiled for GPUs (scripts/check_kernels.py, the latest, in `compile/`)."""
    results = _latest_first(results_dir)
    lines = [
        "# Benchmarks",
        "",
        "Every figure below was measured by `scripts/bench_decode.py`; each section gives the command and the",
        "machine. This file is regenerated from `bench/results/` by that script: do not edit it by hand. A",
        "configuration that was not measured has no row.",
        "",
        "Columns: prefill and decode speed in tokens per second, time to the first token, decode speed as a",
        "multiple of the transformers baseline's (with accelerate's device_map under the budget, or all in memory),",
        "decode time per token as a multiple of the",
        "physical floor (see below), the host's time per decode token (queueing the step and sampling, not",
        "waiting for the device: on the CPU, all of it), the kernel-launching aten ops of one decode token per",
        "MoE layer, peak memory (CUDA: allocated on the device; CPU: the process's resident set after the run),",
        "the expert cache's hit rate and the bytes it copied per decode token.",
        "",
        "The floor is max(bytes a token must copy / host-to-device bandwidth, bytes it must read / device",
        "memory bandwidth), with both bandwidths measured in the same run; on the CPU, bytes read and copied",
        "over the measured RAM bandwidth. Cache policies replayed on real routing (`scripts/simulate_cache.py`),",
        "the expert kernels (`scripts/bench_kernels.py`), the quality of quantized experts",
        "(`scripts/quant_quality.py`), the CPU kernels beside llama.cpp (`scripts/bench_cpu.py`) and the",
        "kernels' registers when compiled for GPUs (`scripts/check_kernels.py`) come last.",
    ]
    for r in results:
        lines += _heading(f"{r['model']} on {r['device']} ({r['dtype']}), {r['date']}", r)
        floor = r["floor"]
        bw = ", ".join(f"{k.replace('_', ' ')} {v / 1e9:.1f} GB/s" for k, v in r["bandwidth"].items())
        lines += [
            f"Checkpoint: {r['checkpoint']}. Budget: {r['budget']}. Prompt {r['prompt_tokens']} tokens, "
            f"{r['new_tokens']} new tokens. Measured bandwidth: {bw}. Floor: {floor['floor_s'] * 1000:.1f} ms per "
            f"token ({floor['bound']}; {format_bytes(floor['read_bytes_per_token'])} read per token).",
            "",
        ]
        runs = [RunResult(**{k: v for k, v in run.items()}) for run in r["runs"]]
        lines += [results_table(runs, floor["floor_s"], baseline_of(runs)), ""]
        lines += [f"- {label(run)}: {run.detail}" for run in runs if run.detail]
        lines += [f"- greedy tokens equal to the reference run's, before the first difference: {r['same_tokens']}"]
    sections = _cache_sections(results_dir / "cache") + _kernel_sections(results_dir / "kernels")
    sections += _quality_sections(results_dir / "quant") + _cpu_sections(results_dir / "cpu")
    sections += _compile_sections(results_dir / "compile")
    write_atomic(docs, "\n".join(lines + sections) + "\n")


def _latest_first(folder: Path) -> list[dict]:
    """The result files in `folder`, newest first."""
    results = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    return sorted(results, key=lambda r: r["date"], reverse=True)


def _heading(title: str, result: dict) -> list[str]:
    """A section's title, the command that measured it and the machine it ran on."""
    machine = ", ".join(f"{k} {v}" for k, v in result["machine"].items())
    return ["", f"## {title}", "", f"Command: `{result['command']}`", "", f"Machine: {machine}.", ""]


def _cache_sections(folder: Path) -> list[str]:
    results = _latest_first(folder)
    lines = []
    for r in results:
        total = r["layers"] * r["experts"]
        lines += _heading(f"Cache policies on the routing of {r['trace']}, {r['date']}", r)
        lines += [
            f"{r['requests']} requests, {r['tokens']} tokens, {r['layers']} MoE layers x {r['experts']} experts, "
            f"top-{r['top_k']}, "
            "replayed through the runtime's own `ExpertCache`. Hit rate: share of expert uses found in a slot. "
            "Belady: the offline optimum of a pool that may leave a miss uncached and chooses what to keep once "
            "each token is over (the direct miss policy's optimum; it bounds every policy); admit-all: Belady "
            "made to cache every miss before use, the bound of a policy that copies every miss. Static oracle: "
            "the experts the trace uses most, pinned from the start. Start: one cache through the whole trace "
            "(continuing), each request a run of its own from an empty cache (fresh), or from the routing profile"
            " of the other requests (profile). Miss policies: copy (every miss copied before use, the bound: "
            "admit-all Belady), bypass (misses the policy would not admit computed on the CPU), direct (misses "
            "read where they lie, then admitted when the token is over if the policy ranks them above their "
            "victim). Copied, CPU and in place: experts per token.",
        ]
        for size in r["sizes"]:
            lines += [
                "",
                f"**{size['slots']} slots ({size['slots'] / total:.0%} of experts)**: Belady {size['belady']:.3f}, "
                f"admit-all Belady {size['belady_admit_all']:.3f}, static oracle {size['static_oracle']:.3f}.",
                "",
                "| policy | pool | start | hit rate | of Belady | of admit-all Belady | copied | CPU | in place |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for row in size["rows"]:
                lines.append(
                    f"| {row['policy']} | {row['pool']} | {row['start']} | {row['hit_rate']:.3f} | "
                    f"{row['of_belady']:.2f} | {row['of_belady_admit_all']:.2f} | {row['copied_per_token']:.2f} | "
                    f"{row['on_cpu_per_token']:.2f} | {row['in_place_per_token']:.2f} |"
                )
        sweep = r["decay_sweep"]
        if sweep["rows"]:
            lines += ["", f"Score policy by decay, {sweep['slots']} slots, per-layer pool:", ""]
            lines += ["| decay | continuing | from a profile |", "|---|---|---|"]
            lines += [f"| {s['decay']} | {s['continuing']:.3f} | {s['profile']:.3f} |" for s in sweep["rows"]]
    return lines


def _quality_sections(folder: Path) -> list[str]:
    results = _latest_first(folder)
    lines = []
    for r in results:
        lines += _heading(f"Quantized experts: quality on {r['model']} ({r['dtype']}), {r['date']}", r)
        lines += [
            f"Against the same experts unquantized, over {r['prompts']}: the experts' relative output error",
            "per MoE layer (mean and worst layer), the KL divergence of next-token distributions per position,",
            "and how often the greedy token given the same prefix agrees.",
            "",
            "| bits | group | expert error mean | expert error worst layer | KL per token | greedy agreement |",
            "|---|---|---|---|---|---|",
        ]
        for row in r["rows"]:
            lines.append(
                f"| {row['bits']} | {row['group']} | {row['expert_error_mean']:.4f} | {row['expert_error_max']:.4f} "
                f"| {row['kl']:.2e} | {row['agreement']:.2%} |"
            )
    return lines


def _cpu_sections(folder: Path) -> list[str]:
    """scripts/bench_cpu.py's runs: localmoe's CPU kernels beside llama.cpp and transformers."""
    lines = []
    for r in _latest_first(folder):
        lines += _heading(f"CPU decode and prefill beside llama.cpp, {r['threads']} threads, {r['date']}", r)
        lines += [
            f"Prompt {r['prompt_tokens']} tokens, {r['new_tokens']} new tokens, {r['rounds']} rounds with every engine "
            "once per round: the median tokens/s and (in brackets) the range over the rounds. x llama.cpp: the median "
            "as a multiple of llama.cpp's in the same format (its experts-only file where there is one: the same "
            "bytes per token as localmoe); of floor: the median as a share of the tokens/s that reading the weights "
            "at the RAM bandwidth measured in each round would allow.",
        ]
        for model in r["models"]:
            config, bw = model["config"], model["bandwidth"]
            experts = config.get("num_local_experts") or config.get("num_experts")
            inter = config.get("moe_intermediate_size") or config["intermediate_size"]
            lines += [
                "",
                f"**{config['model_type']}**: hidden {config['hidden_size']}, {experts} experts of "
                f"{inter}, top-{config['num_experts_per_tok']}, "
                f"{config['num_hidden_layers']} layers; RAM read {bw['median'] / 1e9:.1f} GB/s "
                f"({bw['min'] / 1e9:.1f}-{bw['max'] / 1e9:.1f}). {_load(model)}",
                "",
                "| engine | format | decode tok/s | x llama.cpp | of floor | prefill tok/s | x llama.cpp | of floor | "
                "read per token |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            llama = {row["format"]: row for row in model["rows"] if row["engine"] == "llama.cpp"}
            for row in model["rows"]:
                same = llama.get(f"{row['format']}, experts only") or llama.get(row["format"])
                base = None if row["engine"] == "llama.cpp" else same
                cells = [row["engine"], row["format"]]
                for kind in ("decode", "prefill"):
                    rate = row[kind]
                    cells.append(f"{rate['median']:.1f} ({rate['min']:.1f}-{rate['max']:.1f})")
                    cells.append(f"{rate['median'] / base[kind]['median']:.2f}" if base else "")
                    cells.append(f"{rate['median'] / row[f'floor_{kind}']:.0%}")
                lines.append("| " + " | ".join([*cells, format_bytes(row["read_per_token"])]) + " |")
            lines += [f"- {row['engine']} {row['format']}: {row['detail']}" for row in model["rows"] if row["detail"]]
    return lines


def _load(model: dict) -> str:
    """The machine's load average during a model's rounds, where measured, else a note on it."""
    note = model.get("note", "")
    if "load" in model:
        load = model["load"]
        spread = f"{load['median']:.1f} ({load['min']:.1f}-{load['max']:.1f})"
        return f"Load average (1 minute) at each round's start: {spread}. {note}".strip()
    return note


def _kernel_sections(folder: Path) -> list[str]:
    results = _latest_first(folder)
    lines = []
    for r in results:
        lines += _heading(f"Expert kernels on {r['device']} ({r['dtype']}), {r['date']}", r)
        lines += [
            "Milliseconds per MoE layer call, the median of the timed repeats: the fused Triton kernels, the",
            "PyTorch reference (one expert at a time, pair outputs summed once), and a per-expert loop as",
            "transformers computes it. Bandwidth: expert bytes the call reads over its time, and that as a share",
            f"of the device's measured copy bandwidth ({r['bandwidth'] / 1e9:.1f} GB/s). {r['note']}",
            "",
            "| shape | tokens | triton ms | reference ms | per-expert loop ms | triton GB/s | share of copy bw |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in r["rows"]:
            triton, rate = row["triton_ms"], row["triton_bandwidth"]
            measured = ["", "", ""] if triton is None else [f"{triton:.3f}", f"{rate / 1e9:.1f}"]
            if triton is not None:
                measured.append(f"{rate / r['bandwidth']:.0%}")
            cells = [row["shape"], str(row["tokens"]), measured[0], f"{row['reference_ms']:.3f}"]
            cells += [f"{row['loop_ms']:.3f}", *measured[1:]]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _compile_sections(folder: Path) -> list[str]:
    lines = []
    for r in _latest_first(folder)[:1]:  # the kernels as they are now
        lines += _heading(f"Expert kernels compiled for GPUs (Triton {r['triton']}), {r['date']}", r)
        lines += [
            "`scripts/check_kernels.py` compiled every variant of the Triton expert kernels ahead of time with",
            "Triton's compiler and ptxas, without a GPU: registers per thread for each target (and bytes of",
            "register spills, if any), and the most shared memory of any target. Biases, input scale, direct",
            "read: all three at once, the most a variant needs. Shapes enter the kernels as runtime integers, so",
            "rows that differ only in shape are mostly the same binary. It took "
            f"{r['seconds']} s with {r['jobs']} processes, {r['cpu_seconds']} s of CPU, for {r['compiles']} "
            "distinct compiles (the machine's other work slows the first figure, not the second).",
            "",
            *compile_table(r["rows"], r["targets"]),
        ]
    return lines


def compile_table(rows: list[dict], targets: list[int]) -> list[str]:
    """The lines of check_kernels' table: one row per variant, registers per target, shared memory."""
    head = "| shape | format | kernel | biases, input scale, direct read | " + " | ".join(f"sm_{t}" for t in targets)
    lines = [head + " | shared KiB |", "|---" * (5 + len(targets)) + "|"]
    for row in rows:
        label = row["label"]
        kernel = label["kernel"] + (f" ({label['activation']})" if "activation" in label else "")
        cells = [label["shape"], label["format"], kernel, "yes" if label["extras"] else "no"]
        cells += [row["cells"][str(t)] for t in targets]
        lines.append("| " + " | ".join(cells) + f" | {row['shared'] / 1024:.1f} |")
    return lines
