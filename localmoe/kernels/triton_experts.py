"""Fused expert kernels in Triton: the (token, choice) pair outputs of a MoE layer in two launches, as
`reference.expert_pair_outputs` computes them one expert at a time.

Launch one computes act(gate(x), up(x)) for every pair into an float32 buffer [P, I]; launch two
applies down to it into the pair outputs [P, E]. Two shapes of each:

- few tokens (decode): one program per (pair, block of output rows), a matrix-vector product that
  reduces along the input; with one token each selected expert's weights are read once;
- many tokens (prefill): pairs sorted by slot and padded per slot to the block height, so each
  program multiplies a block of one slot's pairs by a tile of that slot's weights (a grouped GEMM).

The pair buffers, the activation (SwiGLU, tanh-GELU GLU, gpt-oss's clamped SwiGLU), expert biases and
Llama 4's input scale match the reference. Weights are in the compute dtype, quantized to 8 or 4 bits
(kernels/quantized.py), or block-scaled FP8 and MXFP4 as checkpoints ship them, dequantized in
registers as they are loaded. The sort runs on the device without a host sync.
Under TRITON_INTERPRET=1 the kernels run on the CPU (float32 and float16 only), which is how the
tests check them.
"""

import torch
import triton
import triton.language as tl

from localmoe.kernels.quantized import Fp8Weights, Mxfp4Weights, QuantizedWeights
from localmoe.kernels.reference import ExpertStack

# activation codes: act(gate, up)
SILU_GLU, GELU_TANH_GLU, CLAMPED_SWIGLU, CLAMPED_SILU_GLU = 0, 1, 2, 3
ACTIVATIONS = {("glu", "silu"): SILU_GLU, ("glu", "swish"): SILU_GLU, ("glu", "gelu_pytorch_tanh"): GELU_TANH_GLU}
DECODE_PAIRS = 16  # up to this many pairs, the matrix-vector kernels
BLOCK_M = 16  # pairs per block of the grouped kernels (tl.dot wants at least 16)


def activation_code(act) -> int | None:
    """The kernels' code for a `GatedActivation`, or None where they lack it."""
    if act.kind == "clamped_swiglu":
        return CLAMPED_SWIGLU
    if act.kind == "clamped_glu":
        return CLAMPED_SILU_GLU if act.act in ("silu", "swish") else None
    return ACTIVATIONS.get((act.kind, act.act))


@triton.jit
def _activate(gate, up, ACT: tl.constexpr, alpha, limit):
    # one return after compile-time branches: the compiler rejects returns inside control flow
    if ACT == 0:
        out = gate * tl.sigmoid(gate) * up
    elif ACT == 1:
        # 0.5 g (1 + tanh(c (g + 0.044715 g^3))) = g * sigmoid(2 c (g + 0.044715 g^3))
        out = gate * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate)) * up
    elif ACT == 3:
        clamped = tl.minimum(gate, limit)
        out = clamped * tl.sigmoid(clamped) * tl.minimum(tl.maximum(up, -limit), limit)
    else:
        clamped = tl.minimum(gate, limit)
        out = clamped * tl.sigmoid(clamped * alpha) * (tl.minimum(tl.maximum(up, -limit), limit) + 1.0)
    return out


