"""Pallas (TPU) kernels: adaLN modulation, and the residual chain between a block's halves.

Math, per sample b and token row x of C channels (LayerNorm without affine, eps 1e-6):

    adaln_modulate            y  = xhat * (1 + scale_b) + shift_b,   xhat = (x - mean x) * rstd,
                                   rstd = 1 / sqrt(var x + eps)
    residual_adaln_modulate   x' = x + gate_b * r;   y = adaln_modulate(x')   -> (x', y)

Backward (g = dy * (1 + scale)):

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  dscale = sum_T dy * xhat,  dshift = sum_T dy
    chain: dx' = dx'_in + dx(adaln of x'),  dr = gate * dx',  dgate = sum_T r * dx'

Layouts: x, r, y (B, T, C) row-major, channels on the lane (last) axis; the per-sample
vectors shift/scale/gate (B, C) enter the kernels as (B, 1, C), so each block's last two
dims (1, C) equal the array's own and obey TPU tiling. Grid (B, T / block_tokens); in the
backward the token axis is sequential ("arbitrary") because dshift/dscale/dgate
accumulate in a float32 output block that stays resident across it. Statistics are
float32 whatever the storage dtype; the backward recomputes mean/rstd from the saved
input rather than storing them (two (B,T) arrays that would need a lane-padded layout).
The chain normalizes the float32 sum x + gate * r, not x' rounded to storage, and saves x
rather than x' (x is kept alive by the block's first adaln_modulate anyway): its backward
rebuilds x' in float32 from the x and r it reads, as the Triton chain does.

Roofline at DiT-XL/2 (B=32, T=256, C=1152: 9.4M elements, 18.9 MB per bf16 array),
~10 flops per element, so every op here is memory-bound (~0.3 flop/byte):
    adaln_modulate       fwd: read x, write y              = 37.7 MB,  94 MFLOP
                         bwd: read x, dy; write dx         = 56.6 MB, 170 MFLOP
    residual chain       fwd: read x, r; write x', y       = 75.5 MB, 113 MFLOP
                         bwd: read x, r, dx'_in, dy; write dx, dr  = 113 MB, 226 MFLOP
Unfused, the chain writes x' and reads it back for the norm (+37.7 MB forward). At
~0.8-1.2 TB/s of HBM (TPU v5e/v4) the chain forward is ~65-95 us per block.

VMEM: a token block's rows sit in VMEM twice each (double-buffered), beside the float32
(block, C) values the kernel computes; the chain's backward holds 6 row blocks and about 8
such values. By default each op takes the most tokens per block, up to 256, whose forward
and backward both fit _common.VMEM_BUDGET_BYTES (fitting_block_tokens): at DiT-XL/2's
C=1152 and T=256, blocks of 256 tokens for adaln_modulate in bf16, and of 128 in fp32 and
for the chain (the largest multiples of 8 dividing 256 under 224, 192 and 136). At 256
tokens the chain's backward would take, by this estimate, 16.5 MB in bf16 and 23.6 MB in
fp32: about all or more of the 16 MiB (16.8 MB) a TPU v4/v5e kernel gets, with nothing
left for Mosaic's own scratch.
"""
import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import xla
from ._common import (LANE, SUBLANE, VMEM_BUDGET_BYTES, batch_sharded, check_arrays, check_block_size, check_shape,
                      pallas_call, token_tiling)

F32 = jnp.float32
MAX_BLOCK_TOKENS = 256
# per op, forward then backward: the (block, C) row blocks a kernel reads and writes, and the
# float32 (block, C) values it holds at once besides them (an estimate: x, xhat, g, dx, ...)
_ROW_FOOTPRINTS = {"adaln_modulate": ((2, 3), (3, 6)), "residual_adaln_modulate": ((4, 4), (6, 8))}


