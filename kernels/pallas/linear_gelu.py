"""Pallas (TPU) kernel: the MLP's first layer, gelu_tanh(x @ kernel + bias), in one pass.

Math: z = x @ kernel + bias, y = gelu_tanh(z) = 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))),
computed as z * sigmoid(2 sqrt(2/pi) (z + 0.044715 z^3)), as the Triton kernel does.
The bias add and the GELU run as the epilogue of a tiled matmul, on the float32
accumulator, so z never goes to HBM in inference. Under differentiation the kernel also
writes z (what autodiff of the unfused op would keep too), and the backward is

    dz = dy * gelu'(z),  dx = dz @ kernel^T,  dkernel = x^T dz,  dbias = sum_rows dz

left to XLA: two plain matmuls that XLA already runs at the MXU's peak, with the
elementwise gelu' fused into them as a producer.

Layouts: x (..., K) flattened to (M, K) rows; kernel (K, N), flax's layout (the
transpose of torch's Linear weight); bias (N,) entering as (1, N). Grid (M / block_m,
N / block_n, K / block_k) with a float32 VMEM accumulator; the K axis is sequential.
M runs as equal row blocks of at most block_m, multiples of 8 (padded up to them), unless
it fits in one block; block_n and block_k are the largest multiples of 128 dividing N and
K (or the whole dim).

Roofline at DiT-XL/2 (M = 32*256 = 8192 tokens, K = 1152, N = 4608, bf16): 2*M*K*N =
87 GFLOP. Each x tile is read once per column block and each kernel tile once per row
block; with the default 512 x 768 output tiles (768: the largest multiple of 128 <= 1024
dividing 4608) that is 6 x 18.9 MB of x + 16 x 10.6 MB of kernel + 75.5 MB written =
359 MB: ~240 flop/byte, a TPU v5e's ridge point (~0.44 ms either way). Unfused, z is
written and read back once more (+151 MB). VMEM, in training: double-buffered 512x384 and
384x768 input tiles and two 512x768 output tiles (y and z), the float32 accumulator and
about 3 float32 values of the epilogue's size: 11.5 MB in bf16; in fp32 that would be
16.5 MB, so the row blocks halve until the tiles fit _common.VMEM_BUDGET_BYTES (256 rows, 9.5 MB).
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import xla
from ._common import (SUBLANE, VMEM_BUDGET_BYTES, batch_sharded, check_arrays, check_block_size, check_shape,
                      even_blocks, lane_block, pallas_call, split_evenly, vmem_bytes)

F32 = jnp.float32
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
EPILOGUE_VALUES = 3  # float32 values of an output tile's size the epilogue holds: z, tanh's argument, tanh


def _gelu_sigmoid(z):
    """sigmoid(2u) = (1 + tanh(u)) / 2, u = sqrt(2/pi) (z + 0.044715 z^3): for very negative z,
    1 + tanh(u) cancels, and a tanh a few ulps off (XLA's on CPU since jax 0.11) put a lone
    output 1.3e-5 off in fp32; this form does not cancel."""
    return 1.0 / (1.0 + jnp.exp(-2.0 * SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)))


def gelu_tanh(z):
    return z * _gelu_sigmoid(z)


def gelu_tanh_derivative(z):
    """s + z s' with s = sigmoid(2u): s' = 2 s (1 - s) u', as 1 - tanh(u)^2 = 4 s (1 - s)."""
    sigmoid = _gelu_sigmoid(z)
    return sigmoid + 2.0 * z * sigmoid * (1.0 - sigmoid) * SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * z * z)


def _kernel(x_ref, kernel_ref, bias_ref, out_ref, *rest):
    *pre_activation_ref, accumulator_ref = rest

    @pl.when(pl.program_id(2) == 0)
    def _zero():
        accumulator_ref[...] = jnp.zeros(accumulator_ref.shape, F32)

    x = x_ref[...]
    precision = jax.lax.Precision.HIGHEST if x.dtype == F32 else None
    accumulator_ref[...] += jnp.dot(x, kernel_ref[...], precision=precision, preferred_element_type=F32)

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _epilogue():
        pre_activation = accumulator_ref[...] + bias_ref[...].astype(F32)
        out_ref[...] = gelu_tanh(pre_activation).astype(out_ref.dtype)
        if pre_activation_ref:
            pre_activation_ref[0][...] = pre_activation.astype(pre_activation_ref[0].dtype)


