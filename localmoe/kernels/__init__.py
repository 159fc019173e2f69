"""Expert kernels: the plain-PyTorch reference (the oracle), the fused Triton kernels for CUDA and the
CPU kernels (one compiled op), behind one signature (`reference.expert_pair_outputs`'s). `pair_kernel`
picks one."""

import os
from collections.abc import Callable

import torch

from localmoe.errors import LocalMoEError, setting
from localmoe.kernels.quantized import (
    MXFP8,
    Fp8Weights,
    Mxfp4Weights,
    Nvfp4Weights,
    QuantSpec,
    StoredFormat,
    quantized_stack,
)
from localmoe.kernels.reference import expert_pair_outputs

KERNELS = ("auto", "reference", "triton", "cpu")


def pair_kernel(
    choice: str, device: torch.device, dtype: torch.dtype, acts, quant: QuantSpec | StoredFormat | None = None
) -> tuple[Callable, str]:
    """(the pair-output function, a few words on why it was chosen) for `--kernels choice`.

    auto: on CUDA, Triton where it is installed, has the model's activations and passes a self-check
    against the reference on this device (with weights quantized as `quant` says); on the CPU, the CPU
    kernels where they build and pass the same check; the reference otherwise. triton, cpu: those
    kernels or an error (Triton on the CPU needs TRITON_INTERPRET=1, which is for tests).
    """
    if choice == "reference":
        return expert_pair_outputs, "reference"
    if choice not in KERNELS:
        raise LocalMoEError(f"unknown kernels {choice!r}: choose one of {', '.join(KERNELS)}")
    if choice == "cpu" and device.type != "cpu":
        raise LocalMoEError(f"{setting('kernels')} cpu computes on the CPU: use it with the CPU device")
    if device.type == "cpu" and choice in ("auto", "cpu"):
        return _cpu_kernel(choice, device, dtype, acts, quant)
    if choice == "auto" and device.type != "cuda":
        return expert_pair_outputs, "reference"
    try:
        from localmoe.kernels.triton_experts import activation_code, triton_pair_outputs
    except ImportError:
        if choice == "auto":
            return expert_pair_outputs, "reference (Triton is not installed)"
        raise LocalMoEError(
            f"{setting('kernels')} triton needs Triton: pip install triton, or use {setting('kernels')} reference"
        ) from None
    missing = sorted({f"{act.kind}/{act.act}" for act in acts if activation_code(act) is None})
    if missing:
        if choice == "auto":
            return expert_pair_outputs, f"reference (Triton kernels lack {', '.join(missing)})"
        raise LocalMoEError(
            f"the Triton expert kernels lack the {', '.join(missing)} activation: {setting('kernels')} reference"
        )
    if not fused_reads(quant):
        if choice == "auto":
            return expert_pair_outputs, f"reference (the Triton kernels do not read {quant.words} yet)"
        raise LocalMoEError(
            f"the Triton expert kernels do not read {quant.words} yet: use {setting('kernels')} reference"
        )
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise LocalMoEError("the Triton expert kernels run on CUDA (on the CPU only under TRITON_INTERPRET=1)")
    if failure := self_check(triton_pair_outputs, device, dtype, acts, quant):
        if choice == "triton":
            raise LocalMoEError(
                f"{setting('kernels')} triton: the Triton expert kernels failed their self-check on {device} "
                f"({failure}); use {setting('kernels')} reference, and please report this"
            )
        return expert_pair_outputs, (
            "reference\nWARNING: the Triton expert kernels failed their self-check on this device "
            f"({failure}): the slower reference kernels run instead; please report this"
        )
    return triton_pair_outputs, "triton"


SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the integers' scales the fused kernels read


def fused_reads(form: QuantSpec | StoredFormat | None) -> bool:
    """Whether the fused kernels (Triton and CPU) read experts in `form`: the compute dtype, integers by
    group of columns or by row, asymmetric or symmetric, with float16, bfloat16 or float32 scales (localmoe's
    own, GPTQ, AWQ, compressed-tensors), MXFP4, NVFP4, and FP8 in blocks or by row. Act order (GPTQ's
    desc_act: each column's group from a table) runs on the reference."""
    if isinstance(form, QuantSpec):
        return not form.act_order and form.scale_dtype in SCALE_DTYPES
    return True


def host_kernel() -> Callable:
    """The kernel for experts computed where they lie in host RAM while the device works (the miss
    policies' CPU share): the CPU kernels, or the reference where they cannot be built."""
    from localmoe.kernels.cpu_experts import cpu_kernel, cpu_pair_outputs

    return cpu_pair_outputs if cpu_kernel()[0] else expert_pair_outputs


