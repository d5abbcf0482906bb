"""Pallas (TPU) flash attention, forward and backward (custom_vjp), any Tq and Tk.

Math: out = softmax(q k^T / sqrt(D), masked keys excluded) v, per batch and head. The
forward walks key blocks with an online softmax, keeping for each query row the running
max m, the running sum l and an unnormalized float32 accumulator, so the (Tq, Tk) score
matrix never leaves on-chip memory; it also saves lse = m + log l per row. The backward
recomputes p = exp(s - lse) block by block:

    dv = p^T do,   dp = do v^T,   ds = p * (dp - delta) with delta = rowsum(do * out),
    dq = ds k / sqrt(D),   dk = ds^T q / sqrt(D)

in two kernels: one per query block (accumulates dq over key blocks), then one per key
block (accumulates dk, dv over query blocks), so no two programs write the same block.
delta also equals rowsum(p * dp): when all keys fit one key block the query kernel computes
it so, in float32, and hands it to the key kernel. With few keys ds cancels (two keys:
ds_1 = -ds_2), and out's rounding to bf16, through rowsum(do * out), would dominate the
gradients (over 1e-2 of their max at 2 or 3 keys). Longer key ranges use rowsum(do * out).
In that one-block case both passes also renormalize p to sum to 1, so a single key gets
p = 1 exactly and dq = dk = 0 exactly, as in float64.

Layouts: q (B,H,Tq,D), k/v (B,H,Tk,D), head dim on the lane axis (any D: a block's last
dim is the whole D, e.g. 72). Grids (B, H, query blocks) and (B, H, key blocks); each
program holds one block of its own side and the whole of the other side of one head in
VMEM (T=1024, D=72 bf16 is 147 KB). Unless they fit in one block, queries run as equal
blocks of at most block_q, multiples of 8 (258 as 3 of 88 over 264 rows, not 3 of 128 over
384), and keys are padded to a multiple of block_k (128-lane blocks, as the scores' key
axis is their lanes); padded keys and key_padding_mask both enter as a float32 (B, 1, Tk)
"key is valid" row. lse and delta are (B, H, Tq, 1) float32 (last dim 1 = the array's own).
A query row whose keys are all masked gets 0, like the reference.

Roofline at DiT-XL/2 (B=32, H=16, T=256, D=72, bf16; 18.9 MB per (B,H,T,D) tensor):
forward reads q, k, v and writes out: 75.5 MB, and does 4*B*H*T*T*D = 9.7 GFLOP of
matmul: 128 flop/byte, under a TPU v5e's ridge (197 TFLOP/s / 819 GB/s = 240), so
memory-bound there: ~92 us (49 us of MXU time). The backward reads q, k, v, out, do and
writes dq, dk, dv (151 MB) and does 7 (T x T x D) matmuls, 33.8 GFLOP (scores and
do v^T are recomputed in both kernels): ~185 us at HBM speed.

What these kernels move beyond those bounds: lse and delta are (B, H, Tq, 1) float32, which
a TPU lays out 128 lanes wide, 67 MB each at DiT-XL/2 (jax's own TPU flash attention keeps
its l and m 128 lanes wide too). The training forward writes lse (~143 MB moved in all),
and the backward moves such an array 6 times (delta written by XLA and by the query pass,
lse and delta read by both passes), besides reading q, k, v and do once per pass: ~650 MB,
so the padding, not the matmuls, bounds it. A lane-dense (B, H, 1, Tq) layout would move
16x less, but it needs the softmax statistics as rows, i.e. transposed score tiles in every
kernel, which no TPU has compiled here: not done.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import xla
from ._common import (LANE, SUBLANE, batch_sharded, check_arrays, check_block_size, check_shape, even_blocks,
                      pallas_call, padded_block)

F32 = jnp.float32
# finite stand-in for -inf: keeps exp() and max() NaN-free on rows with no valid key yet
MASK_VALUE = -0.7 * float(jnp.finfo(F32).max)


def _dot(a, b, contract=(1, 0)):
    """a @ b contracting a's dim contract[0] with b's dim contract[1], float32 accumulation;
    float32 operands at full precision (a TPU would otherwise round them to bfloat16)."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == F32 else None
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                               precision=precision, preferred_element_type=F32)


