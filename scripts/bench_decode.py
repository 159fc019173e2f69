"""Decode benchmark, side by side in one process, on one checkpoint, prompt, device and dtype:

  1. localmoe with a device budget that holds only part of the routed experts, once per miss policy
     (read every miss where it lies, copy it to the device, compute it on the CPU from the host copy,
     or choose per miss);
  2. transformers: with accelerate's device_map="auto" and the same budget as max_memory (what users
     try first: what does not fit goes to host RAM, or to disk when the device is the CPU), or with
     `--baseline resident` all of it in memory;
  3. localmoe with every expert resident, where that fits the device.

Beside tokens/s each run reports the host's time per decode token (queueing the step and sampling,
not waiting for the device; on the CPU, all of it) and the kernel-launching ops of one decode token
per MoE layer. With `--repeats N` every configuration runs N times, interleaved (each loaded afresh),
and the table gives the median with the spread in the notes. It measures the bandwidths of the
machine and reports the physical floor of a decode token, then writes
bench/results/<date>-<device>-<model>.json and regenerates docs/benchmarks.md from every result.

    python scripts/bench_decode.py --random mixtral --experts-gib 1.4 --budget-share 0.33 --device cpu
    python scripts/bench_decode.py --checkpoint ~/models/Qwen3-30B-A3B --device cuda --vram-budget 12GiB
    python scripts/bench_decode.py --random qwen3_moe_48x128 --device cpu --dtype float32 --budget-share 0.25 \
        --miss-policies direct --baseline resident --repeats 5     # host time per token, Qwen3-30B-A3B's routing

On the CPU, localmoe reads the experts it has no slot for from the checkpoint files (mmap), as
accelerate reads them from its offload folder: the same memory envelope for both (`--host-ram` keeps
them in RAM instead, as the direct miss policy needs). The shards are read once before the runs, so
that all of them start with the checkpoint in the page cache.
"""

import argparse
import datetime
import gc
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from localmoe.bench import (  # noqa: E402
    QWEN3_ROUTING_TINY,
    LaunchCounter,
    RunResult,
    baseline_of,
    decode_floor,
    decode_ops,
    label,
    machine,
    measure_bandwidth,
    results_table,
    run_engine,
    write_benchmarks,
)
from localmoe.demo import write_random_checkpoint  # noqa: E402
from localmoe.engine import RuntimeOptions, load, plan_for  # noqa: E402
from localmoe.files import write_atomic  # noqa: E402
from localmoe.loader import DTYPES  # noqa: E402
from localmoe.options import parse_size  # noqa: E402
from localmoe.paths import cache_dir  # noqa: E402
from localmoe.runtime.memory import format_bytes  # noqa: E402

SHAPES = {
    # one expert of 22 MB in bf16, 8 per layer, top-2
    "mixtral": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": 1024,
        "intermediate_size": 3584,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
    # one expert of 4.7 MB in bf16, 64 per layer, top-8
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "moe_intermediate_size": 768,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
    },
    "qwen3_moe_48x128": QWEN3_ROUTING_TINY,
}


def random_checkpoint(shape: str, experts_gib: float) -> Path:
    """A random checkpoint of the given shape with about `experts_gib` of routed experts (bf16), written
    once into localmoe's cache folder."""
    config = {"vocab_size": 32000, **SHAPES[shape], "max_position_embeddings": 4096, "torch_dtype": "bfloat16"}
    inter = config.get("moe_intermediate_size", config["intermediate_size"])
    experts = config.get("num_local_experts") or config["num_experts"]
    expert_bytes = 3 * config["hidden_size"] * inter * 2
    config.setdefault("num_hidden_layers", max(1, round(experts_gib * 2**30 / (experts * expert_bytes))))
    folder = cache_dir() / "bench" / f"random-{shape}-{config['num_hidden_layers']}layers"
    if not (folder / "config.json").is_file():
        print(f"writing a random {shape} checkpoint to {folder} ...", flush=True)
        write_random_checkpoint(folder, {**config, "bos_token_id": 1, "eos_token_id": None}, shard_bytes=1 << 30)
    return folder


BASELINE = "transformers + accelerate"


