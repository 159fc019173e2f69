"""The CPU expert kernels (cpu_experts.cpp): compiled at first use for the instruction set of this CPU,
kept in localmoe's cache folder, loaded with ctypes, and registered as one op, `localmoe::expert_pairs`,
called with `reference.expert_pair_outputs`'s arguments (a dispatch mode sees one op per MoE layer).

The library has a plain C interface and no torch headers: it compiles in seconds with any C++17
compiler and does not depend on how torch was built. Compiling at first use, rather than at `pip
install`, keeps installation free of a build environment (pip's would fetch a CUDA torch) and matches
the binary to the CPU: AVX512-BF16, AVX-512, AVX2, or plain C++ elsewhere. Its OpenMP threads are
torch's own where torch ships its libgomp, so the two never compete for the cores. Where no build is
possible (no compiler), `cpu_kernel()` says why and the caller keeps the reference.
LOCALMOE_CPU_ISA=avx512bf16|avx512|avx2|generic forces a lower instruction set (for tests and benchmarks;
avx512bf16 is the build without AMX tiles, avx512bf16+amx the one with them).

Experts with several pairs (prefill) run in bfloat16 on the AMX tiles of the CPUs that have them, from 4
pairs (the library's tile_prefill: one pass per expert over its weights, decoded 16 rows at a time into
cache exactly as kernels/quantized.py dequantizes them, all the expert's pairs per pass). On the CPUs
without tiles, experts with MANY_PAIRS pairs or more take the library's vector_prefill: the same single
pass, 4 rows at a time decoded into cache and multiplied with every pair, by vdpbf16ps (AVX512-BF16) or
float32 fused multiply-adds (AVX-512, AVX2, plain C++). In float32 or float16, experts with MANY_PAIRS
pairs or more go through the reference's own code here, on weights the library dequantizes exactly as
kernels/quantized.py does: bit for bit the reference.

The library also has the dense products of decode (`linear`): a few rows of bfloat16 activations times
bfloat16 weights, the attention projections, routers, shared experts, dense MLPs and LM heads of a
CPU decode step, where oneDNN's matrix-vector products read the weights at about three quarters of
the RAM's bandwidth; and decode's RMS norms (`rms_norm`), rotary embeddings (`rotary`) and attention
(`decode_attention`), one call each where ATen runs several ops.
"""

import array
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from localmoe.files import locked, temporary_path
from localmoe.kernels import fused_reads
from localmoe.kernels.quantized import Fp8Weights, Mxfp4Weights, Nvfp4Weights, QuantizedWeights
from localmoe.kernels.reference import ExpertStack, _expert, expert_pair_outputs
from localmoe.paths import cache_dir

SOURCE = Path(__file__).with_name("cpu_experts.cpp")

# instruction sets, best first: the CPU flags each needs (/proc/cpuinfo's names) and the compiler's
# (LOCALMOE_AMX: prefill on AMX tiles where Linux permits them; without it, the same library prefills with
# vdpbf16ps, as on CPUs without tiles)
AVX512BF16 = (
    ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx2", "fma", "f16c"),
    ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mavx2", "-mfma", "-mf16c"],
)
ISAS = {
    "avx512bf16+amx": (("amx_tile", "amx_bf16", *AVX512BF16[0]), [*AVX512BF16[1], "-DLOCALMOE_AMX"]),
    "avx512bf16": AVX512BF16,
    "avx512": (
        ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"),
        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    ),
    "avx2": (("avx2", "fma", "f16c"), ["-mavx2", "-mfma", "-mf16c"]),
    "generic": ((), []),
}

# the library's codes (cpu_experts.cpp's Format, Dtype, Kind, Act)
DENSE_FORMATS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
INT8, INT4, FP8, MXFP4, NVFP4 = 3, 4, 5, 6, 7
NIBBLES = (INT4, MXFP4, NVFP4)  # two weights a byte
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # also the integer formats' scale dtypes
# the scale_type of a Matrix: DTYPES, or uint8 exponent bytes 2^(b - 127) (MXFP8's; the FP8 format reads it)
SCALE_TYPES = {**DTYPES, torch.uint8: 3}
KINDS = {"glu": 0, "clamped_swiglu": 1, "clamped_glu": 2, "glu_clamped_after": 3, "softcapped_glu": 4}
ACTS = {"silu": 0, "swish": 0, "gelu": 1, "gelu_pytorch_tanh": 2}
MANY_PAIRS = 8  # pairs of one expert from which prefill takes over: vector_prefill (bf16), else the reference


