"""scripts/check_kernels.py: the Triton kernels compiled ahead of time for real GPUs (Triton ships ptxas,
no GPU needed), and its checks on kernels written to fail them."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_kernels.py"

KERNELS = """
import triton
import triton.language as tl


@triton.jit
def wrapped(p, slot_ptr, stride):  # slot * stride in 32 bits: wraps past 2^31
    slot = tl.load(slot_ptr)
    tl.store(p + slot * stride, 1.0)


@triton.jit
def widened(p, slot_ptr, stride):
    slot = tl.load(slot_ptr)
    tl.store(p + slot.to(tl.int64) * stride, 1.0)


@triton.jit
def per_pair(p, stride):  # the program id of axis 0 counts pairs: its products must be 64-bit too
    tl.store(p + tl.program_id(0) * stride, 1.0)


@triton.jit
def within_a_matrix(p, stride, BLOCK: tl.constexpr):  # rows of one matrix: bounded by the launcher's check
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tl.store(p + rows * stride, 1.0)


@triton.jit
def spilling(p, BLOCK: tl.constexpr):  # BLOCK values per thread kept alive across a reduction
    values = tl.load(p + tl.arange(0, BLOCK))
    tl.store(p + tl.arange(0, BLOCK), values * tl.sum(values * values, axis=0))
"""

DRIVER = """
import json, sys, torch
import check_kernels
import kernels_to_check as k
from localmoe.kernels.triton_experts import Launch

p, slot = torch.empty(8192), torch.zeros(1, dtype=torch.int32)
launches = {
    "wrapped": Launch(k.wrapped, (1,), (p, slot, 4096), {}),
    "widened": Launch(k.widened, (1,), (p, slot, 4096), {}),
    "per_pair": Launch(k.per_pair, (1,), (p, 4096), {}),
    "within_a_matrix": Launch(k.within_a_matrix, (1, 1), (p, 4096), {"BLOCK": 16}),
    "spilling": Launch(k.spilling, (1,), (p,), {"BLOCK": 8192, "num_warps": 1}),
}
found = {}
for name, launch in launches.items():
    result = check_kernels.compile_one(check_kernels.specialise(launch, 80))
    found[name] = check_kernels.problems_of(result, 80)
print(json.dumps(found))
"""


def test_the_checks_find_32_bit_offsets_along_pairs_and_spills(tmp_path):
    (tmp_path / "kernels_to_check.py").write_text(KERNELS)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPT.parent), str(tmp_path), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(DRIVER)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert [p.split(":")[0] for p in found["wrapped"]] == ["32-bit address multiply on the pair/slot axis"]
    assert [p.split(":")[0] for p in found["per_pair"]] == ["32-bit address multiply on the pair/slot axis"]
    assert found["widened"] == [] and found["within_a_matrix"] == []
    assert len(found["spilling"]) == 1 and "bytes of register spills" in found["spilling"][0]


@pytest.mark.slow  # about 160 s of CPU: every variant for four targets
def test_every_kernel_variant_compiles_for_sm_80_86_89_90_without_spills():
    done = subprocess.run([sys.executable, str(SCRIPT), "--jobs", "2"], capture_output=True, text=True)
    summary = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 0 and summary.endswith("; 0 problems"), done.stdout[-5000:] + done.stderr[-3000:]