def run_baseline(
    path: Path, device: torch.device, dtype: torch.dtype, budget: int | None, prompt: list[int], new_tokens: int
):
    """transformers, greedy decode with its KV cache: with accelerate's device_map="auto" under the budget,
    or (no budget) all of it on the device. The CPU's host time per token is the whole decode time there;
    on CUDA it is not measured."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as offload:
        memory = {"cpu": budget} if device.type == "cpu" else {device.index or 0: budget, "cpu": "1000GiB"}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        placed = {"device_map": "auto", "max_memory": memory, "offload_folder": offload} if budget else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placed)
        if not budget:
            model.to(device)
        model.eval()
        first_device = next(model.parameters()).device if device.type == "cpu" else device
        ids = torch.tensor([prompt], device=first_device)
        tokens, timings = [], []
        with torch.no_grad():
            model(ids[:, :1])  # warm up
            start = time.perf_counter()
            out = model(ids, use_cache=True)
            for _ in range(new_tokens):
                token = out.logits[:, -1:].argmax(-1)
                tokens.append(int(token))
                timings.append(time.perf_counter() - start)
                if len(tokens) == new_tokens:
                    break
                start = time.perf_counter()
                out = model(token.to(first_device), past_key_values=out.past_key_values, use_cache=True)
            counter = LaunchCounter()
            with counter:
                model(token.to(first_device), past_key_values=out.past_key_values, use_cache=True)
        placement = sorted({str(d) for d in model.hf_device_map.values()}) if budget else [str(device)]
        moe_layers = sum(1 for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock")) or 1
        del model
    import psutil

    decode = sum(timings[1:])
    return RunResult(
        name=BASELINE if budget else "transformers",
        prefill_tokens_per_s=len(prompt) / timings[0],
        time_to_first_token_s=timings[0],
        decode_tokens_per_s=(len(timings) - 1) / decode if decode else 0.0,
        peak_memory_bytes=torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else psutil.Process().memory_info().rss,
        host_ms_per_token=1000 * decode / max(len(timings) - 1, 1) if device.type == "cpu" else None,
        ops_per_layer=sum(counter.ops.values()) / moe_layers,
        detail=f"device_map over {', '.join(placement)}" if budget else "every weight in memory",
        tokens=tokens,
    )


def median_run(runs: list[RunResult]) -> RunResult:
    """The run of median decode speed among repetitions, its notes saying the spread."""
    if len(runs) == 1:
        return runs[0]
    ranked = sorted(runs, key=lambda r: r.decode_tokens_per_s)
    middle = ranked[len(ranked) // 2]
    rates = [r.decode_tokens_per_s for r in runs]
    hosts = [r.host_ms_per_token for r in runs if r.host_ms_per_token is not None]
    spread = f"median of {len(runs)} interleaved runs: decode {min(rates):.2f}-{max(rates):.2f} tok/s"
    if hosts:
        spread += f", host {min(hosts):.2f}-{max(hosts):.2f} ms/token (median {statistics.median(hosts):.2f})"
    middle.detail = f"{middle.detail}; {spread}" if middle.detail else spread
    return middle


def read_once(folder: Path) -> None:
    """Read the checkpoint's shards once, so that every run finds them in the page cache alike, not only
    the runs after the first."""
    for shard in sorted(folder.glob("*.safetensors")):
        with shard.open("rb") as f:
            while f.read(2**24):
                pass


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint folder or Hub repo id")
    source.add_argument("--random", choices=sorted(SHAPES), help="write and use a random checkpoint of this shape")
    parser.add_argument("--experts-gib", type=float, default=1.4, help="routed expert bytes of --random")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--vram-budget", help="device budget, e.g. 12GiB (default: from --budget-share)")
    parser.add_argument("--budget-share", type=float, default=0.33, help="share of the experts the budget holds")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--miss-policies", default="direct,copy,cpu,auto", help="comma-separated, one localmoe run each"
    )
    parser.add_argument("--expert-bits", type=int, default=16, choices=[16, 8, 4], help="for the localmoe runs")
    parser.add_argument("--expert-group-size", type=int, default=64)
    parser.add_argument(
        "--baseline",
        default="offload",
        choices=["offload", "resident", "none"],
        help="transformers under the budget with accelerate's device_map, or all of it in memory, or none",
    )
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs of every configuration")
    parser.add_argument("--host-ram", action="store_true", help="CPU: the experts' host copy in RAM, not mmap")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    path = str(random_checkpoint(args.random, args.experts_gib) if args.random else args.checkpoint)
    everything = plan_for(path, device=args.device, dtype=dtype, options=RuntimeOptions(vram_budget=2**62))
    fp = everything.footprint
    fixed = everything.device_bytes - everything.pool_bytes
    budget = (
        parse_size(args.vram_budget)
        if args.vram_budget
        else int(fixed + args.budget_share * fp.total_experts * fp.expert_bytes)
    )
    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    prompt = torch.randint(3, min(3000, vocab), (args.prompt_tokens,), generator=torch.Generator().manual_seed(0))
    prompt = prompt.tolist()
    print(
        f"{path}: {fp.total_experts} experts of {format_bytes(fp.expert_bytes)}, budget {format_bytes(budget)}",
        flush=True,
    )

    bandwidth = measure_bandwidth(device)
    read_once(Path(path))
    # On the CPU the "device" is RAM too: unless --host-ram, the experts without a slot stay in the checkpoint
    # files (mmap), where the direct miss policy cannot read them: it is skipped then.
    host_budget = 1 if device.type == "cpu" and not args.host_ram else None
    policies = [p for p in args.miss_policies.split(",") if not (p == "direct" and host_budget)]

    def localmoe_run(miss_policy: str | None) -> RunResult:
        if miss_policy is None:
            engine = load(path, device=args.device, dtype=dtype, options=RuntimeOptions(profile=None))
            name, detail = "localmoe all-resident", "every expert on the device"
        else:
            options = RuntimeOptions(
                vram_budget=budget,
                host_budget=host_budget,
                miss_policy=miss_policy,
                expert_bits=args.expert_bits,
                expert_group_size=args.expert_group_size,
                profile=None,
            )
            engine = load(path, device=args.device, dtype=dtype, options=options)
            name, detail = "localmoe", f"{engine.plan.slots} of {fp.total_experts} experts in slots, host copy: "
            detail += engine.plan.store
            if args.expert_bits < 16:
                detail += f", experts at {args.expert_bits} bits (groups of {args.expert_group_size})"
            if engine.bandwidths:
                rates = engine.bandwidths
                detail += f", calibrated copy {rates.copy / 1e9:.2f} GB/s and CPU {rates.cpu / 1e9:.2f} GB/s"
        result = run_engine(engine, name, prompt, args.new_tokens, detail)
        result.ops_per_layer = sum(decode_ops(engine, prompt).values()) / fp.moe_layers
        del engine
        free_memory()
        return result

    configurations = [lambda p=p: localmoe_run(p) for p in policies]
    if args.baseline != "none":
        baseline_budget = budget if args.baseline == "offload" else None
        configurations.append(lambda: run_baseline(Path(path), device, dtype, baseline_budget, prompt, args.new_tokens))
    if everything.device_bytes <= _free(device):
        configurations.append(lambda: localmoe_run(None))
    repeated = [[] for _ in configurations]
    for _ in range(args.repeats):  # interleaved, so that a slow spell of the machine hits every configuration
        for runs_of, run in zip(repeated, configurations, strict=True):
            runs_of.append(run())
    runs = [median_run(runs_of) for runs_of in repeated]

    floor = decode_floor(fp, bandwidth, runs[0].bytes_copied_per_token or 0.0)
    reference = runs[-1].tokens if runs[-1].name == "localmoe all-resident" else runs[0].tokens
    same = ", ".join(f"{label(run)} {common_prefix(run.tokens, reference)}/{len(reference)}" for run in runs)
    print(results_table(runs, floor["floor_s"], baseline_of(runs)))
    print(f"floor {floor['floor_s'] * 1000:.1f} ms/token ({floor['bound']}); same tokens: {same}")

    now = datetime.datetime.now(datetime.timezone.utc)
    model = Path(path).name
    result = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python scripts/bench_decode.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": machine(),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": args.dtype,
        "model": model,
        "checkpoint": f"{model}, {fp.moe_layers} MoE layers x {fp.experts_per_layer} experts of "
        f"{format_bytes(fp.expert_bytes)}, top-{fp.top_k}, {format_bytes(fp.resident_bytes)} of other weights",
        "budget": format_bytes(budget),
        "prompt_tokens": len(prompt),
        "new_tokens": args.new_tokens,
        "bandwidth": bandwidth,
        "floor": floor,
        "runs": [run.as_dict() for run in runs],
        "same_tokens": same,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{now:%Y%m%d-%H%M}-{device.type}-{model}.json"
    write_atomic(out, json.dumps(result, indent=2))
    write_benchmarks(args.out, args.docs)
    print(f"wrote {out} and {args.docs}")


def common_prefix(tokens: list[int], reference: list[int]) -> int:
    """How many greedy tokens agree before the first difference."""
    return next((i for i, (a, b) in enumerate(zip(tokens, reference, strict=False)) if a != b), len(reference))


def _free(device: torch.device) -> int:
    import psutil

    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available


if __name__ == "__main__":
    main()