MATRIX_FIELDS = 16  # cpu_experts.cpp's Matrix: 3 pointers, 6 strides, rows, columns, block, 4 more of the form


def cpu_isa() -> str:
    """The best instruction set of ISAS this CPU has, or the one LOCALMOE_CPU_ISA names."""
    forced = os.environ.get("LOCALMOE_CPU_ISA")
    if forced:
        if forced not in ISAS:
            raise ValueError(f"LOCALMOE_CPU_ISA={forced}: choose one of {', '.join(ISAS)}")
        return forced
    flags = _cpu_flags()
    return next(isa for isa, (needs, _) in ISAS.items() if set(needs) <= flags)


def _cpu_flags() -> set[str]:
    if platform.machine() not in ("x86_64", "AMD64"):
        return set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


@functools.cache
def cpu_kernel() -> tuple[bool, str]:
    """(whether the op is there, a few words: the instruction set ("avx512bf16+amx" where prefill runs on
    AMX tiles), or why it is not there), once per process."""
    return load()


_library: ctypes.CDLL | None = None


def load() -> tuple[bool, str]:
    """Build (where not yet built) and load the library, and register the op: `cpu_kernel`'s answer,
    with a notice where it fails."""
    global _library
    try:
        isa = cpu_isa()
        library = ctypes.CDLL(str(_built(isa)))
    except (OSError, ValueError, subprocess.SubprocessError) as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        print(f"localmoe: the CPU expert kernels are not available ({reason}); using the slower reference",
              file=sys.stderr)  # fmt: skip
        return False, reason
    library.lm_expert_pairs.argtypes = [ctypes.c_void_p, *[ctypes.c_double] * 3]
    library.lm_dequantize.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 3, ctypes.c_void_p, ctypes.c_int64]
    library.lm_dense.argtypes = [*[ctypes.c_void_p] * 4, *[ctypes.c_int64] * 7]
    library.lm_dense.restype = None
    library.lm_rms_norm.argtypes = [*[ctypes.c_void_p] * 3, *[ctypes.c_int64] * 3, ctypes.c_double]
    library.lm_rms_norm.restype = None
    library.lm_rotary.argtypes = [*[ctypes.c_void_p] * 4, *[ctypes.c_int64] * 4]
    library.lm_rotary.restype = None
    library.lm_decode_attention.argtypes = [*[ctypes.c_void_p] * 5, *[ctypes.c_int64] * 6, ctypes.c_void_p]
    library.lm_decode_attention.argtypes += [ctypes.c_double, ctypes.c_int64]
    library.lm_decode_attention.restype = None
    if _library is None:
        _define_op()
    _library = library
    return True, "avx512bf16" if isa == "avx512bf16+amx" and not library.lm_tiles() else isa


def _built(isa: str) -> Path:
    """The shared library for `isa`, compiled once per source and compiler flags."""
    compiler, compile_flags, link_flags = _flags(isa)
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, *compile_flags, *link_flags]).encode())
    folder = cache_dir() / "kernels"
    library = folder / f"cpu_experts-{isa}-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    with locked(library):
        if not library.exists():  # built by another process while this one waited
            print(f"localmoe: building the CPU expert kernels for {isa} (once)", file=sys.stderr)
            objects, partial = temporary_path(library.with_suffix(".o")), temporary_path(library)
            try:
                _run([compiler, *compile_flags, "-c", str(SOURCE), "-o", str(objects)])
                _run([compiler, "-shared", str(objects), "-o", str(partial), *link_flags])
                partial.replace(library)
            finally:
                objects.unlink(missing_ok=True)
                partial.unlink(missing_ok=True)
    return library


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()
        raise OSError(f"the compiler failed: {errors[0] if errors else done.returncode}")