def _normalize(x, eps):
    """(xhat, rstd) of float32 rows x (rows, C)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centered = x - mean
    rstd = jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + eps)
    return centered * rstd, rstd


def _modulate(x, shift, scale, eps):
    normed, _ = _normalize(x, eps)
    return normed * (1 + scale) + shift


def _modulate_backward(x, scale, d_out, eps):
    """(dx, dshift partial, dscale partial) of one block of float32 rows."""
    normed, rstd = _normalize(x, eps)
    g = d_out * (1 + scale)
    dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True) - normed * jnp.mean(g * normed, axis=-1, keepdims=True))
    return dx, jnp.sum(d_out, axis=0, keepdims=True), jnp.sum(d_out * normed, axis=0, keepdims=True)


def _accumulate_over_tokens(pairs):
    """ref += value for every (ref, value); the refs are zeroed on the first token block."""
    @pl.when(pl.program_id(1) == 0)
    def _zero():
        for ref, _ in pairs:
            ref[...] = jnp.zeros(ref.shape, ref.dtype)

    for ref, value in pairs:
        ref[...] += value


def _modulate_kernel(x_ref, shift_ref, scale_ref, out_ref, *, eps):
    out = _modulate(x_ref[...].astype(F32), shift_ref[...].astype(F32), scale_ref[...].astype(F32), eps)
    out_ref[...] = out.astype(out_ref.dtype)


def _modulate_backward_kernel(x_ref, scale_ref, d_out_ref, dx_ref, dshift_ref, dscale_ref, *, eps):
    dx, dshift, dscale = _modulate_backward(x_ref[...].astype(F32), scale_ref[...].astype(F32),
                                            d_out_ref[...].astype(F32), eps)
    dx_ref[...] = dx.astype(dx_ref.dtype)
    _accumulate_over_tokens([(dshift_ref, dshift), (dscale_ref, dscale)])


def _residual_sum(x_ref, gate_ref, residual_ref):
    """x' = x + gate * r of one block, in float32."""
    return x_ref[...].astype(F32) + gate_ref[...].astype(F32) * residual_ref[...].astype(F32)


def _chain_kernel(x_ref, gate_ref, residual_ref, shift_ref, scale_ref, x_out_ref, out_ref, *, eps):
    x_new = _residual_sum(x_ref, gate_ref, residual_ref)
    x_out_ref[...] = x_new.astype(x_out_ref.dtype)
    # normalize the float32 sum, not its rounded copy: closer to the exact chain (in bf16 with
    # few channels the rounded copy's statistics put the gradients 9e-2 off)
    out = _modulate(x_new, shift_ref[...].astype(F32), scale_ref[...].astype(F32), eps)
    out_ref[...] = out.astype(out_ref.dtype)


def _chain_backward_kernel(x_ref, gate_ref, residual_ref, scale_ref, d_x_new_ref, d_out_ref,
                           dx_ref, dresidual_ref, dgate_ref, dshift_ref, dscale_ref, *, eps):
    dx_norm, dshift, dscale = _modulate_backward(_residual_sum(x_ref, gate_ref, residual_ref),
                                                 scale_ref[...].astype(F32), d_out_ref[...].astype(F32), eps)
    d_x_new = d_x_new_ref[...].astype(F32) + dx_norm
    dx_ref[...] = d_x_new.astype(dx_ref.dtype)
    dresidual_ref[...] = (gate_ref[...].astype(F32) * d_x_new).astype(dresidual_ref.dtype)
    dgate = jnp.sum(residual_ref[...].astype(F32) * d_x_new, axis=0, keepdims=True)
    _accumulate_over_tokens([(dgate_ref, dgate), (dshift_ref, dshift), (dscale_ref, dscale)])


