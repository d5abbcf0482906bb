"""adaLN modulation in one pass over each row: LayerNorm (no affine) then `*(1+scale)+shift`.

Math, per row (b, t) of C channels, in fp32 whatever the storage dtype:
    mean = sum_c x / C,   var = sum_c (x - mean)^2 / C,   rstd = 1 / sqrt(var + eps)
    normed = (x - mean) * rstd
    out = normed * (1 + scale[b]) + shift[b]
Backward, with g = d out:
    d shift[b] = sum_t g                       d scale[b] = sum_t g * normed
    d normed   = g * (1 + scale[b])
    d x        = rstd * (d normed - mean_c(d normed) - normed * mean_c(d normed * normed))

Layouts: x, out (B, T, C), shift/scale (B, C); all made contiguous on purpose (the DiT's
activations already are; chunked adaLN vectors are (B, C) and copying them is free), so the
channel dim has unit stride. One program holds ROWS whole rows (C padded to a power of two,
masked) in registers: the statistics and the output come from a single read of x. Nothing
is saved but the inputs: the backward recomputes mean and rstd from the row it has to read
anyway, which costs a few flops per element and no bytes.

dshift/dscale are sums over T. The backward gives each program a contiguous run of tokens of
one batch element; it accumulates its share in fp32 registers and writes it to a
(2, B, splits, C) fp32 scratch, which `_common.sum_partials` adds up in a fixed order: the
gradients do not change from run to run (float atomics would make them depend on timing).

The same two kernels, with a residual prologue `x + gate*y` (RESIDUAL) and/or without the
normalization (MODULATE=False), also run gated_residual.py's ops; their rooflines are there.

Roofline at DiT-XL/2 (B=32, T=256, C=1152: 9.44M elements, 18.9 MB per (B,T,C) tensor in
bf16/fp16, 37.7 MB in fp32; the (B,C) vectors are 74 KB and ignored below):
    forward   reads x, writes out:                2 tensors = 37.7 MB (75.5 MB fp32)
              ~8 flops/element = 0.08 GFLOP: ~2 flops/byte, far below the H100 ridge
              (~300 flops/byte), so memory-bound: 11.3 us at 3.35 TB/s.
    backward  reads x and d out, writes d x:       3 tensors = 56.6 MB (113 MB fp32)
              + fp32 partials: 2 * B * splits * C * 4 B written and read again; on an H100
              (132 SMs) splits = 8, so 2.4 MB each way (~8%, mostly served from L2)
              ~20 flops/element = 0.19 GFLOP; memory-bound: 16.9 us at 3.35 TB/s.
Target: >= 85% of the measured copy bandwidth, forward and backward.
"""
import math
import numbers

import torch
import triton
import triton.language as tl

from ._common import (
    BACKWARD_TILE_ELEMENTS,
    FORWARD_TILE_ELEMENTS,
    LAUNCH_OPTIONS,
    check_row_channels,
    check_shape,
    check_tensors,
    on_device,
    promote_inputs,
    row_tiling,
    split_rows,
    sum_partials,
)


@triton.jit
def _normalize_rows(x, column_ok, channels, eps):
    """LayerNorm statistics of a (ROWS, BLOCK_C) fp32 tile whose padding is 0: normed, rstd.
    Padding columns come out 0, so they drop out of every later sum over channels."""
    mean = tl.sum(x, axis=1) / channels
    centered = tl.where(column_ok[None, :], x - mean[:, None], 0.0)
    variance = tl.sum(centered * centered, axis=1) / channels
    rstd = 1.0 / tl.sqrt(variance + eps)  # not tl.rsqrt: libdevice fails in the interpreter
    return centered * rstd[:, None], rstd


