"""Checks and helpers shared by the triton ops: clear errors instead of Triton tracebacks,
row tiling, and the deterministic sum of per-program partial reductions."""
import contextlib
import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - triton is an install requirement on Linux
    raise ImportError(
        f"fusedit.kernels.triton needs the `triton` package ({error}); pip install triton"
    ) from error

# Triton reads TRITON_INTERPRET when a kernel is defined, so this is fixed at import.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Row kernels keep whole rows in registers (LayerNorm needs every channel of a row before it
# can write any); beyond this many channels a row no longer fits the register file.
MAX_ROW_CHANNELS = 16384
# Elements per row tile (rows x padded channels), 8 warps. Register counts from ptxas for
# sm_90a, bf16, C=1152 (2048 padded): the forward needs 64-87 registers at 4096 elements (3+
# programs per SM); the backward holds ~6 tiles at once and needs 59-128 at 2048 elements
# (2 programs per SM) but 126-174 at 4096 (the residual chain's would fit only one).
FORWARD_TILE_ELEMENTS = 4096
BACKWARD_TILE_ELEMENTS = 2048
# Programs per SM a split reduction aims for: enough loads in flight to saturate HBM, few
# enough that the fp32 partial sums stay a small fraction of the traffic (see split_rows).
PROGRAMS_PER_SM = 2
# Given at every launch: FMA contraction (a*b + c rounded once), which every kernel here was
# checked and compiled with (bench/results/sm90-compile_*) and Triton 3.x defaults to, but
# Triton 3.9 warns that its default turns off in 3.10. The interpreter ignores it.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def on_device(tensor):
    """The device a kernel on `tensor` must launch on. Triton launches on the current CUDA
    device, which need not be the tensor's (a model moved to cuda:1), and torch.library's
    custom ops set no device guard: every launch goes inside this."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _autocast_dtype(device_type):
    """The autocast dtype for device_type, or None when autocast is off there."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # older torch: no device argument, CUDA only
        enabled = device_type == "cuda" and torch.is_autocast_enabled()
    if not enabled:
        return None
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


def autocast_inputs(*tensors):
    """Under autocast a matmul-like op computes in the autocast dtype, as F.linear and
    F.scaled_dot_product_attention do; our custom ops have no autocast rule, so the
    wrappers cast their floating inputs here."""
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return tensors  # check_tensors names the culprit
    dtype = _autocast_dtype(tensors[0].device.type)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def promote_inputs(*tensors):
    """Elementwise and norm ops take mixed floating dtypes as eager PyTorch does (under
    autocast the residual stream is fp32 but shift/scale/gate come out of a Linear in bf16):
    every input is promoted to the widest dtype. Unsupported dtypes are left for
    check_tensors to name."""
    if not all(isinstance(t, torch.Tensor) and t.dtype in SUPPORTED_DTYPES for t in tensors):
        return tensors
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    return tuple(t.to(dtype) for t in tensors)


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
    check_device(first.device, op)


def check_device(device, op="fusedit.kernels.triton"):
    """A RuntimeError saying how to run the kernels unless they can run on `device`."""
    device = torch.device(device)
    if device.type == "cuda" or (device.type == "cpu" and INTERPRET):
        return
    if device.type == "cpu":
        raise RuntimeError(
            f"{op}: fusedit's triton kernels need a CUDA device, and this runs on the CPU. "
            "To run them on the CPU in Triton's (slow) interpreter, set TRITON_INTERPRET=1 in the "
            "environment before triton is imported (e.g. `TRITON_INTERPRET=1 python ...`), or use "
            "another op set (kernels='reference' in Python, --kernels reference on the command line)."
        )
    raise RuntimeError(f"{op}: tensors are on {device}; fusedit's triton kernels run on CUDA (or the CPU interpreter)")


def check_shape(op, name, tensor, shape):
    """shape: a tuple of ints or None (any size); raises a ValueError naming the mismatch."""
    if tensor.dim() != len(shape) or any(want is not None and got != want for got, want in zip(tensor.shape, shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{op}: {name} must have shape {want}, got {tuple(tensor.shape)}")


def check_row_channels(op, channels):
    if not 0 < channels <= MAX_ROW_CHANNELS:
        raise ValueError(f"{op}: the channel dim must be between 1 and {MAX_ROW_CHANNELS}, got {channels}")


def row_tiling(channels, tokens, tile_elements):
    """(block_channels, rows, num_warps) for a kernel that holds `rows` whole rows per program
    in a tile of about `tile_elements` (no more rows than one batch element has)."""
    block_channels = triton.next_power_of_2(channels)
    rows = max(1, min(tile_elements // block_channels, triton.next_power_of_2(tokens)))
    # 8 warps for a full tile, fewer for a smaller one (tiny C and T)
    num_warps = max(1, min(16, rows * block_channels * 8 // tile_elements))
    return block_channels, rows, num_warps


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_rows(device, groups, rows, rows_per_step):
    """How to cut `rows` rows into contiguous splits, one program each, for a reduction over
    rows that is finished by `sum_partials`: returns (splits, rows_per_split), rows_per_split a
    multiple of rows_per_step. `groups` independent programs run beside each split (batch
    elements, column blocks).

    Each split writes one fp32 partial row, so more splits fill the GPU better but move more
    bytes; PROGRAMS_PER_SM programs per SM is the compromise. The interpreter gets two splits
    per group so the tests cover the multi-split path cheaply.
    """
    if device.type == "cuda":
        wanted_programs = PROGRAMS_PER_SM * _multiprocessor_count(device.index or 0)
    else:
        wanted_programs = 2 * groups
    steps = max(1, triton.cdiv(rows, rows_per_step))
    # rounded down: one full wave of programs rather than a second, nearly empty one
    splits = max(1, min(steps, wanted_programs // max(groups, 1)))  # groups = 0: an empty batch
    rows_per_split = triton.cdiv(steps, splits) * rows_per_step
    return max(1, triton.cdiv(rows, rows_per_split)), rows_per_split


@triton.jit
def _sum_partials_kernel(partials_ptr, out_ptr, splits, width, BLOCK: tl.constexpr):
    # partials (groups, splits, width) fp32 -> out (groups, width): a fixed summation order,
    # so gradients are bit-identical from run to run (float atomics would not be).
    group = tl.program_id(0).to(tl.int64)  # axis 0: groups * batch may pass 65535
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = columns < width
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(splits):
        total += tl.load(partials_ptr + (group * splits + split) * width + columns, mask=in_bounds, other=0.0)
    tl.store(out_ptr + group * width + columns, total.to(out_ptr.dtype.element_ty), mask=in_bounds)


def sum_partials(partials, dtype):
    """partials (*groups, splits, width) fp32 -> (*groups, width) in `dtype`, summed over splits."""
    *groups, splits, width = partials.shape
    out = torch.empty((*groups, width), dtype=dtype, device=partials.device)
    if not out.numel():
        return out
    group_count = out.numel() // width
    block = min(1024, triton.next_power_of_2(width))
    grid = (group_count, triton.cdiv(width, block))
    with on_device(partials):
        _sum_partials_kernel[grid](partials, out, splits, width, BLOCK=block, num_warps=4, **LAUNCH_OPTIONS)
    return out
