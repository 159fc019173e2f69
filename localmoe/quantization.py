"""Quantized checkpoints as the Hub ships them: the `quantization_config` methods localmoe reads, and how
each stores a linear weight [out, in] under its module's name (`<module>.weight` or its companions).

A format answers three questions about a module it stores, never guessing from a tensor alone:
- `spec`: the form its weights take in the kernels (a QuantSpec or StoredFormat of kernels/quantized.py);
- `shape`: the module's [out, in], checked against every part's shape and dtype (shard headers only);
- `read`: its weights as a stack of one matrix in that form, repacked without loss where the checkpoint
  packs them otherwise (GPTQ and AWQ pack int32 words along other dimensions).
A module stored as plain floating-point `<module>.weight` belongs to no format. A method or variant not
listed here is refused in one line naming it, never read as raw weights.

Conventions, and where they were checked:
- fp8 (DeepSeek-V3, Qwen, MiniMax): `weight` float8 e4m3 and `weight_scale_inv` float32 per block of
  `weight_block_size`. DeepSeek-V4's own release names the scale `<module>.scale` and stores it as ue8m0
  (one exponent byte, 2^(b - 127)) where its experts are FP4 (`expert_dtype: fp4`, top-level or in the
  quantization config from V4.1); those experts are `weight` int8 [out, in / 2] with two e2m1 codes a
  byte, low nibble first, and a ue8m0 exponent per 32 inputs (`scale` [out, in / 32]). Checked against
  transformers 5.24's Fp8Dequantize (integrations/finegrained_fp8.py) and vLLM's DeepSeek-V4 loader
  (model_executor/models/deepseek_v4.py: `.scale` -> weight_scale, e8m0 bytes viewed as uint8).
  Without a `weight_block_size` (AutoFP8's per-tensor FP8), `weight` float8 e4m3 and `weight_scale`, one
  float32 per matrix (its `input_scale`, for static activation quantization, is not used). Checked
  against vLLM's Fp8LinearMethod (model_executor/layers/quantization/fp8.py).
- gptq: `qweight` int32 [in * bits / 32, out], inputs packed low bits first; `qzeros` int32
  [groups, out * bits / 32] packed the same way along the outputs; `scales` float16 [groups, out];
  `g_idx` int32 [in], each input's group (act order with desc_act). w = (q - z) * s, where checkpoints
  in the v1 format (checkpoint_format "gptq", the Hub's default) store z - 1; with sym every z is
  2^(bits - 1) (checked, then not kept). Checked against GPTQModel's
  dequantize_weight and convert_gptq_v1_to_v2_format (nn_modules/qlinear, utils/model.py).
- awq (GEMM): `qweight` int32 [in, out / 8] and `qzeros` [groups, out / 8], eight outputs a word in the
  order 0 2 4 6 1 3 5 7; `scales` float16 [groups, out]; w = (q - z) * s. Checked against vLLM's and
  SGLang's awq_dequantize_torch test oracles.
- compressed-tensors: per group of `config_groups` (its `targets` and the `ignore` list decide which
  modules it covers), `pack-quantized`: `weight_packed` int32 [out, in * bits / 32], values offset to
  unsigned (+2^(bits-1)) and packed low bits first, `weight_scale` [out, groups], `weight_zero_point`
  (asymmetric) packed the same way along the outputs, `weight_shape`, `weight_g_idx` (act order
  "group"); `float-quantized`: `weight` float8 e4m3 and `weight_scale` per tensor, row or block;
  `nvfp4-pack-quantized`: `weight_packed` uint8 [out, in / 2] (e2m1, low nibble first), `weight_scale`
  e4m3 [out, in / 16] and `weight_global_scale`, which divides; `mxfp4-pack-quantized`: `weight_packed`
  and `weight_scale` ue8m0 bytes [out, in / 32]. Checked against the compressed-tensors package itself
  (compressors/pack_quantized, nvfp4, mxfp4), which the tests use to write their checkpoints.
- modelopt NVFP4: `weight` uint8 [out, in / 2], `weight_scale` e4m3 [out, in / 16] and `weight_scale_2`,
  a float32 that multiplies (amax / 2688). Checked against vLLM's ModelOpt NVFP4 methods
  (model_executor/layers/quantization/modelopt.py).
"""

