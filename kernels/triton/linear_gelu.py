"""MLP fc1 in one kernel: out = gelu_tanh(x @ weight.T + bias), for any leading shape of x.

Math (fp32 accumulation and epilogue, storage dtype in memory), z the pre-activation:
    z = x @ weight.T + bias
    gelu_tanh(z) = 0.5 z (1 + tanh(u)) = z * sigmoid(2u),  u = sqrt(2/pi) (z + 0.044715 z^3)
    (the sigmoid form needs no libdevice tanh, which the interpreter lacks, and does not
    cancel for very negative z the way 1 + tanh(u) does)
Backward, with g = d out and s = sigmoid(2u):
    d z = g * (s + z s (1 - s) * 2 sqrt(2/pi) (1 + 3 * 0.044715 z^2))
    d x = d z @ weight,   d weight = d z^T @ x,   d bias = sum over rows of d z

Layouts: x (..., K) is viewed as (M, K) row-major, weight (N, K) as nn.Linear stores it,
out (..., N); all made contiguous on purpose. The forward is a tiled matmul (program = one
BLOCK_M x BLOCK_N tile of out, launched in groups of GROUP_M row tiles so that they reuse
the same weight tiles from L2) with bias and GELU applied to the fp32 accumulator before the
single store. fp32 inputs are multiplied in full fp32 (input_precision="ieee"): TF32 would
miss the 1e-5 tolerance.

The backward needs z. It stores it (only when a gradient will be needed: nothing extra is
written under torch.no_grad, e.g. while sampling) instead of recomputing it, and stores it
in fp32. Recomputing costs another 87 GFLOP matmul at DiT-XL/2 (~90 us at the bf16
tensor-core peak); storing fp32 z costs 151 MB written and read back (~45 us each way at
3.35 TB/s). fp32 rather than the storage dtype because gelu'(z) is steep where GELU bends:
a z rounded to fp16 moved d bias (a sum of cancelling terms) by up to 5.6e-3 of its size in
the tests (eager PyTorch, which keeps a 16-bit z: 2.1e-2), past the 2e-3 tolerance; fp32 z
keeps it at ~1e-5. The bytes still match cuBLAS + GELU's (see below), whose backward also
needs a separate pass over d z for d bias. The backward's GELU derivative is one fused
elementwise kernel that also produces d bias (fp32 partial column sums per program, added
in a fixed order by a second small kernel: deterministic) and writes d z in the storage
dtype for the two matmuls, which go to torch.matmul (cuBLAS).

Roofline at DiT-XL/2 fc1 (M = B*T = 32*256 = 8192, K = 1152, N = 4608; bf16/fp16 sizes,
fp32 doubles them; 989 TFLOP/s dense bf16 and 3.35 TB/s on an H100 SXM):
    forward   2 M N K = 87.0 GFLOP (+ ~0.6 GFLOP GELU) -> 88 us of tensor-core time
              reads x 18.9 MB + weight 10.6 MB, writes out 75.5 MB, + fp32 z 151 MB when
              training: 105 MB (256 MB) -> 31 us (76 us), under the matmul's time:
              compute-bound. cuBLAS + a separate GELU writes z, reads it back and writes
              out: 151 MB more than this kernel without grad, the same bytes in training
              (75.5 + 151 vs 226 MB), one launch more.
    backward  GELU': reads g 75.5 MB + fp32 z 151 MB, writes d z 75.5 MB: 302 MB -> 90 us
              (memory-bound), d bias included; unfused: GELU' 226 MB + d bias's pass over
              d z 75.5 MB = the same 302 MB in two launches.
              d x and d weight: 2 x 87.0 GFLOP -> 176 us (cuBLAS)
Target: at least as fast as cuBLAS matmul followed by a separate GELU, forward and backward.
"""
import math

import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, LAUNCH_OPTIONS, autocast_inputs, check_shape, check_tensors, on_device,
                      split_rows, sum_partials)

SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
GELU_CUBIC = tl.constexpr(0.044715)
# GELU-backward tile: 16 rows x 256 columns = 4096 elements per step, 16 per thread at 8 warps.
GELU_BACKWARD_COLUMNS = 256
GELU_BACKWARD_ROWS = 16


def _matmul_configs():
    if INTERPRET:  # autotuning needs a GPU driver: exactly one (small) config
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    # H100: large tiles for 16-bit tensor cores, smaller ones for fp32 and small problems.
    # Configs that exceed shared memory are rejected by the autotuner (out of resources).
    shapes = [
        (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
        (64, 256, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 3),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=warps, num_stages=stages)
        for m, n, k, warps, stages in shapes
    ]


@triton.jit
def _gelu_sigmoid(z):
    """sigmoid(2u), u the tanh-GELU argument, so that gelu_tanh(z) = z * _gelu_sigmoid(z)."""
    u = SQRT_2_OVER_PI * (z + GELU_CUBIC * z * z * z)
    # exp of a non-positive number only: no overflow to inf for very negative z
    decay = tl.exp(-2.0 * tl.abs(u))
    return tl.where(u >= 0, 1.0, decay) / (1.0 + decay)