@triton.jit
def _modulate_forward_kernel(
    x_ptr, gate_ptr, y_ptr, shift_ptr, scale_ptr,
    x_new_ptr, out_ptr,
    tokens, channels, eps,
    RESIDUAL: tl.constexpr, MODULATE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # one grid axis for batch x token blocks: axis 0 holds 2**31 - 1 programs, axes 1 and 2
    # only 65535 (too few for a batch of 65536 images, or for 70000 tokens one row a program)
    program = tl.program_id(0)
    token_blocks = tl.cdiv(tokens, ROWS)
    batch = (program // token_blocks).to(tl.int64)
    token = (program % token_blocks) * ROWS + tl.arange(0, ROWS)
    column = tl.arange(0, BLOCK_C)
    column_ok = column < channels
    in_bounds = (token < tokens)[:, None] & column_ok[None, :]
    offsets = (batch * tokens + token)[:, None] * channels + column[None, :]
    vector_offsets = batch * channels + column

    x = tl.load(x_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    if RESIDUAL:
        gate = tl.load(gate_ptr + vector_offsets, mask=column_ok, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        x += gate[None, :] * y
        tl.store(x_new_ptr + offsets, x.to(x_new_ptr.dtype.element_ty), mask=in_bounds)
    if MODULATE:
        # statistics of the fp32 sum, not of its rounded copy: closer to the exact chain
        normed, rstd = _normalize_rows(x, column_ok, channels, eps)
        shift = tl.load(shift_ptr + vector_offsets, mask=column_ok, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + vector_offsets, mask=column_ok, other=0.0).to(tl.float32)
        out = normed * (1.0 + scale[None, :]) + shift[None, :]
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def _modulate_backward_kernel(
    x_ptr, gate_ptr, y_ptr, scale_ptr,
    grad_out_ptr, grad_x_new_ptr,
    grad_x_ptr, grad_y_ptr, partials_ptr,
    batches, tokens, channels, rows_per_split, eps,
    RESIDUAL: tl.constexpr, MODULATE: tl.constexpr, HAS_GRAD_X_NEW: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # partials (groups, batches, splits, channels): groups shift, scale (MODULATE) then gate
    # (RESIDUAL). Without MODULATE, d x is d x_new itself and is not written again.
    split = tl.program_id(1)  # splits: a few per SM at most, well inside axis 1's 65535
    splits = tl.num_programs(1)
    batch = tl.program_id(0).to(tl.int64)
    column = tl.arange(0, BLOCK_C)
    column_ok = column < channels
    vector_offsets = batch * channels + column
    if RESIDUAL:
        gate = tl.load(gate_ptr + vector_offsets, mask=column_ok, other=0.0).to(tl.float32)
    if MODULATE:
        scale = tl.load(scale_ptr + vector_offsets, mask=column_ok, other=0.0).to(tl.float32)
    sum_grad_shift = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_grad_scale = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_grad_gate = tl.zeros((BLOCK_C,), dtype=tl.float32)

    first_token = split * rows_per_split
    for step in range(0, rows_per_split, ROWS):
        token = first_token + step + tl.arange(0, ROWS)
        in_bounds = (token < tokens)[:, None] & column_ok[None, :]
        offsets = (batch * tokens + token)[:, None] * channels + column[None, :]
        if RESIDUAL:
            y = tl.load(y_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        if MODULATE:
            x = tl.load(x_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
            if RESIDUAL:
                x += gate[None, :] * y
            normed, rstd = _normalize_rows(x, column_ok, channels, eps)
            # a padding row (token past T) has variance 0: with eps = 0 its normed is 0 * inf = NaN,
            # which the sums over tokens below must not see
            normed = tl.where(in_bounds, normed, 0.0)
            grad_out = tl.load(grad_out_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
            sum_grad_shift += tl.sum(grad_out, axis=0)
            sum_grad_scale += tl.sum(grad_out * normed, axis=0)
            grad_normed = grad_out * (1.0 + scale[None, :])
            mean_grad = tl.sum(grad_normed, axis=1) / channels
            mean_grad_dot_normed = tl.sum(grad_normed * normed, axis=1) / channels
            grad_x = (grad_normed - mean_grad[:, None] - normed * mean_grad_dot_normed[:, None]) * rstd[:, None]
            if HAS_GRAD_X_NEW:
                grad_x += tl.load(grad_x_new_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
            grad_x = tl.where(in_bounds, grad_x, 0.0)
            tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=in_bounds)
        else:
            grad_x = tl.load(grad_x_new_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        if RESIDUAL:
            sum_grad_gate += tl.sum(grad_x * y, axis=0)
            grad_y = gate[None, :] * grad_x
            tl.store(grad_y_ptr + offsets, grad_y.to(grad_y_ptr.dtype.element_ty), mask=in_bounds)

    group_stride = splits.to(tl.int64) * batches * channels  # int32 would wrap once B*C passes 2^30 in the chain
    partial_offsets = (batch * splits + split) * channels + column
    if MODULATE:
        tl.store(partials_ptr + partial_offsets, sum_grad_shift, mask=column_ok)
        tl.store(partials_ptr + group_stride + partial_offsets, sum_grad_scale, mask=column_ok)
        gate_group = 2
    else:
        gate_group = 0
    if RESIDUAL:
        tl.store(partials_ptr + gate_group * group_stride + partial_offsets, sum_grad_gate, mask=column_ok)


def modulate_forward(x, shift=None, scale=None, eps=1e-6, gate=None, y=None):
    """Launches the forward kernel on contiguous (B,T,C) / (B,C) tensors.

    With gate and y: x_new = x + gate*y is computed (and returned first); with shift and
    scale: the LayerNorm-modulated result is returned (last). Returns a tuple of outputs."""
    batches, tokens, channels = x.shape
    residual, modulate = gate is not None, shift is not None
    block_channels, rows, num_warps = row_tiling(channels, tokens, FORWARD_TILE_ELEMENTS)
    x_new = torch.empty((batches, tokens, channels), dtype=x.dtype, device=x.device) if residual else None
    out = torch.empty((batches, tokens, channels), dtype=x.dtype, device=x.device) if modulate else None
    if x.numel():
        grid = (batches * triton.cdiv(tokens, rows),)
        with on_device(x):
            _modulate_forward_kernel[grid](
                x, gate, y, shift, scale, x_new, out, tokens, channels, eps,
                RESIDUAL=residual, MODULATE=modulate, ROWS=rows, BLOCK_C=block_channels, num_warps=num_warps,
                **LAUNCH_OPTIONS,
            )
    return tuple(tensor for tensor in (x_new, out) if tensor is not None)


def modulate_backward(grad_out, x, scale=None, eps=1e-6, gate=None, y=None, grad_x_new=None):
    """Backward of modulate_forward (same optional arguments); contiguous tensors.

    grad_out: d out (MODULATE) and grad_x_new: d x_new (RESIDUAL; may be None when only
    out was used). Returns (grad_x or None, grad_y or None, grad_vectors) where grad_vectors
    (groups, B, C) stacks d shift, d scale (MODULATE) and d gate (RESIDUAL) in that order;
    grad_x is None without MODULATE because it equals grad_x_new."""
    batches, tokens, channels = x.shape
    residual, modulate = gate is not None, scale is not None
    block_channels, rows, num_warps = row_tiling(channels, tokens, BACKWARD_TILE_ELEMENTS)
    splits, rows_per_split = split_rows(x.device, batches, tokens, rows)
    groups = 2 * modulate + residual
    shape = (batches, tokens, channels)
    grad_x = torch.empty(shape, dtype=x.dtype, device=x.device) if modulate else None
    grad_y = torch.empty(shape, dtype=x.dtype, device=x.device) if residual else None
    partials = torch.empty((groups, batches, splits, channels), dtype=torch.float32, device=x.device)
    if x.numel():
        with on_device(x):
            _modulate_backward_kernel[(batches, splits)](
                x, gate, y, scale, grad_out, grad_x_new, grad_x, grad_y, partials,
                batches, tokens, channels, rows_per_split, eps,
                RESIDUAL=residual, MODULATE=modulate, HAS_GRAD_X_NEW=grad_x_new is not None,
                ROWS=rows, BLOCK_C=block_channels, num_warps=num_warps, **LAUNCH_OPTIONS,
            )
    else:
        partials.zero_()
    return grad_x, grad_y, sum_partials(partials, x.dtype)


@torch.library.custom_op("fusedit::adaln_modulate", mutates_args=())
def _adaln_modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    (out,) = modulate_forward(x.contiguous(), shift.contiguous(), scale.contiguous(), eps)
    return out


@_adaln_modulate_op.register_fake
def _(x, shift, scale, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("fusedit::adaln_modulate_backward", mutates_args=())
def _adaln_modulate_backward_op(
    grad_out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_x, _, grad_vectors = modulate_backward(grad_out.contiguous(), x.contiguous(), scale.contiguous(), eps)
    return grad_x, grad_vectors


@_adaln_modulate_backward_op.register_fake
def _(grad_out, x, scale, eps):
    return x.new_empty(x.shape), x.new_empty((2, *scale.shape))


def _setup_context(ctx, inputs, output):
    x, _, scale, eps = inputs
    ctx.save_for_backward(x, scale)
    ctx.eps = eps


def _backward(ctx, grad_out):
    x, scale = ctx.saved_tensors
    grad_x, grad_vectors = _adaln_modulate_backward_op(grad_out, x, scale, ctx.eps)
    grad_shift, grad_scale = grad_vectors.unbind(0)
    return grad_x, grad_shift, grad_scale, None


_adaln_modulate_op.register_autograd(_backward, setup_context=_setup_context)


def check_modulate_inputs(op, x, y=None, eps=0.0, **vectors):
    """x (B,T,C), y (optional) of x's shape, (B,C) vectors; one floating dtype, one Triton device;
    eps a finite number >= 0 (a negative one makes the rsqrt of a small variance NaN)."""
    if not (isinstance(eps, numbers.Real) and 0 <= eps < math.inf):
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")
    branch = {} if y is None else {"y": y}
    check_tensors(op, x=x, **branch, **vectors)
    check_shape(op, "x", x, (None, None, None))
    check_row_channels(op, x.shape[-1])
    if y is not None:
        check_shape(op, "y", y, tuple(x.shape))
    for name, vector in vectors.items():
        check_shape(op, name, vector, (x.shape[0], x.shape[2]))


def adaln_modulate(x, shift, scale, eps=1e-6):
    """LayerNorm(x) * (1 + scale) + shift with x (B,T,C), shift/scale (B,C); fp32 statistics."""
    x, shift, scale = promote_inputs(x, shift, scale)
    check_modulate_inputs("adaln_modulate", x, eps=eps, shift=shift, scale=scale)
    return _adaln_modulate_op(x, shift, scale, float(eps))
