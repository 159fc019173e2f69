"""The fused Triton expert kernels against the reference, in Triton's interpreter on the CPU (tiny
shapes: the interpreter runs every program one after another), and the kernel choice."""

import pytest
import torch
from conftest import GPT_OSS, LLAMA4, MIXTRAL, hf_model, save_hf

import localmoe
from localmoe.engine import RuntimeOptions
from localmoe.kernels import pair_kernel, self_check
from localmoe.kernels.quantized import MXFP4, Mxfp4Weights, QuantSpec, StoredFormat, quantized_stack
from localmoe.kernels.reference import ExpertStack, expert_pair_outputs
from localmoe.models.moe import GatedActivation

triton_experts = pytest.importorskip("localmoe.kernels.triton_experts")

SLOTS, HIDDEN, INTER = 5, 40, 24  # not multiples of any block
ACTS = {
    "swiglu": GatedActivation(),
    "gelu-tanh": GatedActivation(act="gelu_pytorch_tanh"),
    "clamped": GatedActivation(kind="clamped_swiglu", alpha=1.702, limit=0.5),  # a limit that clamps
}


def case(tokens: int, k: int, seed: int, biases: bool = False, scale: bool = False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, generator=g).to(dtype)
    gate_up = (torch.randn(SLOTS, 2 * INTER, HIDDEN, generator=g) / 4).to(dtype)
    down = (torch.randn(SLOTS, HIDDEN, INTER, generator=g) / 4).to(dtype)
    slots = torch.randint(-1, SLOTS, (tokens, k), generator=g)
    extra = [None, None, None]
    if biases:
        extra[:2] = (
            torch.randn(SLOTS, 2 * INTER, generator=g).to(dtype),
            torch.randn(SLOTS, HIDDEN, generator=g).to(dtype),
        )
    if scale:
        extra[2] = torch.rand(tokens * k, generator=g)
    return x, gate_up, down, slots, extra


def compare(act, tokens, k, seed=0, dtype=torch.float32, tolerance=1e-5, **options):
    x, gate_up, down, slots, extra = case(tokens, k, seed, dtype=dtype, **options)
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


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("tokens", [1, 24])
def test_quantized_weights_dequantized_in_registers(bits, tokens):
    x, gate_up, down, slots, extra = case(tokens, 2, seed=bits + tokens, biases=True)
    gate_up, down = quantized_stack(gate_up, QuantSpec(bits, 8)), quantized_stack(down, QuantSpec(bits, 8))
    expected, got = torch.zeros(tokens * 2, HIDDEN), torch.zeros(tokens * 2, HIDDEN)
    expert_pair_outputs(expected, x, gate_up, down, slots, ACTS["clamped"], *extra)  # dequantizes per slot
    triton_experts.triton_pair_outputs(got, x, gate_up, down, slots, ACTS["clamped"], *extra)
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


@pytest.mark.parametrize("tokens", [1, 24], ids=["matrix-vector", "grouped"])
def test_pairs_without_a_slot_read_from_the_host_rows_give_the_same_bits(tokens):
    """The direct miss policy's call: experts in slots of a pool, the rest read from the host stack by
    expert id. The same outputs, bit for bit, as with every expert in the pool."""
    act, k = ACTS["clamped"], 2
    x, gate_up, down, _, (bias_in, bias_out, _) = case(tokens, k, seed=3, biases=True)
    ids = torch.randint(0, SLOTS, (tokens, k), generator=torch.Generator().manual_seed(4))
    pool = [3, 0]  # experts 3 and 0 have slots 0 and 1; the others are read from the host
    table = torch.full((SLOTS,), -1)
    table[pool] = torch.arange(len(pool))
    slots = table[ids]
    assert (slots < 0).any() and (slots >= 0).any()
    expected, got = torch.zeros(tokens * k, HIDDEN), torch.zeros(tokens * k, HIDDEN)
    triton_experts.triton_pair_outputs(expected, x, gate_up, down, ids, act, bias_in, bias_out)
    host = ExpertStack(gate_up, down, bias_in, bias_out)
    triton_experts.triton_pair_outputs(
        got, x, gate_up[pool], down[pool], slots, act, bias_in[pool], bias_out[pool], ids=ids, host=host
    )
    assert torch.equal(got, expected)


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
    acts = list(ACTS.values())
    assert self_check(triton_experts.triton_pair_outputs, torch.device("cpu"), torch.float32, acts) is None
    cpu = torch.device("cpu")
    assert self_check(triton_experts.triton_pair_outputs, cpu, torch.float32, acts, QuantSpec(4, 8)) is None
    assert self_check(triton_experts.triton_pair_outputs, cpu, torch.float32, acts, MXFP4) is None
    assert self_check(triton_experts.triton_pair_outputs, cpu, torch.float32, acts, StoredFormat("fp8", 8)) is None

    def off_by_one(out, *args):
        triton_experts.triton_pair_outputs(out, *args)
        out += 1

    assert "max error" in self_check(off_by_one, torch.device("cpu"), torch.float32, acts)


def test_the_choice_of_kernels():
    cpu, acts = torch.device("cpu"), [ACTS["swiglu"]]
    assert pair_kernel("auto", cpu, torch.float32, acts)[1] == "reference"  # the CPU runs the reference
    assert pair_kernel("triton", cpu, torch.float32, acts)[1] == "triton"  # here, in the interpreter
    with pytest.raises(localmoe.LocalMoEError, match="lack the glu/gelu activation"):
        pair_kernel("triton", cpu, torch.float32, [GatedActivation(act="gelu")])


@pytest.mark.slow  # whole models through Triton's interpreter
@pytest.mark.parametrize(
    "config_class, config",
    [("MixtralConfig", MIXTRAL), ("GptOssConfig", GPT_OSS), ("Llama4TextConfig", {**LLAMA4, "num_experts_per_tok": 2})],
    ids=["mixtral", "gpt-oss", "llama4"],
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
    for misses in ("copy", "direct"):  # direct: the kernels read the misses from the host rows
        offloaded, _ = tokens(kernels="triton", expert_slots=engine.plan.footprint.top_k + 1, miss_policy=misses)
        assert offloaded == expected
    quantized_reference, _ = tokens(kernels="reference", expert_bits=4, expert_group_size=16)
    assert tokens(kernels="triton", expert_bits=4, expert_group_size=16)[0] == quantized_reference