def _flags(isa: str) -> tuple[str, list[str], list[str]]:
    """The compiler, its flags and the link flags. OpenMP's pragmas are linked to the libgomp that
    torch ships where there is one (one thread pool for both), else to the compiler's."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        raise OSError("no C++ compiler found: install g++ (or set CXX)")
    torch_lib = Path(torch.__file__).parent / "lib"
    gomp = sorted([*torch_lib.glob("libgomp*.so*"), *(torch_lib.parent.parent / "torch.libs").glob("libgomp*.so*")])
    link = [str(gomp[0]), f"-Wl,-rpath,{gomp[0].parent}"] if gomp else ["-fopenmp"]
    return compiler, ["-O3", "-std=c++17", "-fPIC", "-fopenmp", "-DNDEBUG", *ISAS[isa][1]], link


def missing_activations(acts) -> list[str]:
    """The activations of `acts` (GatedActivation) that the kernels lack, as kind/act."""
    return sorted({f"{a.kind}/{a.act}" for a in acts if a.kind not in KINDS or a.act not in ACTS})


def _reads(weights, act) -> bool:
    """Whether the op reads a stack of `weights` with activation `act`."""
    if missing_activations([act]):
        return False
    if isinstance(weights, QuantizedWeights):
        return fused_reads(weights.spec)
    if isinstance(weights, Fp8Weights):  # whole blocks of columns
        return weights.shape[2] % (_form(weights)[1] or weights.shape[2]) == 0
    if isinstance(weights, (Mxfp4Weights, Nvfp4Weights)):
        return True
    return isinstance(weights, torch.Tensor) and weights.dtype in DENSE_FORMATS


def _form(weights) -> tuple[int, int, int, bool]:
    """(the library's format code, columns per scale (0: the whole row, and dense weights), weight rows per
    row of scales (0: all of them), whether NVFP4's part scales divide) of a stack of weights."""
    if isinstance(weights, QuantizedWeights):
        return (INT8 if weights.spec.bits == 8 else INT4), weights.spec.group, 1, False
    if isinstance(weights, Fp8Weights):
        rows, columns = (weights.block, weights.block) if isinstance(weights.block, int) else weights.block
        return FP8, columns, rows, False
    if isinstance(weights, Mxfp4Weights):
        return MXFP4, 32, 1, False
    if isinstance(weights, Nvfp4Weights):
        return NVFP4, 16, 1, weights.divides
    return DENSE_FORMATS[weights.dtype], 0, 1, False


def _tensors(weights) -> list[torch.Tensor | None]:
    """The weights, scales and zero points (NVFP4: part scales) of a stack, as the op takes them."""
    if isinstance(weights, QuantizedWeights):
        return [weights.q, weights.scale, weights.zero]
    if isinstance(weights, Fp8Weights):
        return [weights.bits, weights.scales, None]
    if isinstance(weights, Mxfp4Weights):
        return [weights.blocks, weights.scales, None]
    if isinstance(weights, Nvfp4Weights):
        return [weights.codes, weights.scales, weights.global_scale]
    return [weights, None, None]


def _stack(stack: ExpertStack) -> list[torch.Tensor | None]:
    return [*_tensors(stack.gate_up), *_tensors(stack.down), stack.gate_up_bias, stack.down_bias]


# the activations the op has been called with, by its codes and parameters: the matrix-product path runs the object
_activations: dict[tuple[int, int, float, float, float], Callable] = {}


def cpu_pair_outputs(
    out: torch.Tensor,
    x: torch.Tensor,
    gate_up,
    down,
    slots: torch.Tensor,
    act,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
    *,
    ids: torch.Tensor | None = None,
    host: ExpertStack | None = None,
) -> None:
    """`reference.expert_pair_outputs` in one call of the op: same arguments, same rows of `out` written;
    bit for bit the reference for experts with MANY_PAIRS pairs or more in float32 and float16 (and in
    bfloat16 at widths not in whole 32 columns), within float32 summation order (see
    tests/test_cpu_kernels.py) for the others. Experts in a form or with an activation the op does not read
    (a checkpoint's symmetric integers, NVFP4, ...) are computed by the reference: the misses' CPU share
    takes this function whatever the model stores."""
    if not _reads(gate_up, act):
        expert_pair_outputs(out, x, gate_up, down, slots, act, gate_up_bias, down_bias, input_scale, ids=ids, host=host)
        return
    form = _form(gate_up)
    if host is not None and _form(host.gate_up) != form:
        raise ValueError("the host stack and the pool hold experts in different formats")
    key = (KINDS[act.kind], ACTS[act.act], float(act.alpha), float(act.limit), float(act.gate_limit))
    _activations.setdefault(key, act)
    pool = _stack(ExpertStack(gate_up, down, gate_up_bias, down_bias))
    host_parts = _stack(host) if host is not None and ids is not None else []
    torch.ops.localmoe.expert_pairs(out, x, slots, ids, input_scale, pool, host_parts, *form, *key)


_op_library: torch.library.Library | None = None  # the op lives as long as this does


def _define_op() -> None:
    global _op_library
    _op_library = torch.library.Library("localmoe", "DEF")
    _op_library.define(
        "expert_pairs(Tensor(a!) out, Tensor x, Tensor slots, Tensor? ids, Tensor? input_scale, Tensor?[] pool, "
        "Tensor?[] host, int format, int block, int block_rows, bool divides, int kind, int act, float alpha, "
        "float limit, float gate_limit) -> ()"
    )
    _op_library.impl("expert_pairs", _expert_pairs, "CPU")


def _expert_pairs(
    out, x, slots, ids, input_scale, pool, host, fmt, block, block_rows, divides, kind, act, alpha, limit, gate_limit
) -> None:
    """The op on CPU tensors: the library's matrix-vector path and AMX tiles, then the reference's matrix
    products for the experts it leaves."""
    if x.dtype not in DTYPES or out.dtype != x.dtype or out.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("the CPU expert kernels take float32, bfloat16 or float16 x and out, rows contiguous")
    tokens, k = slots.shape
    slots = _int64(slots)
    ids = _int64(ids) if ids is not None and host else None
    if input_scale is not None and (input_scale.dtype != torch.float32 or not input_scale.is_contiguous()):
        input_scale = input_scale.float().contiguous()
    form = (fmt, block, block_rows, divides)
    call = [out.data_ptr(), x.data_ptr(), out.stride(0) * out.element_size(), x.stride(0) * x.element_size()]
    call += [tokens, k, x.shape[1], pool[3].shape[2] * (2 if fmt in NIBBLES else 1), slots.data_ptr()]
    call += [0 if ids is None else ids.data_ptr(), 0 if input_scale is None else input_scale.data_ptr()]
    call += _stack_fields(pool, form)
    call += _stack_fields(host, form) if ids is not None else [0] * (2 * MATRIX_FIELDS + 5)
    left = array.array("q", bytes(16 * tokens * k))
    call += [fmt, DTYPES[x.dtype], kind, act, torch.get_num_threads(), MANY_PAIRS, left.buffer_info()[0], 0, 0]
    fields = array.array("q", call)
    if _library.lm_expert_pairs(fields.buffer_info()[0], alpha, limit, gate_limit) != 0:
        raise ValueError("a slot or expert id is out of its stack's range")
    for i in range(fields[-2]):  # left_count
        which, expert = left[2 * i], left[2 * i + 1]
        parts = pool if which == 0 else host
        index = slots if which == 0 else torch.where(slots < 0, ids, -1)
        pairs = (index == expert).nonzero().squeeze(1)
        inputs = x[pairs // k]
        if input_scale is not None:
            inputs = (inputs * input_scale[pairs, None]).to(x.dtype)
        weights = [_dense(parts[i : i + 3], form, expert, x.dtype) for i in (0, 3)]
        biases = [None if b is None else b[expert : expert + 1] for b in parts[6:]]
        stack = ExpertStack(weights[0][None], weights[1][None], *biases)
        out[pairs] = _expert(inputs, stack, 0, _activations[(kind, act, alpha, limit, gate_limit)])


def _int64(index: torch.Tensor) -> torch.Tensor:
    if index.dtype == torch.int64 and index.is_contiguous():
        return index.view(-1)
    return index.reshape(-1).to(torch.int64).contiguous()


def _dense(parts: list, form: tuple, expert: int, dtype: torch.dtype) -> torch.Tensor:
    """One expert's matrix (weights, scales, zero points) in the compute dtype: the stack's own, or
    dequantized by the library."""
    if form[0] < INT8:
        return parts[0][expert]
    matrix = array.array("q", _matrix_fields(*parts, form))
    out = torch.empty(matrix[9], matrix[10], dtype=dtype)  # rows, columns
    address = matrix.buffer_info()[0]
    _library.lm_dequantize(address, form[0], expert, DTYPES[dtype], out.data_ptr(), torch.get_num_threads())
    return out


def _matrix_fields(w: torch.Tensor, s: torch.Tensor | None, z: torch.Tensor | None, form: tuple) -> list[int]:
    """cpu_experts.cpp's Matrix of weights [experts, rows, columns] with their scales and zero points (or
    NVFP4's part scales [experts, parts]), in `form` (_form's)."""
    fmt, block, block_rows, divides = form
    if w.dim() != 3 or w.stride(2) != 1:
        raise ValueError("expert weights must be [experts, rows, columns], rows contiguous")
    experts, rows, cols = w.shape
    cols *= 2 if fmt in NIBBLES else 1
    block = block or cols
    if cols % block:
        raise ValueError(f"the block size {block} must divide the {cols} columns")
    fields = [w.data_ptr(), 0 if s is None else s.data_ptr(), 0 if z is None else z.data_ptr()]
    for t in (w, s, z):
        fields += [0, 0] if t is None else [t.stride(0) * t.element_size(), t.stride(1) * t.element_size()]
    zero_rows = rows // z.shape[1] if z is not None and z.dim() == 2 else 1  # NVFP4: rows per part
    scale_type = SCALE_TYPES.get(s.dtype, 0) if s is not None else 0
    return [*fields, rows, cols, block, block_rows or rows, zero_rows, scale_type, int(divides)]


def _stack_fields(parts: list, form: tuple) -> list[int]:
    """cpu_experts.cpp's lm_stack: gate_up, its scales and zeros, down, its scales and zeros, biases."""
    fields = _matrix_fields(*parts[0:3], form) + _matrix_fields(*parts[3:6], form)
    biases = parts[6:]
    fields += [0 if b is None else b.data_ptr() for b in biases]
    fields += [0 if b is None else b.stride(0) * b.element_size() for b in biases]
    return [*fields, parts[0].shape[0]]


# rows of activations up to which `linear` takes the library's kernel: with more, oneDNN's products are
# faster (scripts/bench_cpu_dense.py, 2 threads: 24.7 GB/s against oneDNN's 22.8 for one row, 23.9 against
# 22.2 for two, 18.8 against 22.1 for four; bench/results/cpu-dense/20261202-1109.json)
DENSE_ROWS = 2


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); by the library for at most DENSE_ROWS rows of bfloat16 on the CPU
    (cpu_experts.cpp's lm_dense: float32 sums in one order per output, rounded once, whatever the thread
    count and the other rows), where it is built. The model's decode products (models/layers.py)."""
    if not (x.device.type == "cpu" and x.dtype == weight.dtype == torch.bfloat16 and _dense_reads(x, weight, bias)):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype)
    bias_address = None if bias is None else bias.data_ptr()
    _library.lm_dense(
        out.data_ptr(), rows.data_ptr(), weight.data_ptr(), bias_address, rows.shape[0], weight.shape[0],
        weight.shape[1], weight.shape[0], rows.stride(0), weight.stride(0), torch.get_num_threads(),
    )  # fmt: skip
    return out


