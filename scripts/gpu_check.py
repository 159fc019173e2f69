"""localmoe's own check of its CUDA paths on a real GPU: about 6 minutes on one H100 or H200.

    python scripts/gpu_check.py [--work DIR] [--budget-s 480] [--phases kernels,overflow,...]

Every phase prints one line `RESULT {json}`; nothing is downloaded. The phases:

  env        the GPU, its capability, torch and Triton
  kernels    the Triton kernels against the reference at real expert shapes (decode and prefill), and the
             decode kernels' bytes per second against a device-to-device copy; the direct-read path (every
             expert in registered host rows) against a pinned host-to-device copy, and bit for bit the slot path
  overflow   gpt-oss's MXFP4 pool with biases past 2^31 elements (400 slots): the last slot against the
             reference (32-bit bias offsets read elsewhere there)                              [subprocess]
  register   a registration the driver refuses (the same memory twice): the next kernel still runs; a host
             stack that is not registered is refused by the launcher with an error, never read  [subprocess]
  offload    a synthetic Qwen3-30B-A3B-shaped checkpoint (48 layers x 32 experts of 2048 x 768, top-8, 15 GB
             of bf16 experts) all resident, then with a quarter of its experts in slots: decode tokens/s, hit
             rate, bytes copied per token, stall, time per token as a multiple of the floor, and greedy
             tokens equal to the all-resident run's
  card12     a 12 GB card emulated by capping the allocator: the default plan for it, prompts of 512, 2048
             and 3584 tokens, and the peak memory against the plan                              [subprocess]

Without CUDA it says so in one RESULT line and exits with status 2. How to read the numbers: README.md.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from localmoe.runtime.pinning import Driver  # noqa: E402

DRIVER = Driver()

PHASES = ("env", "kernels", "overflow", "register", "offload", "card12")
STARTED = time.perf_counter()
GiB = 2**30
# A Qwen3-30B-A3B-shaped model with a quarter of its experts (15 GB of bf16 experts instead of 58).
QWEN3_LIKE = dict(
    layers=48, experts=32, hidden=2048, inter=768, heads=32, kv_heads=4, head_dim=128, vocab=32000, top_k=8
)


def result(phase: str, **data) -> None:
    data["t"] = round(time.perf_counter() - STARTED, 1)
    print("RESULT", json.dumps({"phase": phase, **data}, default=str), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="where the synthetic checkpoint goes (16 GB); default: a temp dir")
    parser.add_argument("--budget-s", type=float, default=480, help="skip what would start after this many seconds")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    args = parser.parse_args()
    phases = args.phases.split(",")
    if unknown := sorted(set(phases) - set(PHASES)):
        parser.error(f"unknown phases {', '.join(unknown)}: choose from {', '.join(PHASES)}")
    if not torch.cuda.is_available():
        result("refused", reason="no CUDA device: this check runs the CUDA paths on a real GPU")
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="localmoe-gpu-check-"))
    os.environ.setdefault("LOCALMOE_CACHE", str(work / "cache"))
    runs = {
        "env": phase_env,
        "kernels": phase_kernels,
        "overflow": lambda: in_subprocess("overflow", OVERFLOW, 240),
        "register": lambda: in_subprocess("register", REGISTER, 120),
        "offload": lambda: phase_offload(work),
        "card12": lambda: phase_card12(work),
    }
    for name in phases:
        if time.perf_counter() - STARTED > args.budget_s:
            result(name, skipped=f"past the {args.budget_s:.0f} s budget")
            continue
        try:
            runs[name]()
        except Exception as error:  # a phase that fails says how, and the next one still runs
            result(name, error=f"{type(error).__name__}: {str(error)[:500]}")
    result("done")
    return 0


def phase_env() -> None:
    import triton

    free, total = torch.cuda.mem_get_info()
    result(
        "env",
        gpu=torch.cuda.get_device_name(),
        capability=torch.cuda.get_device_capability(),
        memory_GiB=round(total / GiB, 1),
        free_GiB=round(free / GiB, 1),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=triton.__version__,
    )


def seconds_per_call(fn, repeats: int = 20) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def copy_rate(target: torch.Tensor, source: torch.Tensor) -> float:
    """Bytes per second of target.copy_(source)."""
    return source.numel() * source.element_size() / seconds_per_call(lambda: target.copy_(source, non_blocking=True), 5)


def register(tensor: torch.Tensor) -> int:
    """Page-lock a CPU tensor's memory and map it into the device's address space as the runtime does
    (localmoe.runtime.pinning: cuMemHostRegister, PORTABLE | DEVICEMAP); the driver's status (0: done)."""
    return DRIVER.register(tensor.data_ptr(), tensor.numel() * tensor.element_size())