import re
import sys
from dataclasses import dataclass, field

import torch

from localmoe.errors import LocalMoEError
from localmoe.kernels.quantized import (
    MXFP4,
    Fp8Weights,
    Mxfp4Weights,
    Nvfp4Weights,
    QuantizedWeights,
    QuantSpec,
    StoredFormat,
)

INT32, UINT8, FP8 = torch.int32, torch.uint8, torch.float8_e4m3fn
SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
E8M0 = (torch.uint8, torch.float8_e8m0fnu)
AWQ_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # the word's nibble that holds each of eight consecutive outputs


class Format:
    """How one format stores a linear weight, by its module's name (the weight's name less `.weight`).
    `marker` is the companion tensor whose presence says a module is stored so."""

    marker = "qweight"

    def stores(self, ckpt, module: str) -> bool:
        return f"{module}.{self.marker}" in ckpt

    def spec(self, ckpt, module: str) -> QuantSpec | StoredFormat:
        raise NotImplementedError

    def shape(self, ckpt, module: str) -> tuple[int, int]:
        raise NotImplementedError

    def read(self, ckpt, module: str):
        raise NotImplementedError


def _part(
    ckpt, module: str, name: str, dtypes, shape: tuple[int, ...] | None = None, said: str = ""
) -> tuple[int, ...]:
    """The shape of `<module>.<name>`, refused in one line where it is missing, of another dtype, or not
    `shape` (which the quantization config's settings `said`, when given, imply)."""
    tensor = f"{module}.{name}"
    if tensor not in ckpt:
        raise LocalMoEError(f"{ckpt.path} lacks {ckpt.stored_name(tensor)}, which its quantized module needs")
    info = ckpt.info(tensor)
    if info.dtype not in dtypes:
        raise LocalMoEError(
            f"{ckpt.stored_name(tensor)} in {ckpt.path} is {str(info.dtype).removeprefix('torch.')}, which its "
            "quantization format does not store there: the checkpoint is damaged or its config names another format"
        )
    if shape is not None and info.shape != shape and said:
        raise LocalMoEError(
            f"{ckpt.stored_name(tensor)} in {ckpt.path} has shape {list(info.shape)} where the quantization_config's "
            f"{said} implies {list(shape)}: correct quantization_config to describe the weights, or the checkpoint "
            "is damaged"
        )
    if shape is not None and info.shape != shape:
        raise LocalMoEError(
            f"{ckpt.stored_name(tensor)} in {ckpt.path} has shape {list(info.shape)} where its quantized weight "
            f"implies {list(shape)}: the checkpoint is damaged"
        )
    return info.shape


def _unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [..., W] -> [..., W * 32 / bits] unsigned values, lowest bits first."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & (2**bits - 1)).flatten(-2)


