"""The CPU expert kernels (cpu_experts.cpp): built at first use for the instruction set of this CPU, with
the compiler that is here and the torch that is installed, kept in localmoe's cache folder, and loaded
as one op, `localmoe::expert_pairs`, called with `reference.expert_pair_outputs`'s arguments.

Building at first use, rather than at `pip install`, keeps installation free of a build environment
(pip's would fetch a CUDA torch to build against) and matches the binary to the CPU: AVX-512, AVX2, or
plain C++ elsewhere (AVX512-BF16 adds the bfloat16 dot products). Where no build is possible (no compiler), `cpu_kernel()` says why and the caller
keeps the reference. LOCALMOE_CPU_ISA=avx512|avx2|generic forces a lower instruction set (for tests).
"""

import contextlib
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from localmoe.kernels.quantized import Fp8Weights, Mxfp4Weights, QuantizedWeights
from localmoe.kernels.reference import ExpertStack
from localmoe.paths import cache_dir

SOURCE = Path(__file__).with_name("cpu_experts.cpp")

# instruction sets, best first: the CPU flags each needs (/proc/cpuinfo's names) and the compiler's
ISAS = {
    "avx512bf16": (
        ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx2", "fma", "f16c"),
        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mavx2", "-mfma", "-mf16c"],
    ),
    "avx512": (
        ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"),
        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    ),
    "avx2": (("avx2", "fma", "f16c"), ["-mavx2", "-mfma", "-mf16c"]),
    "generic": ((), []),
}

# the op's codes (cpu_experts.cpp's Format, Kind, Act)
DENSE_FORMATS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
INT8, INT4, FP8, MXFP4 = 3, 4, 5, 6
KINDS = {"glu": 0, "clamped_swiglu": 1, "clamped_glu": 2}
ACTS = {"silu": 0, "swish": 0, "gelu": 1, "gelu_pytorch_tanh": 2}


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
    """(whether the op is loaded, a few words: the instruction set, or why it is not there), once per
    process: a second library defining the op would abort it."""
    return load()


def load() -> tuple[bool, str]:
    """Build (where not yet built) and load the op: `cpu_kernel`'s answer, with a notice where it fails."""
    try:
        isa = cpu_isa()
        torch.ops.load_library(str(_built(isa)))
    except (OSError, ValueError, subprocess.SubprocessError) as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        print(f"localmoe: the CPU expert kernels are not available ({reason}); using the slower reference",
              file=sys.stderr)  # fmt: skip
        return False, reason
    return True, isa


def _built(isa: str) -> Path:
    """The shared library for `isa`, compiled once per source, torch and compiler flags."""
    flags = _flags(isa)
    key = hashlib.sha256("\0".join([SOURCE.read_text(), torch.__version__, *flags]).encode()).hexdigest()[:16]
    folder = cache_dir() / "kernels"
    library = folder / f"cpu_experts-{isa}-{key}.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / f"{library.name}.lock"):
        if not library.exists():  # built by another process while this one waited
            print(f"localmoe: building the CPU expert kernels for {isa} (once)", file=sys.stderr)
            partial = library.with_suffix(f".{os.getpid()}.tmp")
            done = subprocess.run([*flags[:1], str(SOURCE), "-o", str(partial), *flags[1:]], capture_output=True, text=True)
            if done.returncode != 0:
                partial.unlink(missing_ok=True)
                errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()
                raise OSError(f"the compiler failed: {errors[0] if errors else done.returncode}")
            partial.replace(library)
    return library


def _flags(isa: str) -> list[str]:
    """The compiler and its arguments: torch's headers and libraries, its C++ ABI, and OpenMP, whose
    pragmas at::parallel_for is made of (the process's libgomp, torch's, runs them)."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        raise OSError("no C++ compiler found: install g++ (or set CXX)")
    root = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        compiler,
        "-O3",
        "-std=c++20",
        "-shared",
        "-fPIC",
        "-fopenmp",
        "-DNDEBUG",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        f"-I{root / 'include'}",
        f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
        *ISAS[isa][1],
        f"-L{root / 'lib'}",
        f"-Wl,-rpath,{root / 'lib'}",
        "-lc10",
        "-ltorch_cpu",
        "-ltorch",
    ]


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive lock on `path` (where the system has them), so one process builds at a time."""
    try:
        import fcntl
    except ImportError:  # no locks: concurrent builds each write their own file and rename it in place
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def missing_activations(acts) -> list[str]:
    """The activations of `acts` (GatedActivation) that the kernels lack, as kind/act."""
    return sorted({f"{a.kind}/{a.act}" for a in acts if a.kind not in KINDS or a.act not in ACTS})


def _format(weights) -> tuple[int, int]:
    """(the op's format code, its block: columns per scale) of a stack of weights."""
    if isinstance(weights, QuantizedWeights):
        return (INT8 if weights.spec.bits == 8 else INT4), weights.spec.group
    if isinstance(weights, Fp8Weights):
        return FP8, weights.block
    if isinstance(weights, Mxfp4Weights):
        return MXFP4, 32
    return DENSE_FORMATS[weights.dtype], 0


def _tensors(weights) -> list[torch.Tensor | None]:
    """The weights, scales and zero points of a stack, as the op takes them."""
    if isinstance(weights, QuantizedWeights):
        return [weights.q, weights.scale, weights.zero]
    if isinstance(weights, Fp8Weights):
        return [weights.bits, weights.scales, None]
    if isinstance(weights, Mxfp4Weights):
        return [weights.blocks, weights.scales, None]
    return [weights, None, None]


def _stack(stack: ExpertStack) -> list[torch.Tensor | None]:
    return [*_tensors(stack.gate_up), *_tensors(stack.down), stack.gate_up_bias, stack.down_bias]


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
    """`reference.expert_pair_outputs` in one call of the op: same arguments, same rows of `out` written,
    bit for bit the reference for experts with many pairs, within float32 summation order otherwise."""
    code, block = _format(gate_up)
    if host is not None and _format(host.gate_up) != (code, block):
        raise ValueError("the host stack and the pool hold experts in different formats")
    pool = _stack(ExpertStack(gate_up, down, gate_up_bias, down_bias))
    torch.ops.localmoe.expert_pairs(
        out, x, slots, ids, input_scale, pool, _stack(host) if host is not None and ids is not None else [], code, block,
        KINDS[act.kind], ACTS[act.act], float(act.alpha), float(act.limit),
    )  # fmt: skip