def _dense_reads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether lm_dense takes these operands: few rows, each contiguous, no autograd, a bias like them."""
    return (
        x.numel() <= DENSE_ROWS * x.shape[-1]
        and x.stride(-1) == 1
        and weight.dim() == 2
        and weight.stride(1) == 1
        and (bias is None or (bias.dtype == torch.bfloat16 and bias.dim() == 1 and bias.stride(0) == 1))
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and cpu_kernel()[0]
    )


NORM_VALUES = 16384  # values of x up to which `rms_norm` takes the library: a few tokens' (ATen's ops are parallel)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """models/layers.py's RMSNorm.scaled (weight * x normalised in float32 and cast back) of bfloat16 x [...,
    E] by the library, with weight [E] or one per row of x's last two axes [N, E] (per-head norms); None
    where it does not take them (other dtypes, the CPU's library not built, more than NORM_VALUES values)."""
    if not (x.device.type == "cpu" and x.dtype == weight.dtype == torch.bfloat16 and x.numel() <= NORM_VALUES):
        return None
    if weight.shape not in (x.shape[-1:], x.shape[-2:]) or not cpu_kernel()[0]:
        return None
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)
    rows = x.numel() // x.shape[-1]
    weight_rows = weight.numel() // x.shape[-1]
    _library.lm_rms_norm(out.data_ptr(), x.data_ptr(), weight.data_ptr(), rows, x.shape[-1], weight_rows, eps)
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """models/rotary.py's apply_rotary (the first cos.shape[-1] dims of x [B, H, 1, D] turned in halves) of
    one position in bfloat16 by the library: the same bits. None where it does not take them (more
    positions, other dtypes, the library not built)."""
    if not (x.device.type == "cpu" and x.dtype == cos.dtype == sin.dtype == torch.bfloat16 and x.dim() == 4):
        return None
    if x.shape[2] != 1 or cos.shape != sin.shape or cos.numel() != cos.shape[-1] or cos.shape[-1] % 2:
        return None
    if cos.shape[-1] > x.shape[-1] or not cpu_kernel()[0]:
        return None
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype)
    _library.lm_rotary(
        out.data_ptr(), rows.data_ptr(), cos.data_ptr(), sin.data_ptr(), rows.shape[0], x.shape[-1],
        cos.shape[-1], rows.stride(0),
    )  # fmt: skip
    return out