def unregister(tensor: torch.Tensor) -> int:
    return DRIVER.unregister(tensor.data_ptr())


# name: (hidden, expert intermediate, top-k, weight format, the activation's GatedActivation fields)
KERNEL_SHAPES = {
    "qwen3-30b-a3b bf16": (2048, 768, 8, "bf16", {}),
    "mixtral-8x7b bf16": (4096, 14336, 2, "bf16", {}),
    "qwen3-30b-a3b int4 g64": (2048, 768, 8, "int4", {}),
    "qwen3-30b-a3b int8 g64": (2048, 768, 8, "int8", {}),
    "deepseek-v3 fp8 b128": (7168, 2048, 8, "fp8", {}),
    "gpt-oss mxfp4 + biases": (2880, 2880, 4, "mxfp4", {"kind": "clamped_swiglu"}),
    "nemotron-3-nano bf16 ungated relu2": (2688, 1856, 6, "bf16", {"kind": "ungated", "act": "relu2"}),
}


def random_experts(fmt: str, experts: int, hidden: int, inter: int, device, gated=True, dtype=torch.bfloat16):
    """gate_up and down of `experts` random experts in a weight format (gate_up up alone where not
    `gated`), and their bytes per expert."""
    from localmoe.kernels.quantized import Fp8Weights, Mxfp4Weights, QuantSpec, quantized_stack

    in_rows = (2 if gated else 1) * inter

    def matrices(rows, columns):
        return (torch.randn(experts, rows, columns, device=device) * columns**-0.5).to(dtype)

    if fmt in ("bf16", "int8", "int4"):
        stacks = [matrices(in_rows, hidden), matrices(hidden, inter)]
        if fmt != "bf16":
            stacks = [quantized_stack(stack, QuantSpec(int(fmt[3:]), 64)) for stack in stacks]
    elif fmt == "fp8":

        def fp8(rows, columns):
            bits = torch.randn(experts, rows, columns, device=device).to(torch.float8_e4m3fn).view(torch.uint8)
            return Fp8Weights(bits, torch.rand(experts, rows // 128, columns // 128, device=device) / 64, 128, dtype)

        stacks = [fp8(in_rows, hidden), fp8(hidden, inter)]
    else:

        def mxfp4(rows, columns):
            blocks = torch.randint(0, 256, (experts, rows, columns // 2), device=device, dtype=torch.uint8)
            scales = torch.randint(117, 121, (experts, rows, columns // 32), device=device, dtype=torch.uint8)
            return Mxfp4Weights(blocks, scales, dtype)

        stacks = [mxfp4(in_rows, hidden), mxfp4(hidden, inter)]
    nbytes = sum(part.numel() * part.element_size() for stack in stacks for part in _parts(stack)) // experts
    return stacks, nbytes


def _parts(stack) -> list[torch.Tensor]:
    return (
        [stack] if isinstance(stack, torch.Tensor) else [v for v in vars(stack).values() if isinstance(v, torch.Tensor)]
    )


def host_copies(stacks: list) -> tuple[torch.Tensor, list]:
    """Copies of stacks (tensors or quantized stacks) in one page-aligned host buffer, to be registered at
    once (two registrations may not share a page): (the buffer, the copies)."""
    import dataclasses

    parts = [part for stack in stacks for part in _parts(stack)]
    sizes = [(part.numel() * part.element_size() + 4095) // 4096 * 4096 for part in parts]
    raw = torch.empty(sum(sizes) + 4096, dtype=torch.uint8)
    buffer = raw[-raw.data_ptr() % 4096 :][: sum(sizes)]
    views, offset = {}, 0
    for part, size in zip(parts, sizes, strict=True):
        nbytes = part.numel() * part.element_size()
        views[id(part)] = buffer[offset : offset + nbytes].view(part.dtype).view(part.shape).copy_(part)
        offset += size

    def copy(stack):
        if isinstance(stack, torch.Tensor):
            return views[id(stack)]
        fields = {name: views[id(v)] for name, v in vars(stack).items() if isinstance(v, torch.Tensor)}
        return dataclasses.replace(stack, **fields)

    return buffer, [copy(stack) for stack in stacks]


def phase_kernels() -> None:
    from localmoe.models.moe import GatedActivation

    device = torch.device("cuda")
    source = torch.empty(GiB, dtype=torch.uint8, device=device)
    device_copy = 2 * copy_rate(torch.empty_like(source), source)  # read and written
    pinned = torch.empty(GiB // 4, dtype=torch.uint8, pin_memory=True)
    host_copy = copy_rate(source[: GiB // 4], pinned)
    del source, pinned
    result(
        "kernels.bandwidth", device_copy_GBps=round(device_copy / 1e9, 1), host_to_device_GBps=round(host_copy / 1e9, 1)
    )
    torch.manual_seed(0)
    for name, (hidden, inter, top_k, fmt, fields) in KERNEL_SHAPES.items():
        result(
            "kernels",
            name=name,
            **kernel_row(hidden, inter, top_k, fmt, GatedActivation(**fields), device_copy, host_copy),
        )
        torch.cuda.empty_cache()


def kernel_row(hidden, inter, top_k, fmt, act, device_copy: float, host_copy: float) -> dict:
    """One shape and format: errors against the reference, decode speed from slots and from host rows."""
    from localmoe.kernels.reference import ExpertStack
    from localmoe.kernels.triton_experts import triton_pair_outputs

    device, experts = torch.device("cuda"), top_k + 4
    (gate_up, down), nbytes = random_experts(fmt, experts, hidden, inter, device, act.gated)
    biases = [None, None]
    if fmt == "mxfp4":
        biases = [torch.randn(experts, n, device=device).to(torch.bfloat16) / 10 for n in (2 * inter, hidden)]
    decode_slots = torch.randperm(experts, device=device)[:top_k].view(1, top_k)
    row = kernel_errors(gate_up, down, biases, decode_slots, act)
    x = torch.randn(1, hidden, device=device).to(torch.bfloat16)
    out = x.new_zeros(top_k, hidden)
    seconds = seconds_per_call(lambda: triton_pair_outputs(out, x, gate_up, down, decode_slots, act, *biases))
    rate = top_k * nbytes / seconds
    row.update(
        decode_us=round(seconds * 1e6, 1), decode_GBps=round(rate / 1e9, 1), of_device_copy=round(rate / device_copy, 2)
    )
    # the direct-read path: every expert of the decode token read from registered host rows
    buffer, (host_gate_up, host_down, *host_biases) = host_copies(
        [gate_up, down, *(b for b in biases if b is not None)]
    )
    status = register(buffer)
    if status != 0:
        row["direct_read"] = f"registration refused (CUDA error {status})"
    else:
        host = ExpertStack(host_gate_up, host_down, *(host_biases or [None, None]))
        absent = torch.full_like(decode_slots, -1)
        direct = torch.zeros_like(out)
        triton_pair_outputs(out, x, gate_up, down, decode_slots, act, *biases)
        seconds = seconds_per_call(
            lambda: triton_pair_outputs(direct, x, gate_up, down, absent, act, *biases, ids=decode_slots, host=host), 10
        )
        rate = top_k * nbytes / seconds
        row.update(direct_equal_to_slots=torch.equal(direct, out), direct_GBps=round(rate / 1e9, 1))
        row["direct_of_host_copy"] = round(rate / host_copy, 2)
        unregister(buffer)
    row["ok"] = all(v < 2e-2 for k, v in row.items() if k.endswith("error")) and row.get("direct_equal_to_slots", True)
    return row


def kernel_errors(gate_up, down, biases, decode_slots, act, prefill_tokens: int = 256) -> dict:
    """The Triton kernels' relative error against the reference for one decode token (on `decode_slots`)
    and a prefill of random slots, in the weights' compute dtype on their device."""
    from localmoe.kernels.reference import expert_pair_outputs
    from localmoe.kernels.triton_experts import triton_pair_outputs

    device, (experts, hidden), dtype = decode_slots.device, down.shape[:2], gate_up.dtype
    row = {}
    for tokens in (1, prefill_tokens):
        x = torch.randn(tokens, hidden, device=device).to(dtype)
        top_k = decode_slots.shape[1]
        slots = decode_slots if tokens == 1 else torch.randint(0, experts, (tokens, top_k), device=device)
        expected, got = x.new_zeros(slots.numel(), hidden), x.new_zeros(slots.numel(), hidden)
        expert_pair_outputs(expected, x, gate_up, down, slots, act, *biases)
        triton_pair_outputs(got, x, gate_up, down, slots, act, *biases)
        error = (got.float() - expected.float()).norm() / expected.float().norm()
        row[f"T{tokens}_relative_error"] = round(error.item(), 5)
    return row


OVERFLOW = r"""
import json, torch
from localmoe.kernels.quantized import Mxfp4Weights
from localmoe.kernels.reference import expert_pair_outputs
from localmoe.kernels.triton_experts import triton_pair_outputs
from localmoe.models.moe import GatedActivation

# gpt-oss's experts as the pool keeps them: one byte row per slot, the biases (bfloat16) at its end
slots, hidden, inter = 400, 2880, 2880
sizes = [2 * inter * hidden // 2, 2 * inter * hidden // 32, hidden * inter // 2, hidden * inter // 32]
row = sum(sizes) + 2 * (2 * inter + hidden)
rows = torch.randint(0, 256, (slots, row), dtype=torch.uint8, device="cuda")
starts = [sum(sizes[:i]) for i in range(5)]
def part(i, shape):
    return rows[:, starts[i]:starts[i] + sizes[i]].view(slots, *shape)
gate_up = Mxfp4Weights(part(0, (2 * inter, hidden // 2)), part(1, (2 * inter, hidden // 32)).fill_(120), torch.bfloat16)
down = Mxfp4Weights(part(2, (hidden, inter // 2)), part(3, (hidden, inter // 32)).fill_(120), torch.bfloat16)
tail = rows[:, starts[4]:].view(torch.bfloat16)
biases = (tail[:, :2 * inter], tail[:, 2 * inter:])
for bias in biases:
    bias.copy_(torch.randn(bias.shape, device="cuda") / 10)
act = GatedActivation(kind="clamped_swiglu")
x = torch.randn(1, hidden, device="cuda").to(torch.bfloat16)
out = {"bias_stride": biases[0].stride(0), "first_slot_past_2^31": 2**31 // biases[0].stride(0)}
for slot in (10, slots - 1):
    chosen = torch.tensor([[slot]], device="cuda")
    expected, got = (torch.zeros(1, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    expert_pair_outputs(expected, x, gate_up, down, chosen, act, *biases)
    triton_pair_outputs(got, x, gate_up, down, chosen, act, *biases)
    torch.cuda.synchronize()
    out[f"slot_{slot}_relative_error"] = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
out["ok"] = all(v < 2e-2 for k, v in out.items() if k.endswith("error"))
print(json.dumps(out))
"""

REGISTER = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from gpu_check import register, unregister
from localmoe.kernels.reference import ExpertStack
from localmoe.kernels.triton_experts import triton_pair_outputs
from localmoe.models.moe import GatedActivation

out = {}
buffer = torch.empty(64 << 20, dtype=torch.uint8)
out["first_registration"] = register(buffer)
out["second_registration_refused"] = register(buffer)
try:
    torch.ones(4, device="cuda").add_(1).sum().item()
    out["next_launch"] = "ran"
except RuntimeError as error:
    out["next_launch"] = "raised: " + str(error).splitlines()[0]
unregister(buffer)
gate_up, down = torch.randn(4, 64, 64).bfloat16(), torch.randn(4, 64, 32).bfloat16()
pool = ExpertStack(gate_up.cuda(), down.cuda())
x, ids = torch.randn(1, 64, device="cuda").bfloat16(), torch.tensor([[1, 2]], device="cuda")
got = torch.zeros(2, 64, device="cuda", dtype=torch.bfloat16)
try:
    host = ExpertStack(gate_up, down)  # plain, unregistered host memory
    triton_pair_outputs(got, x, *pool, torch.full_like(ids, -1), GatedActivation(), ids=ids, host=host)
    torch.cuda.synchronize()
    out["unregistered_host_stack"] = "read (wrong: it must be refused)"
except ValueError as error:
    out["unregistered_host_stack"] = "refused: " + str(error).splitlines()[0][:200]
refused = out["unregistered_host_stack"].startswith("refused")
out["ok"] = out["second_registration_refused"] != 0 and out["next_launch"] == "ran" and refused
print(json.dumps(out))
"""


def in_subprocess(name: str, code: str, timeout: float, *args: str) -> None:
    """Run a phase that may break the CUDA context in a process of its own (argv: this script's folder,
    then `args`); the last line it prints is its result."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", code, str(Path(__file__).parent), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    lines = done.stdout.strip().splitlines()
    try:
        result(name, returncode=done.returncode, **json.loads(lines[-1]))
    except (IndexError, json.JSONDecodeError):
        result(
            name, returncode=done.returncode, ok=False, stdout=lines[-3:], stderr=done.stderr.strip().splitlines()[-3:]
        )


def synthetic_checkpoint(folder: Path, layers, experts, hidden, inter, heads, kv_heads, head_dim, vocab, top_k) -> Path:
    """A Qwen3-MoE checkpoint with random bfloat16 weights, written as transformers writes one: config,
    generation config, safetensors shards of four layers and their index."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": hidden,
        "intermediate_size": 3 * hidden, "moe_intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim, "num_experts": experts,
        "num_experts_per_tok": top_k, "norm_topk_prob": True, "vocab_size": vocab, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6, "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "tie_word_embeddings": False, "attention_bias": False, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "dtype": "bfloat16", "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(1)

    def weight(*shape, scale=1.0):
        values = torch.randn(*shape, generator=generator, device=device) * (scale * shape[-1] ** -0.5)
        return values.to(torch.bfloat16).cpu()

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    weight_map = {}

    def shard(tensors: dict, name: str) -> None:
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    outer = {"model.embed_tokens.weight": weight(vocab, hidden), "lm_head.weight": weight(vocab, hidden)}
    shard({**outer, "model.norm.weight": ones(hidden)}, "model-extra.safetensors")
    for first in range(0, layers, 4):
        tensors = {}
        for layer in range(first, min(first + 4, layers)):
            p = f"model.layers.{layer}."
            tensors.update({
                p + "input_layernorm.weight": ones(hidden), p + "post_attention_layernorm.weight": ones(hidden),
                p + "self_attn.q_proj.weight": weight(heads * head_dim, hidden),
                p + "self_attn.k_proj.weight": weight(kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.weight": weight(kv_heads * head_dim, hidden),
                p + "self_attn.o_proj.weight": weight(hidden, heads * head_dim),
                p + "self_attn.q_norm.weight": ones(head_dim), p + "self_attn.k_norm.weight": ones(head_dim),
                p + "mlp.gate.weight": weight(experts, hidden, scale=4.0),  # routing sharper than uniform
            })  # fmt: skip
            for expert in range(experts):
                q = f"{p}mlp.experts.{expert}."
                tensors.update({q + f"{role}_proj.weight": weight(inter, hidden) for role in ("gate", "up")})
                tensors[q + "down_proj.weight"] = weight(hidden, inter)
        shard(tensors, f"model-{first:05d}.safetensors")
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def measured_run(engine, prompt: list[int], new_tokens: int) -> tuple[list[int], dict]:
    """bench.run_engine's run (a warm-up, then a cold cache) with the copy stall over it, where offloaded."""
    from localmoe.bench import run_engine

    stall = _stall_seconds(engine)
    run = run_engine(engine, "gpu check", prompt, new_tokens)
    figures = {"decode_tok_s": round(run.decode_tokens_per_s, 2), "prefill_tok_s": round(run.prefill_tokens_per_s, 1)}
    if stall is not None:
        figures.update(
            hit_rate=round(run.hit_rate, 3),
            MB_copied_per_decode_token=round(run.bytes_copied_per_token / 1e6, 1),
            stall_s=round(_stall_seconds(engine) - stall, 3),
        )
    return run.tokens, figures


def _stall_seconds(engine) -> float | None:
    """How long the compute has waited for copies (the runtime's own counter); None when all is resident."""
    offloaded = engine._offloaded  # the counter is not part of the engine's snapshot yet
    return None if offloaded is None else offloaded.cache.copies.stall_seconds()


def phase_offload(work: Path) -> None:
    import localmoe
    from localmoe.bench import decode_floor, measure_bandwidth
    from localmoe.engine import RuntimeOptions

    started = time.perf_counter()
    folder = synthetic_checkpoint(work / "synthetic-qwen3", **QWEN3_LIKE)
    result("offload.checkpoint", seconds=round(time.perf_counter() - started, 1), **QWEN3_LIKE)
    prompt = torch.randint(3, QWEN3_LIKE["vocab"], (64,), generator=torch.Generator().manual_seed(3)).tolist()
    bandwidth = measure_bandwidth(torch.device("cuda"))
    engine = localmoe.load(str(folder), device="cuda", options=RuntimeOptions(profile=None))
    resident, figures = measured_run(engine, prompt, 48)
    floor = decode_floor(engine.plan.footprint, bandwidth, 0.0)["floor_s"]
    times_floor = round(1 / figures["decode_tok_s"] / floor, 1)
    result(
        "offload.resident", kernels=engine.kernels, floor_ms=round(floor * 1e3, 2), times_floor=times_floor, **figures
    )
    del engine
    torch.cuda.empty_cache()
    slots = QWEN3_LIKE["layers"] * QWEN3_LIKE["experts"] // 4
    engine = localmoe.load(str(folder), device="cuda", options=RuntimeOptions(profile=None, expert_slots=slots))
    tokens, figures = measured_run(engine, prompt, 48)
    floor = decode_floor(engine.plan.footprint, bandwidth, figures["MB_copied_per_decode_token"] * 1e6)
    result(
        "offload.quarter_in_slots",
        summary=engine.summary(),
        floor_ms=round(floor["floor_s"] * 1e3, 2),
        floor_bound=floor["bound"],
        times_floor=round(1 / figures["decode_tok_s"] / floor["floor_s"], 1),
        same_tokens_as_resident=tokens == resident,
        **figures,
    )


CARD12 = r"""
import json, sys, torch
import localmoe
from localmoe.engine import RuntimeOptions

card = 12 * 10**9  # a 12 GB card: what the allocator may take, less what the CUDA context holds there
torch.cuda.set_per_process_memory_fraction(card / torch.cuda.mem_get_info()[1])
free = card - 600 * 2**20
budget = free - max(free // 20, 512 * 2**20)  # the plan's headroom, as it would compute it on the card
engine = localmoe.load(sys.argv[2], device="cuda", options=RuntimeOptions(profile=None, vram_budget=budget))
plan = engine.plan
out = {"slots": plan.slots, "prefill_chunk": plan.prefill_chunk, "plan_GiB": round(plan.device_bytes / 2**30, 2),
       "workspace_MiB": plan.workspace_bytes >> 20}
generator = torch.Generator().manual_seed(4)
for n in (512, 2048, 3584):
    torch.cuda.reset_peak_memory_stats()
    try:
        list(engine.generate_ids(torch.randint(3, 32000, (n,), generator=generator).tolist(), 2))
        out[f"prompt_{n}"] = f"ok, peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    except torch.OutOfMemoryError as error:
        out[f"prompt_{n}"] = "out of memory: " + str(error).splitlines()[0][:160]
        break
out["ok"] = all(str(v).startswith("ok") for k, v in out.items() if k.startswith("prompt"))
print(json.dumps(out))
"""


def phase_card12(work: Path) -> None:
    folder = work / "synthetic-qwen3"
    if not (folder / "config.json").is_file():
        synthetic_checkpoint(folder, **QWEN3_LIKE)
    in_subprocess("card12", CARD12, 300, str(folder))


if __name__ == "__main__":
    sys.exit(main())
