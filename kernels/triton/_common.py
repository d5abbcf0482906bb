"""Checks and helpers shared by the triton ops: clear errors instead of Triton tracebacks."""
import os

import torch

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401
except ImportError as error:  # pragma: no cover - triton is an install requirement on Linux
    raise ImportError(
        f"fusedit.kernels.triton needs the `triton` package ({error}); pip install triton"
    ) from error

# Triton reads TRITON_INTERPRET when a kernel is defined, so this is fixed at import.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensors(op, **tensors):
    """Every tensor floating (fp32/fp16/bf16), of one dtype, on one device that Triton can run on."""
    first_name, first = next(iter(tensors.items()))
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{op}: {name} has dtype {tensor.dtype}; supported: float32, float16, bfloat16")
        if tensor.dtype != first.dtype:
            raise ValueError(f"{op}: {name} is {tensor.dtype} but {first_name} is {first.dtype}; pass one dtype")
        if tensor.device != first.device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but {first_name} is on {first.device}")
    device = first.device
    if device.type == "cuda":
        return
    if device.type == "cpu" and INTERPRET:
        return
    if device.type == "cpu":
        raise RuntimeError(
            f"{op}: fusedit's triton kernels need a CUDA device, and these tensors are on the CPU. "
            "To run them on the CPU in Triton's (slow) interpreter, set TRITON_INTERPRET=1 in the "
            "environment before triton is imported (e.g. `TRITON_INTERPRET=1 python ...`), or use "
            "kernels='reference'."
        )
    raise RuntimeError(f"{op}: tensors are on {device}; fusedit's triton kernels run on CUDA (or the CPU interpreter)")


def check_shape(op, name, tensor, shape):
    """shape: a tuple of ints or None (any size); raises a ValueError naming the mismatch."""
    if tensor.dim() != len(shape) or any(want is not None and got != want for got, want in zip(tensor.shape, shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{op}: {name} must have shape {want}, got {tuple(tensor.shape)}")