def _forward_kernel(q_ref, k_ref, v_ref, valid_ref, out_ref, *lse_ref, block_k, scale):
    q = q_ref[...]
    rows = q.shape[0]
    row_max = jnp.full((rows, 1), MASK_VALUE, F32)
    row_sum = jnp.zeros((rows, 1), F32)
    accumulator = jnp.zeros((rows, q.shape[1]), F32)
    for start in range(0, k_ref.shape[0], block_k):  # static: the key blocks of one head
        valid = valid_ref[:, start:start + block_k] > 0
        scores = jnp.where(valid, _dot(q, k_ref[start:start + block_k, :], (1, 1)) * scale, MASK_VALUE)
        new_max = jnp.maximum(row_max, jnp.max(scores, axis=-1, keepdims=True))
        probs = jnp.where(valid, jnp.exp(scores - new_max), 0.0)
        correction = jnp.exp(row_max - new_max)
        row_sum = correction * row_sum + jnp.sum(probs, axis=-1, keepdims=True)
        value = v_ref[start:start + block_k, :]
        accumulator = correction * accumulator + _dot(probs.astype(value.dtype), value)
        row_max = new_max
    has_keys = row_sum > 0
    out_ref[...] = jnp.where(has_keys, accumulator / jnp.where(has_keys, row_sum, 1.0), 0.0).astype(out_ref.dtype)
    if lse_ref:
        lse_ref[0][...] = jnp.where(has_keys, row_max + jnp.log(jnp.where(has_keys, row_sum, 1.0)), 0.0)


def _probabilities(q, k, v, valid, d_out, lse, scale, one_key_block):
    """(p, dp) of one (query block, key block) tile, p recomputed from lse. With all keys in
    this one block, p is renormalized to sum to 1: the recomputed scores round differently
    from the forward's, and with a single key p = 1 - 1e-7 would give dq, dk ~1e-7 instead
    of exactly 0."""
    scores = _dot(q, k, (1, 1)) * scale
    probs = jnp.where(valid, jnp.exp(scores - lse), 0.0)
    if one_key_block:
        total = jnp.sum(probs, axis=-1, keepdims=True)
        probs = probs / jnp.where(total > 0, total, 1.0)
    return probs, _dot(d_out, v, (1, 1))


def _key_block_backward_kernel(q_ref, k_ref, v_ref, valid_ref, d_out_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                               *, block_q, scale, one_key_block):
    k, v = k_ref[...], v_ref[...]
    valid = valid_ref[...] > 0
    dk = jnp.zeros(k.shape, F32)
    dv = jnp.zeros(v.shape, F32)
    for start in range(0, q_ref.shape[0], block_q):  # static: the query blocks of one head
        rows = slice(start, start + block_q)
        q, d_out = q_ref[rows, :], d_out_ref[rows, :]
        probs, d_probs = _probabilities(q, k, v, valid, d_out, lse_ref[rows, :], scale, one_key_block)
        d_scores = probs * (d_probs - delta_ref[rows, :])
        dv += _dot(probs.astype(d_out.dtype), d_out, (0, 0))
        dk += _dot(d_scores.astype(q.dtype), q, (0, 0))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _query_block_backward_kernel(q_ref, k_ref, v_ref, valid_ref, d_out_ref, lse_ref, delta_ref, dq_ref,
                                 delta_out_ref, *, block_k, scale, one_key_block):
    q, d_out, lse, delta = q_ref[...], d_out_ref[...], lse_ref[...], delta_ref[...]
    dq = jnp.zeros(q.shape, F32)
    for start in range(0, k_ref.shape[0], block_k):  # static: the key blocks of one head
        keys = slice(start, start + block_k)
        k = k_ref[keys, :]
        probs, d_probs = _probabilities(q, k, v_ref[keys, :], valid_ref[:, keys] > 0, d_out, lse, scale, one_key_block)
        if one_key_block:
            # one key block: delta = rowsum(p * dp) in float32, not from out rounded to
            # storage, whose error dominates dk when few keys make ds cancel (see backward)
            delta = jnp.sum(probs * d_probs, axis=-1, keepdims=True)
        dq += _dot((probs * (d_probs - delta)).astype(k.dtype), k)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)
    delta_out_ref[...] = delta


def _specs(q, k, block_q, block_k):
    """BlockSpecs over grid (B, H, blocks): a block of one side, the whole head of the other."""
    head_dim = q.shape[-1]

    def rows(block):
        return pl.BlockSpec((None, None, block, head_dim), lambda b, h, i: (b, h, i, 0))

    def whole(length, width=head_dim):
        return pl.BlockSpec((None, None, length, width), lambda b, h, i: (b, h, 0, 0))

    def row_stats(block):
        return pl.BlockSpec((None, None, block, 1), lambda b, h, i: (b, h, i, 0))

    valid_whole = pl.BlockSpec((None, 1, k.shape[2]), lambda b, h, i: (b, 0, 0))
    valid_block = pl.BlockSpec((None, 1, block_k), lambda b, h, i: (b, 0, i))
    return rows, whole, row_stats, valid_whole, valid_block