@triton.jit
def _weights(w_ptr, s_ptr, z_ptr, r, c, mask, stride_r, stride_sr, BITS: tl.constexpr, GROUP: tl.constexpr):
    """One expert's weights at rows r and columns c (broadcastable index tensors), in float32: loaded, or
    unpacked and dequantized, (q - zero) * scale, with each column's group."""
    if BITS == 16:
        w = tl.load(w_ptr + r * stride_r + c, mask=mask, other=0.0).to(tl.float32)
    elif BITS == 2:  # block-scaled FP8 (e4m3fn bits), a float32 multiplier per GROUP x GROUP tile
        byte = tl.load(w_ptr + r * stride_r + c, mask=mask, other=0).to(tl.int32)
        exponent = (byte >> 3) & 0xF
        mantissa = (byte & 7).to(tl.float32)
        magnitude = tl.where(
            exponent == 0,
            mantissa * 0.001953125,  # subnormal: m / 8 * 2^-6
            (1.0 + mantissa * 0.125) * tl.exp2((exponent - 7).to(tl.float32)),
        )
        scale = tl.load(s_ptr + (r // GROUP) * stride_sr + c // GROUP, mask=mask, other=0.0)
        w = tl.where(byte >= 128, -magnitude, magnitude) * scale
    elif BITS == 1:  # MXFP4: e2m1 codes, two per byte, and a power-of-two exponent per 32 columns
        byte = tl.load(w_ptr + r * stride_r + c // 2, mask=mask, other=0).to(tl.int32)
        code = tl.where(c % 2 == 0, byte & 0xF, (byte >> 4) & 0xF)
        exponent = (code >> 1) & 3
        mantissa = (code & 1).to(tl.float32)
        magnitude = tl.where(
            exponent == 0, 0.5 * mantissa, (1.0 + 0.5 * mantissa) * tl.exp2((exponent - 1).to(tl.float32))
        )
        scale = tl.load(s_ptr + r * stride_sr + c // 32, mask=mask, other=127).to(tl.float32)
        w = tl.where(code >= 8, -magnitude, magnitude) * tl.exp2(scale - 127.0)
    else:
        if BITS == 8:
            q = tl.load(w_ptr + r * stride_r + c, mask=mask, other=0).to(tl.float32)
        else:
            byte = tl.load(w_ptr + r * stride_r + c // 2, mask=mask, other=0).to(tl.int32)
            q = tl.where(c % 2 == 0, byte & 0xF, (byte >> 4) & 0xF).to(tl.float32)
        group = r * stride_sr + c // GROUP
        scale = tl.load(s_ptr + group, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + group, mask=mask, other=0.0).to(tl.float32)
        w = (q - zero) * scale
    return w


@triton.jit
def _gate_up_rows(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    scale_ptr,
    slot_ptr,
    h_ptr,
    HIDDEN,
    INTER,
    K_CHOICES,
    stride_x,
    stride_ws,
    stride_wr,
    stride_ss,
    stride_sr,
    stride_bs,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    alpha,
    limit,
    BLOCK_I: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pair = tl.program_id(0)
    slot = tl.load(slot_ptr + pair)
    if slot >= 0:
        token = pair // K_CHOICES
        rows = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        row_ok = rows < INTER
        w = w_ptr + slot.to(tl.int64) * stride_ws
        s = s_ptr + slot.to(tl.int64) * stride_ss
        z = z_ptr + slot.to(tl.int64) * stride_ss
        gate = tl.zeros([BLOCK_I], dtype=tl.float32)
        up = tl.zeros([BLOCK_I], dtype=tl.float32)
        for start in range(0, HIDDEN, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            col_ok = cols < HIDDEN
            xk = tl.load(x_ptr + token * stride_x + cols, mask=col_ok, other=0.0).to(tl.float32)
            ok = row_ok[:, None] & col_ok[None, :]
            wg = _weights(w, s, z, rows[:, None], cols[None, :], ok, stride_wr, stride_sr, BITS, GROUP)
            wu = _weights(w, s, z, rows[:, None] + INTER, cols[None, :], ok, stride_wr, stride_sr, BITS, GROUP)
            gate += tl.sum(wg * xk[None, :], axis=1)
            up += tl.sum(wu * xk[None, :], axis=1)
        if HAS_SCALE:
            scale = tl.load(scale_ptr + pair).to(tl.float32)
            gate = gate * scale
            up = up * scale
        if HAS_BIAS:
            gate += tl.load(bias_ptr + slot * stride_bs + rows, mask=row_ok, other=0.0).to(tl.float32)
            up += tl.load(bias_ptr + slot * stride_bs + INTER + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(h_ptr + pair * INTER + rows, _activate(gate, up, ACT, alpha, limit), mask=row_ok)


@triton.jit
def _down_rows(
    h_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    slot_ptr,
    out_ptr,
    HIDDEN,
    INTER,
    stride_out,
    stride_ws,
    stride_wr,
    stride_ss,
    stride_sr,
    stride_bs,
    HAS_BIAS: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pair = tl.program_id(0)
    slot = tl.load(slot_ptr + pair)
    if slot >= 0:
        rows = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        row_ok = rows < HIDDEN
        w = w_ptr + slot.to(tl.int64) * stride_ws
        s = s_ptr + slot.to(tl.int64) * stride_ss
        z = z_ptr + slot.to(tl.int64) * stride_ss
        acc = tl.zeros([BLOCK_E], dtype=tl.float32)
        for start in range(0, INTER, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            col_ok = cols < INTER
            hk = tl.load(h_ptr + pair * INTER + cols, mask=col_ok, other=0.0)
            ok = row_ok[:, None] & col_ok[None, :]
            wd = _weights(w, s, z, rows[:, None], cols[None, :], ok, stride_wr, stride_sr, BITS, GROUP)
            acc += tl.sum(wd * hk[None, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + slot * stride_bs + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + pair * stride_out + rows, acc.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _grouped_gate_up(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    scale_ptr,
    sorted_ptr,
    block_slot_ptr,
    h_ptr,
    HIDDEN,
    INTER,
    K_CHOICES,
    stride_x,
    stride_ws,
    stride_wr,
    stride_ss,
    stride_sr,
    stride_bs,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    alpha,
    limit,
    PRECISION: tl.constexpr,  # of float32 products: ieee, not the tf32 default
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    block = tl.program_id(0)
    slot = tl.load(block_slot_ptr + block)
    if slot >= 0:
        pairs = tl.load(sorted_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = pairs >= 0
        tokens = tl.where(valid, pairs, 0) // K_CHOICES
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < INTER
        w = w_ptr + slot.to(tl.int64) * stride_ws
        s = s_ptr + slot.to(tl.int64) * stride_ss
        z = z_ptr + slot.to(tl.int64) * stride_ss
        gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, HIDDEN, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            col_ok = cols < HIDDEN
            a_ok = valid[:, None] & col_ok[None, :]
            a = tl.load(x_ptr + tokens[:, None] * stride_x + cols[None, :], mask=a_ok, other=0.0)
            ok = col_ok[:, None] & row_ok[None, :]
            wg = _weights(w, s, z, rows[None, :], cols[:, None], ok, stride_wr, stride_sr, BITS, GROUP)
            wu = _weights(w, s, z, rows[None, :] + INTER, cols[:, None], ok, stride_wr, stride_sr, BITS, GROUP)
            gate += tl.dot(a, wg.to(a.dtype), input_precision=PRECISION)
            up += tl.dot(a, wu.to(a.dtype), input_precision=PRECISION)
        if HAS_SCALE:
            scale = tl.load(scale_ptr + pairs, mask=valid, other=0.0).to(tl.float32)
            gate = gate * scale[:, None]
            up = up * scale[:, None]
        if HAS_BIAS:
            gate += tl.load(bias_ptr + slot * stride_bs + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
            up += tl.load(bias_ptr + slot * stride_bs + INTER + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        h = _activate(gate, up, ACT, alpha, limit)
        tl.store(h_ptr + pairs[:, None] * INTER + rows[None, :], h, mask=valid[:, None] & row_ok[None, :])


@triton.jit
def _grouped_down(
    h_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    sorted_ptr,
    block_slot_ptr,
    out_ptr,
    HIDDEN,
    INTER,
    stride_out,
    stride_ws,
    stride_wr,
    stride_ss,
    stride_sr,
    stride_bs,
    HAS_BIAS: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    PRECISION: tl.constexpr,  # of float32 products: ieee, not the tf32 default
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    block = tl.program_id(0)
    slot = tl.load(block_slot_ptr + block)
    if slot >= 0:
        pairs = tl.load(sorted_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = pairs >= 0
        safe = tl.where(valid, pairs, 0)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < HIDDEN
        w = w_ptr + slot.to(tl.int64) * stride_ws
        s = s_ptr + slot.to(tl.int64) * stride_ss
        z = z_ptr + slot.to(tl.int64) * stride_ss
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, INTER, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            col_ok = cols < INTER
            a_ok = valid[:, None] & col_ok[None, :]
            a = tl.load(h_ptr + safe[:, None] * INTER + cols[None, :], mask=a_ok, other=0.0)
            ok = col_ok[:, None] & row_ok[None, :]
            wd = _weights(w, s, z, rows[None, :], cols[:, None], ok, stride_wr, stride_sr, BITS, GROUP)
            dtype = out_ptr.dtype.element_ty  # the compute dtype, as the reference multiplies in
            acc += tl.dot(a.to(dtype), wd.to(dtype), input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + slot * stride_bs + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + safe[:, None] * stride_out + rows[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & row_ok[None, :])


def _weight_args(weights) -> tuple[list, dict]:
    """(pointer and stride arguments, compile-time arguments) for compute-dtype, quantized or MXFP4
    weights."""
    if isinstance(weights, Fp8Weights):
        bits, scales = weights.bits, weights.scales
        args = [bits, scales, scales, bits.stride(0), bits.stride(1), scales.stride(0), scales.stride(1)]
        return args, dict(BITS=2, GROUP=weights.block)
    if isinstance(weights, Mxfp4Weights):
        blocks, scales = weights.blocks, weights.scales
        args = [blocks, scales, scales, blocks.stride(0), blocks.stride(1), scales.stride(0), scales.stride(1)]
        return args, dict(BITS=1, GROUP=32)
    if isinstance(weights, QuantizedWeights):
        q, scale = weights.q, weights.scale
        args = [q, scale, weights.zero, q.stride(0), q.stride(1), scale.stride(0), scale.stride(1)]
        return args, dict(BITS=weights.spec.bits, GROUP=weights.spec.group)
    return [weights, weights, weights, weights.stride(0), weights.stride(1), 0, 0], dict(BITS=16, GROUP=1)


def triton_pair_outputs(
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
    """`reference.expert_pair_outputs`, fused: same arguments (weights in the compute dtype or
    `QuantizedWeights`), same rows of `out` written. With `ids` and `host`, the pairs without a slot are
    computed by the same kernels from the host rows where they lie: on CUDA, page-locked and mapped
    memory the device reads over the bus (Triton takes its device address), with nothing decided on the
    host, the same arithmetic as from a slot."""
    _pair_outputs(out, x, gate_up, down, slots, act, gate_up_bias, down_bias, input_scale)
    if ids is not None and host is not None:
        misses = torch.where(slots < 0, ids.to(slots.dtype), -1)
        _pair_outputs(out, x, host.gate_up, host.down, misses, act, host.gate_up_bias, host.down_bias, input_scale)


def _pair_outputs(out, x, gate_up, down, slots, act, gate_up_bias, down_bias, input_scale) -> None:
    code = activation_code(act)
    if code is None:
        raise ValueError(f"the Triton expert kernels have no {act.kind}/{act.act} activation")
    tokens, k = slots.shape
    hidden, inter = x.shape[1], down.shape[2]
    flat = slots.reshape(-1).to(torch.int32).contiguous()
    x = x.contiguous()
    h = torch.empty(flat.numel(), inter, dtype=torch.float32, device=x.device)
    has_bias, has_scale = gate_up_bias is not None, input_scale is not None
    bias_in = gate_up_bias if has_bias else flat  # any pointer: unused without biases
    bias_out = down_bias if has_bias else flat
    bias_strides = (gate_up_bias.stride(0), down_bias.stride(0)) if has_bias else (0, 0)
    scale = input_scale.contiguous() if has_scale else flat
    gate_up_args, gate_up_bits = _weight_args(gate_up)
    down_args, down_bits = _weight_args(down)
    activation = dict(ACT=code, alpha=float(act.alpha), limit=float(act.limit))
    if flat.numel() <= DECODE_PAIRS:
        _gate_up_rows[(flat.numel(), triton.cdiv(inter, 32))](
            x, *gate_up_args[:3], bias_in, scale, flat, h, hidden, inter, k, x.stride(0), *gate_up_args[3:],
            bias_strides[0], HAS_BIAS=has_bias, HAS_SCALE=has_scale, BLOCK_I=32, BLOCK_K=128, **gate_up_bits,
            **activation,
        )  # fmt: skip
        _down_rows[(flat.numel(), triton.cdiv(hidden, 32))](
            h, *down_args[:3], bias_out, flat, out, hidden, inter, out.stride(0), *down_args[3:], bias_strides[1],
            HAS_BIAS=has_bias, BLOCK_E=32, BLOCK_K=128, **down_bits,
        )  # fmt: skip
        return
    order, block_slot = sorted_blocks(flat, gate_up.shape[0], BLOCK_M)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    _grouped_gate_up[(block_slot.numel(), triton.cdiv(inter, 64))](
        x, *gate_up_args[:3], bias_in, scale, order, block_slot, h, hidden, inter, k, x.stride(0),
        *gate_up_args[3:], bias_strides[0], HAS_BIAS=has_bias, HAS_SCALE=has_scale, PRECISION=precision,
        BLOCK_M=BLOCK_M, BLOCK_N=64, BLOCK_K=64, **gate_up_bits, **activation,
    )  # fmt: skip
    _grouped_down[(block_slot.numel(), triton.cdiv(hidden, 64))](
        h, *down_args[:3], bias_out, order, block_slot, out, hidden, inter, out.stride(0), *down_args[3:],
        bias_strides[1], HAS_BIAS=has_bias, PRECISION=precision, BLOCK_M=BLOCK_M, BLOCK_N=64, BLOCK_K=64, **down_bits,
    )  # fmt: skip


def sorted_blocks(slots: torch.Tensor, num_slots: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs grouped by slot, each group padded to a multiple of `block` with -1: (pair indices [M],
    the slot of each block of `block` entries [M / block], -1 for blocks past the end). M is the most
    the padding can need, so nothing here waits for the device."""
    pairs = slots.numel()
    key = torch.where(slots >= 0, slots.long(), num_slots)  # skipped pairs sort last
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(num_slots + 1, dtype=torch.long, device=slots.device).scatter_add_(
        0, key, torch.ones_like(key)
    )[:num_slots]
    padded = (counts + block - 1) // block * block
    ends = padded.cumsum(0)
    sorted_key = key[order]
    valid = sorted_key < num_slots
    first_of_slot = counts.cumsum(0) - counts  # where each slot's pairs start in `order`
    safe = sorted_key.clamp(max=num_slots - 1)
    position = (ends - padded)[safe] + torch.arange(pairs, device=slots.device) - first_of_slot[safe]
    capacity = triton.cdiv(pairs + min(pairs, num_slots) * (block - 1), block) * block
    grouped = torch.full((capacity + 1,), -1, dtype=torch.int32, device=slots.device)
    grouped[torch.where(valid, position, capacity)] = order.to(torch.int32)  # skipped pairs land in the spare
    starts = torch.arange(0, capacity, block, device=slots.device)
    block_slot = torch.searchsorted(ends, starts, right=True)
    block_slot = torch.where(block_slot < num_slots, block_slot, -1).to(torch.int32)
    return grouped[:capacity], block_slot
