"""Bad inputs to fusedit's triton ops raise errors that name the problem, and a CPU run
without Triton's interpreter says how to get one instead of showing a Triton traceback."""
import os
import subprocess
import sys

import pytest
import torch

from fusedit.kernels.testing import DEVICE
from fusedit.kernels.triton import adaln_modulate, gated_residual, linear_gelu, residual_adaln_modulate


def tensor(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(shape, device=device).to(dtype)


B, T, C = 2, 3, 8
CASES = [
    # (call, error type, words the message must contain)
    (lambda: adaln_modulate(tensor(B, C), tensor(B, C), tensor(B, C)), ValueError,
     ["adaln_modulate", "x", "(*, *, *)"]),
    (lambda: adaln_modulate(tensor(B, T, C), tensor(B, C + 1), tensor(B, C)), ValueError, ["shift", f"({B}, {C})"]),
    (lambda: adaln_modulate(tensor(B, T, C), tensor(B, C), tensor(1, C)), ValueError, ["scale", f"({B}, {C})"]),
    (lambda: adaln_modulate(tensor(B, T, C, dtype=torch.float64), tensor(B, C), tensor(B, C)), ValueError,
     ["x", "float64", "supported"]),
    (lambda: adaln_modulate(tensor(B, T, C), tensor(B, C, device="meta"), tensor(B, C)), ValueError, ["shift", "meta"]),
    (lambda: adaln_modulate(tensor(B, T, C).tolist(), tensor(B, C), tensor(B, C)), TypeError, ["x", "torch.Tensor"]),
    (lambda: adaln_modulate(tensor(1, 1, 16385), tensor(1, 16385), tensor(1, 16385)), ValueError, ["channel", "16384"]),
    (lambda: gated_residual(tensor(B, T, C), tensor(B, C), tensor(B, T + 1, C)), ValueError, ["y", f"({B}, {T}, {C})"]),
    (lambda: gated_residual(tensor(B, T, C), tensor(B, T, C), tensor(B, T, C)), ValueError, ["gate", f"({B}, {C})"]),
    (lambda: gated_residual(tensor(B, T, C), tensor(B, C), tensor(B, T, C, dtype=torch.int32)), ValueError,
     ["y", "int32"]),
    (lambda: residual_adaln_modulate(tensor(B, T, C), tensor(B, C), tensor(B, T, C), tensor(B, C), tensor(C)),
     ValueError, ["residual_adaln_modulate", "scale"]),
    (lambda: adaln_modulate(tensor(B, T, C), tensor(B, C), tensor(B, C), eps=-1e-6), ValueError,
     ["adaln_modulate", "eps must be a finite number >= 0", "-1e-06"]),
    (lambda: residual_adaln_modulate(tensor(B, T, C), tensor(B, C), tensor(B, T, C), tensor(B, C), tensor(B, C),
                                     eps=float("nan")), ValueError, ["residual_adaln_modulate", "eps", "nan"]),
    (lambda: adaln_modulate(tensor(B, T, C), tensor(B, C), tensor(B, C), eps=float("inf")), ValueError,
     ["adaln_modulate", "eps", "inf"]),
    (lambda: adaln_modulate(tensor(B, T, 0), tensor(B, 0), tensor(B, 0)), ValueError, ["channel", "got 0"]),
    (lambda: linear_gelu(tensor(B, T, C), tensor(16, C + 1), tensor(16)), ValueError, ["weight", f"(*, {C})"]),
    (lambda: linear_gelu(tensor(B, T, C), tensor(16, C), tensor(15)), ValueError, ["bias", "(16)"]),
    (lambda: linear_gelu(tensor(B, T, C), tensor(16, C, dtype=torch.bfloat16), tensor(16)), ValueError,
     ["weight", "bfloat16"]),
    (lambda: linear_gelu(torch.tensor(1.0, device=DEVICE), tensor(16, 1), tensor(16)), ValueError, ["x", "scalar"]),
]


@pytest.mark.parametrize("call, error, words", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_bad_input_raises_a_clear_error(call, error, words):
    with pytest.raises(error) as raised:
        call()
    for word in words:
        assert word in str(raised.value), f"{word!r} missing from: {raised.value}"


def test_cpu_without_interpreter_says_how_to_run():
    # a fresh interpreter without TRITON_INTERPRET: every op must refuse CPU tensors with
    # the RuntimeError that names the fix, before any Triton code runs
    script = """
import torch
from fusedit.kernels.triton import adaln_modulate, gated_residual, linear_gelu, residual_adaln_modulate
x, v = torch.randn(1, 2, 4), torch.randn(1, 4)
calls = [
    lambda: adaln_modulate(x, v, v),
    lambda: gated_residual(x, v, x),
    lambda: residual_adaln_modulate(x, v, x, v, v),
    lambda: linear_gelu(x, torch.randn(3, 4), torch.randn(3)),
]
for call in calls:
    try:
        call()
    except RuntimeError as error:
        print("ERROR:", error)
    else:
        print("NO ERROR")
"""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4, result.stdout + result.stderr
    for line, op in zip(lines, ["adaln_modulate", "gated_residual", "residual_adaln_modulate", "linear_gelu"]):
        assert line.startswith(f"ERROR: {op}:"), line
        assert "CUDA" in line and "TRITON_INTERPRET=1" in line, line


def test_mixed_floating_dtypes_promote_like_eager():
    # autocast hands the norm/residual ops an fp32 residual stream and bf16 shift/scale/gate;
    # they promote as eager PyTorch does rather than refuse
    from fusedit.kernels import reference

    x, shift, scale = tensor(B, T, C), tensor(B, C, dtype=torch.float16), tensor(B, C)
    got = adaln_modulate(x, shift, scale)
    want = reference.adaln_modulate(x, shift, scale)
    assert got.dtype == want.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5)
    got = gated_residual(x, shift, tensor(B, T, C, dtype=torch.bfloat16))
    assert got.dtype == torch.float32
    # the widest dtype wins wherever it stands, not only as the first argument
    x16, shift32, scale32 = tensor(B, T, C, dtype=torch.bfloat16), tensor(B, C), tensor(B, C)
    got = adaln_modulate(x16, shift32, scale32)
    assert got.dtype == reference.adaln_modulate(x16, shift32, scale32).dtype == torch.float32
    chain_inputs = (x, tensor(B, C, dtype=torch.bfloat16), tensor(B, T, C, dtype=torch.float16), shift32, scale32)
    got = residual_adaln_modulate(*chain_inputs)
    want = reference.residual_adaln_modulate(*chain_inputs)
    assert [t.dtype for t in got] == [t.dtype for t in want] == [torch.float32] * 2
    for got_tensor, want_tensor in zip(got, want):
        assert torch.allclose(got_tensor, want_tensor, atol=1e-5)
    got = residual_adaln_modulate(x16, *chain_inputs[1:])  # bf16 stream, fp16 y, fp32 shift/scale
    assert [t.dtype for t in got] == [t.dtype for t in reference.residual_adaln_modulate(x16, *chain_inputs[1:])]
