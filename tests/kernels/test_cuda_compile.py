"""Every Triton kernel compiles for an H100 (sm_90) on a machine without a GPU.

The interpreter tests check the math but accept programs the GPU compiler rejects, so this
runs tests/kernels/cuda_compile.py, which drives the ops forward and backward at DiT-XL/2
shapes with launches replaced by Triton's real compiler and its ptxas (the first and the
last autotuning configs of each kernel).
"""
import collections
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("cuda_compile.py")
HOOK_MISMATCH = 4  # cuda_compile.py's exit code when this triton's runtime differs from its hooks
KERNELS = {"_modulate_forward_kernel", "_modulate_backward_kernel", "_sum_partials_kernel", "_forward_kernel",
           "_backward_query_kernel", "_backward_key_kernel", "_linear_gelu_kernel"}


def _nvidia_backend_problem():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError as error:
        return f"this triton has no NVIDIA backend to compile with ({error})"
    return None


# (dtype, head dim) per compile run: bf16 at DiT-XL's 72 for the tensor-core path, fp32 at 40
# for the tf32x3 / ieee paths. The two run side by side (the CI machine has 2 cores).
RUNS = (("bfloat16", "72"), ("float32", "40"))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the kernel tests compile and run every kernel for real")
    if problem := _nvidia_backend_problem():
        pytest.skip(problem)
    folder = tmp_path_factory.mktemp("cuda_compile")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(folder / "cache"), TRITON_DEFAULT_FP_FUSION="1")
    runs = []
    for dtype, head_dim in RUNS:
        output = folder / f"{dtype}.json"
        command = [sys.executable, str(SCRIPT), "--arch", "90", "--dtype", dtype, "--head-dim", head_dim,
                   "--configs", "ends", "--json", str(output)]
        runs.append((subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
                     output))
    failures, records = [], []
    for process, output in runs:
        log, _ = process.communicate(timeout=600)
        if process.returncode == HOOK_MISMATCH:
            pytest.skip(f"the compile check follows Triton's runtime internals, and this one differs: {log.strip()}")
        if process.returncode != 0:
            failures.append(log[-3000:])
        if output.exists():
            records += json.loads(output.read_text())["records"]
    return failures, records


def test_every_kernel_compiles_for_sm90_with_a_config_that_fits(compiled):
    failures, records = compiled
    assert not failures, "\n\n".join(failures)
    assert {record["kernel"] for record in records} >= KERNELS, "some kernel was never compiled"
    cases = {record["case"] for record in records}
    assert any("mask" in case for case in cases) and any("float32" in case for case in cases)
    assert any(case.endswith("Tk=2") for case in cases), "no attention with all keys in one block"


def test_the_bf16_forward_kernels_do_not_spill_at_dit_xl_shapes(compiled):
    """Spilled registers go to local memory, the slow path; the row kernels' tile sizes and
    the attention forward's configs were chosen so that they fit (see _common.py and
    attention.py)."""
    _, records = compiled
    checked = [record for record in records if record["ok"] and "bfloat16" in record["case"]
               and record["kernel"] in ("_modulate_forward_kernel", "_modulate_backward_kernel", "_forward_kernel")]
    assert checked
    assert [record for record in checked if record["spilled"]] == []


def test_float32_matmuls_keep_their_precision(compiled):
    """The interpreter ignores tl.dot's input_precision, so only the compiled IR shows it:
    fp32 attention runs tf32x3 (about fp32's accuracy on tensor cores), fp32 linear_gelu ieee."""
    _, records = compiled
    wanted = {"_forward_kernel": ["tf32x3"], "_backward_query_kernel": ["tf32x3"], "_backward_key_kernel": ["tf32x3"],
              "_linear_gelu_kernel": ["ieee"]}
    checked = [record for record in records if record["ok"] and "float32" in record["case"] and record["kernel"] in wanted]
    assert {record["kernel"] for record in checked} == set(wanted)
    for record in checked:
        assert record["dot_precisions"] == wanted[record["kernel"]], record


def test_bf16_kernels_load_16_byte_vectors_at_dit_xl_shapes(compiled):
    """Triton vectorizes a load only where it can prove where rows start: at D = 72, a row
    stride that no power of two past 8 divides, every q/k/v/o row was once loaded 2 bytes at
    a time (ld.global.b16) and never copied asynchronously; the kernels now hand the
    compiler the strides' alignment (attention.py, _head_start)."""
    _, records = compiled
    checked = [record for record in records if record["ok"] and "bfloat16" in record["case"]
               and ("D=72" in record["case"] or "C=1152" in record["case"])
               and record["kernel"] in ("_forward_kernel", "_backward_query_kernel", "_backward_key_kernel",
                                        "_modulate_forward_kernel", "_modulate_backward_kernel")]
    assert {record["kernel"] for record in checked} == {"_forward_kernel", "_backward_query_kernel",
                                                        "_backward_key_kernel", "_modulate_forward_kernel",
                                                        "_modulate_backward_kernel"}
    for record in checked:
        assert 128 in record["global_load_bits"] and 16 not in record["global_load_bits"], record


def test_the_matmul_kernels_reach_hoppers_wgmma_at_dit_xl_shapes(compiled):
    """Hopper's full tensor-core rate needs wgmma (sm_90a): Triton emits it for a tl.dot of
    bf16/fp16 or tf32 operands with 64 rows or more, and falls back to Ampere's mma.sync
    otherwise. Each attention kernel (bf16 at D = 72, fp32's tf32x3 at D = 40) and the bf16
    linear_gelu must have a config on wgmma: their first, largest configs are, while the
    configs whose program owns 32 rows, the fallback that fits every head dim and dtype among
    them, run mma.sync."""
    _, records = compiled
    wanted = {("bfloat16", "_forward_kernel"), ("bfloat16", "_backward_query_kernel"),
              ("bfloat16", "_backward_key_kernel"), ("bfloat16", "_linear_gelu_kernel"),
              ("float32", "_forward_kernel"), ("float32", "_backward_query_kernel"), ("float32", "_backward_key_kernel")}
    instructions = collections.defaultdict(set)  # per (dtype, case, kernel), over the kernel's configs
    for record in records:
        dtype = "bfloat16" if "bfloat16" in record["case"] else "float32"  # RUNS compiles just these two
        if record["ok"] and (dtype, record["kernel"]) in wanted:
            instructions[dtype, record["case"], record["kernel"]].update(record["matrix_instructions"])
    assert {(dtype, kernel) for dtype, _, kernel in instructions} == wanted
    missing = [key for key, found in instructions.items() if "wgmma" not in found]
    attention = importlib.import_module("fusedit.kernels.triton.attention")  # the package's `attention` is the op
    if attention._HOPPER_NEEDS_128_ROWS_FOR_8_WARPS:
        # Triton 3.0 leaves the bf16 key backward at D = 72 its fallback alone: its 8-warp
        # configs are left out there (_compiles_here) and its 4-warp ones, with two 64 x 80
        # accumulators, exceed the register budget (_prune_for_head_dim)
        missing = [(dtype, case, kernel) for dtype, case, kernel in missing
                   if (dtype, kernel) != ("bfloat16", "_backward_key_kernel")]
    assert missing == []
