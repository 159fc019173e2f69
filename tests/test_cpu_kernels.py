"""The CPU expert kernels (kernels/cpu_experts.cpp) against the reference: every weight format, the
activations, biases and input scales, real models' expert shapes and ragged small ones, 1-8 tokens and
prefills of 9-300, 1-2 threads; the instruction set forced down to AVX2 and to plain C++ in a subprocess;
the build's fallback; one op per call. The dense products of decode (`cpu.linear`) against F.linear, and
in a bfloat16 model loaded on the CPU."""

import collections
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import QWEN2_MOE, TINY_FAMILIES, hf_model, save_hf
from torch.utils._python_dispatch import TorchDispatchMode

import localmoe
from localmoe.engine import RuntimeOptions
from localmoe.errors import LocalMoEError
from localmoe.kernels import _random_stored, pair_kernel
from localmoe.kernels import cpu_experts as cpu
from localmoe.kernels.quantized import MXFP4, MXFP8, QuantSpec, StoredFormat, quantized_stack
from localmoe.kernels.reference import ExpertStack, expert_pair_outputs
from localmoe.models.layers import Linear, RMSNorm, rms_normalize
from localmoe.models.moe import GatedActivation
from localmoe.models.rotary import apply_rotary


@pytest.fixture(autouse=True)
def threads():
    """Skip where the kernels cannot be built; give the next test back the thread count a test set."""
    available, why = cpu.cpu_kernel()  # here, not at import: localmoe's cache folder is the tests' by now
    if not available:
        pytest.skip(f"the CPU kernels could not be built: {why}")
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