def _cpu_kernel(choice: str, device, dtype, acts, quant) -> tuple[Callable, str]:
    from localmoe.kernels.cpu_experts import cpu_kernel, cpu_pair_outputs, missing_activations

    available, isa = cpu_kernel()
    failure = f"they could not be built: {isa}" if not available else None
    if failure is None and not fused_reads(quant):
        failure = f"they do not read {quant.words} yet"
    if failure is None and (missing := missing_activations(acts)):
        failure = f"they lack the {', '.join(missing)} activation"
    if failure is None and choice == "auto" and (error := self_check(cpu_pair_outputs, device, dtype, acts, quant)):
        failure = f"they failed their self-check: {error}"
    if failure is None:
        return cpu_pair_outputs, f"cpu ({isa})"
    if choice == "auto":
        return expert_pair_outputs, f"reference (CPU kernels: {failure})"
    raise LocalMoEError(f"{setting('kernels')} cpu: {failure}; use {setting('kernels')} reference")


def self_check(
    kernel: Callable, device: torch.device, dtype: torch.dtype, acts, quant: QuantSpec | StoredFormat | None = None
) -> str | None:
    """None if `kernel` matches the reference on small random experts on this device, both kernel
    shapes (few and many tokens), each activation, weights quantized by `quant` if given; else what
    went wrong, in a line."""
    generator = torch.Generator().manual_seed(0)
    experts, hidden, inter = 4, 3 * _unit(quant), 2 * _unit(quant)

    def rand(*shape, scale=0.25):
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    for act in {(a.kind, a.act, a.alpha, a.limit, a.gate_limit): a for a in acts}.values():
        gate_up, down = rand(experts, (2 if act.gated else 1) * inter, hidden), rand(experts, hidden, inter)
        if isinstance(quant, QuantSpec):
            gate_up, down = quantized_stack(gate_up, quant), quantized_stack(down, quant)
        elif quant is not None:
            parts = 2 if act.gated else 1
            gate_up = _random_stored(quant, experts, gate_up.shape[1:], dtype, device, parts)
            down = _random_stored(quant, experts, down.shape[1:], dtype, device)
        for tokens in (1, 40):
            x = rand(tokens, hidden, scale=1.0)
            slots = torch.randint(-1, experts, (tokens, 2), generator=generator).to(device)
            expected, got = (x.new_zeros(slots.numel(), hidden) for _ in range(2))
            expert_pair_outputs(expected, x, gate_up, down, slots, act)
            try:
                kernel(got, x, gate_up, down, slots, act)
            except Exception as error:  # a compiler or driver error, whatever its type
                return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            tolerance = 1e-3 if dtype == torch.float32 else 5e-2
            error = (got.float() - expected.float()).abs().max().item()
            if not error <= tolerance * max(1.0, expected.float().abs().max().item()):
                return f"max error {error:.3g} with {act.kind}/{act.act}, {tokens} tokens"
    return None


def _unit(form: QuantSpec | StoredFormat | None) -> int:
    """A width the form's groups or blocks divide."""
    if isinstance(form, QuantSpec):
        return form.group or 16
    if isinstance(form, StoredFormat):
        return (form.block if isinstance(form.block, int) else max(form.block)) or 16
    return 16


def _random_stored(fmt: StoredFormat, experts: int, shape, dtype: torch.dtype, device, parts: int = 1):
    """Random weights in a checkpoint's stored format, with scales that keep them near unit size; `parts`:
    NVFP4's part scales per matrix (gate and up: 2)."""
    generator = torch.Generator().manual_seed(1)
    rows, columns = shape
    if fmt.kind in ("mxfp4", "nvfp4"):
        codes = torch.randint(0, 256, (experts, rows, columns // 2), generator=generator, dtype=torch.uint8)
    if fmt.kind == "mxfp4":
        scales = torch.randint(122, 126, (experts, rows, columns // 32), generator=generator, dtype=torch.uint8)
        return Mxfp4Weights(codes.to(device), scales.to(device), dtype)
    if fmt.kind == "nvfp4":  # block scales near 1/8 (e4m3 bytes 40-47), a part scale for gate's rows and up's
        scales = torch.randint(32, 40, (experts, rows, columns // 16), generator=generator, dtype=torch.uint8)
        global_scale = torch.rand(experts, parts, generator=generator) + 0.5
        return Nvfp4Weights(codes.to(device), scales.to(device), global_scale.to(device), fmt.divides, dtype)
    bits = torch.randn(experts, rows, columns, generator=generator).to(torch.float8_e4m3fn).view(torch.uint8)
    if fmt == MXFP8:  # exponents 2^-7 to 2^-3
        scales = torch.randint(120, 125, (experts, rows, columns // 32), generator=generator, dtype=torch.uint8)
        return Fp8Weights(bits.to(device), scales.to(device), (1, 32), dtype)
    block_rows, block_columns = (fmt.block, fmt.block) if isinstance(fmt.block, int) else fmt.block
    tiles = (-(-rows // (block_rows or rows)), -(-columns // (block_columns or columns)))
    scales = torch.rand(experts, *tiles, generator=generator) / 8
    return Fp8Weights(bits.to(device), scales.to(device), fmt.block, dtype)
