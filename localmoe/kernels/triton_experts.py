"""Fused expert kernels in Triton: the (token, choice) pair outputs of a MoE layer in two launches, as
`reference.expert_pair_outputs` computes them one expert at a time.

Launch one computes act(gate(x), up(x)) for every pair into a float32 buffer [P, I]; launch two
applies down to it into the pair outputs [P, E]. Two shapes of each:

- few tokens (decode): one program per (pair, block of output rows), a matrix-vector product that
  reduces along the input; each weight byte is loaded once, and quantized weights are reduced per
  group of columns before their group's scale is applied (one scale load per row and group);
- many tokens (prefill): pairs sorted by expert and padded per expert to the block height, so each
  program multiplies a block of one expert's pairs by a tile of that expert's weights (a grouped GEMM).

A pair's expert lies in a slot of the device pool, or (slot -1, with `ids` and `host` given) in the
host stack at its expert id: on CUDA those are pinned host rows mapped into the device's address space,
which the kernel reads over the bus (see `triton_pair_outputs`). Both sources run the same code on the
same bytes, so a pair's output does not depend on where its expert lies.

The activation (SwiGLU, tanh-GELU GLU, gpt-oss's clamped SwiGLU, DeepSeek-V4's clamped GLU, Step-3.7's
SwiGLU clamped after the activation, Inkling 2's softcapped GLU, and Nemotron-H's ungated ReLU-squared,
whose experts have an up projection and no gate: gate_up [N, I, E]), expert biases and Llama 4's input
scale match the reference. Weights are in the compute dtype, quantized to 8 or 4 bits (kernels/quantized.py), or
block-scaled FP8 (with float32 multipliers, or MXFP8's exponent bytes), MXFP4 and NVFP4 as checkpoints
ship them, decoded in registers with integer bit operations.
Offsets along pairs, tokens, slots and experts are 64-bit; offsets inside one expert's matrix are
32-bit, which the launcher's checks keep below 2^31 (scripts/check_kernels.py finds any 32-bit product
along pairs or slots in the compiled kernels). The sort runs on the device without a host sync. Under
TRITON_INTERPRET=1 the kernels run on the CPU (float32 and float16 only), which is how the tests check
them.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from localmoe.kernels.quantized import Fp8Weights, Mxfp4Weights, Nvfp4Weights, QuantizedWeights
from localmoe.kernels.reference import ExpertStack

# activation codes: act(gate, up), or act(up) for ungated experts (the codes from UNGATED on, whose input
# projection is up alone)
SILU_GLU, GELU_TANH_GLU, CLAMPED_SWIGLU, CLAMPED_SILU_GLU, SILU_GLU_CLAMPED_AFTER, SOFTCAPPED_GLU = 0, 1, 2, 3, 4, 5
UNGATED = RELU2 = 6
ACTIVATIONS = {
    ("glu", "silu"): SILU_GLU,
    ("glu", "swish"): SILU_GLU,
    ("glu", "gelu_pytorch_tanh"): GELU_TANH_GLU,
    ("glu_clamped_after", "silu"): SILU_GLU_CLAMPED_AFTER,
    ("glu_clamped_after", "swish"): SILU_GLU_CLAMPED_AFTER,
    ("ungated", "relu2"): RELU2,
}
# weight formats, the kernels' BITS (literals in the kernels, which cannot read Python globals)
# compute dtype, 8- and 4-bit affine, e4m3fn blocks, MXFP4, NVFP4
PLAIN, INT8, INT4, FP8, MXFP4, NVFP4 = 16, 8, 4, 2, 1, 3
DECODE_PAIRS = 16  # up to this many pairs, the matrix-vector kernels
BLOCK_M = 16  # pairs per block of the grouped kernels (tl.dot wants at least 16)
DECODE_ROWS = 32  # output rows per decode program
# columns per step of the decode kernels (256 bytes of each row for 16-bit and 8-bit weights, 128 and 64 for
# int4 and MXFP4), so that every variant compiles without register spills (scripts/check_kernels.py; 256
# columns of MXFP4 spilled on sm_90)
DECODE_COLUMNS = {PLAIN: 128, FP8: 256, INT8: 256, MXFP4: 128, NVFP4: 128, INT4: 256}
INDEX_LIMIT = 2**31  # 32-bit offsets inside one expert's matrix


def activation_code(act) -> int | None:
    """The kernels' code for a `GatedActivation`, or None where they lack it."""
    if act.kind == "clamped_swiglu":
        return CLAMPED_SWIGLU
    if act.kind == "clamped_glu":
        return CLAMPED_SILU_GLU if act.act in ("silu", "swish") else None
    if act.kind == "softcapped_glu":  # sigmoid whatever `act` says, as the reference
        return SOFTCAPPED_GLU
    return ACTIVATIONS.get((act.kind, act.act))


@triton.jit
def _activate(gate, up, ACT: tl.constexpr, alpha, limit, gate_limit):
    # one return after compile-time branches: the compiler rejects returns inside control flow; ungated
    # activations (ACT >= 6) read up only
    if ACT == 0:
        out = gate * tl.sigmoid(gate) * up
    elif ACT == 1:
        # 0.5 g (1 + tanh(c (g + 0.044715 g^3))) = g * sigmoid(2 c (g + 0.044715 g^3))
        out = gate * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate)) * up
    elif ACT == 3:
        clamped = tl.minimum(gate, limit)
        out = clamped * tl.sigmoid(clamped) * tl.minimum(tl.maximum(up, -limit), limit)
    elif ACT == 4:
        out = tl.minimum(gate * tl.sigmoid(gate), limit) * tl.minimum(tl.maximum(up, -limit), limit)
    elif ACT == 5:
        out = _softcap(gate, gate_limit) * tl.sigmoid(gate) * _softcap(up, limit)
    elif ACT == 6:
        positive = tl.maximum(up, 0.0)
        out = positive * positive
    else:
        clamped = tl.minimum(gate, limit)
        out = clamped * tl.sigmoid(clamped * alpha) * (tl.minimum(tl.maximum(up, -limit), limit) + 1.0)
    return out


@triton.jit
def _softcap(x, cap):
    # cap * tanh(x / cap), tanh(y) being 2 sigmoid(2y) - 1: Triton's language has no tanh, and libdevice's
    # does not run in the interpreter
    return cap * (2.0 * tl.sigmoid(2.0 * x / cap) - 1.0)