ACTS = {
    "swiglu": GatedActivation(),
    "gelu-tanh": GatedActivation(act="gelu_pytorch_tanh"),
    "gelu": GatedActivation(act="gelu"),
    "clamped-swiglu": GatedActivation(kind="clamped_swiglu", alpha=1.702, limit=0.5),  # a limit that clamps
    "clamped-glu": GatedActivation(kind="clamped_glu", limit=0.5),
    "clamped-after": GatedActivation(kind="glu_clamped_after", limit=0.3),  # Step-3.7
    "softcapped-glu": GatedActivation(kind="softcapped_glu", gate_limit=0.7, limit=1.5),  # Inkling 2; caps that bend
}
FORMATS = ("dense", "int8", "int4", "fp8", "mxfp4", "int4-sym", "int8-row", "int4-row", "nvfp4", "nvfp4-ct")
FORMATS += ("fp8-row", "fp8-oblong")  # FP8 scaled per row (compressed-tensors channel, AutoFP8), in 2:1 tiles
FORMATS += ("fp8-mx",)  # MXFP8 (Inkling 2's releases): FP8 in 1 x 32 tiles, scaled by exponent bytes
# the integer forms checkpoints store beside localmoe's own (asymmetric, float16 scales per group)
CHECKPOINT_INTEGERS = {
    "int4-sym": dict(bits=4, symmetric=True, scale_dtype=torch.bfloat16),  # Kimi K2.5/K2.6, compressed-tensors
    "int8-row": dict(bits=8, group=0, symmetric=True),  # GPTQ 8-bit with group_size -1
    "int4-row": dict(bits=4, group=0, scale_dtype=torch.float32),  # compressed-tensors asymmetric by channel
}
# |kernel - reference| <= TOLERANCE * max |reference|, for experts with few pairs (the matrix-vector path):
# float32 differs by summation order only; in 16 bits the reference also rounds each dequantized
# weight to the compute dtype, and an accumulation one float32 ulp apart can flip a 16-bit rounding of
# gate, up or the activation, which moves the output by about one unit of its last place.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def experts(fmt: str, count: int, hidden: int, inter: int, dtype, seed: int, bias: bool = False) -> ExpertStack:
    """A random stack of `count` experts in `fmt`, with weights near the size real checkpoints have."""
    g = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(count, 2 * inter, hidden, generator=g) / hidden**0.5).to(dtype)
    down = (torch.randn(count, hidden, inter, generator=g) / inter**0.5).to(dtype)
    if fmt in ("int8", "int4") or fmt in CHECKPOINT_INTEGERS:
        form = CHECKPOINT_INTEGERS[fmt] if fmt in CHECKPOINT_INTEGERS else dict(bits=int(fmt[3:]))
        widths = 32 if fmt == "int4-sym" else 64  # Kimi's groups are 32 columns
        group = widths if hidden % widths == 0 and inter % widths == 0 else 2  # 2: every shape, the scalar path
        spec = QuantSpec(**{"group": group, **form})
        gate_up, down = quantized_stack(gate_up, spec), quantized_stack(down, spec)
    elif fmt.startswith("fp8"):
        block = 128 if hidden % 128 == 0 and inter % 128 == 0 else 8
        form = {"fp8": block, "fp8-row": (1, 0), "fp8-oblong": (block, block // 2)}
        form = MXFP8 if fmt == "fp8-mx" else StoredFormat("fp8", form[fmt])
        gate_up, down = (_random_stored(form, count, w.shape[1:], dtype, "cpu") for w in (gate_up, down))
    elif fmt == "mxfp4":
        gate_up, down = (_random_stored(MXFP4, count, w.shape[1:], dtype, "cpu") for w in (gate_up, down))
    elif fmt.startswith("nvfp4"):  # ModelOpt's part scales multiply, compressed-tensors' divide
        form = StoredFormat("nvfp4", 16, divides=fmt == "nvfp4-ct")
        gate_up = _random_stored(form, count, gate_up.shape[1:], dtype, "cpu", parts=2)
        down = _random_stored(form, count, down.shape[1:], dtype, "cpu")
    biases = (torch.randn(count, 2 * inter, generator=g).to(dtype), torch.randn(count, hidden, generator=g).to(dtype))
    return ExpertStack(gate_up, down, *(biases if bias else (None, None)))


def outputs(kernel, stack: ExpertStack, x, slots, act, scale=None, **host) -> torch.Tensor:
    out = torch.full((slots.numel(), x.shape[1]), 7.0, dtype=x.dtype)  # rows of skipped pairs stay as they were
    kernel(out, x, stack.gate_up, stack.down, slots, act, stack.gate_up_bias, stack.down_bias, scale, **host)
    return out


def assert_near(got, expected, dtype):
    scale = expected.float().abs().max().item()
    error = (got.float() - expected.float()).abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"max error {error:.3g} of {scale:.3g}"


def small(fmt: str) -> tuple[int, int]:
    """Widths that no vector fits (MXFP4's and MXFP8's exponents cover 32 columns, NVFP4's 16: the
    smallest they have)."""
    return {"mxfp4": (96, 32), "fp8-mx": (96, 32), "nvfp4": (48, 16), "nvfp4-ct": (48, 16)}.get(fmt, (40, 24))


def case(tokens: int, k: int, count: int, hidden: int, seed: int, dtype, skipped: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    slots = torch.stack([torch.randperm(count, generator=g)[:k] for _ in range(tokens)])
    if skipped:
        slots[torch.rand(tokens, k, generator=g) < 0.2] = -1  # pairs without a slot are left alone
    return x, slots


# each format on 2 threads, and the first five (whose code the threading shares with the others) on 1
THREADED = [(fmt, threads) for fmt in FORMATS for threads in ((1, 2) if fmt in FORMATS[:5] else (2,))]


@pytest.mark.parametrize("fmt, thread_count", THREADED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 2, 5, 8])
def test_small_shapes_match_the_reference(fmt, thread_count, dtype, tokens):
    """Ragged widths (the scalar path) and widths the vector path takes, 1-8 tokens, top-1 to top-4, on
    `thread_count` threads."""
    torch.set_num_threads(thread_count)
    for hidden, inter in (small(fmt), (256, 128)):
        stack = experts(fmt, 6, hidden, inter, dtype, seed=tokens)
        x, slots = case(tokens, 1 + tokens % 4, 6, hidden, seed=tokens + thread_count, dtype=dtype)
        expected = outputs(expert_pair_outputs, stack, x, slots, ACTS["swiglu"])
        assert_near(outputs(cpu.cpu_pair_outputs, stack, x, slots, ACTS["swiglu"]), expected, dtype)


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activations_biases_and_input_scales(act, fmt, dtype):
    stack = experts(fmt, 5, 256, 128, dtype, seed=1, bias=True)
    x, slots = case(3, 2, 5, 256, seed=2, dtype=dtype)
    x = x * 3  # large enough to clamp
    scale = torch.rand(slots.numel(), generator=torch.Generator().manual_seed(3))
    expected = outputs(expert_pair_outputs, stack, x, slots, ACTS[act], scale)
    assert_near(outputs(cpu.cpu_pair_outputs, stack, x, slots, ACTS[act], scale), expected, dtype)


# real models' expert shapes (hidden, intermediate), with few cases each: they are large
MODELS = {
    "mixtral": (4096, 14336, "int4", 1),
    "qwen3-30b": (2048, 768, "dense", 8),
    "deepseek": (7168, 2048, "fp8", 2),
    "gpt-oss": (2880, 2880, "mxfp4", 3),
    "kimi-k2": (7168, 2048, "int4-sym", 1),
    "qwen3-30b-nvfp4": (2048, 768, "nvfp4-ct", 4),
}


@pytest.mark.parametrize("prefill", [False, True])
@pytest.mark.parametrize("model", list(MODELS))
def test_model_shapes_match_the_reference(model, prefill):
    """A few tokens, or 33 (a prefill: two tiles of pairs and one more on each expert)."""
    hidden, inter, fmt, tokens = MODELS[model]
    tokens = 33 if prefill else tokens
    stack = experts(fmt, 2, hidden, inter, torch.bfloat16, seed=4, bias=model == "gpt-oss")
    x, slots = case(tokens, 2, 2, hidden, seed=5, dtype=torch.bfloat16, skipped=False)
    act = ACTS["clamped-swiglu"] if model == "gpt-oss" else ACTS["swiglu"]
    expected = outputs(expert_pair_outputs, stack, x, slots, act)
    assert_near(outputs(cpu.cpu_pair_outputs, stack, x, slots, act), expected, torch.bfloat16)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [8, 16, 32, 64, 128, 256])
@pytest.mark.parametrize("symmetric", [False, True])
def test_integer_groups_within_and_across_vector_steps(bits, group, symmetric):
    """The bfloat16 path reads 4-bit codes 128 columns a step and 8-bit ones 64, each float lane of a
    step's sums covering 8 (4) columns: groups of several lanes, of a step, and of several steps."""
    g = torch.Generator().manual_seed(group + bits)
    hidden, inter = 512, 256
    spec = QuantSpec(bits=bits, group=group, symmetric=symmetric)
    gate_up = quantized_stack((torch.randn(3, 2 * inter, hidden, generator=g) / hidden**0.5).bfloat16(), spec)
    down = quantized_stack((torch.randn(3, hidden, inter, generator=g) / inter**0.5).bfloat16(), spec)
    stack = ExpertStack(gate_up, down)
    for tokens in (1, 3):
        x, slots = case(tokens, 2, 3, hidden, seed=group, dtype=torch.bfloat16)
        expected = outputs(expert_pair_outputs, stack, x, slots, ACTS["swiglu"])
        assert_near(outputs(cpu.cpu_pair_outputs, stack, x, slots, ACTS["swiglu"]), expected, torch.bfloat16)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_with_many_pairs_match_the_reference(fmt, dtype):
    """Experts with many pairs run the prefill path: in bfloat16 AMX tiles where the CPU has them, else the
    vector prefill (from 4 pairs; the reference's oneDNN products sum in their own order: within
    TOLERANCE); in float32 from MANY_PAIRS on the reference's own arithmetic (bit for bit)."""
    stack = experts(fmt, 3, 256, 128, dtype, seed=6, bias=True)
    x, _ = case(24, 1, 3, 256, seed=7, dtype=dtype)
    slots = torch.tensor([[0, 1]] * 12 + [[1, 2]] * 12)  # 12, 24 and 12 pairs per expert
    scale = torch.rand(slots.numel(), generator=torch.Generator().manual_seed(8))
    # and Inkling 2's kind with another gate cap alone: each is handed to the reference's code as itself
    for act in [*ACTS.values(), dataclasses.replace(ACTS["softcapped-glu"], gate_limit=2.0)]:
        expected = outputs(expert_pair_outputs, stack, x, slots, act, scale)
        got = outputs(cpu.cpu_pair_outputs, stack, x, slots, act, scale)
        if dtype == torch.bfloat16:
            assert_near(got, expected, dtype)
        else:
            assert torch.equal(got, expected)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tokens", [9, 17, 40, 300])
def test_prefill_token_counts_match_the_reference(fmt, tokens):
    """Prefills of 9 to a few hundred tokens, top-2 of 4 experts (one to many tiles of 16 pairs, ragged last
    tiles), biases and input scales, bfloat16, on a tiled shape and a ragged one (left to the reference's
    products); on the prefill path the same bits on 1 and 2 threads."""
    for hidden, inter in ((256, 128), small(fmt)):
        stack = experts(fmt, 4, hidden, inter, torch.bfloat16, seed=tokens, bias=True)
        x, slots = case(tokens, 2, 4, hidden, seed=tokens, dtype=torch.bfloat16)
        scale = torch.rand(slots.numel(), generator=torch.Generator().manual_seed(tokens))
        expected = outputs(expert_pair_outputs, stack, x, slots, ACTS["swiglu"], scale)
        by_threads = []
        for thread_count in (1, 2):
            torch.set_num_threads(thread_count)
            by_threads.append(outputs(cpu.cpu_pair_outputs, stack, x, slots, ACTS["swiglu"], scale))
            assert_near(by_threads[-1], expected, torch.bfloat16)
        if hidden % 32 == 0:
            assert torch.equal(*by_threads)


def test_on_the_prefill_path_a_pair_does_not_depend_on_the_other_pairs():
    """A token's outputs are the same bits whichever pairs share its expert's pass, and wherever in a tile
    or a step it falls (prefill chunks differ between an offloaded run and a resident one only in what they
    hold)."""
    stack = experts("int4", 2, 256, 128, torch.bfloat16, seed=15, bias=True)
    x, _ = case(40, 1, 2, 256, seed=16, dtype=torch.bfloat16)
    slots = torch.tensor([[t % 2, 1 - t % 2] for t in range(40)])  # 40 pairs per expert
    everything = outputs(cpu.cpu_pair_outputs, stack, x, slots, ACTS["swiglu"])
    for first, last in ((0, 18), (5, 23), (3, 40)):
        part = outputs(cpu.cpu_pair_outputs, stack, x[first:last], slots[first:last], ACTS["swiglu"])
        assert torch.equal(part, everything[2 * first : 2 * last])


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_pair_does_not_depend_on_the_others_the_threads_or_where_its_expert_lies(fmt):
    """What makes an offloaded run equal the all-resident one: each output is computed alone, in one
    order, the same from a slot of the pool as from the host stack by expert id."""
    host = experts(fmt, 6, 256, 128, torch.bfloat16, seed=9, bias=True)
    x, ids = case(4, 3, 6, 256, seed=10, dtype=torch.bfloat16, skipped=False)
    act = ACTS["swiglu"]
    torch.set_num_threads(2)
    everything = outputs(cpu.cpu_pair_outputs, host, x, ids, act)
    torch.set_num_threads(1)
    assert torch.equal(outputs(cpu.cpu_pair_outputs, host, x, ids, act), everything)
    alone = outputs(cpu.cpu_pair_outputs, host, x[2:3], ids[2:3], act)
    assert torch.equal(alone, everything[6:9])
    # experts 4 and 1 in slots 0 and 1 of a pool; the rest read from the host stack
    pool = ExpertStack(*(_rows(part, [4, 1]) for part in host))
    slots = torch.where(ids == 4, 0, torch.where(ids == 1, 1, -1))
    mixed = outputs(cpu.cpu_pair_outputs, pool, x, slots, act, ids=ids, host=host)
    assert torch.equal(mixed, everything)
    expected = outputs(expert_pair_outputs, pool, x, slots, act, ids=ids, host=host)
    assert_near(mixed, expected, torch.bfloat16)


def _rows(part, rows: list[int]):
    """Rows of a stack (tensor or quantized stack), copied into a new one."""
    if isinstance(part, torch.Tensor):
        return part[rows].clone()
    fields = {name: getattr(part, name) for name in part.__dataclass_fields__}
    return type(part)(**{n: v[rows].clone() if isinstance(v, torch.Tensor) else v for n, v in fields.items()})


def test_one_op_per_call():
    """A dispatch mode sees the whole layer as one op (core's count of ops per MoE layer relies on it)."""
    stack = experts("int4", 8, 256, 128, torch.bfloat16, seed=11, bias=True)
    x, slots = case(1, 4, 8, 256, seed=12, dtype=torch.bfloat16)
    out, scale = torch.zeros(slots.numel(), 256, dtype=torch.bfloat16), torch.ones(slots.numel())

    class Seen(TorchDispatchMode):
        ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Seen() as seen:
        cpu.cpu_pair_outputs(out, x, *stack[:2], slots, ACTS["swiglu"], *stack[2:], scale)
    assert seen.ops == ["localmoe.expert_pairs.default"]


CHILD = """
import torch
from localmoe.kernels import cpu_experts as cpu
available, isa = cpu.cpu_kernel()
assert available and isa == {isa!r}, (available, isa)
import test_cpu_kernels as t
for fmt in t.FORMATS:
    for hidden, inter in (t.small(fmt), (256, 128)):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            stack = t.experts(fmt, 5, hidden, inter, dtype, seed=13, bias=True)
            x, slots = t.case(3, 3, 5, hidden, seed=14, dtype=dtype)
            for act in t.ACTS.values():
                expected = t.outputs(t.expert_pair_outputs, stack, x, slots, act)
                t.assert_near(t.outputs(cpu.cpu_pair_outputs, stack, x, slots, act), expected, dtype)
    # prefill (experts with many pairs, bfloat16): within TOLERANCE, the same bits on 1 and 2 threads and
    # whichever other pairs share the expert
    stack = t.experts(fmt, 4, 256, 128, torch.bfloat16, seed=15, bias=True)
    x, _ = t.case(40, 2, 4, 256, seed=16, dtype=torch.bfloat16)
    slots = torch.tensor([[i % 4, (i + 1) % 4] for i in range(40)])  # 20 pairs per expert, 9 in the part
    scale = torch.rand(slots.numel(), generator=torch.Generator().manual_seed(17))
    expected = t.outputs(t.expert_pair_outputs, stack, x, slots, t.ACTS["swiglu"], scale)
    by_threads = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        by_threads.append(t.outputs(cpu.cpu_pair_outputs, stack, x, slots, t.ACTS["swiglu"], scale))
        t.assert_near(by_threads[-1], expected, torch.bfloat16)
    assert torch.equal(*by_threads)
    part = t.outputs(cpu.cpu_pair_outputs, stack, x[5:23], slots[5:23], t.ACTS["swiglu"], scale[10:46])
    assert torch.equal(part, by_threads[0][10:46])
t.check_dense_products()
t.check_rms_norms()
t.check_rotary()
t.check_decode_attention()
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx512bf16", "avx512", "avx2", "generic"])
def test_lower_instruction_sets_match_the_reference(isa):
    """The instruction sets below this CPU's, forced: AVX512-BF16 without AMX tiles (AMD Zen 4 and 5), AVX-512
    alone, AVX2 (consumer CPUs without AVX-512) and plain C++ (other architectures); each is its own library,
    so each runs in its own process."""
    if not set(cpu.ISAS[isa][0]) <= cpu._cpu_flags():
        pytest.skip(f"this CPU has no {isa}")
    env = {
        **os.environ,
        "LOCALMOE_CPU_ISA": isa,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path]),
    }
    done = subprocess.run([sys.executable, "-c", CHILD.format(isa=isa)], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_the_choice_of_kernels_on_the_cpu(monkeypatch):
    here, acts = torch.device("cpu"), list(ACTS.values())  # every activation the families use
    isa = cpu.cpu_kernel()[1]
    assert pair_kernel("auto", here, torch.bfloat16, acts, QuantSpec(4, 32)) == (cpu.cpu_pair_outputs, f"cpu ({isa})")
    assert pair_kernel("cpu", here, torch.float32, acts, MXFP4)[0] is cpu.cpu_pair_outputs
    with pytest.raises(LocalMoEError, match="cpu computes on the CPU"):
        pair_kernel("cpu", torch.device("cuda"), torch.float32, acts)
    monkeypatch.setattr(cpu, "cpu_kernel", lambda: (False, "no C++ compiler found"))
    expected = (expert_pair_outputs, "reference (CPU kernels: they could not be built: no C++ compiler found)")
    assert pair_kernel("auto", here, torch.float32, acts) == expected
    with pytest.raises(LocalMoEError, match="could not be built"):
        pair_kernel("cpu", here, torch.float32, acts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["step3p5", "inkling2_text"])  # SwiGLU clamped after; the softcapped GLU
def test_families_with_clamped_or_softcapped_experts_run_the_library(family, dtype, tmp_path):
    """Step-3.7's and Inkling 2's experts take the CPU kernels, with the reference kernel's greedy tokens;
    so the reference kernel no longer bars CUDA graphs (the same choice on CUDA takes Triton)."""
    config_class, config = TINY_FAMILIES[family]
    path = str(save_hf(hf_model(config_class, **config), tmp_path, "single"))
    prompt = list(range(3, 15))

    def run(kernels: str):
        engine = localmoe.load(path, device="cpu", dtype=dtype, options=RuntimeOptions(kernels=kernels))
        return list(engine.generate_ids(prompt, 8)), engine

    (expected, reference), (got, engine) = run("reference"), run("auto")
    assert engine.kernels == f"cpu ({cpu.cpu_kernel()[1]})" and got == expected
    for barred, kernel in ((reference.graphs_barred(), True), (engine.graphs_barred(), False)):
        assert any("reference expert kernel" in why for why in barred) == kernel


def test_without_a_compiler_the_reference_is_kept_with_one_notice(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LOCALMOE_CACHE", str(tmp_path))
    available, reason = cpu.load()
    assert not available and "no-such-compiler" in reason
    assert capsys.readouterr().err.count("using the slower reference") == 1


BUILD = """
from localmoe.kernels import cpu_experts as cpu
available, isa = cpu.cpu_kernel()
print(available, isa)
"""


def test_two_processes_starting_at_once_build_the_library_once(tmp_path):
    """The second waits on the first's lock and loads what it built; neither sees a half-written file,
    and no temporary file is left."""
    env = {**os.environ, "LOCALMOE_CACHE": str(tmp_path), "LOCALMOE_CPU_ISA": "generic"}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    done = [run.communicate() for run in runs]
    assert [out.split() for out, _ in done] == [["True", "generic"]] * 2, [err for _, err in done]
    assert sum(err.count("building the CPU expert kernels") for _, err in done) == 1
    built = sorted(path.name for path in (tmp_path / "kernels").iterdir())
    assert len([name for name in built if name.endswith(".so")]) == 1
    assert not [name for name in built if name.endswith(".tmp")], built


# (rows, columns) of dense weights: attention's q/k/v side by side and o (Qwen3-30B), a router, an LM head,
# and ragged ones no vector or block of 4 rows fits
DENSE_SHAPES = ((5120, 2048), (2048, 4096), (128, 2048), (320, 2048), (37, 100), (3, 33), (1, 64))


def check_dense_products():
    """cpu.linear within the bfloat16 tolerance of F.linear in float32, for 1-5 rows of activations (the
    library's limit lifted to reach its passes of two and the last one alone), with and without a bias,
    on 1 and 2 threads; each activation row's outputs the same bits whether computed alone or with the
    others, and whatever the thread count."""
    g = torch.Generator().manual_seed(21)
    limit, cpu.DENSE_ROWS = cpu.DENSE_ROWS, 8
    try:
        for rows, cols in DENSE_SHAPES:
            w = (torch.randn(rows, cols, generator=g) / cols**0.5).bfloat16()
            bias = torch.randn(rows, generator=g).bfloat16()
            x = torch.randn(5, cols, generator=g).bfloat16()
            for b in (None, bias):
                expected = F.linear(x.float(), w.float(), None if b is None else b.float())
                results = []
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    results += [cpu.linear(x, w, b), torch.cat([cpu.linear(x[i : i + 1], w, b) for i in range(5)])]
                assert_near(results[0], expected, torch.bfloat16)
                assert all(torch.equal(r, results[0]) for r in results), (rows, cols)
    finally:
        cpu.DENSE_ROWS = limit


def test_dense_products_match_the_reference():
    check_dense_products()


def check_rms_norms():
    """cpu.rms_norm within the bfloat16 tolerance of RMSNorm's ATen ops, most values the same bits: a hidden
    state's norm, per-head norms of queries and keys (a weight per head), and ragged widths."""
    g = torch.Generator().manual_seed(23)
    for shape, weight_shape in (((1, 1, 2048), (2048,)), ((1, 1, 36, 128), (36, 128)), ((2, 3, 37), (37,))):
        x = (torch.randn(*shape, generator=g) * 3).bfloat16()
        weight = (1 + torch.randn(*weight_shape, generator=g) / 4).bfloat16()
        expected = weight * rms_normalize(x, 1e-6)
        got = cpu.rms_norm(x, weight, 1e-6)
        assert_near(got, expected, torch.bfloat16)
        assert (got == expected).float().mean() > 0.99, shape


def test_rms_norms_match_the_reference():
    check_rms_norms()


def check_rotary():
    """cpu.rotary the same bits as apply_rotary's ATen ops (which run for two positions): whole and partial
    rotation, heads laid out as attention's transposed projections, two sequences."""
    g = torch.Generator().manual_seed(24)
    for batch, heads, dim, rot in ((1, 36, 128, 128), (2, 3, 64, 32), (1, 2, 40, 24)):
        x = (torch.randn(batch, 1, heads, dim, generator=g) * 3).bfloat16().transpose(1, 2)  # [B, H, 1, D]
        cos, sin = torch.randn(2, 1, rot, generator=g).bfloat16()
        expected = apply_rotary(torch.cat((x, x), dim=2), torch.cat((cos, cos)), torch.cat((sin, sin)))[:, :, :1]
        assert torch.equal(cpu.rotary(x, cos, sin), expected), (batch, heads, dim, rot)


def test_rotary_matches_the_reference():
    check_rotary()
    x, cos = torch.randn(1, 2, 3, 8).bfloat16(), torch.randn(3, 8).bfloat16()
    assert cpu.rotary(x, cos, cos) is None  # several positions: ATen's ops
    assert cpu.rotary(x[:, :, :1].float(), cos[:1].float(), cos[:1].float()) is None


def check_decode_attention():
    """cpu.decode_attention within the bfloat16 tolerance of scaled_dot_product_attention in float32, on 1
    and 2 threads with the same bits: grouped heads over a cache's first keys (a view of a longer cache), a
    mask of visible keys or none, values of another width, two sequences, one key."""
    g = torch.Generator().manual_seed(25)
    shapes = ((1, 32, 4, 64, 128, 128), (2, 4, 2, 7, 40, 24), (1, 2, 1, 1, 8, 8))
    for batch, heads, kv_heads, keys, dim, v_dim in shapes:
        q = torch.randn(batch, 1, heads + kv_heads, dim, generator=g).bfloat16().transpose(1, 2)[:, :heads]
        k = torch.randn(batch, kv_heads, keys + 5, dim, generator=g).bfloat16()[:, :, :keys]
        v = torch.randn(batch, kv_heads, keys + 5, v_dim, generator=g).bfloat16()[:, :, :keys]
        visible = torch.rand(1, keys, generator=g) < 0.7
        visible[0, -1] = True
        for mask in (None, visible):
            expected = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=mask, scale=0.1, enable_gqa=True
            )
            results = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                results.append(cpu.decode_attention(q, k, v, mask, False, 0.1))
            assert_near(results[0], expected, torch.bfloat16)
            assert torch.equal(results[0], results[1]), (batch, heads, keys)


def test_decode_attention_matches_the_reference():
    check_decode_attention()
    q, k = torch.randn(1, 4, 2, 8).bfloat16(), torch.randn(1, 2, 5, 8).bfloat16()
    assert cpu.decode_attention(q, k, k, None, False, 0.1) is None  # two positions: ATen's
    assert cpu.decode_attention(q[:, :, :1], k, k, None, True, 0.1) is None  # causal: ATen's
    assert cpu.decode_attention(q[:, :, :1], k, k, torch.ones(1, 4, 1, 5, dtype=torch.bool), False, 0.1) is None
    many = torch.randn(1, 2, cpu.ATTENTION_KEYS + 1, 8).bfloat16()
    assert cpu.decode_attention(q[:, :, :1], many, many, None, False, 0.1) is None  # a long context: ATen's


def test_rms_norms_leave_the_rest_to_aten():
    """float32, more than NORM_VALUES values, a weight that broadcasts otherwise: None, ATen's ops run."""
    x, weight = torch.randn(1, 4, 64).bfloat16(), torch.ones(64).bfloat16()
    assert cpu.rms_norm(x.float(), weight.float(), 1e-6) is None
    assert cpu.rms_norm(torch.randn(2, cpu.NORM_VALUES // 64, 64).bfloat16(), weight, 1e-6) is None
    assert cpu.rms_norm(x, torch.ones(1, 1, 64).bfloat16(), 1e-6) is None
    norm = RMSNorm(64, 1e-6).bfloat16()
    assert torch.equal(norm(x.float().bfloat16()), cpu.rms_norm(x, norm.weight, 1e-6))


class CountedLibrary:
    """The library, counting its calls by function name."""

    def __init__(self, library):
        self.library, self.calls = library, collections.Counter()

    def __getattr__(self, name):
        function = getattr(self.library, name)

        def counted(*args):
            self.calls[name] += 1
            return function(*args)

        return counted


def test_dense_products_leave_the_rest_to_f_linear(monkeypatch):
    """More rows than DENSE_ROWS, float32, a weight whose rows are not contiguous, autograd: F.linear."""
    g = torch.Generator().manual_seed(22)
    w, x = torch.randn(48, 64, generator=g).bfloat16(), torch.randn(cpu.DENSE_ROWS + 1, 64, generator=g).bfloat16()
    counted = CountedLibrary(cpu._library)
    monkeypatch.setattr(cpu, "_library", counted)
    trained = w.clone().requires_grad_()
    cases = [(x, w), (x[:1].float(), w.float()), (x[:1], w.t().contiguous().t()), (x[:1], trained)]
    for a, b in cases:
        assert torch.equal(cpu.linear(a, b), F.linear(a, b))
    assert counted.calls["lm_dense"] == 0
    cpu.linear(x[: cpu.DENSE_ROWS], w)
    assert counted.calls["lm_dense"] == 1


@pytest.fixture(scope="module")
def qwen2_moe(tmp_path_factory):
    """Shared experts and their gate, biases on q/k/v, a router: the dense products of a MoE decode step."""
    return str(save_hf(hf_model("Qwen2MoeConfig", **QWEN2_MOE), tmp_path_factory.mktemp("qwen2_moe"), "sharded"))


def test_a_bfloat16_model_on_the_cpu_decodes_through_the_library(qwen2_moe, monkeypatch):
    """Loaded on the CPU, every nn.Linear takes `linear`; a decode step's products, norms and rotary
    embeddings and attention run in the library, its logits within the bfloat16 tolerance of ATen's (the
    library taken as unavailable: the experts' op still runs it)."""
    engine = localmoe.load(qwen2_moe, device="cpu", dtype=torch.bfloat16, options=RuntimeOptions(threads=2))
    model = engine.model
    assert not [m for m in model.modules() if isinstance(m, torch.nn.Linear) and type(m) is not Linear]
    counted = CountedLibrary(cpu._library)
    monkeypatch.setattr(cpu, "_library", counted)

    def decode_logits() -> torch.Tensor:
        cache = model.new_cache(1, 32)
        with torch.inference_mode():
            model(torch.tensor([[5, 9, 77, 3]]), cache)
            return model(torch.tensor([[12]]), cache).float()

    ours = decode_logits()
    layers = len(model.model.layers)  # per layer q/k/v at once, o, the router, the shared expert's 3 and gate
    assert counted.calls["lm_dense"] == 7 * layers + 2  # and the LM head, also on the prompt's last position
    assert counted.calls["lm_rms_norm"] == 2 * (2 * layers + 1)  # two a layer and the final one, the prompt's too
    assert counted.calls["lm_rotary"] == counted.calls["lm_decode_attention"] == layers  # the decode token's
    calls = {name: counted.calls[name] for name in ("lm_dense", "lm_rms_norm", "lm_rotary", "lm_decode_attention")}
    monkeypatch.setattr(cpu, "cpu_kernel", lambda: (False, "ATen's run"))  # the experts' op is bound already
    assert_near(ours, decode_logits(), torch.bfloat16)
    assert {name: counted.calls[name] for name in calls} == calls