@triton.autotune(configs=_matmul_configs(), key=["rows", "columns", "depth", "STORE_PREACTIVATION"])
@triton.heuristics({"EVEN_K": lambda args: args["depth"] % args["BLOCK_K"] == 0})
@triton.jit
def _linear_gelu_kernel(
    x_ptr, weight_ptr, bias_ptr, out_ptr, preactivation_ptr,
    rows, columns, depth,
    STORE_PREACTIVATION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    # consecutive programs walk down GROUP_M row tiles before moving to the next column
    # tile, so a weight tile is fetched from HBM once per group rather than once per tile
    program = tl.program_id(0)
    row_tiles = tl.cdiv(rows, BLOCK_M)
    column_tiles = tl.cdiv(columns, BLOCK_N)
    programs_per_group = GROUP_M * column_tiles
    first_row_tile = (program // programs_per_group) * GROUP_M
    group_rows = tl.minimum(row_tiles - first_row_tile, GROUP_M)
    row_tile = first_row_tile + (program % programs_per_group) % group_rows
    column_tile = (program % programs_per_group) // group_rows

    row = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    column = column_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    # out-of-range rows/columns wrap onto valid ones, so the loads in the K loop need no
    # row/column masks; their results are never stored
    safe_row = (row % rows).to(tl.int64)
    safe_column = (column % columns).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    x_tile = x_ptr + safe_row[:, None] * depth + k[None, :]
    weight_tile = weight_ptr + safe_column[None, :] * depth + k[:, None]

    accumulator = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, depth, BLOCK_K):
        if EVEN_K:
            x_block = tl.load(x_tile)
            weight_block = tl.load(weight_tile)
        else:
            k_ok = k_start + k < depth
            x_block = tl.load(x_tile, mask=k_ok[None, :], other=0.0)
            weight_block = tl.load(weight_tile, mask=k_ok[:, None], other=0.0)
        if DOT_IN_FP32:  # the interpreter's bf16 dot is wrong; fp32 operands are exact
            x_block = x_block.to(tl.float32)
            weight_block = weight_block.to(tl.float32)
        # "ieee": fp32 storage must not drop to TF32; 16-bit operands ignore the setting
        accumulator = tl.dot(x_block, weight_block, accumulator, input_precision="ieee")
        x_tile += BLOCK_K
        weight_tile += BLOCK_K

    preactivation = accumulator + tl.load(bias_ptr + safe_column).to(tl.float32)[None, :]
    in_bounds = (row < rows)[:, None] & (column < columns)[None, :]
    # a 64-bit tile base and 32-bit offsets inside the tile: an int64 offset per element
    # would take two of the registers the accumulator needs (it spilled)
    tile_start = (row_tile * BLOCK_M).to(tl.int64) * columns + column_tile * BLOCK_N
    offsets = tl.arange(0, BLOCK_M)[:, None] * columns + tl.arange(0, BLOCK_N)[None, :]
    if STORE_PREACTIVATION:
        tl.store(preactivation_ptr + tile_start + offsets, preactivation, mask=in_bounds)
    out = preactivation * _gelu_sigmoid(preactivation)
    tl.store(out_ptr + tile_start + offsets, out.to(out_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def _gelu_backward_kernel(
    grad_out_ptr, preactivation_ptr, grad_preactivation_ptr, partials_ptr,
    rows, columns, rows_per_split,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # partials (splits, columns): this program's fp32 share of d bias
    split = tl.program_id(0)
    column = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    column_ok = column < columns
    sum_grad = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first_row = split * rows_per_split
    for step in range(0, rows_per_split, ROWS):
        row = first_row + step + tl.arange(0, ROWS)
        in_bounds = (row < rows)[:, None] & column_ok[None, :]
        offsets = row.to(tl.int64)[:, None] * columns + column[None, :]
        grad_out = tl.load(grad_out_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        z = tl.load(preactivation_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        sigmoid = _gelu_sigmoid(z)
        du_dz = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * z * z)
        grad_z = grad_out * (sigmoid + z * sigmoid * (1.0 - sigmoid) * 2.0 * du_dz)
        sum_grad += tl.sum(grad_z, axis=0)  # masked elements have grad_out = 0
        tl.store(grad_preactivation_ptr + offsets, grad_z.to(grad_preactivation_ptr.dtype.element_ty), mask=in_bounds)
    tl.store(partials_ptr + split * columns + column, sum_grad, mask=column_ok)


def linear_gelu_forward(x, weight, bias, save_preactivation):
    """x (M, K), weight (N, K), bias (N,), contiguous -> (out (M, N), fp32 z (M, N) or empty)."""
    rows, depth = x.shape
    columns = weight.shape[0]
    out = torch.empty((rows, columns), dtype=x.dtype, device=x.device)
    preactivation_shape = (rows, columns) if save_preactivation else (0,)
    preactivation = torch.empty(preactivation_shape, dtype=torch.float32, device=x.device)
    if out.numel():
        def grid(meta):
            return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(columns, meta["BLOCK_N"]),)

        with on_device(x):
            _linear_gelu_kernel[grid](
                x, weight, bias, out, preactivation, rows, columns, depth,
                STORE_PREACTIVATION=save_preactivation, DOT_IN_FP32=INTERPRET, **LAUNCH_OPTIONS,
            )
    return out, preactivation


def gelu_backward(grad_out, preactivation):
    """grad_out (M, N), fp32 z (M, N), contiguous -> (d z, d bias (N,)) in grad_out's dtype."""
    rows, columns = preactivation.shape
    block_columns = min(GELU_BACKWARD_COLUMNS, triton.next_power_of_2(max(columns, 1)))
    column_blocks = triton.cdiv(columns, block_columns)
    splits, rows_per_split = split_rows(preactivation.device, column_blocks, rows, GELU_BACKWARD_ROWS)
    grad_preactivation = torch.empty((rows, columns), dtype=grad_out.dtype, device=grad_out.device)
    partials = torch.empty((splits, columns), dtype=torch.float32, device=preactivation.device)
    if preactivation.numel():
        with on_device(grad_out):
            _gelu_backward_kernel[(splits, column_blocks)](
                grad_out, preactivation, grad_preactivation, partials, rows, columns, rows_per_split,
                ROWS=GELU_BACKWARD_ROWS, BLOCK_N=block_columns, num_warps=8, **LAUNCH_OPTIONS,
            )
    else:
        partials.zero_()
    return grad_preactivation, sum_partials(partials, grad_out.dtype)


@torch.library.custom_op("fusedit::linear_gelu", mutates_args=())
def _linear_gelu_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, save_preactivation: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out, z): z in fp32, an empty tensor unless save_preactivation."""
    columns, leading = weight.shape[0], x.shape[:-1]
    # reshape(-1, K) cannot infer the rows when K = 0, hence the product
    out, preactivation = linear_gelu_forward(
        x.reshape(math.prod(leading), x.shape[-1]).contiguous(), weight.contiguous(), bias.contiguous(),
        save_preactivation,
    )
    return out.view(*leading, columns), preactivation.view(*leading, columns) if save_preactivation else preactivation


@_linear_gelu_op.register_fake
def _(x, weight, bias, save_preactivation):
    shape = (*x.shape[:-1], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if save_preactivation else (0,), dtype=torch.float32)


@torch.library.custom_op("fusedit::gelu_tanh_backward", mutates_args=())
def _gelu_backward_op(grad_out: torch.Tensor, preactivation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., N) gradient and fp32 pre-activation -> (d z (..., N), d bias (N,)), grad_out's dtype."""
    columns = preactivation.shape[-1]
    rows = math.prod(preactivation.shape[:-1])
    grad_preactivation, grad_bias = gelu_backward(
        grad_out.reshape(rows, columns).contiguous(), preactivation.reshape(rows, columns).contiguous()
    )
    return grad_preactivation.view(preactivation.shape), grad_bias


@_gelu_backward_op.register_fake
def _(grad_out, preactivation):
    return grad_out.new_empty(preactivation.shape), grad_out.new_empty(preactivation.shape[-1:])


def _setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, preactivation = output
    ctx.save_for_backward(x, weight, bias, preactivation)
    ctx.mark_non_differentiable(preactivation)
    ctx.set_materialize_grads(False)  # no (M, N) zero tensor for z's gradient


def _backward(ctx, grad_out, _grad_preactivation):
    x, weight, bias, preactivation = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None
    if preactivation.numel() != grad_out.numel():
        # the op was called with save_preactivation=False while a gradient is wanted (the
        # public wrapper never does this): recompute z rather than fail
        preactivation = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
    grad_preactivation, grad_bias = _gelu_backward_op(grad_out, preactivation)
    grad_x = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.matmul(grad_preactivation, weight)
    if ctx.needs_input_grad[1]:
        columns, depth = weight.shape
        rows = math.prod(x.shape[:-1])
        grad_weight = torch.matmul(grad_preactivation.reshape(rows, columns).t(), x.reshape(rows, depth))
    return grad_x, grad_weight, grad_bias, None


_linear_gelu_op.register_autograd(_backward, setup_context=_setup_context)


def linear_gelu(x, weight, bias):
    """gelu_tanh(x @ weight.T + bias); x (..., K), weight (N, K), bias (N,)."""
    x, weight, bias = autocast_inputs(x, weight, bias)
    check_tensors("linear_gelu", x=x, weight=weight, bias=bias)
    if x.dim() < 1:
        raise ValueError("linear_gelu: x must have at least one dimension (..., K), got a scalar")
    check_shape("linear_gelu", "weight", weight, (None, x.shape[-1]))
    check_shape("linear_gelu", "bias", bias, (weight.shape[0],))
    # z is stored for the backward only when one will run (not while sampling)
    save_preactivation = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)
    out, _ = _linear_gelu_op(x, weight, bias, save_preactivation)
    return out
