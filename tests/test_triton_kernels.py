"""The fused Triton expert kernels against the reference, in Triton's interpreter on the CPU (tiny
shapes: the interpreter runs every program one after another), and the kernel choice."""

import dataclasses

import pytest
import torch
from conftest import GPT_OSS, LLAMA4, MIXTRAL, TINY_FAMILIES, hf_model, save_hf

import localmoe
from localmoe.engine import RuntimeOptions
from localmoe.kernels import pair_kernel, self_check
from localmoe.kernels.quantized import (
    MXFP4,
    MXFP8,
    Fp8Weights,
    Mxfp4Weights,
    Nvfp4Weights,
    QuantSpec,
    StoredFormat,
    quantized_stack,
)
from localmoe.kernels.reference import ExpertStack, expert_pair_outputs
from localmoe.models.moe import GatedActivation

triton_experts = pytest.importorskip("localmoe.kernels.triton_experts")

SLOTS, HIDDEN, INTER = 5, 40, 24  # not multiples of any block
ACTS = {
    "swiglu": GatedActivation(),
    "gelu-tanh": GatedActivation(act="gelu_pytorch_tanh"),
    "clamped": GatedActivation(kind="clamped_swiglu", alpha=1.702, limit=0.5),  # a limit that clamps
    "clamped-glu": GatedActivation(kind="clamped_glu", limit=0.5),
    "clamped-after": GatedActivation(kind="glu_clamped_after", limit=0.2),
    "softcapped": GatedActivation(kind="softcapped_glu", gate_limit=0.7, limit=1.5),  # Inkling 2; caps that bend
    "relu2-ungated": GatedActivation(kind="ungated", act="relu2"),  # Nemotron-H: up alone, no gate
}
UNGATED = ACTS["relu2-ungated"]


def case(tokens: int, k: int, seed: int, biases: bool = False, scale: bool = False, dtype=torch.float32, gated=True):
    g = torch.Generator().manual_seed(seed)
    in_rows = (2 if gated else 1) * INTER  # gate and up rows, or up alone
    x = torch.randn(tokens, HIDDEN, generator=g).to(dtype)
    gate_up = (torch.randn(SLOTS, in_rows, HIDDEN, generator=g) / 4).to(dtype)
    down = (torch.randn(SLOTS, HIDDEN, INTER, generator=g) / 4).to(dtype)
    slots = torch.randint(-1, SLOTS, (tokens, k), generator=g)
    extra = [None, None, None]
    if biases:
        extra[:2] = (
            torch.randn(SLOTS, in_rows, generator=g).to(dtype),
            torch.randn(SLOTS, HIDDEN, generator=g).to(dtype),
        )
    if scale:
        extra[2] = torch.rand(tokens * k, generator=g)
    return x, gate_up, down, slots, extra


def compare(act, tokens, k, seed=0, dtype=torch.float32, tolerance=1e-5, **options):
    x, gate_up, down, slots, extra = case(tokens, k, seed, dtype=dtype, gated=act.gated, **options)
    expected = torch.full((tokens * k, HIDDEN), 7.0, dtype=dtype)  # rows of skipped pairs stay as they were
    got = expected.clone()
    expert_pair_outputs(expected, x, gate_up, down, slots, act, *extra)
    triton_experts.triton_pair_outputs(got, x, gate_up, down, slots, act, *extra)
    scale = expected.float().abs().max().item()
    assert (got.float() - expected.float()).abs().max().item() <= tolerance * scale


@pytest.mark.parametrize("tokens", [1, 3, 64])
@pytest.mark.parametrize("k", [1, 2, 8])
def test_both_kernel_shapes_match_the_reference(tokens, k):
    # 1 x 1 .. 3 x 2 pairs take the matrix-vector kernels, 3 x 8 and 64 x k the grouped ones
    compare(ACTS["swiglu"], tokens, k, seed=tokens * 10 + k)


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("tokens", [2, 24])
def test_activations_biases_and_input_scales(act, tokens):
    compare(ACTS[act], tokens, 2, seed=3, biases=True, scale=True)