def _row_call(kernel, name, operands, outputs, block_tokens, accumulates):
    """kernel over grid (B, T / block): every operand and output is (B, T, C), a row
    array, or (B, 1, C), a per-sample vector (the same block either way when T == 1).
    `accumulates`: the vector outputs sum over the token axis, which must then run in order."""
    batch, tokens, channels = operands[0].shape
    block, padded = token_tiling(tokens, block_tokens)
    if padded != tokens:
        raise ValueError(f"{name}: {tokens} tokens need padding to {padded} first (see _padded_tokens)")
    row_spec = pl.BlockSpec((None, block, channels), lambda b, t: (b, t, 0))
    vector_spec = pl.BlockSpec((None, 1, channels), lambda b, t: (b, 0, 0))

    def spec(array):
        return vector_spec if array.shape[1] == 1 else row_spec

    return pallas_call(
        kernel,
        name=name,
        grid=(batch, tokens // block),
        in_specs=[spec(array) for array in operands],
        out_specs=[spec(array) for array in outputs],
        out_shape=list(outputs),
        semantics=("parallel", "arbitrary" if accumulates else "parallel"),
    )(*operands)


@functools.lru_cache(maxsize=None)
def _modulate_op(eps, block_tokens):
    """adaln_modulate on (B,T,C) x and (B,1,C) shift/scale, with its Pallas backward."""
    kernel = functools.partial(_modulate_kernel, eps=eps)
    backward_kernel = functools.partial(_modulate_backward_kernel, eps=eps)

    @jax.custom_vjp
    def modulate(x, shift, scale):
        (out,) = _row_call(kernel, "adaln_modulate", [x, shift, scale], [jax.ShapeDtypeStruct(x.shape, x.dtype)],
                           block_tokens, accumulates=False)
        return out

    def forward(x, shift, scale):
        return modulate(x, shift, scale), (x, shift, scale)

    def backward(saved, d_out):
        x, shift, scale = saved
        vector = jax.ShapeDtypeStruct(shift.shape, F32)
        dx, dshift, dscale = _row_call(backward_kernel, "adaln_modulate_backward", [x, scale, d_out],
                                       [jax.ShapeDtypeStruct(x.shape, x.dtype), vector, vector],
                                       block_tokens, accumulates=True)
        return dx, dshift.astype(shift.dtype), dscale.astype(scale.dtype)

    modulate.defvjp(forward, backward)
    return modulate


@functools.lru_cache(maxsize=None)
def _chain_op(eps, block_tokens):
    """residual_adaln_modulate on (B,T,C) x/residual and (B,1,C) gate/shift/scale."""
    kernel = functools.partial(_chain_kernel, eps=eps)
    backward_kernel = functools.partial(_chain_backward_kernel, eps=eps)

    @jax.custom_vjp
    def chain(x, gate, residual, shift, scale):
        row = jax.ShapeDtypeStruct(x.shape, x.dtype)
        x_new, out = _row_call(kernel, "residual_adaln_modulate", [x, gate, residual, shift, scale], [row, row],
                               block_tokens, accumulates=False)
        return x_new, out

    def forward(x, gate, residual, shift, scale):
        x_new, out = chain(x, gate, residual, shift, scale)
        return (x_new, out), (x, gate, residual, shift, scale)

    def backward(saved, cotangents):
        x, gate, residual, shift, scale = saved
        d_x_new, d_out = cotangents
        row, vector = jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(gate.shape, F32)
        dx, dresidual, dgate, dshift, dscale = _row_call(
            backward_kernel, "residual_adaln_modulate_backward",
            [x, gate, residual, scale, d_x_new, d_out], [row, row, vector, vector, vector],
            block_tokens, accumulates=True)
        return dx, dgate.astype(gate.dtype), dresidual, dshift.astype(shift.dtype), dscale.astype(scale.dtype)

    chain.defvjp(forward, backward)
    return chain


def fitting_block_tokens(op, channels, dtype, block_tokens=None):
    """The token block `op` runs with: the most tokens, a multiple of 8 and at most
    block_tokens (default MAX_BLOCK_TOKENS), whose row blocks and float32 values fit
    VMEM_BUDGET_BYTES at `channels` (C), forward and backward."""
    lanes = -(-channels // LANE) * LANE
    per_token = max(2 * blocks * lanes * jnp.dtype(dtype).itemsize + values * lanes * 4
                    for blocks, values in _ROW_FOOTPRINTS[op])
    fitting = max(SUBLANE, VMEM_BUDGET_BYTES // per_token // SUBLANE * SUBLANE)
    return min(block_tokens or MAX_BLOCK_TOKENS, fitting)


def _check(op, x, block_tokens, eps, **vectors):
    if not (isinstance(eps, numbers.Real) and 0 <= eps < math.inf):  # a negative one: NaN rows
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")
    check_arrays(op, x=x, **vectors)
    check_shape(op, "x", x, (None, None, None))
    batch, _, channels = x.shape
    for name, vector in vectors.items():
        check_shape(op, name, vector, (batch, channels))
    if block_tokens is not None:
        check_block_size(op, "block_tokens", block_tokens, 8)


def _padded_tokens(x, block_tokens):
    """x (B,T,C) with its last token repeated up to token_tiling's padded length: the copies'
    statistics are a real row's (zeros would have variance 0, and with eps = 0 NaN, which
    the sums over tokens would take in), and the caller drops their outputs, so their
    cotangents, and with them every gradient they add, are 0."""
    _, padded = token_tiling(x.shape[1], block_tokens)
    return jnp.pad(x, ((0, 0), (0, padded - x.shape[1]), (0, 0)), mode="edge")


def adaln_modulate(x, shift, scale, eps=1e-6, *, block_tokens=None):
    """LayerNorm(x) * (1 + scale) + shift; x (B,T,C), shift/scale (B,C); float32 or bfloat16.
    block_tokens (a multiple of 8): an upper bound on the token block (see fitting_block_tokens)."""
    _check("adaln_modulate", x, block_tokens, eps, shift=shift, scale=scale)
    if not x.size:  # an empty array: no work for a kernel, nor a block to tile it with
        return xla.adaln_modulate(x, shift, scale, eps)
    block_tokens = fitting_block_tokens("adaln_modulate", x.shape[2], x.dtype, block_tokens)
    op, tokens = _modulate_op(float(eps), block_tokens), x.shape[1]

    def per_shard(x, shift, scale):
        return op(_padded_tokens(x, block_tokens), shift[:, None], scale[:, None])[:, :tokens]

    return batch_sharded("adaln_modulate", per_shard, x, shift, scale, batched=(True, True, True))


def residual_adaln_modulate(x, gate, y, shift, scale, eps=1e-6, *, block_tokens=None):
    """(x + gate*y, adaln_modulate(x + gate*y)) in one pass; x, y (B,T,C), gate/shift/scale (B,C).
    block_tokens (a multiple of 8): an upper bound on the token block (see fitting_block_tokens)."""
    _check("residual_adaln_modulate", x, block_tokens, eps, gate=gate, shift=shift, scale=scale)
    check_shape("residual_adaln_modulate", "y", y, x.shape)
    check_arrays("residual_adaln_modulate", x=x, y=y)
    if not x.size:  # an empty array: no work for a kernel, nor a block to tile it with
        return xla.residual_adaln_modulate(x, gate, y, shift, scale, eps)
    block_tokens = fitting_block_tokens("residual_adaln_modulate", x.shape[2], x.dtype, block_tokens)
    op, tokens = _chain_op(float(eps), block_tokens), x.shape[1]

    def per_shard(x, gate, y, shift, scale):
        x_new, out = op(_padded_tokens(x, block_tokens), gate[:, None], _padded_tokens(y, block_tokens),
                        shift[:, None], scale[:, None])
        return x_new[:, :tokens], out[:, :tokens]

    return batch_sharded("residual_adaln_modulate", per_shard, x, gate, y, shift, scale, batched=(True,) * 5)