# keys up to which `decode_attention` takes the library: each query head reads its group's keys and values
# itself, and beyond this ATen's flash attention is faster (2 threads, 32 query heads over 4 of 128 wide:
# 36 against 38 us at 64 keys, 57 against 50 at 128, 356 against 192 at 1024, warm; in a decode step, where
# the weights streamed through evict everything, 25-37 against 90 us at 64 keys)
ATTENTION_KEYS = 64


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, scale: float
) -> torch.Tensor | None:
    """F.scaled_dot_product_attention(q, k, v, mask, is_causal, scale, enable_gqa=True) [B, H, 1, Dv] of one
    query position over at most ATTENTION_KEYS keys in bfloat16 by the library (float32 scores, softmax and
    sums, rounded once), with `mask` None or the keys' booleans shared by all heads; None where it does not
    take them."""
    if not (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.dim() == 4):
        return None
    (batch, heads, positions, dim), (keys, v_dim) = q.shape, (k.shape[2], v.shape[3])
    if positions != 1 or is_causal or k.shape[:2] != v.shape[:2] or v.shape[2] != keys or heads % k.shape[1]:
        return None
    if keys > ATTENTION_KEYS:
        return None
    if k.shape[0] != batch or k.shape[3] != dim or not q.stride(3) == k.stride(3) == v.stride(3) == 1:
        return None
    if mask is not None and (mask.dtype != torch.bool or mask.numel() != keys):
        return None
    if not cpu_kernel()[0]:
        return None
    visible = None if mask is None else mask.reshape(keys).contiguous().view(torch.uint8)
    out = torch.empty(batch, heads, 1, v_dim, dtype=q.dtype)
    strides = (ctypes.c_int64 * 8)(q.stride(0), q.stride(1), *k.stride()[:3], *v.stride()[:3])
    _library.lm_decode_attention(
        out.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), None if visible is None else visible.data_ptr(),
        batch, heads, k.shape[1], keys, dim, v_dim, strides, scale, torch.get_num_threads(),
    )  # fmt: skip
    return out
