"""scripts/gpu_check.py, what of it runs without a GPU: its arguments, its refusal, and its synthetic
checkpoint (a valid Qwen3-MoE: transformers and localmoe agree on its greedy tokens)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import localmoe
from localmoe.models.moe import GatedActivation

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
TINY = dict(layers=3, experts=6, hidden=64, inter=32, heads=4, kv_heads=2, head_dim=16, vocab=300, top_k=2)


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_it_refuses_in_one_result_line():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 2
    (line,) = done.stdout.strip().splitlines()
    assert line.startswith("RESULT ") and json.loads(line[7:])["phase"] == "refused"
    done = subprocess.run([sys.executable, str(SCRIPT), "--phases", "kernels,warp"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown phases warp" in done.stderr


def test_the_synthetic_checkpoint_is_a_qwen3_moe_transformers_reads_alike(tmp_path):
    import transformers

    folder = gpu_check().synthetic_checkpoint(tmp_path / "synthetic", **TINY)
    prompt = list(range(3, 15))
    engine = localmoe.load(str(folder), device="cpu", dtype=torch.float32)
    ours = list(engine.generate_ids(prompt, 6))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt) :].tolist()
    assert ours == theirs


@pytest.mark.slow  # about 2 minutes of Triton's interpreter in all
@pytest.mark.parametrize("name", list(gpu_check().KERNEL_SHAPES))
def test_each_kernel_row_runs_its_formats_and_activation_in_the_interpreter(name):
    """The kernels phase's shapes scaled down to what Triton's interpreter runs (float32: it lacks
    bfloat16): the weights it builds fit the kernels, and their errors are what it reports."""
    check = gpu_check()
    _, _, top_k, fmt, fields = check.KERNEL_SHAPES[name]
    act = GatedActivation(**fields)
    cpu, experts = torch.device("cpu"), top_k + 1
    width = 128 if fmt == "fp8" else 64  # FP8's blocks are 128 wide
    (gate_up, down), _ = check.random_experts(fmt, experts, width, width, cpu, act.gated, torch.float32)
    slots = torch.randperm(experts)[:top_k].view(1, top_k)
    errors = check.kernel_errors(gate_up, down, [None, None], slots, act, prefill_tokens=5)
    assert set(errors) == {"T1_relative_error", "T5_relative_error"}
    assert all(error < 1e-4 for error in errors.values()), errors