@functools.lru_cache(maxsize=None)
def _linear_gelu_op(block_m, block_n, block_k):
    """custom_vjp linear_gelu on (M, K) rows, M a multiple of block_m."""

    def run(x, kernel, bias, with_pre_activation):
        rows, inner = x.shape
        outer = kernel.shape[1]
        out = jax.ShapeDtypeStruct((rows, outer), x.dtype)
        out_spec = pl.BlockSpec((block_m, block_n), lambda i, j, k: (i, j))
        return pallas_call(
            _kernel,
            name="linear_gelu",
            grid=(rows // block_m, outer // block_n, inner // block_k),
            in_specs=[pl.BlockSpec((block_m, block_k), lambda i, j, k: (i, k)),
                      pl.BlockSpec((block_k, block_n), lambda i, j, k: (k, j)),
                      pl.BlockSpec((1, block_n), lambda i, j, k: (0, j))],
            out_specs=[out_spec] * (2 if with_pre_activation else 1),
            out_shape=[out] * (2 if with_pre_activation else 1),
            scratch_shapes=[pltpu.VMEM((block_m, block_n), F32)],
            semantics=("parallel", "parallel", "arbitrary"),
        )(x, kernel, bias)

    @jax.custom_vjp
    def linear_gelu(x, kernel, bias):
        return run(x, kernel, bias, with_pre_activation=False)[0]

    def forward(x, kernel, bias):
        out, pre_activation = run(x, kernel, bias, with_pre_activation=True)
        return out, (x, kernel, pre_activation)

    def backward(saved, d_out):
        x, kernel, pre_activation = saved
        d_pre_f32 = d_out.astype(F32) * gelu_tanh_derivative(pre_activation.astype(F32))
        d_pre = d_pre_f32.astype(x.dtype)
        # fp32 at full precision, as the forward kernel: a TPU's default would round the
        # operands of these two XLA matmuls through bf16
        precision = jax.lax.Precision.HIGHEST if x.dtype == F32 else None
        dx = jnp.dot(d_pre, kernel.T, precision=precision, preferred_element_type=F32).astype(x.dtype)
        dkernel = jnp.dot(x.T, d_pre, precision=precision, preferred_element_type=F32).astype(kernel.dtype)
        dbias = jnp.sum(d_pre_f32, axis=0, keepdims=True).astype(kernel.dtype)
        return dx, dkernel, dbias

    linear_gelu.defvjp(forward, backward)
    return linear_gelu


def _tiles_vmem_bytes(block_m, block_n, block_k, dtype):
    """VMEM of one training-time program (y and z written): see the module docstring."""
    inputs = vmem_bytes((block_m, block_k), dtype) + vmem_bytes((block_k, block_n), dtype)
    inputs += vmem_bytes((1, block_n), dtype)
    output_tile, accumulator_tile = vmem_bytes((block_m, block_n), dtype), vmem_bytes((block_m, block_n), F32)
    return 2 * inputs + 2 * 2 * output_tile + (1 + EPILOGUE_VALUES) * accumulator_tile


def _fitting_row_block(rows, block_m, block_n, block_k, dtype):
    """(row block, padded rows): even_blocks(rows, block_m), then twice as many equal row
    blocks until the tiles fit VMEM_BUDGET_BYTES (300 rows in one block too big: 2 of 152).
    Every row block reads all of the kernel again, so the blocks stay as large as fit."""
    row_block, padded_rows = even_blocks(rows, block_m)
    while row_block > SUBLANE and _tiles_vmem_bytes(row_block, block_n, block_k, dtype) > VMEM_BUDGET_BYTES:
        row_block, padded_rows = split_evenly(rows, 2 * (padded_rows // row_block))
    return row_block, padded_rows


def linear_gelu(x, kernel, bias, *, block_m=512, block_n=1024, block_k=512):
    """gelu_tanh(x @ kernel + bias); x (..., K), kernel (K, N) (flax layout), bias (N,).

    float32 or bfloat16. block_m (multiple of 8), block_n and block_k (multiples of 128)
    are upper bounds on the tile sizes; block_m shrinks further until the tiles fit VMEM.
    """
    op = "linear_gelu"
    check_arrays(op, x=x, kernel=kernel, bias=bias)
    if x.ndim < 2:
        raise ValueError(f"{op}: x must be (..., K) with a leading batch dim, got shape {tuple(x.shape)}")
    inner = x.shape[-1]
    check_shape(op, "kernel", kernel, (inner, None))
    outer = kernel.shape[1]
    check_shape(op, "bias", bias, (outer,))
    check_block_size(op, "block_m", block_m, SUBLANE)
    check_block_size(op, "block_n", block_n, 128)
    check_block_size(op, "block_k", block_k, 128)
    if not (x.size and kernel.size):  # an empty array: no work for a kernel, nor a block to tile it with
        return xla.linear_gelu(x, kernel, bias)
    block_n, block_k = lane_block(outer, block_n), lane_block(inner, block_k)

    def per_shard(x, kernel, bias):
        rows = math.prod(x.shape[:-1])
        row_block, padded_rows = _fitting_row_block(rows, block_m, block_n, block_k, x.dtype)
        flat = jnp.pad(x.reshape(rows, inner), ((0, padded_rows - rows), (0, 0)))
        out = _linear_gelu_op(row_block, block_n, block_k)(flat, kernel, bias[None, :])
        return out[:rows].reshape(*x.shape[:-1], outer)

    return batch_sharded(op, per_shard, x, kernel, bias, batched=(True, False, False))
