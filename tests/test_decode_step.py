"""The decode step: static where the model allows (the same results as the forward, whatever the token and
position), nothing read back from the device when misses are read in place, few kernel launches per MoE
layer, and captured as a CUDA graph where there is CUDA."""

from pathlib import Path

import pytest
import torch
from conftest import TINY_FAMILIES, hf_model, save_hf

import localmoe
from localmoe.bench import QWEN3_ROUTING_TINY, LaunchCounter, decode_ops
from localmoe.demo import write_random_checkpoint
from localmoe.engine import RuntimeOptions
from localmoe.kernels import pair_kernel
from localmoe.kernels.reference import expert_pair_outputs
from localmoe.models.layers import bucket
from localmoe.runtime.generate import DecodeSteps, StepHooks

PROMPT = list(range(3, 27))


# the standard attention, with a window ring and sinks, latent attention with position-scaled queries,
# per-kind rotaries with per-layer inputs
STATIC = ["qwen3_moe", "gpt_oss", "deepseek_v3", "mistral4", "gemma4_text"]
EAGER = ["llama4_text", "phimoe", "minimax", "qwen3_5_moe_text", "glm_moe_dsa", "deepseek_v4"]  # host positions
FAST = {*STATIC, "llama4_text", "glm_moe_dsa"}
FAMILIES = [pytest.param(f, marks=[] if f in FAST else [pytest.mark.slow]) for f in sorted(TINY_FAMILIES)]
RUNTIME_DOCS = Path(__file__).resolve().parent.parent / "docs" / "runtime.md"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each family's tiny checkpoint, written when a test first asks for it."""

    class Checkpoints(dict):
        def __missing__(self, family: str) -> str:
            config_class, config = TINY_FAMILIES[family]
            folder = tmp_path_factory.mktemp(family)
            self[family] = path = str(save_hf(hf_model(config_class, **config), folder, "sharded"))
            return path

    return Checkpoints()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_static_step_gives_what_the_forward_gives(checkpoints, family):
    """Run twice, at other positions with other tokens, the one step function (its positions only on the
    device) gives the forward's logits bit for bit: nothing of a position is baked into it. A family
    with layers that need host positions decodes eagerly, and the runtime docs say so."""
    model = localmoe.load(checkpoints[family], device="cpu", dtype=torch.float32).model
    if family in STATIC + EAGER:
        assert model.static_decode == (family in STATIC)
    if not model.static_decode:
        assert f"`{family}`" in RUNTIME_DOCS.read_text().split("These decode")[1].split("\n\n")[0]
        return
    eager, static = model.new_cache(1, 100), model.new_cache(1, 100)
    with torch.inference_mode():
        model(torch.tensor([PROMPT]), eager)
        model(torch.tensor([PROMPT]), static)
        position = torch.zeros(1, dtype=torch.long)
        for token in (5, 130):  # two positions in the same bucket: the same step function
            expected = model(torch.tensor([[token]]), eager)
            position.fill_(static.pos)
            got = model.decode_step(torch.tensor([[token]]), position, static, bucket(static.pos, static.max_len))
            static.pos += 1
            assert torch.equal(got, expected)


@pytest.mark.parametrize("context", [100, 1100], ids=["whole", "rings"])  # windows of 8 in rings past 1032
@pytest.mark.parametrize("family", STATIC)
def test_the_static_check_gives_what_the_forward_gives(checkpoints, family, context):
    """A speculative check (the last chosen token and drafts: T tokens, their logits and hidden states at
    every position) as a static step gives the eager check's bits, whatever T: within a bucket, one
    token, across a bucket's end (positions 62 .. 66 read 128 keys) and up to the context's last position."""
    model = localmoe.load(checkpoints[family], device="cpu", dtype=torch.float32).model
    eager, static = model.new_cache(1, context), model.new_cache(1, context)
    with torch.inference_mode():
        model(torch.tensor([PROMPT]), eager)
        model(torch.tensor([PROMPT]), static)
        for start, length in ((24, 3), (27, 1), (62, 5), (context - 4, 4)):
            for cache in (eager, static):  # on from `start`: what a rollback leaves (a gap reads as unwritten)
                cache.rewind(start)
            ids = torch.randint(0, 200, (1, length), generator=torch.Generator().manual_seed(start))
            expected = model(ids, eager, all_logits=True, hidden=True, trail=True)
            positions = torch.arange(start, start + length)
            got = model.decode_step(ids, positions, static, bucket(start + length - 1, context), hidden=True)
            static.pos += length
            assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_buckets_cover_the_position_and_stay_within_the_cache():
    assert [bucket(p, 4096) for p in (0, 63, 64, 100, 127, 128, 4095)] == [64, 64, 128, 128, 128, 256, 4096]
    assert bucket(70, 100) == 100