def _pack_nibbles(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned values [R, C] -> the kernels' bytes: one per value, or at 4 bits two, the even column low."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4) if bits == 4 else q


def _little_endian_bytes(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, W] -> its bytes [R, 4W] in memory order, the order compressed-tensors' values follow."""
    if sys.byteorder != "little":
        raise LocalMoEError("reading int32-packed checkpoints needs a little-endian machine")
    return words.contiguous().view(torch.uint8)


def _stack(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.unsqueeze(0) for t in tensors]


# --- integers ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gptq(Format):
    bits: int
    group: int  # 0: one group per row (group_size -1)
    act_order: bool
    v1: bool  # zero points stored less one
    symmetric: bool = False  # sym: every zero point 2^(bits - 1), checked when read and then not kept

    def spec(self, ckpt, module):
        return QuantSpec(self.bits, self.group, self.symmetric, act_order=self.act_order)

    def shape(self, ckpt, module):
        words, out = _part(ckpt, module, "qweight", (INT32,))
        inputs = words * 32 // self.bits
        groups = inputs // self.group if self.group else 1
        if f"{module}.g_idx" in ckpt:
            self._check_config(ckpt, module, words, inputs)
        said = f"bits {self.bits}, group_size {self.group or -1}"
        _part(ckpt, module, "qzeros", (INT32,), (groups, out * self.bits // 32), said)
        _part(ckpt, module, "scales", (torch.float16,), (groups, out), said)
        if self.act_order or f"{module}.g_idx" in ckpt:
            _part(ckpt, module, "g_idx", (INT32,), (inputs,))
        return out, inputs

    def _check_config(self, ckpt, module: str, words: int, inputs: int):
        """g_idx [in] gives the module's inputs, so the bits and group size it is stored at, which must be
        the config's: named in one line where they are not."""
        (stored_inputs,) = _part(ckpt, module, "g_idx", (INT32,))
        groups = _part(ckpt, module, "scales", (torch.float16,))[0]
        bits, stored_group = words * 32 // max(stored_inputs, 1), -1 if groups == 1 else stored_inputs // max(groups, 1)
        if bits != self.bits or groups != (-(-stored_inputs // self.group) if self.group else 1):
            raise LocalMoEError(
                f"{ckpt.path}: {ckpt.stored_name(module)} is stored at {bits} bits with group_size {stored_group} "
                f"while its config.json's quantization_config says bits {self.bits}, group_size {self.group or -1}: "
                "correct quantization_config to match the weights"
            )

    def read(self, ckpt, module):
        out, inputs = self.shape(ckpt, module)
        q = _unpack(ckpt.tensor(f"{module}.qweight").T, self.bits)  # [out, in]
        zeros = _unpack(ckpt.tensor(f"{module}.qzeros"), self.bits) + int(self.v1)  # [groups, out]
        scales = ckpt.tensor(f"{module}.scales")
        g_idx = ckpt.tensor(f"{module}.g_idx") if f"{module}.g_idx" in ckpt else None
        if not self.act_order and g_idx is not None and not torch.equal(g_idx, _positional(inputs, self.group)):
            raise LocalMoEError(
                f"{ckpt.stored_name(module)}.g_idx in {ckpt.path} reorders the groups while the config says "
                "desc_act false: the checkpoint and its config disagree"
            )
        if self.symmetric and not bool((zeros == 2 ** (self.bits - 1)).all()):
            raise LocalMoEError(
                f"{ckpt.path}: {ckpt.stored_name(module)}.qzeros are not all {2 ** (self.bits - 1)} while its "
                "config.json's quantization_config says sym true: correct quantization_config to match the weights"
            )
        g_idx = g_idx.view(1, -1) if self.act_order else None
        zeros = None if self.symmetric else zeros.T.to(torch.float16)
        weights = _stack(_pack_nibbles(q, self.bits), scales.T, zeros, g_idx)
        return QuantizedWeights(*weights[:3], self.spec(ckpt, module), torch.float32, weights[3])


def _positional(inputs: int, group: int) -> torch.Tensor:
    return torch.arange(inputs, dtype=INT32) // group if group else torch.zeros(inputs, dtype=INT32)


@dataclass(frozen=True)
class AwqGemm(Format):
    group: int

    def spec(self, ckpt, module):
        return QuantSpec(4, self.group)

    def shape(self, ckpt, module):
        inputs, words = _part(ckpt, module, "qweight", (INT32,))
        out, groups, said = words * 8, inputs // self.group, f"group_size {self.group}"
        _part(ckpt, module, "qzeros", (INT32,), (groups, words), said)
        _part(ckpt, module, "scales", (torch.float16,), (groups, out), said)
        return out, inputs

    def read(self, ckpt, module):
        def outputs_in_order(words: torch.Tensor) -> torch.Tensor:  # [rows, out / 8] -> [rows, out]
            return _unpack(words, 4).unflatten(-1, (-1, 8))[..., AWQ_ORDER].flatten(-2)

        q = outputs_in_order(ckpt.tensor(f"{module}.qweight")).T  # [out, in]
        zeros = outputs_in_order(ckpt.tensor(f"{module}.qzeros")).T.to(torch.float16)
        scales = ckpt.tensor(f"{module}.scales").T
        weights = _stack(_pack_nibbles(q.contiguous(), 4), scales, zeros)
        return QuantizedWeights(*weights, self.spec(ckpt, module), torch.float32)


@dataclass(frozen=True)
class PackedInt(Format):
    """compressed-tensors' pack-quantized integers."""

    bits: int
    group: int  # 0: one group per row (the channel strategy)
    symmetric: bool

    def stores(self, ckpt, module):
        name = f"{module}.weight_packed"
        return name in ckpt and ckpt.info(name).dtype == INT32

    def spec(self, ckpt, module):
        scale_dtype = ckpt.info(f"{module}.weight_scale").dtype
        return QuantSpec(self.bits, self.group, self.symmetric, scale_dtype, f"{module}.weight_g_idx" in ckpt)

    def shape(self, ckpt, module):
        out, words = _part(ckpt, module, "weight_packed", (INT32,))
        _part(ckpt, module, "weight_shape", (INT32, torch.int64), (2,))
        # a plan from shard headers alone (weights not downloaded) takes the shape the packing implies
        stored = (
            tuple(ckpt.tensor(f"{module}.weight_shape").tolist())
            if ckpt.weights_here
            else (out, words * 32 // self.bits)
        )
        inputs = stored[1]
        if stored[0] == out and inputs and inputs * self.bits != words * 32 and words * 32 % inputs == 0:
            raise LocalMoEError(
                f"{ckpt.path}: {ckpt.stored_name(module)} is packed at {words * 32 // inputs} bits while its config "
                f"group says num_bits {self.bits}: correct quantization_config to match the weights"
            )
        if stored[0] != out or inputs * self.bits != words * 32:
            raise LocalMoEError(
                f"{ckpt.stored_name(module)} in {ckpt.path}: weight_shape {list(stored)} does not match its packed "
                f"weight {[out, words]} (localmoe reads inputs that fill whole int32 words)"
            )
        groups = inputs // self.group if self.group else 1
        said = f"group_size {self.group}" if self.group else "channel strategy"
        _part(ckpt, module, "weight_scale", SCALE_DTYPES, (out, groups), said)
        if not self.symmetric:
            _part(ckpt, module, "weight_zero_point", (INT32,), (-(-out * self.bits // 32), groups))
        if f"{module}.weight_g_idx" in ckpt:
            _part(ckpt, module, "weight_g_idx", (INT32,), (inputs,))
        return out, inputs

    def read(self, ckpt, module):
        out, _ = self.shape(ckpt, module)
        q = _little_endian_bytes(ckpt.tensor(f"{module}.weight_packed"))  # already the kernels' bytes
        zero = None
        if not self.symmetric:  # packed along the outputs: [out * bits / 32, groups]
            zero = _unpack(ckpt.tensor(f"{module}.weight_zero_point").T, self.bits)[:, :out].T.to(torch.float16)
        g_idx = ckpt.tensor(f"{module}.weight_g_idx").view(1, -1) if f"{module}.weight_g_idx" in ckpt else None
        weights = _stack(q, ckpt.tensor(f"{module}.weight_scale"), zero, g_idx)
        return QuantizedWeights(*weights[:3], self.spec(ckpt, module), torch.float32, weights[3])


# --- floating point -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockFp8(Format):
    """float8 e4m3 `weight` with a multiplier per `block` tile: `weight_scale_inv` (DeepSeek-V3 and most
    FP8 releases) or `<module>.scale` (DeepSeek-V4's own), float32 or ue8m0."""

    block: tuple[int, int]

    def stores(self, ckpt, module):
        name = f"{module}.weight"
        return name in ckpt and ckpt.info(name).dtype == FP8 and self._scale(ckpt, module) in ckpt

    def _scale(self, ckpt, module: str) -> str:
        return f"{module}.weight_scale_inv" if f"{module}.weight_scale_inv" in ckpt else f"{module}.scale"

    def spec(self, ckpt, module):
        return StoredFormat("fp8", self.block[0] if self.block[0] == self.block[1] else self.block)

    def shape(self, ckpt, module):
        out, inputs = _part(ckpt, module, "weight", (FP8,))
        grid = (-(-out // self.block[0]), -(-inputs // self.block[1]))
        said = f"weight_block_size {list(self.block)}"
        _part(ckpt, module, self._scale(ckpt, module).removeprefix(f"{module}."), SCALE_DTYPES + E8M0, grid, said)
        return out, inputs

    def read(self, ckpt, module):
        self.shape(ckpt, module)
        bits = ckpt.tensor(f"{module}.weight").view(UINT8)
        scales = _multipliers(ckpt.tensor(self._scale(ckpt, module)))
        return Fp8Weights(*_stack(bits, scales), self.spec(ckpt, module).block, torch.float32)


def _multipliers(scale: torch.Tensor) -> torch.Tensor:
    """Scales as float32 multipliers: ue8m0 exponent bytes become 2^(b - 127), exactly."""
    if scale.dtype in E8M0:
        return torch.exp2(scale.view(UINT8).float() - 127)
    return scale.float()


@dataclass(frozen=True)
class FloatFp8(Format):
    """compressed-tensors' float-quantized FP8: `weight_scale` per tensor, row or block."""

    strategy: str
    block: tuple[int, int] | None = None

    def stores(self, ckpt, module):
        name = f"{module}.weight"
        return name in ckpt and ckpt.info(name).dtype == FP8 and f"{module}.weight_scale" in ckpt

    def spec(self, ckpt, module):
        if self.strategy == "block":
            return StoredFormat("fp8", self.block[0] if self.block[0] == self.block[1] else self.block)
        return StoredFormat("fp8", (1, 0))  # one multiplier per row; a tensor's own repeated down its rows

    def shape(self, ckpt, module):
        out, inputs = _part(ckpt, module, "weight", (FP8,))
        scale = _part(ckpt, module, "weight_scale", SCALE_DTYPES)
        expected = {
            "tensor": ((), (1,), (1, 1)),
            "channel": ((out, 1),),
            "block": ((-(-out // self.block[0]), -(-inputs // self.block[1])),) if self.block else (),
        }[self.strategy]
        if scale not in expected:
            raise LocalMoEError(
                f"{ckpt.stored_name(module)}.weight_scale in {ckpt.path} has shape {list(scale)}, which the "
                f"{self.strategy} strategy does not give: the checkpoint is damaged"
            )
        return out, inputs

    def read(self, ckpt, module):
        out, _ = self.shape(ckpt, module)
        scale = ckpt.tensor(f"{module}.weight_scale").float()
        if self.strategy == "tensor":
            scale = scale.reshape(1, 1).expand(out, 1)
        bits = ckpt.tensor(f"{module}.weight").view(UINT8)
        return Fp8Weights(*_stack(bits, scale.contiguous()), self.spec(ckpt, module).block, torch.float32)


@dataclass(frozen=True)
class Mxfp4Packed(Format):
    """e2m1 codes [out, in / 2] and a ue8m0 exponent per 32 inputs: compressed-tensors' mxfp4-pack-quantized
    (`weight_packed`, `weight_scale`), or DeepSeek-V4's experts (`weight` int8, `<module>.scale`)."""

    codes: str = "weight_packed"
    scales: str = "weight_scale"

    def stores(self, ckpt, module):
        codes, scales = f"{module}.{self.codes}", f"{module}.{self.scales}"
        return (
            codes in ckpt
            and scales in ckpt
            and ckpt.info(codes).dtype in (torch.int8, UINT8)
            and ckpt.info(scales).dtype in E8M0
        )

    def spec(self, ckpt, module):
        return MXFP4

    def shape(self, ckpt, module):
        out, packed = _part(ckpt, module, self.codes, (torch.int8, UINT8))
        if packed % 16:
            raise LocalMoEError(f"{ckpt.stored_name(module)} in {ckpt.path}: MXFP4 needs a multiple of 32 inputs")
        _part(ckpt, module, self.scales, E8M0, (out, packed // 16))
        return out, 2 * packed

    def read(self, ckpt, module):
        self.shape(ckpt, module)
        codes = ckpt.tensor(f"{module}.{self.codes}").view(UINT8)
        return Mxfp4Weights(*_stack(codes, ckpt.tensor(f"{module}.{self.scales}").view(UINT8)), torch.float32)


@dataclass(frozen=True)
class Nvfp4(Format):
    """e2m1 codes [out, in / 2], an e4m3 scale per 16 inputs and a float32 scale for the matrix, which
    divides (compressed-tensors' `weight_global_scale`) or multiplies (ModelOpt's `weight_scale_2`)."""

    codes: str
    global_scale: str
    divides: bool

    def stores(self, ckpt, module):
        return f"{module}.{self.global_scale}" in ckpt and f"{module}.{self.codes}" in ckpt

    def spec(self, ckpt, module):
        return StoredFormat("nvfp4", 16, self.divides)

    def shape(self, ckpt, module):
        out, packed = _part(ckpt, module, self.codes, (UINT8,))
        if packed % 8:
            raise LocalMoEError(f"{ckpt.stored_name(module)} in {ckpt.path}: NVFP4 needs a multiple of 16 inputs")
        _part(ckpt, module, "weight_scale", (FP8,), (out, packed // 8))
        if _part(ckpt, module, self.global_scale, (torch.float32,)) not in ((), (1,)):
            raise LocalMoEError(f"{ckpt.stored_name(module)}.{self.global_scale} in {ckpt.path} is not one number")
        return out, 2 * packed

    def read(self, ckpt, module):
        self.shape(ckpt, module)
        codes, scales = ckpt.tensor(f"{module}.{self.codes}"), ckpt.tensor(f"{module}.weight_scale").view(UINT8)
        global_scale = ckpt.tensor(f"{module}.{self.global_scale}").float().reshape(1)
        return Nvfp4Weights(*_stack(codes, scales, global_scale), self.divides, torch.float32)


# --- methods ------------------------------------------------------------------------------------------------


@dataclass
class Quantization:
    """A checkpoint's quantization method and the formats its modules may be stored in. A method that no
    format lists (none, or a family's own such as gpt-oss's mxfp4) leaves every module to its family."""

    method: str | None = None
    formats: tuple[Format, ...] = ()

    def format_of(self, ckpt, module: str) -> Format | None:
        return next((f for f in self.formats if f.stores(ckpt, module)), None)


@dataclass
class CompressedTensors(Quantization):
    """compressed-tensors: each module in the format of the first config group whose targets it matches,
    unless the ignore list names it."""

    groups: list[tuple[tuple[str, ...], Format]] = field(default_factory=list)
    ignore: tuple[str, ...] = ()

    def format_of(self, ckpt, module):
        stored = next((f for f in self.formats if f.stores(ckpt, module)), None)
        if stored is None:
            return None
        name = ckpt.stored_name(module)
        chosen = None if any(_matches(name, t) for t in self.ignore) else _group_format(self.groups, name)
        if chosen is None or type(chosen) is not type(stored):
            said = "ignores it" if chosen is None else f"gives it {describe(chosen)}"
            raise LocalMoEError(
                f"{ckpt.path}: {name} is stored as {describe(stored)}, and the quantization config {said}: "
                "the checkpoint and its config disagree"
            )
        return chosen


def _group_format(groups, name: str) -> Format | None:
    return next((fmt for targets, fmt in groups if any(_matches(name, t) for t in targets)), None)


def _matches(name: str, target: str) -> bool:
    """compressed-tensors' rule: "re:" and a regular expression matched from the start, a module class
    (every stored module here is a Linear), or the exact name."""
    if target.startswith("re:"):
        return re.match(target.removeprefix("re:"), name) is not None
    return target == name or target == "Linear"


def describe(fmt: Format) -> str:
    """The format in a few words, for messages."""
    if isinstance(fmt, FloatFp8):
        return f"FP8 by {fmt.strategy}"
    return {
        Gptq: "GPTQ",
        AwqGemm: "AWQ",
        PackedInt: "pack-quantized integers",
        FloatFp8: "float-quantized FP8",
        BlockFp8: "block FP8",
        Mxfp4Packed: "MXFP4",
        Nvfp4: "NVFP4",
    }[type(fmt)]


def quantization_for(config: dict, path) -> Quantization:
    """The quantization of a checkpoint from its config, refusing in one line a variant of a known method
    that localmoe does not read."""
    quant = config.get("quantization_config") or {}
    method = quant.get("quant_method")
    reader = READERS.get(method)
    return Quantization(method) if reader is None else reader(quant, config, path)


def _refuse(path, what: str, reads: str) -> LocalMoEError:
    return LocalMoEError(f"{path}/config.json: {what} is not supported (localmoe reads {reads})")


def _fp8(quant: dict, config: dict, path) -> Quantization:
    block = quant.get("weight_block_size")
    if block is None:  # AutoFP8's per-tensor FP8 (Neural Magic's releases): `weight_scale`, one float32
        formats: tuple[Format, ...] = (FloatFp8("tensor"),)
    elif isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block):
        formats = (BlockFp8((block[0], block[1])),)
    else:
        raise LocalMoEError(f"{path}/config.json: FP8 weight_block_size {block!r} is not [rows, columns]")
    expert_dtype = quant.get("expert_dtype", config.get("expert_dtype", "fp8"))
    if expert_dtype == "fp4":  # DeepSeek-V4's experts
        formats += (Mxfp4Packed(codes="weight", scales="scale"),)
    elif expert_dtype != "fp8":
        raise _refuse(path, f"expert_dtype {expert_dtype!r}", "fp8 and fp4 experts")
    return Quantization("fp8", formats)


def _gptq(quant: dict, config: dict, path) -> Quantization:
    bits, group = quant.get("bits"), quant.get("group_size", 128)
    checkpoint_format = quant.get("checkpoint_format", quant.get("format", "gptq"))
    if bits not in (4, 8):
        raise _refuse(path, f"GPTQ with {bits} bits", "GPTQ at 4 and 8 bits")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise _refuse(path, f"GPTQ in the {checkpoint_format!r} format", "the gptq and gptq_v2 formats")
    if not isinstance(group, int) or (group < 1 and group != -1):
        raise _refuse(path, f"GPTQ group_size {group!r}", "a positive group size, or -1")
    overrides = [
        rule
        for rule, change in (quant.get("dynamic") or {}).items()
        if not rule.startswith("-:") and any(quant.get(key) != value for key, value in (change or {}).items())
    ]
    if overrides:  # GPTQModel's per-module settings; "-:" rules only leave modules unquantized, stored plain
        raise _refuse(
            path, f"GPTQ with per-module settings in dynamic ({overrides[0]!r})", "one setting for all modules"
        )
    symmetric = quant.get("sym") is True
    gptq = Gptq(bits, max(group, 0), bool(quant.get("desc_act")), checkpoint_format == "gptq", symmetric)
    return Quantization("gptq", (gptq,))


def _awq(quant: dict, config: dict, path) -> Quantization:
    version, bits = str(quant.get("version", "gemm")).lower(), quant.get("bits", quant.get("w_bit"))
    group = quant.get("group_size", quant.get("q_group_size"))
    if version != "gemm":
        raise _refuse(path, f"AWQ version {version!r}", "AWQ's GEMM packing")
    if bits != 4 or not quant.get("zero_point", True):
        raise _refuse(path, f"AWQ with {bits} bits{'' if quant.get('zero_point', True) else ', no zero point'}",
                      "4-bit AWQ with zero points")  # fmt: skip
    if not isinstance(group, int) or group < 1:
        raise _refuse(path, f"AWQ group_size {group!r}", "a positive group size")
    return Quantization("awq", (AwqGemm(group),))


CT_FORMATS = ("pack-quantized", "float-quantized", "nvfp4-pack-quantized", "mxfp4-pack-quantized", "dense")


def _compressed_tensors(quant: dict, config: dict, path) -> Quantization:
    if quant.get("sparsity_config"):
        raise _refuse(path, "compressed-tensors with a sparsity_config", "dense quantized checkpoints")
    groups = []
    for name, group in (quant.get("config_groups") or {}).items():
        if not isinstance(group, dict):
            raise LocalMoEError(f"{path}/config.json: config_groups.{name} is not an object: the config is damaged")
        fmt = _ct_format(group.get("format") or quant.get("format"), group.get("weights") or {}, name, path)
        if fmt is not None:
            groups.append((tuple(group.get("targets") or ()), fmt))
    formats = tuple({type(fmt): fmt for _, fmt in groups}.values())
    return CompressedTensors("compressed-tensors", formats, groups, tuple(quant.get("ignore") or ()))


def _ct_format(name: str | None, weights: dict, group: str, path) -> Format | None:
    """The format of one compressed-tensors config group."""
    bits, kind = weights.get("num_bits"), weights.get("type", "int")
    strategy, size = weights.get("strategy"), weights.get("group_size")
    what = f"compressed-tensors {name!r}" + (f" ({kind}, {bits} bits, {strategy})" if weights else "")
    if name not in CT_FORMATS:
        raise _refuse(path, f"compressed-tensors format {name!r}", ", ".join(CT_FORMATS))
    if name == "dense" or not weights:
        return None
    if name == "pack-quantized" and kind == "int" and bits in (4, 8) and strategy in ("group", "channel"):
        group_size = size if strategy == "group" else 0
        if strategy == "group" and not (isinstance(size, int) and size > 0):
            raise _refuse(path, f"{what} with group_size {size!r}", "a positive group size")
        if weights.get("actorder") not in (None, False, "weight", "static", "group", "dynamic"):
            raise _refuse(path, f"{what} with actorder {weights.get('actorder')!r}", "weight and group actorder")
        return PackedInt(bits, group_size, bool(weights.get("symmetric", True)))
    if name == "float-quantized" and kind == "float" and bits == 8 and strategy in ("tensor", "channel", "block"):
        block = weights.get("block_structure")
        if strategy == "block" and not (isinstance(block, list) and len(block) == 2):
            raise _refuse(path, f"{what} without a [rows, columns] block_structure", "block FP8 with its blocks")
        return FloatFp8(strategy, tuple(block) if strategy == "block" else None)
    if name == "nvfp4-pack-quantized" and kind == "float" and bits == 4 and size == 16:
        return Nvfp4("weight_packed", "weight_global_scale", divides=True)
    if name == "mxfp4-pack-quantized" and kind == "float" and bits == 4 and size == 32:
        return Mxfp4Packed()
    raise _refuse(
        path,
        f"{what} in config group {group}",
        "int4/int8 pack-quantized by group or channel, FP8 by tensor, channel or block, NVFP4 and MXFP4",
    )


def _modelopt(quant: dict, config: dict, path) -> Quantization:
    nested = quant.get("quantization") if isinstance(quant.get("quantization"), dict) else quant
    algo = str(nested.get("quant_algo", "")).upper()
    if algo not in ("NVFP4", "W4A16_NVFP4"):
        raise _refuse(path, f"ModelOpt quant_algo {algo or None!r}", "ModelOpt's NVFP4")
    if nested.get("group_size", 16) != 16:
        raise _refuse(path, f"ModelOpt NVFP4 with group_size {nested.get('group_size')}", "NVFP4's 16")
    return Quantization("modelopt", (Nvfp4("weight", "weight_scale_2", divides=False),))


READERS = {
    "fp8": _fp8,
    "gptq": _gptq,
    "awq": _awq,
    "compressed-tensors": _compressed_tensors,
    "modelopt": _modelopt,
}