SPECS = {  # localmoe's own forms, and those checkpoints store
    "int8": QuantSpec(8, 8),
    "int4": QuantSpec(4, 8),
    "int4-sym": QuantSpec(4, 8, symmetric=True, scale_dtype=torch.bfloat16),  # Kimi K2's experts
    "int8-row": QuantSpec(8, 0, symmetric=True, scale_dtype=torch.float32),  # GPTQ 8-bit by row
    "int4-row": QuantSpec(4, 0, scale_dtype=torch.bfloat16),  # compressed-tensors asymmetric by channel
}
# Forms checkpoints store that the kernels do not read yet: `auto` takes the reference for them
REFERENCE_ONLY = [QuantSpec(4, 8, act_order=True), QuantSpec(8, 0, act_order=True)]


@pytest.mark.parametrize("spec", REFERENCE_ONLY, ids=lambda spec: spec.words)
def test_forms_the_kernels_do_not_read_are_refused_when_triton_is_asked_for(spec):
    acts = [ACTS["clamped"]]
    with pytest.raises(localmoe.LocalMoEError, match="do not read"):
        pair_kernel("triton", torch.device("cpu"), torch.float32, acts, spec)


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("tokens", [1, 24])
@pytest.mark.parametrize("act", ["clamped", "relu2-ungated"])
def test_quantized_weights_dequantized_in_registers(spec, tokens, act):
    act = ACTS[act]
    x, gate_up, down, slots, extra = case(tokens, 2, seed=len(spec) + tokens, biases=True, gated=act.gated)
    gate_up, down = quantized_stack(gate_up, SPECS[spec]), quantized_stack(down, SPECS[spec])
    expected, got = torch.zeros(tokens * 2, HIDDEN), torch.zeros(tokens * 2, HIDDEN)
    expert_pair_outputs(expected, x, gate_up, down, slots, act, *extra)  # dequantizes per slot
    triton_experts.triton_pair_outputs(got, x, gate_up, down, slots, act, *extra)
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