def gathered_pairs(out, x, gate_up, down, slots, act, gate_up_bias=None, down_bias=None, input_scale=None, **reads):
    """A stand-in for a fused kernel that never reads the device: each pair's weights gathered from its slot
    or, with -1, from the host row of its expert (slow, and not the reference's bits: for this test only)."""
    ids, host = reads["ids"].reshape(-1), reads["host"]
    flat = slots.reshape(-1).long()
    found = (flat >= 0)[:, None, None]
    gate_up = torch.where(found, gate_up[flat.clamp(min=0)], host.gate_up[ids])
    down = torch.where(found, down[flat.clamp(min=0)], host.down[ids])
    inputs = x.repeat_interleave(slots.shape[1], dim=0)[:, :, None]
    gate, up = (gate_up @ inputs).squeeze(-1).chunk(2, dim=-1)
    out.copy_((down @ act(gate, up)[:, :, None]).squeeze(-1))


class NoDeviceReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on every op that makes the host wait for the device: a scalar read, data-dependent shapes,
    a copy between devices."""

    SYNCING = {"_local_scalar_dense", "item", "nonzero", "_unique2", "unique_dim", "unique_consecutive"}
    SYNCING |= {"masked_select", "tolist"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name().split("::")[-1].split(".")[0]
        assert name not in self.SYNCING, f"{func.name()} reads from the device"
        if name in ("copy_", "_to_copy"):
            devices = {t.device for t in args if isinstance(t, torch.Tensor)}
            if kwargs and kwargs.get("device") is not None:
                devices.add(torch.device(kwargs["device"]))
            assert len(devices) <= 1, f"{func.name()} copies between {devices}"
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("tokens", [1, 6], ids=["decode", "check"])
@pytest.mark.parametrize("kernel", ["stand-in", "triton"])
def test_the_direct_decode_step_reads_nothing_from_the_device(checkpoints, kernel, tokens):
    """Between the embedding and the logits, no op waits for the device, and the routing still reaches
    the cache (a step later, through the routing log). With a kernel that reads nothing back itself: a
    stand-in, or the fused kernels (in Triton's interpreter: their launches are no aten ops). A decode
    token, and a speculative check of six (the last chosen token and five drafts: 18 pairs, past the
    matrix-vector kernels' 16, so the grouped ones run)."""
    if kernel == "triton":
        pytest.importorskip("triton")
    options = RuntimeOptions(expert_slots=8, kernels="triton" if kernel == "triton" else "reference")
    engine = localmoe.load(checkpoints["qwen3_moe"], device="cpu", dtype=torch.float32, options=options)
    runtime = engine.experts
    assert engine.miss_policy == "direct"
    if kernel == "stand-in":
        runtime.pair_outputs = gathered_pairs
    cache = engine.model.new_cache(1, 64)
    hooks = StepHooks(runtime.begin_step, runtime.end_step, runtime.step_tokens)
    steps = DecodeSteps(engine.model, cache, hooks=hooks, most=tokens)
    ids = torch.tensor([[7, 8, 9, 10, 11, 12][:tokens]])
    with torch.inference_mode():
        engine.model(torch.tensor([PROMPT]), cache)
        steps.check(ids)  # warm: buffers allocated
        uses = runtime.cache.totals().uses
        runtime.begin_step()
        positions = torch.arange(cache.pos, cache.pos + tokens)
        with NoDeviceReads():
            engine.model.decode_step(ids, positions, cache, bucket(cache.pos + tokens - 1, 64), hidden=True)
        runtime.end_step()
    assert runtime.cache.totals().uses > uses  # the step was learned from


@pytest.fixture(scope="module")
def qwen3_48_layers(tmp_path_factory) -> str:
    """Qwen3-30B-A3B's routing shape at tiny width: 48 MoE layers of 128 experts, top-8."""
    folder = tmp_path_factory.mktemp("qwen3-48")
    config = {**QWEN3_ROUTING_TINY, "max_position_embeddings": 4096, "torch_dtype": "float32"}
    write_random_checkpoint(folder, {**config, "bos_token_id": 1, "eos_token_id": None})
    return str(folder)


def ops_per_layer(path: str, slots: int, counter: LaunchCounter, kernel_as_one: bool) -> float:
    engine = localmoe.load(path, device="cpu", options=RuntimeOptions(expert_slots=slots, context=64, profile=None))
    assert engine.miss_policy == "direct"
    if kernel_as_one:
        engine.experts.pair_outputs = counter.as_one(engine.experts.pair_outputs)
    return sum(decode_ops(engine, PROMPT, counter).values()) / 48


@pytest.mark.slow
@pytest.mark.parametrize("share", [0.99, 0.25], ids=["nearly-all-slots", "a-quarter"])
def test_a_decode_token_launches_at_most_40_ops_per_moe_layer_beside_one_kernel_call(qwen3_48_layers, share):
    """Everything but the expert kernel, with the kernel counted as one call: the runtime's share of the
    budget, whatever kernel `pair_kernel` picks."""
    assert ops_per_layer(qwen3_48_layers, int(48 * 128 * share), LaunchCounter(), kernel_as_one=True) <= 40


FUSED_ON_CPU = pair_kernel("auto", torch.device("cpu"), torch.float32, [])[0] is not expert_pair_outputs


@pytest.mark.slow
@pytest.mark.xfail(
    not FUSED_ON_CPU, strict=True, reason="the reference kernel loops over the chosen experts: ~10 ops each"
)
@pytest.mark.parametrize("share", [0.99, 0.25], ids=["nearly-all-slots", "a-quarter"])
def test_a_decode_token_launches_at_most_40_ops_per_moe_layer(qwen3_48_layers, share):
    """Every op, with the kernel `pair_kernel` picks on this machine."""
    assert ops_per_layer(qwen3_48_layers, int(48 * 128 * share), LaunchCounter(), kernel_as_one=False) <= 40


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_decode_step_captured_as_a_cuda_graph_gives_the_eager_tokens(checkpoints):
    def tokens(graphs: str) -> list[int]:
        options = RuntimeOptions(expert_slots=8, cuda_graphs=graphs, kernels="triton")
        engine = localmoe.load(checkpoints["qwen3_moe"], device="cuda", dtype=torch.float32, options=options)
        assert bool(engine.graphs_barred()) == (graphs == "off")
        return list(engine.generate_ids(PROMPT, 80))  # past the first bucket: two graphs

    assert tokens("on") == tokens("off")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("speculative", ["lookup", "mtp"])
def test_speculative_steps_captured_as_cuda_graphs_give_the_eager_tokens(checkpoints, tmp_path, speculative):
    """Checks of every length (prompt lookup drafts what it finds) and the MTP layer's steps, one graph
    per kind, bucket and token count, offloaded with misses read in place: the tokens without graphs."""
    from test_mtp import RELEASES

    path = checkpoints["qwen3_moe"] if speculative == "lookup" else str(RELEASES["deepseek_v3"](tmp_path).folder)

    def tokens(graphs: str) -> list[int]:
        options = RuntimeOptions(
            expert_slots=8, cuda_graphs=graphs, kernels="triton", speculative=speculative, draft_tokens=3
        )
        engine = localmoe.load(path, device="cuda", dtype=torch.float32, options=options)
        assert bool(engine.graphs_barred()) == (graphs == "off") and not engine.drafts_barred()
        return list(engine.generate_ids(PROMPT * 3, 40))  # past the first bucket

    assert tokens("on") == tokens("off")


def test_graphs_are_refused_with_the_reason_where_they_cannot_be(checkpoints):
    options = RuntimeOptions(expert_slots=8, cuda_graphs="on")
    engine = localmoe.load(checkpoints["qwen3_moe"], device="cpu", dtype=torch.float32, options=options)
    with pytest.raises(localmoe.LocalMoEError, match="cuda_graphs on: .*not on CUDA"):
        list(engine.generate_ids(PROMPT, 2))