@triton.jit
def _e2m1(code):
    """FP4 (e2m1) codes [0, 16) as float32, exactly: codes 2-7 are normal numbers whose two exponent bits
    and one mantissa bit drop into float32's fields with the exponent rebiased (2^-1 * 2^126 per code
    step of 2 is 252 << 22); 0 and 1 are 0 and 0.5."""
    magnitude = code & 7
    normal = ((magnitude + 252) << 22).to(tl.float32, bitcast=True)
    value = tl.where(magnitude >= 2, normal, magnitude.to(tl.float32) * 0.5)
    return tl.where(code >= 8, -value, value)


@triton.jit
def _e4m3(byte):
    """FP8 e4m3fn bits [0, 256) as float32, exactly (NaN aside): normal numbers by moving the exponent
    and mantissa into float32's fields and rebiasing the exponent by 127 - 7; subnormals are m * 2^-9."""
    magnitude = byte & 0x7F
    normal = ((magnitude << 20) + (120 << 23)).to(tl.float32, bitcast=True)
    value = tl.where(magnitude >= 8, normal, magnitude.to(tl.float32) * 0.001953125)
    return tl.where(byte >= 128, -value, value)


@triton.jit
def _power_of_two(exponent):
    """2^(e - 127) for MXFP4's biased exponent bytes, built as float32 bits (e = 0 gives 0, not 2^-127)."""
    return (exponent.to(tl.int32) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _tile_scales(s, at, mask):
    """FP8's tile multipliers at offsets `at`: float32 as stored, or MXFP8's exponent bytes as 2^(b - 127)."""
    # one return after the compile-time branch: the compiler takes both returns of an early one (the
    # interpreter does not)
    if s.dtype.element_ty == tl.uint8:
        scales = _power_of_two(tl.load(s + at, mask=mask, other=127))
    else:
        scales = tl.load(s + at, mask=mask, other=0.0)
    return scales


@triton.jit
def _source(slot, expert, pool, host, stride_pool, stride_host, HAS_HOST: tl.constexpr):
    """Where one part of an expert lies: its slot of the pool, or else its row of the host stack."""
    if HAS_HOST:
        where = tl.where(slot >= 0, pool + slot.to(tl.int64) * stride_pool, host + expert.to(tl.int64) * stride_host)
    else:
        where = pool + slot.to(tl.int64) * stride_pool
    return where


@triton.jit
def _matrix_source(
    slot, expert, w, s, z, host_w, host_s, host_z, stride_w, stride_s, stride_z, stride_host_w, stride_host_s,
    stride_host_z, HAS_HOST
):  # fmt: skip
    """The parts (weights, scales, zero points or NVFP4's part scales) of one expert's matrix where they lie
    (see `_source`)."""
    return (
        _source(slot, expert, w, host_w, stride_w, stride_host_w, HAS_HOST),
        _source(slot, expert, s, host_s, stride_s, stride_host_s, HAS_HOST),
        _source(slot, expert, z, host_z, stride_z, stride_host_z, HAS_HOST),
    )


@triton.jit
def _up_part(z, GATED: tl.constexpr, BITS: tl.constexpr):
    """Where up's zero points lie (the gate's, whose rows they continue), or its NVFP4 part scale (gate's
    and up's are [2]: the next one)."""
    if GATED and BITS == 3:
        z = z + 1
    return z


@triton.jit
def _pair_source(slot, id_ptr, pair, HAS_HOST: tl.constexpr):
    """(the pair's expert id where the host stack is given, whether the pair is computed at all)."""
    if HAS_HOST:
        expert = tl.load(id_ptr + pair)
        active = (slot >= 0) | (expert >= 0)
    else:
        expert = slot
        active = slot >= 0
    return expert, active


@triton.jit
def _row_sums(
    w,
    s,
    z,
    rows,
    row_ok,
    x_ptr,
    STORED,
    stride_r,
    stride_sr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_ROWS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    DIVIDES: tl.constexpr,
    SPAN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """sum_c W[rows, c] * x[c] over the columns of one expert's matrix (parts w, s, z; STORED elements a
    row, bytes for the 4-bit formats) and one input row, in float32 [BLOCK_R]. Each step covers BLOCK_K
    columns as groups of SPAN sharing a scale: every weight byte is loaded once (4-bit formats unpack
    both nibbles of it), each group is reduced in float32 and then scaled once, (sum q x - zero sum x)
    * scale for the affine formats (zero 2^(bits - 1) where SYMMETRIC); NVFP4's part scale (at z) is
    applied to the sum."""
    PACKED: tl.constexpr = BITS == 4 or BITS == 1 or BITS == 3  # two columns per byte
    STRIDE: tl.constexpr = 1 + PACKED  # columns per stored element
    groups = tl.arange(0, BLOCK_K // SPAN)
    # the stored elements of a step as [NG, J], counted in stored units so that the compiler sees each
    # row's bytes as contiguous (and loads them as 16-byte vectors)
    in_step = groups[:, None] * (SPAN // STRIDE) + tl.arange(0, SPAN // STRIDE)[None, :]
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for first in range(0, STORED, BLOCK_K // STRIDE):
        start = first * STRIDE  # the step's first column
        stored_at = first + in_step
        cols = stored_at * STRIDE  # each stored element's first column
        col_ok = stored_at < STORED  # (not cols < K: a mask constant over 16 bytes lets them load at once)
        ok = row_ok[:, None, None] & col_ok[None, :, :]
        x0 = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :, :]
        where = w + rows[:, None, None] * stride_r + stored_at[None, :, :]
        if BITS == 16:
            acc += tl.sum(tl.sum(tl.load(where, mask=ok, other=0.0).to(tl.float32) * x0, axis=2), axis=1)
        else:
            stored = tl.load(where, mask=ok, other=0).to(tl.int32)
            if PACKED:
                x1 = tl.load(x_ptr + cols + 1, mask=col_ok, other=0.0).to(tl.float32)[None, :, :]
                low, high = stored & 0xF, stored >> 4
                if BITS == 1 or BITS == 3:
                    part = tl.sum(_e2m1(low) * x0 + _e2m1(high) * x1, axis=2)
                else:
                    part = tl.sum(low.to(tl.float32) * x0 + high.to(tl.float32) * x1, axis=2)
                x_sum = tl.sum(x0 + x1, axis=2)
            elif BITS == 2:
                part = tl.sum(_e4m3(stored) * x0, axis=2)
                x_sum = tl.sum(x0, axis=2)
            else:
                part = tl.sum(stored.to(tl.float32) * x0, axis=2)
                x_sum = tl.sum(x0, axis=2)
            group = (start + groups * SPAN) // GROUP  # [NG]
            scale_ok = row_ok[:, None] & (group[None, :] * GROUP < STORED * STRIDE)
            if BITS == 1:
                scale_at = rows[:, None] * stride_sr + group[None, :]
                acc += tl.sum(part * _power_of_two(tl.load(s + scale_at, mask=scale_ok, other=127)), axis=1)
            elif BITS == 2:  # a scale per GROUP_ROWS x GROUP tile
                scale_at = (rows // GROUP_ROWS)[:, None] * stride_sr + group[None, :]
                acc += tl.sum(part * _tile_scales(s, scale_at, scale_ok), axis=1)
            elif BITS == 3:
                scale_at = rows[:, None] * stride_sr + group[None, :]
                acc += tl.sum(part * _e4m3(tl.load(s + scale_at, mask=scale_ok, other=0).to(tl.int32)), axis=1)
            else:
                scale_at = rows[:, None] * stride_sr + group[None, :]
                scale = tl.load(s + scale_at, mask=scale_ok, other=0.0).to(tl.float32)
                if SYMMETRIC:
                    acc += tl.sum((part - (1 << (BITS - 1)) * x_sum) * scale, axis=1)
                else:
                    zero = tl.load(z + scale_at, mask=scale_ok, other=0.0).to(tl.float32)
                    acc += tl.sum((part - zero * x_sum) * scale, axis=1)
    if BITS == 3:
        acc = _part_scaled(acc, z, DIVIDES)
    return acc


@triton.jit
def _part_scaled(value, part_scale, DIVIDES: tl.constexpr):
    """NVFP4: `value` with the float32 scale of its part of the matrix (at `part_scale`) applied: divided by
    it (compressed-tensors) or multiplied (ModelOpt)."""
    scale = tl.load(part_scale)
    return value / scale if DIVIDES else value * scale


@triton.jit
def _gate_up_rows(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    host_w_ptr,
    host_s_ptr,
    host_z_ptr,
    host_bias_ptr,
    scale_ptr,
    slot_ptr,
    id_ptr,
    h_ptr,
    HIDDEN_STORED,  # stored elements of a gate_up row
    INTER,
    K_CHOICES,
    stride_x,
    stride_ws,
    stride_ss,
    stride_bs,
    stride_host_ws,
    stride_host_ss,
    stride_host_bs,
    stride_wr,
    stride_sr,
    stride_zs,
    stride_host_zs,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_HOST: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_ROWS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    DIVIDES: tl.constexpr,
    SPAN: tl.constexpr,
    alpha,
    limit,
    gate_limit,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pair = tl.program_id(0)
    slot = tl.load(slot_ptr + pair)
    expert, active = _pair_source(slot, id_ptr, pair, HAS_HOST)
    if active:
        token = pair // K_CHOICES
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < INTER
        w, s, z = _matrix_source(
            slot, expert, w_ptr, s_ptr, z_ptr, host_w_ptr, host_s_ptr, host_z_ptr, stride_ws, stride_ss, stride_zs,
            stride_host_ws, stride_host_ss, stride_host_zs, HAS_HOST
        )  # fmt: skip
        x = x_ptr + token.to(tl.int64) * stride_x
        stored = HIDDEN_STORED
        GATED: tl.constexpr = ACT < 6  # else the rows are up's alone, and up's offset is 0, not INTER
        if GATED:
            gate = _row_sums(
                w, s, z, rows, row_ok, x, stored, stride_wr, stride_sr, BITS, GROUP, GROUP_ROWS, SYMMETRIC, DIVIDES,
                SPAN, BLOCK_R, BLOCK_K
            )  # fmt: skip
        up = _row_sums(
            w, s, _up_part(z, GATED, BITS), rows + INTER if GATED else rows, row_ok, x, stored, stride_wr, stride_sr,
            BITS, GROUP, GROUP_ROWS, SYMMETRIC, DIVIDES, SPAN, BLOCK_R, BLOCK_K
        )  # fmt: skip
        if not GATED:
            gate = up
        if HAS_SCALE:
            scale = tl.load(scale_ptr + pair).to(tl.float32)
            gate = gate * scale
            up = up * scale
        if HAS_BIAS:
            bias = _source(slot, expert, bias_ptr, host_bias_ptr, stride_bs, stride_host_bs, HAS_HOST)
            gate += tl.load(bias + rows, mask=row_ok, other=0.0).to(tl.float32)
            up_bias = bias + INTER if GATED else bias
            up += tl.load(up_bias + rows, mask=row_ok, other=0.0).to(tl.float32)
        h = _activate(gate, up, ACT, alpha, limit, gate_limit)
        tl.store(h_ptr + pair.to(tl.int64) * INTER + rows, h, mask=row_ok)


@triton.jit
def _down_rows(
    h_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    host_w_ptr,
    host_s_ptr,
    host_z_ptr,
    host_bias_ptr,
    slot_ptr,
    id_ptr,
    out_ptr,
    HIDDEN,
    INTER,
    INTER_STORED,  # stored elements of a down row
    stride_out,
    stride_ws,
    stride_ss,
    stride_bs,
    stride_host_ws,
    stride_host_ss,
    stride_host_bs,
    stride_wr,
    stride_sr,
    stride_zs,
    stride_host_zs,
    HAS_BIAS: tl.constexpr,
    HAS_HOST: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_ROWS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    DIVIDES: tl.constexpr,
    SPAN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pair = tl.program_id(0)
    slot = tl.load(slot_ptr + pair)
    expert, active = _pair_source(slot, id_ptr, pair, HAS_HOST)
    if active:
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < HIDDEN
        w, s, z = _matrix_source(
            slot, expert, w_ptr, s_ptr, z_ptr, host_w_ptr, host_s_ptr, host_z_ptr, stride_ws, stride_ss, stride_zs,
            stride_host_ws, stride_host_ss, stride_host_zs, HAS_HOST
        )  # fmt: skip
        h = h_ptr + pair.to(tl.int64) * INTER
        stored = INTER_STORED
        acc = _row_sums(
            w, s, z, rows, row_ok, h, stored, stride_wr, stride_sr, BITS, GROUP, GROUP_ROWS, SYMMETRIC, DIVIDES, SPAN,
            BLOCK_R, BLOCK_K
        )  # fmt: skip
        if HAS_BIAS:
            bias = _source(slot, expert, bias_ptr, host_bias_ptr, stride_bs, stride_host_bs, HAS_HOST)
            acc += tl.load(bias + rows, mask=row_ok, other=0.0).to(tl.float32)
        out = out_ptr + pair.to(tl.int64) * stride_out + rows
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _tile(
    w, s, z, r, c, mask, stride_r, stride_sr, BITS: tl.constexpr, GROUP: tl.constexpr, GROUP_ROWS: tl.constexpr,
    SYMMETRIC: tl.constexpr
):  # fmt: skip
    """Weights at rows r and columns c (broadcastable index tensors) in float32, for the 16- and 8-bit
    formats: loaded, or decoded and scaled with each column's group."""
    if BITS == 16:
        w = tl.load(w + r * stride_r + c, mask=mask, other=0.0).to(tl.float32)
    elif BITS == 2:
        value = _e4m3(tl.load(w + r * stride_r + c, mask=mask, other=0).to(tl.int32))
        w = value * _tile_scales(s, (r // GROUP_ROWS) * stride_sr + c // GROUP, mask)
    else:
        q = tl.load(w + r * stride_r + c, mask=mask, other=0).to(tl.float32)
        group = r * stride_sr + c // GROUP
        zero = 128.0 if SYMMETRIC else tl.load(z + group, mask=mask, other=0.0).to(tl.float32)
        w = (q - zero) * tl.load(s + group, mask=mask, other=0.0).to(tl.float32)
    return w


@triton.jit
def _nibble_tiles(
    w, s, z, r, b, mask, stride_r, stride_sr, BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
    DIVIDES: tl.constexpr
):  # fmt: skip
    """The 4-bit formats' weights at rows r and bytes b (columns 2b and 2b + 1), each byte loaded once: the
    even and the odd columns' weights in float32. Both columns of a byte share its group's scale."""
    stored = tl.load(w + r * stride_r + b, mask=mask, other=0).to(tl.int32)
    group = r * stride_sr + (2 * b) // GROUP
    if BITS == 1 or BITS == 3:
        if BITS == 1:
            scale = _power_of_two(tl.load(s + group, mask=mask, other=127))
        else:  # as kernels/quantized.py: the block scale with the part scale applied, then the codes
            scale = _part_scaled(_e4m3(tl.load(s + group, mask=mask, other=0).to(tl.int32)), z, DIVIDES)
        even, odd = _e2m1(stored & 0xF) * scale, _e2m1(stored >> 4) * scale
    else:
        scale = tl.load(s + group, mask=mask, other=0.0).to(tl.float32)
        zero = 8.0 if SYMMETRIC else tl.load(z + group, mask=mask, other=0.0).to(tl.float32)
        even, odd = ((stored & 0xF).to(tl.float32) - zero) * scale, ((stored >> 4).to(tl.float32) - zero) * scale
    return even, odd


@triton.jit
def _grouped_product(
    a_rows,
    a_ok,
    w,
    s,
    z,
    rows,
    row_ok,
    K,
    stride_wr,
    stride_sr,
    acc,
    DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_ROWS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    DIVIDES: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc [M, N] plus the input rows at a_rows [M] (pointers; a_ok where valid) times one expert's weights
    at `rows` [N] over K columns, the weights decoded to DTYPE for tl.dot."""
    PACKED: tl.constexpr = BITS == 4 or BITS == 1 or BITS == 3
    for start in range(0, K, BLOCK_K):
        if PACKED:  # the even and the odd columns as two products, so that each byte is loaded once
            b = start // 2 + tl.arange(0, BLOCK_K // 2)
            b_ok = 2 * b < K
            ok = b_ok[:, None] & row_ok[None, :]
            even, odd = _nibble_tiles(
                w, s, z, rows[None, :], b[:, None], ok, stride_wr, stride_sr, BITS, GROUP, SYMMETRIC, DIVIDES
            )
            a_even = tl.load(a_rows[:, None] + 2 * b[None, :], mask=a_ok[:, None] & b_ok[None, :], other=0.0)
            a_odd = tl.load(a_rows[:, None] + 2 * b[None, :] + 1, mask=a_ok[:, None] & b_ok[None, :], other=0.0)
            acc += tl.dot(a_even.to(DTYPE), even.to(DTYPE), input_precision=PRECISION)
            acc += tl.dot(a_odd.to(DTYPE), odd.to(DTYPE), input_precision=PRECISION)
        else:
            cols = start + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            wk = _tile(
                w,
                s,
                z,
                rows[None, :],
                cols[:, None],
                col_ok[:, None] & row_ok[None, :],
                stride_wr,
                stride_sr,
                BITS,
                GROUP,
                GROUP_ROWS,
                SYMMETRIC,
            )
            a = tl.load(a_rows[:, None] + cols[None, :], mask=a_ok[:, None] & col_ok[None, :], other=0.0)
            acc += tl.dot(a.to(DTYPE), wk.to(DTYPE), input_precision=PRECISION)
    return acc


@triton.jit
def _block_source(key, NUM_SLOTS):
    """A block's expert key (a pool slot below NUM_SLOTS, else NUM_SLOTS + the host expert id) as
    (slot or -1, expert id)."""
    return tl.where(key < NUM_SLOTS, key, -1), key - NUM_SLOTS


@triton.jit
def _grouped_gate_up(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    host_w_ptr,
    host_s_ptr,
    host_z_ptr,
    host_bias_ptr,
    scale_ptr,
    sorted_ptr,
    block_key_ptr,
    h_ptr,
    HIDDEN,
    INTER,
    K_CHOICES,
    NUM_SLOTS,
    stride_x,
    stride_ws,
    stride_ss,
    stride_bs,
    stride_host_ws,
    stride_host_ss,
    stride_host_bs,
    stride_wr,
    stride_sr,
    stride_zs,
    stride_host_zs,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_HOST: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_ROWS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    DIVIDES: tl.constexpr,
    alpha,
    limit,
    gate_limit,
    PRECISION: tl.constexpr,  # of float32 products: ieee, not the tf32 default
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    block = tl.program_id(0)
    key = tl.load(block_key_ptr + block)
    if key >= 0:
        slot, expert = _block_source(key, NUM_SLOTS)
        pairs = tl.load(sorted_ptr + block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = pairs >= 0
        tokens = tl.where(valid, pairs, 0) // K_CHOICES
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < INTER
        w, s, z = _matrix_source(
            slot, expert, w_ptr, s_ptr, z_ptr, host_w_ptr, host_s_ptr, host_z_ptr, stride_ws, stride_ss, stride_zs,
            stride_host_ws, stride_host_ss, stride_host_zs, HAS_HOST
        )  # fmt: skip
        x_rows = x_ptr + tokens.to(tl.int64) * stride_x
        dtype = x_ptr.dtype.element_ty
        zeros = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        GATED: tl.constexpr = ACT < 6  # else the rows are up's alone, and up's offset is 0, not INTER
        if GATED:
            gate = _grouped_product(
                x_rows, valid, w, s, z, rows, row_ok, HIDDEN, stride_wr, stride_sr, zeros, dtype, PRECISION, BITS,
                GROUP, GROUP_ROWS, SYMMETRIC, DIVIDES, BLOCK_K
            )  # fmt: skip
        # (the offset added here and to the bias pointer below, not kept in a row vector across the loop: that
        # cost gpt-oss's MXFP4 kernel a spill on sm_80)
        up = _grouped_product(
            x_rows, valid, w, s, _up_part(z, GATED, BITS), rows + INTER if GATED else rows, row_ok, HIDDEN, stride_wr,
            stride_sr, zeros, dtype, PRECISION, BITS, GROUP, GROUP_ROWS, SYMMETRIC, DIVIDES, BLOCK_K
        )  # fmt: skip
        if not GATED:
            gate = up
        if HAS_SCALE:
            scale = tl.load(scale_ptr + pairs, mask=valid, other=0.0).to(tl.float32)
            gate = gate * scale[:, None]
            up = up * scale[:, None]
        if HAS_BIAS:
            bias = _source(slot, expert, bias_ptr, host_bias_ptr, stride_bs, stride_host_bs, HAS_HOST)
            gate += tl.load(bias + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
            up_bias = bias + INTER if GATED else bias
            up += tl.load(up_bias + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        h = _activate(gate, up, ACT, alpha, limit, gate_limit)
        h_rows = h_ptr + tl.where(valid, pairs, 0).to(tl.int64) * INTER
        tl.store(h_rows[:, None] + rows[None, :], h, mask=valid[:, None] & row_ok[None, :])


@triton.jit
def _grouped_down(
    h_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    host_w_ptr,
    host_s_ptr,
    host_z_ptr,
    host_bias_ptr,
    sorted_ptr,
    block_key_ptr,
    out_ptr,
    HIDDEN,
    INTER,
    NUM_SLOTS,
    stride_out,
    stride_ws,
    stride_ss,
    stride_bs,
    stride_host_ws,
    stride_host_ss,
    stride_host_bs,
    stride_wr,
    stride_sr,
    stride_zs,
    stride_host_zs,
    HAS_BIAS: tl.constexpr,
    HAS_HOST: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_ROWS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    DIVIDES: tl.constexpr,
    PRECISION: tl.constexpr,  # of float32 products: ieee, not the tf32 default
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    block = tl.program_id(0)
    key = tl.load(block_key_ptr + block)
    if key >= 0:
        slot, expert = _block_source(key, NUM_SLOTS)
        pairs = tl.load(sorted_ptr + block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = pairs >= 0
        safe = tl.where(valid, pairs, 0).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < HIDDEN
        w, s, z = _matrix_source(
            slot, expert, w_ptr, s_ptr, z_ptr, host_w_ptr, host_s_ptr, host_z_ptr, stride_ws, stride_ss, stride_zs,
            stride_host_ws, stride_host_ss, stride_host_zs, HAS_HOST
        )  # fmt: skip
        dtype = out_ptr.dtype.element_ty  # the compute dtype, as the reference multiplies in
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc = _grouped_product(
            h_ptr + safe * INTER, valid, w, s, z, rows, row_ok, INTER, stride_wr, stride_sr, acc, dtype, PRECISION,
            BITS, GROUP, GROUP_ROWS, SYMMETRIC, DIVIDES, BLOCK_K
        )  # fmt: skip
        if HAS_BIAS:
            bias = _source(slot, expert, bias_ptr, host_bias_ptr, stride_bs, stride_host_bs, HAS_HOST)
            acc += tl.load(bias + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + safe[:, None] * stride_out + rows[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & row_ok[None, :])


class WeightArgs(NamedTuple):
    """One stack of expert matrices as the kernels take it: the parts (weights, scales, zero points or
    NVFP4's part scales; the weights or scales again where a format lacks a part), their strides per expert
    and per row, and its format."""

    w: torch.Tensor
    s: torch.Tensor
    z: torch.Tensor
    stride_w: int
    stride_s: int
    stride_z: int
    stride_r: int
    stride_sr: int
    bits: int
    group: int  # columns per scale
    group_rows: int = 1  # rows per scale (FP8's tiles)
    symmetric: bool = False  # integers without zero points: each is 2^(bits - 1)
    divides: bool = False  # NVFP4: the part scale divides (compressed-tensors) rather than multiplies

    @property
    def parts(self) -> tuple[torch.Tensor, ...]:
        if self.bits == PLAIN:
            return (self.w,)
        return (self.w, self.s) if self.bits in (FP8, MXFP4) or self.symmetric else (self.w, self.s, self.z)

    @property
    def form(self) -> tuple:
        """What the kernels compile for: the format and its variant."""
        return self.bits, self.group, self.group_rows, self.symmetric, self.divides


def _weight_args(weights) -> WeightArgs:
    if isinstance(weights, Fp8Weights):
        w, s = weights.bits, weights.scales
        rows, columns = (weights.block, weights.block) if isinstance(weights.block, int) else weights.block
        strides = (w.stride(0), s.stride(0), s.stride(0), w.stride(1), s.stride(1))
        return WeightArgs(w, s, s, *strides, FP8, columns or w.shape[2], rows or w.shape[1])
    if isinstance(weights, Mxfp4Weights):
        w, s = weights.blocks, weights.scales
        return WeightArgs(w, s, s, w.stride(0), s.stride(0), s.stride(0), w.stride(1), s.stride(1), MXFP4, 32)
    if isinstance(weights, Nvfp4Weights):
        w, s, g = weights.codes, weights.scales, weights.global_scale
        strides = (w.stride(0), s.stride(0), g.stride(0), w.stride(1), s.stride(1))
        return WeightArgs(w, s, g, *strides, NVFP4, 16, divides=weights.divides)
    if isinstance(weights, QuantizedWeights):
        w, s, spec = weights.q, weights.scale, weights.spec
        z = s if weights.zero is None else weights.zero  # symmetric: any pointer, the kernels do not read it
        group = spec.group or weights.shape[2]  # one group per row: the whole width
        strides = (w.stride(0), s.stride(0), z.stride(0), w.stride(1), s.stride(1))
        return WeightArgs(w, s, z, *strides, spec.bits, group, symmetric=spec.symmetric)
    return WeightArgs(weights, weights, weights, weights.stride(0), 0, 0, weights.stride(1), 0, PLAIN, 1)


def _part_shapes(args: WeightArgs, rows: int, columns: int, parts: int) -> list[tuple[int, ...]]:
    """The shape of each part of a `rows` x `columns` matrix in this format, but the experts' axis (`parts`:
    NVFP4's part scales, gate and up or one)."""
    if args.bits == PLAIN:
        return [(rows, columns)]
    if args.bits == FP8:
        return [(rows, columns), (-(-rows // args.group_rows), -(-columns // args.group))]
    scales = (rows, columns // args.group)
    return [(rows, _stored(args, columns)), scales, (parts,) if args.bits == NVFP4 else scales]


SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # of the integer formats' scales


def _part_dtypes(args: WeightArgs) -> tuple[tuple[torch.dtype, ...], ...]:
    """The dtypes each part of a quantized format may have."""
    return {
        FP8: ((torch.uint8,), (torch.float32, torch.uint8)),  # multipliers, or MXFP8's exponent bytes
        MXFP4: ((torch.uint8,), (torch.uint8,)),
        NVFP4: ((torch.uint8,), (torch.uint8,), (torch.float32,)),
    }.get(args.bits, ((torch.uint8,), SCALE_DTYPES, (torch.float16,)))


def _check_stack(
    name: str, args: WeightArgs, rows: int, columns: int, experts: int | None, parts: int = 1
) -> list[str]:
    """What is wrong with a stack of `experts` matrices [rows, columns] in `args` (nothing: []); `parts`:
    how many row parts it has (gate and up: 2)."""
    problems = []
    shapes, dtypes = _part_shapes(args, rows, columns, parts), _part_dtypes(args)
    for index, part in enumerate(args.parts):
        shape = shapes[index]
        if part.dim() != 1 + len(shape) or tuple(part.shape[1:]) != shape or (experts not in (None, part.shape[0])):
            problems.append(f"{name} part {index} has shape {tuple(part.shape)}, not ({experts or 'N'}, *{shape})")
        elif part.stride(-1) != 1:
            problems.append(f"{name} part {index} has strided rows {part.stride()}: its columns must be contiguous")
        elif len(shape) == 2 and (part.shape[1] - 1) * part.stride(1) + part.shape[2] > INDEX_LIMIT:
            problems.append(f"{name} part {index} spans 2^31 elements or more in one expert: 32-bit offsets overflow")
        if args.bits != PLAIN and part.dtype not in dtypes[index]:
            problems.append(f"{name} part {index} is {part.dtype}, not {' or '.join(map(str, dtypes[index]))}")
    zero_points = len(args.parts) == 3 and args.bits != NVFP4
    if zero_points and (args.s.shape, args.s.stride()) != (args.z.shape, args.z.stride()):
        problems.append(f"{name}: scales and zero points must have the same shape and strides")
    return problems


def _check_bias(name: str, bias: torch.Tensor | None, width: int, experts: int) -> list[str]:
    if bias is None:
        return []
    if bias.dim() != 2 or tuple(bias.shape) != (experts, width) or bias.stride(1) != 1:
        return [f"{name} must be [{experts}, {width}] with contiguous rows, not {tuple(bias.shape)} {bias.stride()}"]
    return [] if bias.is_floating_point() else [f"{name} is {bias.dtype}, not floating point"]


def _check_launch(out, x, gate_up, down, slots, biases, input_scale, ids, host, gated: bool) -> list[str]:
    """Everything the kernels assume of their arguments that the arguments could get wrong."""
    problems = []
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        problems.append(f"x must be [T, E] in float16, bfloat16 or float32, not {tuple(x.shape)} {x.dtype}")
    if slots.dim() != 2 or slots.shape[0] != x.shape[0] or slots.is_floating_point():
        problems.append(f"slots must be integer [T, k] with T = {x.shape[0]}, not {tuple(slots.shape)} {slots.dtype}")
    if problems:
        return problems
    tokens, hidden = x.shape
    pairs = slots.numel()
    if tuple(out.shape) != (pairs, hidden) or out.dtype != x.dtype or out.stride(1) != 1:
        problems.append(
            f"out must be [{pairs}, {hidden}] {x.dtype} with contiguous rows, not {tuple(out.shape)} {out.dtype}"
        )
    if input_scale is not None and input_scale.numel() != pairs:
        problems.append(f"input_scale must have one value per pair ({pairs}), not {input_scale.numel()}")
    experts, in_rows, columns = gate_up.shape
    inter = down.shape[2] if len(down.shape) == 3 else -1
    parts = 2 if gated else 1  # gate and up rows, or up alone
    if (
        columns != hidden
        or in_rows != parts * inter
        or tuple(down.shape) != (experts, hidden, inter)
        or type(gate_up) is not type(down)
    ):
        shape = f"[N, {'2I' if gated else 'I'}, {hidden}] and [N, {hidden}, I]"
        problems.append(f"gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} are not {shape}")
        return problems
    stacks = [("gate_up", gate_up, in_rows, hidden), ("down", down, hidden, inter)]
    for name, stack, rows, cols in stacks:
        args = _weight_args(stack)
        problems += _check_stack(name, args, rows, cols, experts, parts if name == "gate_up" else 1)
        if args.bits == PLAIN and stack.dtype != x.dtype:
            problems.append(f"{name} is {stack.dtype}, not x's {x.dtype}")
    problems += _check_bias("gate_up_bias", biases[0], in_rows, experts)
    problems += _check_bias("down_bias", biases[1], hidden, experts)
    devices = {t.device for t in (out, x, slots, *_weight_args(gate_up).parts, *_weight_args(down).parts)}
    devices |= {t.device for t in (*biases, input_scale) if t is not None}
    if len(devices) > 1:
        problems.append(f"the pool's tensors lie on several devices: {sorted(map(str, devices))}")
    if (ids is None) != (host is None):
        problems.append("ids and host go together: the host stack is indexed by the pairs' expert ids")
    elif host is not None:
        problems += _check_host(x, slots, gate_up, down, biases, ids, host)
    return problems


def _check_host(x, slots, gate_up, down, biases, ids, host: ExpertStack) -> list[str]:
    """The host stack must hold experts in the pool's row layout (same format, shapes and row strides),
    with biases where the pool has them, on x's device or in (mapped) host memory."""
    problems = []
    if tuple(ids.shape) != tuple(slots.shape) or ids.is_floating_point() or ids.device != slots.device:
        problems.append(f"ids must be integer {tuple(slots.shape)} beside slots, not {tuple(ids.shape)} {ids.dtype}")
    experts = host.gate_up.shape[0]
    for name, pool, stack in (("gate_up", gate_up, host.gate_up), ("down", down, host.down)):
        if type(stack) is not type(pool) or tuple(stack.shape[1:]) != tuple(pool.shape[1:]):
            problems.append(f"host {name} {type(stack).__name__} {tuple(stack.shape)} is not in the pool's format")
            continue
        pool_args, args = _weight_args(pool), _weight_args(stack)
        problems += _check_stack(f"host {name}", args, *pool.shape[1:], experts, pool_args.z.shape[-1])
        if (args.form, args.stride_r, args.stride_sr) != (pool_args.form, pool_args.stride_r, pool_args.stride_sr):
            problems.append(f"host {name} rows are laid out unlike the pool's (format, group or row strides)")
        if args.bits == PLAIN and stack.dtype != x.dtype:
            problems.append(f"host {name} is {stack.dtype}, not x's {x.dtype}")
    host_biases = (host.gate_up_bias, host.down_bias)
    for name, pool_bias, bias in zip(("gate_up_bias", "down_bias"), biases, host_biases, strict=True):
        if (pool_bias is None) != (bias is None):
            problems.append(f"{name}: the pool and the host stack must both have it or both lack it")
        elif bias is not None:
            problems += _check_bias(f"host {name}", bias, pool_bias.shape[1], experts)
    parts = [
        *_weight_args(host.gate_up).parts,
        *_weight_args(host.down).parts,
        *(b for b in host_biases if b is not None),
    ]
    if any(part.device not in (x.device, torch.device("cpu")) for part in parts):
        problems.append(f"the host stack must lie in host memory or on {x.device}")
    return problems


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
    """`reference.expert_pair_outputs`, fused: same arguments (weights in the compute dtype, or any stack of
    kernels/quantized.py), same rows of `out` written, the arguments checked first (a ValueError saying
    what does not fit, never a wrong read).

    A pair whose slot is -1 is computed from `host` at expert `ids[t, j]` when both are given, with the
    very operations a slot would get. On CUDA the host stack's tensors are CPU tensors whose memory is
    page-locked and mapped into the device's address space (cuMemHostRegister with DEVICEMAP): they are
    passed to the kernel as they are, and Triton's launcher resolves each to its device address with
    cuPointerGetAttribute, refusing (ValueError, "cannot be accessed from Triton") memory that is not
    mapped. The kernels then read those rows over the bus as they read the pool, in wide, coalesced rows.
    """
    code = activation_code(act)
    if code is None:
        raise ValueError(f"the Triton expert kernels have no {act.kind}/{act.act} activation")
    biases = (gate_up_bias, down_bias)
    if problems := _check_launch(out, x, gate_up, down, slots, biases, input_scale, ids, host, code < UNGATED):
        raise ValueError("triton_pair_outputs: " + "; ".join(problems))
    for launch in kernel_launches(
        out, x, gate_up, down, slots, code, act, gate_up_bias, down_bias, input_scale, ids, host
    ):
        launch.kernel[launch.grid](*launch.args, **launch.constants)


class Launch(NamedTuple):
    kernel: object  # a @triton.jit function
    grid: tuple[int, ...]
    args: tuple
    constants: dict


def kernel_launches(
    out, x, gate_up, down, slots, code, act, gate_up_bias, down_bias, input_scale, ids, host
) -> list[Launch]:
    """The two launches `triton_pair_outputs` makes for these (checked) arguments, without running them:
    scripts/check_kernels.py compiles exactly these for GPU targets."""
    hidden, inter = x.shape[1], down.shape[2]
    flat = slots.reshape(-1).to(torch.int32).contiguous()
    x = x.contiguous()
    h = torch.empty(flat.numel(), inter, dtype=torch.float32, device=x.device)
    scale = input_scale.reshape(-1).contiguous() if input_scale is not None else flat  # any pointer when unused
    pool_in, pool_out = _weight_args(gate_up), _weight_args(down)
    has_host = host is not None
    host_in, host_out = (_weight_args(host.gate_up), _weight_args(host.down)) if has_host else (pool_in, pool_out)
    host_bias_in, host_bias_out = (host.gate_up_bias, host.down_bias) if has_host else (gate_up_bias, down_bias)
    sources_in = _source_args(pool_in, host_in, gate_up_bias, host_bias_in, flat)
    sources_out = _source_args(pool_out, host_out, down_bias, host_bias_out, flat)
    flags_in = dict(HAS_BIAS=gate_up_bias is not None, HAS_HOST=has_host, **_form_flags(pool_in))
    flags_out = dict(HAS_BIAS=down_bias is not None, HAS_HOST=has_host, **_form_flags(pool_out))
    activation = dict(ACT=code, alpha=float(act.alpha), limit=float(act.limit), gate_limit=float(act.gate_limit))
    activation["HAS_SCALE"] = input_scale is not None
    pairs = flat.numel()
    if pairs <= DECODE_PAIRS:
        id_of_pair = ids.reshape(-1).to(torch.int32).contiguous() if has_host else flat
        tiling_in, tiling_out = _decode_tiling(pool_in), _decode_tiling(pool_out)
        return [
            Launch(
                _gate_up_rows,
                (pairs, triton.cdiv(inter, DECODE_ROWS)),
                (x, *sources_in.pointers, scale, flat, id_of_pair, h, _stored(pool_in, hidden), inter, slots.shape[1],
                 x.stride(0), *sources_in.strides),
                {**flags_in, **activation, **tiling_in},
            ),
            Launch(
                _down_rows,
                (pairs, triton.cdiv(hidden, DECODE_ROWS)),
                (h, *sources_out.pointers, flat, id_of_pair, out, hidden, inter, _stored(pool_out, inter),
                 out.stride(0), *sources_out.strides),
                {**flags_out, **tiling_out},
            ),
        ]  # fmt: skip
    num_slots = gate_up.shape[0]
    keys, num_keys = flat, num_slots
    if has_host:  # host experts are keys past the slots
        keys = torch.where(flat >= 0, flat, torch.where(ids.reshape(-1) >= 0, num_slots + ids.reshape(-1), -1))
        keys, num_keys = keys.to(torch.int32), num_slots + host.gate_up.shape[0]
    order, block_key = sorted_blocks(keys, num_keys, BLOCK_M)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    tiling = dict(PRECISION=precision, BLOCK_M=BLOCK_M, BLOCK_N=64)
    columns_in, columns_out = _grouped_columns(pool_in, x.dtype), _grouped_columns(pool_out, x.dtype)
    return [
        Launch(
            _grouped_gate_up,
            (block_key.numel(), triton.cdiv(inter, 64)),
            (x, *sources_in.pointers, scale, order, block_key, h, hidden, inter, slots.shape[1], num_slots, x.stride(0),
             *sources_in.strides),
            {**flags_in, **activation, **tiling, "BLOCK_K": columns_in},
        ),
        Launch(
            _grouped_down,
            (block_key.numel(), triton.cdiv(hidden, 64)),
            (h, *sources_out.pointers, order, block_key, out, hidden, inter, num_slots, out.stride(0),
             *sources_out.strides),
            {**flags_out, **tiling, "BLOCK_K": columns_out},
        ),
    ]  # fmt: skip


def _form_flags(args: WeightArgs) -> dict:
    return dict(
        BITS=args.bits, GROUP=args.group, GROUP_ROWS=args.group_rows, SYMMETRIC=args.symmetric, DIVIDES=args.divides
    )


class _Sources(NamedTuple):
    pointers: tuple  # pool w, s, z, bias; host w, s, z, bias
    strides: tuple  # per expert: pool w, s, bias; host w, s, bias; per row: w, s; per expert: pool z, host z


def _source_args(pool: WeightArgs, host: WeightArgs, bias, host_bias, anything) -> _Sources:
    """The pointer and stride arguments of one matrix's pool and host stacks (`anything` stands for a
    missing bias: the kernels do not read it)."""
    bias_stride = bias.stride(0) if bias is not None else 0
    host_bias_stride = host_bias.stride(0) if host_bias is not None else 0
    return _Sources(
        (pool.w, pool.s, pool.z, anything if bias is None else bias, host.w, host.s, host.z,
         anything if host_bias is None else host_bias),
        (pool.stride_w, pool.stride_s, bias_stride, host.stride_w, host.stride_s, host_bias_stride, pool.stride_r,
         pool.stride_sr, pool.stride_z, host.stride_z),
    )  # fmt: skip


def _stored(args: WeightArgs, columns: int) -> int:
    """Stored elements of a row of `columns` weights: bytes of two weights each for the 4-bit formats."""
    return columns // 2 if args.bits in (INT4, MXFP4, NVFP4) else columns


def _decode_tiling(args: WeightArgs) -> dict:
    """Block sizes of a decode kernel for this format: columns per step, and the columns per scale within
    a step (the group, or its largest power-of-two divisor, at most a step)."""
    columns = DECODE_COLUMNS[args.bits]
    span = columns if args.bits == PLAIN else min(columns, args.group & -args.group)
    return dict(SPAN=span, BLOCK_R=DECODE_ROWS, BLOCK_K=columns)


def _grouped_columns(args: WeightArgs, dtype: torch.dtype) -> int:
    """Input columns per step of a grouped kernel: 64, or 32 where 64 spills registers (int8 weights,
    float32 products), as scripts/check_kernels.py finds."""
    return 32 if args.bits == INT8 or dtype == torch.float32 else 64


def sorted_blocks(keys: torch.Tensor, num_keys: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs grouped by key (the expert's slot, or past the slots its host expert), each group padded to a
    multiple of `block` with -1: (pair indices [M], the key of each block of `block` entries [M / block],
    -1 for blocks past the end). Pairs whose key is -1 are skipped. M is the most the padding can need, so
    nothing here waits for the device."""
    pairs = keys.numel()
    key = torch.where(keys >= 0, keys.long(), num_keys)  # skipped pairs sort last
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(num_keys + 1, dtype=torch.long, device=keys.device).scatter_add_(0, key, torch.ones_like(key))[
        :num_keys
    ]
    padded = (counts + block - 1) // block * block
    ends = padded.cumsum(0)
    sorted_key = key[order]
    valid = sorted_key < num_keys
    first_of_key = counts.cumsum(0) - counts  # where each key's pairs start in `order`
    safe = sorted_key.clamp(max=num_keys - 1)
    position = (ends - padded)[safe] + torch.arange(pairs, device=keys.device) - first_of_key[safe]
    capacity = triton.cdiv(pairs + min(pairs, num_keys) * (block - 1), block) * block
    grouped = torch.full((capacity + 1,), -1, dtype=torch.int32, device=keys.device)
    grouped[torch.where(valid, position, capacity)] = order.to(torch.int32)  # skipped pairs land in the spare
    starts = torch.arange(0, capacity, block, device=keys.device)
    block_key = torch.searchsorted(ends, starts, right=True)
    block_key = torch.where(block_key < num_keys, block_key, -1).to(torch.int32)
    return grouped[:capacity], block_key