@pytest.mark.parametrize("tokens", [1, 24])
def test_mxfp4_weights_decoded_in_registers(tokens):
    x, _, _, slots, extra = case(tokens, 2, seed=tokens, biases=True)
    g = torch.Generator().manual_seed(tokens)

    def mxfp4(rows: int, columns: int) -> Mxfp4Weights:
        blocks = torch.randint(0, 256, (SLOTS, rows, columns // 2), generator=g, dtype=torch.uint8)
        return Mxfp4Weights(
            blocks, torch.randint(120, 128, (SLOTS, rows, columns // 32), generator=g).to(torch.uint8), torch.float32
        )

    hidden, inter = 64, 32  # MXFP4 needs multiples of 32
    x = torch.randn(tokens, hidden, generator=g)
    gate_up, down = mxfp4(2 * inter, hidden), mxfp4(hidden, inter)
    biases = torch.randn(SLOTS, 2 * inter, generator=g), torch.randn(SLOTS, hidden, generator=g)
    expected, got = torch.zeros(tokens * 2, hidden), torch.zeros(tokens * 2, hidden)
    expert_pair_outputs(expected, x, gate_up, down, slots, ACTS["clamped"], *biases)
    triton_experts.triton_pair_outputs(got, x, gate_up, down, slots, ACTS["clamped"], *biases)
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_float16():
    compare(ACTS["swiglu"], 24, 2, dtype=torch.float16, tolerance=2e-3)
    compare(ACTS["swiglu"], 2, 2, dtype=torch.float16, tolerance=2e-3)


def test_one_expert_for_every_token_and_a_zero_weight():
    x, gate_up, down, _, _ = case(20, 2, 1)
    slots = torch.full((20, 2), 3)
    slots[:, 1] = -1
    expected, got = torch.zeros(40, HIDDEN), torch.zeros(40, HIDDEN)
    zero_scale = torch.zeros(40)
    expert_pair_outputs(expected, x, gate_up, down, slots, ACTS["swiglu"], None, None, zero_scale)
    triton_experts.triton_pair_outputs(got, x, gate_up, down, slots, ACTS["swiglu"], None, None, zero_scale)
    assert torch.equal(got, expected) and not got.any()  # a weight of 0 on the input: exactly nothing


def test_sorted_blocks_group_pairs_by_slot():
    slots = torch.tensor([2, -1, 0, 2, 2, 0], dtype=torch.int32)
    order, block_slot = triton_experts.sorted_blocks(slots, 4, block=2)
    by_slot = {}
    for slot, pairs in zip(block_slot.tolist(), order.view(-1, 2).tolist(), strict=True):
        if slot < 0:
            assert pairs == [-1, -1]  # a spare block past the end
        else:
            by_slot.setdefault(slot, []).extend(pair for pair in pairs if pair >= 0)
    assert by_slot == {0: [2, 5], 2: [0, 3, 4]}  # pair 1 is skipped; slot 2's three pairs take two blocks


def test_self_check_passes_and_catches_a_broken_kernel():
    acts = list(ACTS.values())  # gated and ungated experts at once
    assert self_check(triton_experts.triton_pair_outputs, torch.device("cpu"), torch.float32, acts) is None
    cpu = torch.device("cpu")
    assert self_check(triton_experts.triton_pair_outputs, cpu, torch.float32, acts, QuantSpec(4, 8)) is None
    assert self_check(triton_experts.triton_pair_outputs, cpu, torch.float32, acts, MXFP4) is None
    assert self_check(triton_experts.triton_pair_outputs, cpu, torch.float32, acts, StoredFormat("fp8", 8)) is None
    nvfp4 = StoredFormat("nvfp4", 16, divides=True)  # part scales for gate and up, or up alone
    assert self_check(triton_experts.triton_pair_outputs, cpu, torch.float32, acts, nvfp4) is None

    def off_by_one(out, *args):
        triton_experts.triton_pair_outputs(out, *args)
        out += 1

    assert "max error" in self_check(off_by_one, torch.device("cpu"), torch.float32, acts)


def test_the_choice_of_kernels(monkeypatch):
    cpu, acts = torch.device("cpu"), [ACTS["swiglu"]]
    assert pair_kernel("triton", cpu, torch.float32, acts)[1] == "triton"  # here, in the interpreter
    import localmoe.kernels as kernels

    monkeypatch.setattr(kernels, "self_check", lambda *args: None)  # nothing runs on the device
    for act in ACTS.values():  # every activation the families use: Triton on CUDA, never the reference
        assert pair_kernel("auto", torch.device("cuda"), torch.bfloat16, [act], MXFP8)[1] == "triton"
    with pytest.raises(localmoe.LocalMoEError, match="lack the glu/gelu activation"):
        pair_kernel("triton", cpu, torch.float32, [GatedActivation(act="gelu")])
    act_order = QuantSpec(4, 128, act_order=True)  # GPTQ's desc_act: each column's group from a table
    with pytest.raises(localmoe.LocalMoEError, match="do not read int4 .*act order. yet"):
        pair_kernel("triton", cpu, torch.float32, acts, act_order)


@pytest.mark.slow  # whole models through Triton's interpreter
@pytest.mark.parametrize(
    "config_class, config",
    [
        ("MixtralConfig", MIXTRAL),
        ("GptOssConfig", GPT_OSS),
        ("Llama4TextConfig", {**LLAMA4, "num_experts_per_tok": 2}),
        TINY_FAMILIES["nemotron_h"],  # ungated ReLU-squared experts in a latent space
        TINY_FAMILIES["step3p5"],  # SwiGLU clamped after the activation
        TINY_FAMILIES["inkling2_text"],  # the softcapped GLU
    ],
    ids=["mixtral", "gpt-oss", "llama4", "nemotron-h", "step-3.7", "inkling-2"],
)
def test_greedy_tokens_equal_the_reference_path(config_class, config, tmp_path):
    """End to end in float32, resident and offloaded, with the kernels in the interpreter."""
    path = str(save_hf(hf_model(config_class, **config), tmp_path, "single"))
    prompt = list(range(3, 15))

    def tokens(**options):
        engine = localmoe.load(path, device="cpu", dtype=torch.float32, options=RuntimeOptions(**options))
        return list(engine.generate_ids(prompt, 6)), engine

    expected, _ = tokens(kernels="reference")
    resident, engine = tokens(kernels="triton")
    assert resident == expected and "kernels: triton" in engine.summary()
    assert not [why for why in engine.graphs_barred() if "reference expert kernel" in why]
    for misses in ("copy", "direct"):  # direct: the kernels read the misses from the host rows
        offloaded, _ = tokens(kernels="triton", expert_slots=engine.plan.footprint.top_k + 1, miss_policy=misses)
        assert offloaded == expected
    quantized_reference, _ = tokens(kernels="reference", expert_bits=4, expert_group_size=8)
    assert tokens(kernels="triton", expert_bits=4, expert_group_size=8)[0] == quantized_reference


def stored_stack(fmt: str, rows: int, columns: int, experts: int, g: torch.Generator, parts: int = 1):
    """Random experts [experts, rows, columns] in one of the kernels' weight formats (float32 compute);
    `parts`: NVFP4's part scales (gate and up: 2)."""
    if fmt == "float32":
        return torch.randn(experts, rows, columns, generator=g) / 4
    if fmt in SPECS:
        return quantized_stack(torch.randn(experts, rows, columns, generator=g) / 4, SPECS[fmt])
    if fmt == "mxfp4":
        blocks = torch.randint(0, 256, (experts, rows, columns // 2), generator=g, dtype=torch.uint8)
        return Mxfp4Weights(
            blocks, torch.randint(120, 128, (experts, rows, columns // 32), generator=g).to(torch.uint8), torch.float32
        )
    if fmt.startswith("nvfp4"):  # ModelOpt's part scales multiply, compressed-tensors' (nvfp4-ct) divide
        codes = torch.randint(0, 256, (experts, rows, columns // 2), generator=g, dtype=torch.uint8)
        scales = torch.randint(32, 48, (experts, rows, columns // 16), generator=g).to(torch.uint8)  # e4m3 1/8-1/2
        return Nvfp4Weights(
            codes, scales, torch.rand(experts, parts, generator=g) + 0.5, fmt == "nvfp4-ct", torch.float32
        )
    bits = (torch.randn(experts, rows, columns, generator=g) * 4).to(torch.float8_e4m3fn).view(torch.uint8)
    # FP8 in tiles, by row, or in 1 x 32 tiles scaled by exponent bytes (MXFP8: 2^-7 to 2^-3)
    block = {"fp8": (16, 16), "fp8-row": (1, 0), "fp8-oblong": (16, 8), "fp8-mx": (1, 32)}[fmt]
    tiles = (-(-rows // block[0]), -(-columns // (block[1] or columns)))
    scales = torch.rand(experts, *tiles, generator=g) / 8
    if fmt == "fp8-mx":
        scales = torch.randint(120, 125, (experts, *tiles), generator=g).to(torch.uint8)
    return Fp8Weights(bits, scales, 16 if fmt == "fp8" else block, torch.float32)


def take(stack, rows: list[int]):
    """The experts `rows` of a stack, in that order, as a new stack of the same format (copies)."""
    if isinstance(stack, torch.Tensor):
        return stack[rows].clone()
    parts = {
        f.name: getattr(stack, f.name)[rows].clone()
        for f in dataclasses.fields(stack)
        if isinstance(getattr(stack, f.name), torch.Tensor)
    }
    return dataclasses.replace(stack, **parts)


FORMATS = ["float32", "int8", "int4", "mxfp4", "fp8", "int4-sym", "int8-row", "int4-row", "nvfp4", "nvfp4-ct"]
FORMATS += ["fp8-row", "fp8-oblong", "fp8-mx"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tokens, k", [(1, 4), (3, 2), (12, 2)])  # decode, decode, grouped
def test_pairs_outside_the_pool_read_from_the_host_stack(fmt, tokens, k):
    """The direct-read path: a pair whose slot is -1 is computed from the host stack at its expert id, bit
    for bit what the same expert gives from a slot (same bytes, same operations); pairs with neither a
    slot nor an id (-1) are skipped. Biases and input scales included; within tolerance of the reference."""
    check_host_stack(fmt, tokens, k, ACTS["clamped"])


@pytest.mark.parametrize("fmt", ["float32", "mxfp4", "nvfp4"])
@pytest.mark.parametrize("tokens, k", [(1, 4), (12, 2)])  # decode, grouped
def test_ungated_experts_from_the_pool_and_the_host_stack(fmt, tokens, k):
    check_host_stack(fmt, tokens, k, UNGATED)


@pytest.mark.parametrize("tokens, k", [(1, 4), (12, 2)])  # decode, grouped
def test_softcapped_experts_in_mxfp8_from_the_pool_and_the_host_stack(tokens, k):
    """Inkling 2's activation on its release's stored form."""
    check_host_stack("fp8-mx", tokens, k, ACTS["softcapped"])


def check_host_stack(fmt: str, tokens: int, k: int, act: GatedActivation) -> None:
    g = torch.Generator().manual_seed(len(fmt) * 10 + tokens)
    experts, hidden, inter = 6, 64, 32
    in_rows = (2 if act.gated else 1) * inter
    host = ExpertStack(
        stored_stack(fmt, in_rows, hidden, experts, g, parts=2 if act.gated else 1),
        stored_stack(fmt, hidden, inter, experts, g),
        torch.randn(experts, in_rows, generator=g),
        torch.randn(experts, hidden, generator=g),
    )
    in_pool = [4, 1, 5]  # the experts the pool holds, in slots 0, 1, 2
    pool = ExpertStack(*(take(part, in_pool) for part in host))
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    table = torch.full((experts,), -1)
    table[in_pool] = torch.arange(len(in_pool))
    slots = table[ids]
    ids_or_none = torch.where(torch.rand(ids.shape, generator=g) < 0.2, -1, ids)  # some pairs skipped
    x = torch.randn(tokens, hidden, generator=g)
    scale = torch.rand(tokens * k, generator=g)
    everything = torch.full((tokens * k, hidden), 7.0)  # every expert read as if from a slot of the host stack
    triton_experts.triton_pair_outputs(everything, x, *host[:2], ids_or_none, act, *host[2:], scale)
    mixed = torch.full((tokens * k, hidden), 7.0)
    skipped = ids_or_none < 0
    mixed_slots = torch.where(skipped, -1, slots)
    triton_experts.triton_pair_outputs(
        mixed, x, *pool[:2], mixed_slots, act, *pool[2:], scale, ids=ids_or_none, host=host
    )
    assert torch.equal(mixed, everything)
    assert torch.equal(mixed[skipped.reshape(-1)], torch.full((int(skipped.sum()), hidden), 7.0))
    expected = torch.full((tokens * k, hidden), 7.0)
    expert_pair_outputs(expected, x, *pool[:2], mixed_slots, act, *pool[2:], scale, ids=ids_or_none, host=host)
    assert (mixed - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()


def spread(values: torch.Tensor, stride: int) -> torch.Tensor:
    """values [n, ...] (contiguous) in rows `stride` elements apart, in an allocation left untouched between
    them: offsets past 2^31 elements at the cost of a few pages."""
    big = torch.empty((values.shape[0] - 1) * stride + values[0].numel(), dtype=values.dtype)
    rows = big.as_strided(values.shape, (stride, *values[0].stride()))
    rows.copy_(values)
    return rows


@pytest.mark.parametrize("tokens, k", [(1, 3), (9, 2)])  # decode, grouped
def test_offsets_past_two_to_the_31_elements(tokens, k):
    """Slots, host experts and output rows 2^31 elements and more from their base (gpt-oss's MXFP4 pool
    puts its biases there from slot 325 on): every offset along slots, experts and pairs is 64-bit; a
    32-bit product would wrap and read or write elsewhere."""
    g = torch.Generator().manual_seed(tokens)
    experts, hidden, inter = 3, 32, 16
    weights = (
        torch.randn(experts, 2 * inter, hidden, generator=g) / 4,
        torch.randn(experts, hidden, inter, generator=g) / 4,
        torch.randn(experts, 2 * inter, generator=g),
        torch.randn(experts, hidden, generator=g),
    )
    far = 2**30 + 64  # expert 2 starts past 2^31 elements
    pool, host = (ExpertStack(*(spread(part, far) for part in weights)) for _ in range(2))
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    slots = torch.where(torch.arange(tokens)[:, None] % 2 == 0, ids, -1)  # odd tokens read the host stack
    x = torch.randn(tokens, hidden, generator=g)
    pairs = tokens * k
    out = spread(torch.zeros(pairs, hidden), 2**31 // (pairs - 1) + 64)  # the last pair's row past 2^31
    triton_experts.triton_pair_outputs(out, x, *pool[:2], slots, ACTS["swiglu"], *pool[2:], ids=ids, host=host)
    expected = torch.zeros(pairs, hidden)
    expert_pair_outputs(expected, x, *weights[:2], ids, ACTS["swiglu"], *weights[2:])
    assert (out - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_a_failed_self_check_is_loud_and_an_error_when_triton_was_asked_for(monkeypatch):
    import localmoe.kernels as kernels

    monkeypatch.setattr(kernels, "self_check", lambda *args: "max error 3 with glu/silu, 1 tokens")
    cuda, acts = torch.device("cuda"), [ACTS["swiglu"]]  # the check is faked: nothing runs on the device
    kernel, why = pair_kernel("auto", cuda, torch.float32, acts)
    assert kernel is expert_pair_outputs
    first, loud = why.splitlines()
    assert first == "reference" and loud.startswith("WARNING: the Triton expert kernels failed their self-check")
    with pytest.raises(localmoe.LocalMoEError, match="kernels triton: .* failed their self-check"):
        pair_kernel("triton", torch.device("cpu"), torch.float32, acts)


def launcher_error(**changes) -> str:
    """The launcher's error for a decode call with one argument changed."""
    x, gate_up, down, slots, _ = case(1, 2, 0)
    arguments = dict(out=torch.zeros(2, HIDDEN), x=x, gate_up=gate_up, down=down, slots=slots, act=ACTS["swiglu"])
    arguments.update(changes)
    with pytest.raises(ValueError) as error:
        triton_experts.triton_pair_outputs(**arguments)
    return str(error.value)


def test_the_launcher_refuses_what_would_be_read_wrong():
    _, gate_up, down, slots, _ = case(1, 2, 0)
    assert "out must be [2, 40] torch.float32" in launcher_error(out=torch.zeros(2, HIDDEN, dtype=torch.float16))
    assert "x must be [T, E]" in launcher_error(x=torch.zeros(1, HIDDEN, dtype=torch.int32))
    assert "are not [N, 2I, 40] and [N, 40, I]" in launcher_error(down=down[:, :, :-1])
    assert "are not [N, I, 40] and [N, 40, I]" in launcher_error(act=UNGATED)  # gate rows where up alone lies
    assert "gate_up part 0 has strided rows" in launcher_error(
        gate_up=gate_up.transpose(1, 2).contiguous().transpose(1, 2)
    )
    assert "gate_up is torch.float16" in launcher_error(gate_up=gate_up.half())
    assert "down_bias must be [5, 40]" in launcher_error(
        gate_up_bias=torch.zeros(5, 2 * INTER), down_bias=torch.zeros(5, 4)
    )
    assert "one value per pair" in launcher_error(input_scale=torch.ones(3))
    far = 2**26  # rows this far apart: one expert spans 47 * 2^26 elements, past 2^31 (untouched memory)
    huge_rows = torch.empty((2 * INTER - 1) * far + HIDDEN).as_strided((SLOTS, 2 * INTER, HIDDEN), (0, far, 1))
    assert "spans 2^31 elements or more" in launcher_error(gate_up=huge_rows)
    quantized = quantized_stack(gate_up, QuantSpec(4, 8))
    zero = quantized.zero.transpose(1, 2).contiguous().transpose(1, 2)
    unmatched = dataclasses.replace(quantized, zero=zero)
    assert "scales and zero points must have the same shape and strides" in launcher_error(
        gate_up=unmatched, down=quantized_stack(down, QuantSpec(4, 8))
    )
    host = ExpertStack(gate_up, down)
    assert "ids and host go together" in launcher_error(host=host)
    ids = slots.clamp(min=0)
    assert "not in the pool's format" in launcher_error(ids=ids, host=ExpertStack(quantized, down))
    wider_rows = torch.zeros(SLOTS, 2 * INTER, HIDDEN + 8)[:, :, :HIDDEN]
    assert "laid out unlike the pool's" in launcher_error(ids=ids, host=ExpertStack(wider_rows, down))
    assert "both have it or both lack it" in launcher_error(
        ids=ids, host=ExpertStack(gate_up, down, torch.zeros(SLOTS, 2 * INTER), None)
    )