@functools.lru_cache(maxsize=None)
def _flash_op(block_q, block_k):
    """custom_vjp attention on padded (B,H,Tq,D)/(B,H,Tk,D) and a (B,1,Tk) float valid row."""

    def run_forward(q, k, v, valid, with_lse):
        batch, heads, queries, head_dim = q.shape
        scale = 1.0 / math.sqrt(head_dim)
        rows, whole, row_stats, valid_whole, _ = _specs(q, k, block_q, block_k)
        out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
        out_specs = [rows(block_q)]
        if with_lse:
            out_shape.append(jax.ShapeDtypeStruct((batch, heads, queries, 1), F32))
            out_specs.append(row_stats(block_q))
        return pallas_call(
            functools.partial(_forward_kernel, block_k=block_k, scale=scale),
            name="flash_attention",
            grid=(batch, heads, queries // block_q),
            in_specs=[rows(block_q), whole(k.shape[2]), whole(k.shape[2]), valid_whole],
            out_specs=out_specs,
            out_shape=out_shape,
        )(q, k, v, valid)

    @jax.custom_vjp
    def flash(q, k, v, valid):
        return run_forward(q, k, v, valid, with_lse=False)[0]

    def forward(q, k, v, valid):
        out, lse = run_forward(q, k, v, valid, with_lse=True)
        return out, (q, k, v, valid, out, lse)

    def backward(saved, d_out):
        q, k, v, valid, out, lse = saved
        batch, heads, queries, head_dim = q.shape
        keys = k.shape[2]
        scale = 1.0 / math.sqrt(head_dim)
        one_key_block = keys <= block_k
        delta = jnp.sum(d_out.astype(F32) * out.astype(F32), axis=-1, keepdims=True)
        rows, whole, row_stats, valid_whole, valid_block = _specs(q, k, block_q, block_k)
        # The query pass first: with one key block it refines delta, which the key pass reads.
        dq, delta = pallas_call(
            functools.partial(_query_block_backward_kernel, block_k=block_k, scale=scale, one_key_block=one_key_block),
            name="flash_attention_backward_queries",
            grid=(batch, heads, queries // block_q),
            in_specs=[rows(block_q), whole(keys), whole(keys), valid_whole, rows(block_q),
                      row_stats(block_q), row_stats(block_q)],
            out_specs=[rows(block_q), row_stats(block_q)],
            out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(delta.shape, F32)],
        )(q, k, v, valid, d_out, lse, delta)
        dk, dv = pallas_call(
            functools.partial(_key_block_backward_kernel, block_q=block_q, scale=scale, one_key_block=one_key_block),
            name="flash_attention_backward_keys",
            grid=(batch, heads, keys // block_k),
            in_specs=[whole(queries), rows(block_k), rows(block_k), valid_block, whole(queries),
                      whole(queries, 1), whole(queries, 1)],
            out_specs=[rows(block_k), rows(block_k)],
            out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        )(q, k, v, valid, d_out, lse, delta)
        return dq, dk, dv, jnp.zeros_like(valid)

    flash.defvjp(forward, backward)
    return flash


def _pad_tokens(array, length):
    return jnp.pad(array, ((0, 0), (0, 0), (0, length - array.shape[2]), (0, 0)))


def attention(q, k, v, key_padding_mask=None, *, block_q=128, block_k=128):
    """softmax(q k^T / sqrt(D)) v over (B,H,Tq,D) x (B,H,Tk,D) -> (B,H,Tq,D).

    key_padding_mask: optional bool (B, Tk), True where a key is padding and must be
    ignored; a query whose keys are all padding gets 0. float32 or bfloat16.
    block_q (multiple of 8): the most queries per block; block_k (multiple of 128): the
    keys per block, when T exceeds it.
    """
    op = "attention"
    check_arrays(op, q=q, k=k, v=v)
    check_shape(op, "q", q, (None, None, None, None))
    batch, heads, queries, head_dim = q.shape
    check_shape(op, "k", k, (batch, heads, None, head_dim))
    keys = k.shape[2]
    check_shape(op, "v", v, (batch, heads, keys, head_dim))
    check_block_size(op, "block_q", block_q, SUBLANE)
    check_block_size(op, "block_k", block_k, LANE)
    valid = jnp.ones((batch, keys), F32)
    if key_padding_mask is not None:
        check_shape(op, "key_padding_mask", key_padding_mask, (batch, keys))
        if key_padding_mask.dtype != jnp.bool_:
            raise ValueError(f"{op}: key_padding_mask must be bool (True = padding), got {key_padding_mask.dtype}")
        valid = jnp.where(key_padding_mask, 0.0, valid)
    if not (q.size and k.size):  # an empty array: no work for a kernel, nor a block to tile it with
        return xla.attention(q, k, v, key_padding_mask)
    query_block, padded_queries = even_blocks(queries, block_q)
    key_block, padded_keys = padded_block(keys, block_k)
    flash = _flash_op(query_block, key_block)

    def per_shard(q, k, v, valid):
        valid = jnp.pad(valid, ((0, 0), (0, padded_keys - keys)))[:, None, :]
        out = flash(_pad_tokens(q, padded_queries), _pad_tokens(k, padded_keys), _pad_tokens(v, padded_keys), valid)
        return out[:, :, :queries]

    return batch_sharded(op, per_shard, q, k, v, valid, batched=(True,) * 4)
