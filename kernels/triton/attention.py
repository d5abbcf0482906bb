"""Flash attention in Triton: softmax(q k^T / sqrt(D)) v, forward and backward, without
ever holding the Tq x Tk score matrix in memory.

Math. With scale = 1/sqrt(D) and S = scale * q k^T (masked keys at -inf):

    forward   P = softmax(S) row-wise, O = P v, and per query row the log-sum-exp
              L = log sum_j exp(S_j), saved for the backward.
              The softmax is online: key blocks stream past a query block, each row keeps
              its running max m and sum l, and the accumulator is rescaled by exp(m_old -
              m_new) whenever the max grows. Everything runs in base 2 (exp2 is the
              hardware instruction), so the kernels fold log2(e) into the scale and keep L
              in base 2 too.
    backward  P is recomputed from L (P = exp2(S2 - L2), S2 and L2 in base 2), then
              Delta = rowsum(dO * O),
              dV = P^T dO,  dP = dO v^T,  dS = P * (dP - Delta),
              dQ = scale * dS k,  dK = scale * dS^T q.
              Delta equals rowsum(P * dP). Where all keys fit the smallest key block
              (Tk <= 32 on CUDA, 16 in the interpreter: short contexts such as the DiT's
              2-token cross-attention), it is computed so, from fp32 P and dP: with few
              keys dS cancels (two keys: dS_1 = -dS_2) and the rounding of O to storage,
              through Delta, would dominate dK (fp16, Tk = 2: 2.5e-3 of max |dK| instead
              of 3.9e-4). Longer key ranges, DiT-XL/2's 256 among them, use dO * O, which
              costs no extra pass, in a kernel compiled without the short-key branch.
              Two passes, both deterministic, no atomics: one program per query block
              computes Delta (the usual preprocess, fused here because this pass reads dO
              and O anyway) and dQ; then one program per key block computes dK and dV.
              Each pass recomputes P, which costs two extra matmuls over a single pass
              with float atomics on dQ but gives bit-identical gradients on every run.

Key padding. key_padding_mask (B, Tk) bool, True = padding: those keys get S = -inf, so
P = 0 for them, and their dK, dV are 0. A query whose keys are all padding has l = 0: its
output is written as 0 and its L as +inf, so the backward's exp2(S2 - L2) is 0 and all of
its gradients are 0, with no inf - inf anywhere (never NaN).

Layouts. q (B, H, Tq, D), k and v (B, H, Tk, D), in any strides: the kernels take every
stride, so the DiT's views from `qkv.reshape(B, T, 3, H, D).permute(2, 0, 3, 1, 4)` are
read in place, not copied. out, dq, dk, dv are (B, H, T, D) views of (B, T, H, D) memory,
the order the DiT wants next (`out.transpose(1, 2).reshape(B, T, C)` is then free); L
and Delta are float32 (B, H, Tq). Rows move as 16-byte vectors, copied asynchronously
ahead of use, only where the compiler can see that they start 16 bytes apart: a runtime
stride such as D = 72 does not show it, so the launcher passes ALIGN (the most elements,
up to 16 bytes, dividing every batch, head and token stride: 8 for bf16 at D = 72) and the
kernels rebuild their strides as multiples of it. Storage fp32, fp16 or bf16; accumulation
in fp32. fp32 matmuls run as tf32x3 (three tf32 products, ~fp32 accuracy: plain tf32 would
miss the 1e-4 bar, and IEEE fp32 leaves the tensor cores).

Head dims. tl.arange needs power-of-two widths, and padding D = 72 to 128 would waste 44%
of every matmul. The head dim is split into a power-of-two main part plus a remainder
rounded up to a power of two (at least 16, tl.dot's smallest K), loaded with masked
loads and contracted/accumulated as two tiles:
    D = 72 -> 64 + 16 (80 wide, 10% waste), 40 -> 32 + 16, 80 -> 64 + 16, 96 -> 64 + 32,
    64 / 128 / 256 -> one tile, D < 16 -> one 16-wide tile; up to D = 256.

Roofline at DiT-XL/2 (B=32, H=16, T=Tq=Tk=256, D=72, fp16/bf16, H100 SXM: ~990 Tflop/s
dense 16-bit, ~3.35 TB/s HBM). One q/k/v/o tensor is B*T*H*D*2 bytes = 18.9 MB.
    forward   flops 2 matmuls * 2*B*H*T*T*D = 9.7 Gflop (10.7 at the 80-wide tile)
                    + B*H*T*T = 34 M exp2 (~9 us of the special-function units)
              bytes read q, k, v, write o (4 * 18.9 MB) + L (0.5 MB) = 76 MB
              -> 23 us at HBM bandwidth vs 10-11 us of tensor-core time: memory-bound at
              this short T (127 flop/byte, H100's ridge is ~300).
    backward  flops 7 matmuls (dQ pass: S, dP, dQ; dK/dV pass: S, dP, dV, dK)
                    * 2*B*H*T*T*D = 34 Gflop (38 at the 80-wide tile) + 2 * 34 M exp2
              bytes dQ pass reads q, k, v, o, dO, writes dQ (6 * 18.9 MB);
                    dK/dV pass reads q, k, v, dO, writes dK, dV (6 * 18.9 MB); L, Delta
                    ~2 MB: 229 MB -> 68 us at HBM bandwidth vs 34-38 us of tensor time.
Block sizes are autotuned on CUDA over H100-sized configs (keyed on Tq, Tk, D, mask,
dtype), after dropping those whose fp32 accumulators would spill registers at the head
dim's tile width; the interpreter uses one 16 x 16 config (autotuning needs a GPU driver).
Speed is measured on the GPU only, never in the interpreter.

Registered as the custom ops fusedit::attention and fusedit::attention_backward with
fake (meta) implementations and an autograd formula, so torch.compile(fullgraph=True)
traces `attention` without graph breaks.
"""
import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, LAUNCH_OPTIONS, autocast_inputs, check_shape, check_tensors, on_device

OP = "attention"
MAX_HEAD_DIM = 256
# The interpreter's only config; small blocks keep its numpy work per step small and make
# the tests' short sequences span several blocks.
INTERPRETER_BLOCK = 16


def head_dim_tiles(head_dim):
    """(main, rest) tile widths for a head dim: main a power of two >= 16, rest 0 or a
    power of two >= 16 covering what main leaves over (see the module docstring)."""
    main = max(16, 1 << (head_dim.bit_length() - 1))
    left_over = head_dim - main
    rest = 0 if left_over <= 0 else max(16, triton.next_power_of_2(left_over))
    return main, rest


def _configs(cuda_configs):
    if INTERPRET:
        return [triton.Config({"BLOCK_M": INTERPRETER_BLOCK, "BLOCK_N": INTERPRETER_BLOCK})]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in cuda_configs]


# Per thread, a program's fp32 accumulators (rows it owns x head-dim tile width, times
# accumulators) must leave room in the 255 registers for the tiles in flight; past about
# 64 the compiler spills (offline sm_90 builds at D = 72, 80, 256 showed it).
_ACCUMULATOR_REGISTERS = 64


# Triton 3.0 aborts the whole process (an assertion in its layout passes: "mma -> mma layout
# conversion is only supported on Ampere"), not raising anything the autotuner could catch,
# when it compiles for Hopper a config of 8 warps that owns 64 rows: the forward in every
# dtype, the backward in fp32 (offline sm_90 builds with triton 3.0.0; 3.6 and later
# compile them all). There such configs are left out.
_HOPPER_NEEDS_128_ROWS_FOR_8_WARPS = tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 1)


def _compiles_here(config, owned_rows):
    if not _HOPPER_NEEDS_128_ROWS_FOR_8_WARPS or config.num_warps < 8 or config.kwargs[owned_rows] >= 128:
        return True
    return _target_arch() < 90


def _target_arch():
    """The compute capability (x10) Triton compiles for: the current device's."""
    return triton.runtime.driver.active.get_current_target().arch


def _prune_for_head_dim(configs, named_args, owned_rows, accumulators, **kwargs):
    """The configs whose accumulators fit the registers at this head dim, plus always the
    last, smallest one, which fits shared memory even at fp32 and D = 256: a config that
    runs out of resources only loses the autotuning, it never leaves none that launches."""
    width = kwargs["MAIN_WIDTH"] + kwargs["REST_WIDTH"]

    def registers(config):
        return config.kwargs[owned_rows] * width * accumulators / (32 * config.num_warps)

    return [config for config in configs[:-1]
            if registers(config) <= _ACCUMULATOR_REGISTERS and _compiles_here(config, owned_rows)] + configs[-1:]


def _autotune(cuda_configs, owned_rows, accumulators):
    return triton.autotune(
        configs=_configs(cuda_configs),
        key=["query_len", "key_len", "HEAD_DIM", "HAS_MASK"],
        prune_configs_by={"early_config_prune": functools.partial(
            _prune_for_head_dim, owned_rows=owned_rows, accumulators=accumulators)},
    )


# (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages) for an H100 (228 KB of shared
# memory per SM; at T=256 a 128-query block gives B*H*2 = 1024 programs); the 8-warp,
# 64-row ones are for head dims over 128, the last is the small one that always fits.
_FORWARD_CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (64, 64, 8, 2), (64, 32, 8, 2),
                    (32, 32, 4, 1)]
_BACKWARD_CONFIGS = [(64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3), (64, 32, 8, 2),
                     (32, 32, 4, 1)]
# Up to this many keys, every backward config holds all keys in one key block.
_KEYS_IN_EVERY_BLOCK = min(config.kwargs["BLOCK_N"] for config in _configs(_BACKWARD_CONFIGS))


# The interpreter re-patches triton.language on every call of a jit helper (~15 ms each,
# most of its time here); as plain functions the helpers run the same code there.
_device_function = (lambda function: function) if INTERPRET else triton.jit

# INTERPRETER_BF16 is set only for bf16 in Triton's CPU interpreter, which computes bf16
# dots wrongly and truncates fp32 -> bf16 casts: there, dot operands go to fp32 and casts
# round to nearest even first, as the GPU does. On CUDA it is always False.


@_device_function
def _dot(a, b, INTERPRETER_BF16: tl.constexpr):
    if INTERPRETER_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        # three tf32 tensor-core products: ~fp32 accuracy, where plain tf32 misses 1e-4
        # and "ieee" falls back to FMA loops that spill kilobytes of registers
        product = tl.dot(a, b, input_precision="tf32x3")
    else:
        product = tl.dot(a, b)
    return product


@_device_function
def _to_storage(values, dtype: tl.constexpr, INTERPRETER_BF16: tl.constexpr):
    if INTERPRETER_BF16:
        bits = values.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        values = bits.to(tl.float32, bitcast=True)
    return values.to(dtype)


@_device_function
def _head_start(pointer, batch, head, stride_batch, stride_head, stride_token, ALIGN: tl.constexpr):
    """(pointer to the rows of `head` in batch element `batch`, the token stride), every stride
    rebuilt as a multiple of ALIGN, which the launcher checked it is (_alignment), so that the
    compiler sees it: a runtime stride such as D = 72 tells it nothing of where rows start, and
    it then loads and stores every q/k/v/o row 2 bytes at a time, with no asynchronous copies
    (sm_90 PTX at D = 72 before this: only ld.global.b16)."""
    offset = batch * (stride_batch // ALIGN * ALIGN) + head * (stride_head // ALIGN * ALIGN)
    return pointer + offset, stride_token // ALIGN * ALIGN


@_device_function
def _load_tile(pointer, rows, row_ok, stride_row, stride_dim,
               COLUMN_START: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    columns = COLUMN_START + tl.arange(0, WIDTH)
    return tl.load(
        pointer + rows[:, None] * stride_row + columns[None, :] * stride_dim,
        mask=row_ok[:, None] & (columns[None, :] < HEAD_DIM),
        other=0.0,
    )


@_device_function
def _store_tile(pointer, values, rows, row_ok, stride_row, stride_dim,
                COLUMN_START: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr,
                INTERPRETER_BF16: tl.constexpr):
    columns = COLUMN_START + tl.arange(0, WIDTH)
    tl.store(
        pointer + rows[:, None] * stride_row + columns[None, :] * stride_dim,
        _to_storage(values, pointer.dtype.element_ty, INTERPRETER_BF16),
        mask=row_ok[:, None] & (columns[None, :] < HEAD_DIM),
    )


@_device_function
def _keys_attended(mask_pointer, keys, key_len, mask_stride_token, HAS_MASK: tl.constexpr):
    """True for keys that exist (inside Tk) and are not padding."""
    attended = keys < key_len
    if HAS_MASK:
        padded = tl.load(mask_pointer + keys * mask_stride_token, mask=attended, other=1)
        attended = attended & (padded == 0)
    return attended


@_autotune(_FORWARD_CONFIGS, owned_rows="BLOCK_M", accumulators=1)
@triton.jit
def _forward_kernel(
    q_pointer, k_pointer, v_pointer, mask_pointer, out_pointer, lse_pointer,
    q_stride_batch, q_stride_head, q_stride_token, q_stride_dim,
    k_stride_batch, k_stride_head, k_stride_token, k_stride_dim,
    v_stride_batch, v_stride_head, v_stride_token, v_stride_dim,
    out_stride_batch, out_stride_head, out_stride_token, out_stride_dim,
    mask_stride_batch, mask_stride_token,
    num_heads, query_len, key_len, scale_log2,
    HEAD_DIM: tl.constexpr, MAIN_WIDTH: tl.constexpr, REST_WIDTH: tl.constexpr,
    HAS_MASK: tl.constexpr, INTERPRETER_BF16: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    query_block = tl.program_id(0)
    batch_head = tl.program_id(1)
    # int64 so that batch * stride cannot overflow on tensors over 2**31 elements
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    q_pointer, q_stride_token = _head_start(
        q_pointer, batch, head, q_stride_batch, q_stride_head, q_stride_token, ALIGN)
    k_pointer, k_stride_token = _head_start(
        k_pointer, batch, head, k_stride_batch, k_stride_head, k_stride_token, ALIGN)
    v_pointer, v_stride_token = _head_start(
        v_pointer, batch, head, v_stride_batch, v_stride_head, v_stride_token, ALIGN)
    out_pointer, out_stride_token = _head_start(
        out_pointer, batch, head, out_stride_batch, out_stride_head, out_stride_token, ALIGN)
    mask_pointer += batch * mask_stride_batch

    queries = query_block * BLOCK_M + tl.arange(0, BLOCK_M)
    query_ok = queries < query_len
    q_main = _load_tile(q_pointer, queries, query_ok, q_stride_token, q_stride_dim, 0, MAIN_WIDTH, HEAD_DIM)
    out_main = tl.zeros([BLOCK_M, MAIN_WIDTH], dtype=tl.float32)
    if REST_WIDTH > 0:
        q_rest = _load_tile(q_pointer, queries, query_ok, q_stride_token, q_stride_dim,
                            MAIN_WIDTH, REST_WIDTH, HEAD_DIM)
        out_rest = tl.zeros([BLOCK_M, REST_WIDTH], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)

    for key_start in range(0, key_len, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        key_ok = keys < key_len
        attended = _keys_attended(mask_pointer, keys, key_len, mask_stride_token, HAS_MASK)
        k_main = _load_tile(k_pointer, keys, key_ok, k_stride_token, k_stride_dim, 0, MAIN_WIDTH, HEAD_DIM)
        scores = _dot(q_main, tl.trans(k_main), INTERPRETER_BF16)
        if REST_WIDTH > 0:
            k_rest = _load_tile(k_pointer, keys, key_ok, k_stride_token, k_stride_dim, MAIN_WIDTH, REST_WIDTH, HEAD_DIM)
            scores += _dot(q_rest, tl.trans(k_rest), INTERPRETER_BF16)
        scores = tl.where(attended[None, :], scores * scale_log2, float("-inf"))

        new_max = tl.maximum(row_max, tl.max(scores, 1))
        # a row with nothing attended yet has max -inf; subtracting 0 instead keeps
        # exp2(-inf - -inf) = NaN out of it
        subtracted = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.math.exp2(row_max - subtracted)
        probs = tl.math.exp2(scores - subtracted[:, None])
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        probs = _to_storage(probs, v_pointer.dtype.element_ty, INTERPRETER_BF16)
        v_main = _load_tile(v_pointer, keys, key_ok, v_stride_token, v_stride_dim, 0, MAIN_WIDTH, HEAD_DIM)
        out_main = out_main * rescale[:, None] + _dot(probs, v_main, INTERPRETER_BF16)
        if REST_WIDTH > 0:
            v_rest = _load_tile(v_pointer, keys, key_ok, v_stride_token, v_stride_dim, MAIN_WIDTH, REST_WIDTH, HEAD_DIM)
            out_rest = out_rest * rescale[:, None] + _dot(probs, v_rest, INTERPRETER_BF16)
        row_max = new_max

    # row_sum is 0 only for a query whose keys are all padding: output 0, L = +inf
    anything_attended = row_sum > 0.0
    inverse_sum = tl.where(anything_attended, 1.0 / tl.where(anything_attended, row_sum, 1.0), 0.0)
    _store_tile(out_pointer, out_main * inverse_sum[:, None], queries, query_ok,
                out_stride_token, out_stride_dim, 0, MAIN_WIDTH, HEAD_DIM, INTERPRETER_BF16)
    if REST_WIDTH > 0:
        _store_tile(out_pointer, out_rest * inverse_sum[:, None], queries, query_ok,
                    out_stride_token, out_stride_dim, MAIN_WIDTH, REST_WIDTH, HEAD_DIM, INTERPRETER_BF16)
    lse = tl.where(anything_attended, row_max + tl.math.log2(tl.where(anything_attended, row_sum, 1.0)), float("inf"))
    tl.store(lse_pointer + batch_head.to(tl.int64) * query_len + queries, lse, mask=query_ok)


@_autotune(_BACKWARD_CONFIGS, owned_rows="BLOCK_M", accumulators=1)
@triton.jit
def _backward_query_kernel(
    q_pointer, k_pointer, v_pointer, mask_pointer, out_pointer, grad_out_pointer,
    lse_pointer, delta_pointer, grad_q_pointer,
    q_stride_batch, q_stride_head, q_stride_token, q_stride_dim,
    k_stride_batch, k_stride_head, k_stride_token, k_stride_dim,
    v_stride_batch, v_stride_head, v_stride_token, v_stride_dim,
    out_stride_batch, out_stride_head, out_stride_token, out_stride_dim,
    grad_out_stride_batch, grad_out_stride_head, grad_out_stride_token, grad_out_stride_dim,
    grad_q_stride_batch, grad_q_stride_head, grad_q_stride_token, grad_q_stride_dim,
    mask_stride_batch, mask_stride_token,
    num_heads, query_len, key_len, scale, scale_log2,
    HEAD_DIM: tl.constexpr, MAIN_WIDTH: tl.constexpr, REST_WIDTH: tl.constexpr,
    HAS_MASK: tl.constexpr, INTERPRETER_BF16: tl.constexpr, ALIGN: tl.constexpr, ONE_KEY_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One query block: Delta (stored for the key pass) and dQ. ONE_KEY_BLOCK: all keys fit
    one key block (a constexpr, so that longer key ranges compile the plain loop)."""
    query_block = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    q_pointer, q_stride_token = _head_start(
        q_pointer, batch, head, q_stride_batch, q_stride_head, q_stride_token, ALIGN)
    k_pointer, k_stride_token = _head_start(
        k_pointer, batch, head, k_stride_batch, k_stride_head, k_stride_token, ALIGN)
    v_pointer, v_stride_token = _head_start(
        v_pointer, batch, head, v_stride_batch, v_stride_head, v_stride_token, ALIGN)
    out_pointer, out_stride_token = _head_start(
        out_pointer, batch, head, out_stride_batch, out_stride_head, out_stride_token, ALIGN)
    grad_out_pointer, grad_out_stride_token = _head_start(
        grad_out_pointer, batch, head, grad_out_stride_batch, grad_out_stride_head, grad_out_stride_token, ALIGN)
    grad_q_pointer, grad_q_stride_token = _head_start(
        grad_q_pointer, batch, head, grad_q_stride_batch, grad_q_stride_head, grad_q_stride_token, ALIGN)
    mask_pointer += batch * mask_stride_batch
    row_offsets = batch_head.to(tl.int64) * query_len

    queries = query_block * BLOCK_M + tl.arange(0, BLOCK_M)
    query_ok = queries < query_len
    q_main = _load_tile(q_pointer, queries, query_ok, q_stride_token, q_stride_dim, 0, MAIN_WIDTH, HEAD_DIM)
    grad_out_main = _load_tile(grad_out_pointer, queries, query_ok, grad_out_stride_token, grad_out_stride_dim,
                               0, MAIN_WIDTH, HEAD_DIM)
    out_main = _load_tile(out_pointer, queries, query_ok, out_stride_token, out_stride_dim, 0, MAIN_WIDTH, HEAD_DIM)
    delta = tl.sum(grad_out_main.to(tl.float32) * out_main.to(tl.float32), 1)
    grad_q_main = tl.zeros([BLOCK_M, MAIN_WIDTH], dtype=tl.float32)
    if REST_WIDTH > 0:
        q_rest = _load_tile(q_pointer, queries, query_ok, q_stride_token, q_stride_dim,
                            MAIN_WIDTH, REST_WIDTH, HEAD_DIM)
        grad_out_rest = _load_tile(grad_out_pointer, queries, query_ok, grad_out_stride_token, grad_out_stride_dim,
                                   MAIN_WIDTH, REST_WIDTH, HEAD_DIM)
        out_rest = _load_tile(out_pointer, queries, query_ok, out_stride_token, out_stride_dim,
                              MAIN_WIDTH, REST_WIDTH, HEAD_DIM)
        delta += tl.sum(grad_out_rest.to(tl.float32) * out_rest.to(tl.float32), 1)
        grad_q_rest = tl.zeros([BLOCK_M, REST_WIDTH], dtype=tl.float32)
    # Stored before the loop unless the loop refines it: sm_90 builds storing it after the
    # loop took up to 39 more registers per thread (most configs), for the same DiT-XL work.
    if not ONE_KEY_BLOCK:
        tl.store(delta_pointer + row_offsets + queries, delta, mask=query_ok)
    # rows past Tq get L = +inf, hence P = 0
    lse = tl.load(lse_pointer + row_offsets + queries, mask=query_ok, other=float("inf"))

    for key_start in range(0, key_len, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        key_ok = keys < key_len
        attended = _keys_attended(mask_pointer, keys, key_len, mask_stride_token, HAS_MASK)
        k_main = _load_tile(k_pointer, keys, key_ok, k_stride_token, k_stride_dim, 0, MAIN_WIDTH, HEAD_DIM)
        v_main = _load_tile(v_pointer, keys, key_ok, v_stride_token, v_stride_dim, 0, MAIN_WIDTH, HEAD_DIM)
        scores = _dot(q_main, tl.trans(k_main), INTERPRETER_BF16)
        grad_probs = _dot(grad_out_main, tl.trans(v_main), INTERPRETER_BF16)
        if REST_WIDTH > 0:
            k_rest = _load_tile(k_pointer, keys, key_ok, k_stride_token, k_stride_dim, MAIN_WIDTH, REST_WIDTH, HEAD_DIM)
            v_rest = _load_tile(v_pointer, keys, key_ok, v_stride_token, v_stride_dim, MAIN_WIDTH, REST_WIDTH, HEAD_DIM)
            scores += _dot(q_rest, tl.trans(k_rest), INTERPRETER_BF16)
            grad_probs += _dot(grad_out_rest, tl.trans(v_rest), INTERPRETER_BF16)
        probs = tl.math.exp2(tl.where(attended[None, :], scores * scale_log2 - lse[:, None], float("-inf")))
        if ONE_KEY_BLOCK:  # this is the only tile: Delta from it exactly (module docstring)
            delta = tl.sum(probs * grad_probs, 1)
        grad_scores = _to_storage(probs * (grad_probs - delta[:, None]), k_pointer.dtype.element_ty, INTERPRETER_BF16)
        grad_q_main += _dot(grad_scores, k_main, INTERPRETER_BF16)
        if REST_WIDTH > 0:
            grad_q_rest += _dot(grad_scores, k_rest, INTERPRETER_BF16)
    if ONE_KEY_BLOCK:
        tl.store(delta_pointer + row_offsets + queries, delta, mask=query_ok)

    _store_tile(grad_q_pointer, grad_q_main * scale, queries, query_ok,
                grad_q_stride_token, grad_q_stride_dim, 0, MAIN_WIDTH, HEAD_DIM, INTERPRETER_BF16)
    if REST_WIDTH > 0:
        _store_tile(grad_q_pointer, grad_q_rest * scale, queries, query_ok,
                    grad_q_stride_token, grad_q_stride_dim, MAIN_WIDTH, REST_WIDTH, HEAD_DIM, INTERPRETER_BF16)


@_autotune(_BACKWARD_CONFIGS, owned_rows="BLOCK_N", accumulators=2)
@triton.jit
def _backward_key_kernel(
    q_pointer, k_pointer, v_pointer, mask_pointer, grad_out_pointer,
    lse_pointer, delta_pointer, grad_k_pointer, grad_v_pointer,
    q_stride_batch, q_stride_head, q_stride_token, q_stride_dim,
    k_stride_batch, k_stride_head, k_stride_token, k_stride_dim,
    v_stride_batch, v_stride_head, v_stride_token, v_stride_dim,
    grad_out_stride_batch, grad_out_stride_head, grad_out_stride_token, grad_out_stride_dim,
    grad_k_stride_batch, grad_k_stride_head, grad_k_stride_token, grad_k_stride_dim,
    grad_v_stride_batch, grad_v_stride_head, grad_v_stride_token, grad_v_stride_dim,
    mask_stride_batch, mask_stride_token,
    num_heads, query_len, key_len, scale, scale_log2,
    HEAD_DIM: tl.constexpr, MAIN_WIDTH: tl.constexpr, REST_WIDTH: tl.constexpr,
    HAS_MASK: tl.constexpr, INTERPRETER_BF16: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One key block: dK and dV over every query block. Works on transposed tiles
    (keys x queries) so that P^T and dS^T come out of the matmuls without a transpose."""
    key_block = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    q_pointer, q_stride_token = _head_start(
        q_pointer, batch, head, q_stride_batch, q_stride_head, q_stride_token, ALIGN)
    k_pointer, k_stride_token = _head_start(
        k_pointer, batch, head, k_stride_batch, k_stride_head, k_stride_token, ALIGN)
    v_pointer, v_stride_token = _head_start(
        v_pointer, batch, head, v_stride_batch, v_stride_head, v_stride_token, ALIGN)
    grad_out_pointer, grad_out_stride_token = _head_start(
        grad_out_pointer, batch, head, grad_out_stride_batch, grad_out_stride_head, grad_out_stride_token, ALIGN)
    grad_k_pointer, grad_k_stride_token = _head_start(
        grad_k_pointer, batch, head, grad_k_stride_batch, grad_k_stride_head, grad_k_stride_token, ALIGN)
    grad_v_pointer, grad_v_stride_token = _head_start(
        grad_v_pointer, batch, head, grad_v_stride_batch, grad_v_stride_head, grad_v_stride_token, ALIGN)
    mask_pointer += batch * mask_stride_batch
    row_offsets = batch_head.to(tl.int64) * query_len

    keys = key_block * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = keys < key_len
    attended = _keys_attended(mask_pointer, keys, key_len, mask_stride_token, HAS_MASK)
    k_main = _load_tile(k_pointer, keys, key_ok, k_stride_token, k_stride_dim, 0, MAIN_WIDTH, HEAD_DIM)
    v_main = _load_tile(v_pointer, keys, key_ok, v_stride_token, v_stride_dim, 0, MAIN_WIDTH, HEAD_DIM)
    grad_k_main = tl.zeros([BLOCK_N, MAIN_WIDTH], dtype=tl.float32)
    grad_v_main = tl.zeros([BLOCK_N, MAIN_WIDTH], dtype=tl.float32)
    if REST_WIDTH > 0:
        k_rest = _load_tile(k_pointer, keys, key_ok, k_stride_token, k_stride_dim, MAIN_WIDTH, REST_WIDTH, HEAD_DIM)
        v_rest = _load_tile(v_pointer, keys, key_ok, v_stride_token, v_stride_dim, MAIN_WIDTH, REST_WIDTH, HEAD_DIM)
        grad_k_rest = tl.zeros([BLOCK_N, REST_WIDTH], dtype=tl.float32)
        grad_v_rest = tl.zeros([BLOCK_N, REST_WIDTH], dtype=tl.float32)

    for query_start in range(0, query_len, BLOCK_M):
        queries = query_start + tl.arange(0, BLOCK_M)
        query_ok = queries < query_len
        q_main = _load_tile(q_pointer, queries, query_ok, q_stride_token, q_stride_dim, 0, MAIN_WIDTH, HEAD_DIM)
        grad_out_main = _load_tile(grad_out_pointer, queries, query_ok, grad_out_stride_token, grad_out_stride_dim,
                                   0, MAIN_WIDTH, HEAD_DIM)
        scores_t = _dot(k_main, tl.trans(q_main), INTERPRETER_BF16)
        grad_probs_t = _dot(v_main, tl.trans(grad_out_main), INTERPRETER_BF16)
        if REST_WIDTH > 0:
            q_rest = _load_tile(q_pointer, queries, query_ok, q_stride_token, q_stride_dim,
                                MAIN_WIDTH, REST_WIDTH, HEAD_DIM)
            grad_out_rest = _load_tile(grad_out_pointer, queries, query_ok, grad_out_stride_token,
                                       grad_out_stride_dim, MAIN_WIDTH, REST_WIDTH, HEAD_DIM)
            scores_t += _dot(k_rest, tl.trans(q_rest), INTERPRETER_BF16)
            grad_probs_t += _dot(v_rest, tl.trans(grad_out_rest), INTERPRETER_BF16)
        lse = tl.load(lse_pointer + row_offsets + queries, mask=query_ok, other=float("inf"))
        delta = tl.load(delta_pointer + row_offsets + queries, mask=query_ok, other=0.0)
        probs_t = tl.math.exp2(tl.where(attended[:, None], scores_t * scale_log2 - lse[None, :], float("-inf")))
        grad_scores_t = _to_storage(probs_t * (grad_probs_t - delta[None, :]), q_pointer.dtype.element_ty,
                                    INTERPRETER_BF16)
        probs_t = _to_storage(probs_t, grad_out_pointer.dtype.element_ty, INTERPRETER_BF16)
        grad_v_main += _dot(probs_t, grad_out_main, INTERPRETER_BF16)
        grad_k_main += _dot(grad_scores_t, q_main, INTERPRETER_BF16)
        if REST_WIDTH > 0:
            grad_v_rest += _dot(probs_t, grad_out_rest, INTERPRETER_BF16)
            grad_k_rest += _dot(grad_scores_t, q_rest, INTERPRETER_BF16)

    _store_tile(grad_k_pointer, grad_k_main * scale, keys, key_ok,
                grad_k_stride_token, grad_k_stride_dim, 0, MAIN_WIDTH, HEAD_DIM, INTERPRETER_BF16)
    _store_tile(grad_v_pointer, grad_v_main, keys, key_ok,
                grad_v_stride_token, grad_v_stride_dim, 0, MAIN_WIDTH, HEAD_DIM, INTERPRETER_BF16)
    if REST_WIDTH > 0:
        _store_tile(grad_k_pointer, grad_k_rest * scale, keys, key_ok,
                    grad_k_stride_token, grad_k_stride_dim, MAIN_WIDTH, REST_WIDTH, HEAD_DIM, INTERPRETER_BF16)
        _store_tile(grad_v_pointer, grad_v_rest, keys, key_ok,
                    grad_v_stride_token, grad_v_stride_dim, MAIN_WIDTH, REST_WIDTH, HEAD_DIM, INTERPRETER_BF16)


def _allocate(shape, dtype, device):
    """Every buffer the op hands out or passes between kernels comes from here, through
    torch.empty: the tests' poisoned_allocations fills it with NaN (an element a kernel
    forgets to write shows) and guards its end."""
    return torch.empty(shape, dtype=dtype, device=device)


def _new_head_tensor(batch, heads, tokens, head_dim, like):
    """(B, H, T, D) view of (B, T, H, D) memory: the order the DiT reshapes to next."""
    return _allocate((batch, tokens, heads, head_dim), like.dtype, like.device).transpose(1, 2)


def _new_row_stats(q):
    batch, heads, query_len, _ = q.shape
    return _allocate((batch, heads, query_len), torch.float32, q.device)


def _launch_constants(q, key_padding_mask):
    """(scale, scale * log2(e), the kernels' constexprs)."""
    head_dim = q.shape[-1]
    main_width, rest_width = head_dim_tiles(head_dim)
    scale = head_dim ** -0.5
    constants = dict(
        HEAD_DIM=head_dim, MAIN_WIDTH=main_width, REST_WIDTH=rest_width,
        HAS_MASK=key_padding_mask is not None,
        INTERPRETER_BF16=INTERPRET and q.dtype == torch.bfloat16,
    )
    return scale, scale * math.log2(math.e), constants


def _alignment(*tensors):
    """ALIGN: the most elements, at most 16 bytes' worth, that divide every batch, head and
    token stride of `tensors`: each row then starts on such a boundary when the base
    pointer does (Triton sees the pointers' 16-byte alignment itself)."""
    common = math.gcd(*(stride for tensor in tensors for stride in tensor.stride()[:-1]))
    align, most = 1, max(1, 16 // tensors[0].element_size())
    while align < most and common % (2 * align) == 0:
        align *= 2
    return align


def _mask_arguments(key_padding_mask, q):
    """(pointer, stride_batch, stride_token); without a mask, q stands in for the pointer,
    which HAS_MASK=False never reads."""
    if key_padding_mask is None:
        return q, 0, 0
    return key_padding_mask.view(torch.uint8), *key_padding_mask.stride()


# CUDA allows at most 65535 programs on a grid's second axis, where the kernels put batch *
# heads (the first holds the blocks of one head, which then run side by side and share its
# k and v in L2): a larger batch is launched in slices of whole batch elements.
_MOST_BATCH_HEADS = 65535


def _batch_slices(batch, heads):
    step = max(1, _MOST_BATCH_HEADS // max(1, heads))
    return [slice(start, min(start + step, batch)) for start in range(0, batch, step)]


def _sliced(rows, *tensors):
    """The batch slice `rows` of each tensor (None stays None): views, so the kernels write
    into the whole outputs."""
    return [None if tensor is None else tensor[rows] for tensor in tensors]


def _forward(q, k, v, key_padding_mask):
    batch, heads, query_len, head_dim = q.shape
    out = _new_head_tensor(batch, heads, query_len, head_dim, q)
    lse = _new_row_stats(q)
    if out.numel() == 0:
        return out, lse
    with on_device(q):
        for rows in _batch_slices(batch, heads):
            _launch_forward(*_sliced(rows, q, k, v, key_padding_mask, out, lse))
    return out, lse


def _launch_forward(q, k, v, key_padding_mask, out, lse):
    batch, heads, query_len, _ = q.shape
    key_len = k.shape[2]
    _scale, scale_log2, constants = _launch_constants(q, key_padding_mask)
    mask, mask_stride_batch, mask_stride_token = _mask_arguments(key_padding_mask, q)
    grid = lambda meta: (triton.cdiv(query_len, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _forward_kernel[grid](
        q, k, v, mask, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        mask_stride_batch, mask_stride_token,
        heads, query_len, key_len, scale_log2,
        ALIGN=_alignment(q, k, v, out), **constants, **LAUNCH_OPTIONS,
    )


def _backward(grad_out, q, k, v, key_padding_mask, out, lse):
    batch, heads, query_len, head_dim = q.shape
    key_len = k.shape[2]
    grad_q = _new_head_tensor(batch, heads, query_len, head_dim, q)
    grad_k = _new_head_tensor(batch, heads, key_len, head_dim, k)
    grad_v = _new_head_tensor(batch, heads, key_len, head_dim, v)
    delta = _new_row_stats(q)
    with on_device(q):
        for rows in _batch_slices(batch, heads):
            _launch_backward(*_sliced(rows, grad_out, q, k, v, key_padding_mask, out, lse, delta, grad_q, grad_k, grad_v))
    return grad_q, grad_k, grad_v


def _launch_backward(grad_out, q, k, v, key_padding_mask, out, lse, delta, grad_q, grad_k, grad_v):
    batch, heads, query_len, _ = q.shape
    key_len = k.shape[2]
    scale, scale_log2, constants = _launch_constants(q, key_padding_mask)
    mask, mask_stride_batch, mask_stride_token = _mask_arguments(key_padding_mask, q)
    constants["ALIGN"] = _alignment(q, k, v, out, grad_out, grad_q, grad_k, grad_v)
    query_grid = lambda meta: (triton.cdiv(query_len, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    key_grid = lambda meta: (triton.cdiv(key_len, meta["BLOCK_N"]), batch * heads)  # noqa: E731
    if grad_q.numel():
        _backward_query_kernel[query_grid](
            q, k, v, mask, out, grad_out, lse, delta, grad_q,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(), *grad_q.stride(),
            mask_stride_batch, mask_stride_token,
            heads, query_len, key_len, scale, scale_log2,
            ONE_KEY_BLOCK=key_len <= _KEYS_IN_EVERY_BLOCK, **constants, **LAUNCH_OPTIONS,
        )
    if grad_k.numel():
        _backward_key_kernel[key_grid](
            q, k, v, mask, grad_out, lse, delta, grad_k, grad_v,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *grad_k.stride(), *grad_v.stride(),
            mask_stride_batch, mask_stride_token,
            heads, query_len, key_len, scale, scale_log2,
            **constants, **LAUNCH_OPTIONS,
        )


@torch.library.custom_op("fusedit::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, key_padding_mask)


@_attention_op.register_fake
def _attention_fake(q, k, v, key_padding_mask):
    batch, heads, query_len, head_dim = q.shape
    return _new_head_tensor(batch, heads, query_len, head_dim, q), _new_row_stats(q)


@torch.library.custom_op("fusedit::attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad_out, q, k, v, key_padding_mask, out, lse)


@_attention_backward_op.register_fake
def _attention_backward_fake(grad_out, q, k, v, key_padding_mask, out, lse):
    batch, heads, query_len, head_dim = q.shape
    key_len = k.shape[2]
    return (
        _new_head_tensor(batch, heads, query_len, head_dim, q),
        _new_head_tensor(batch, heads, key_len, head_dim, k),
        _new_head_tensor(batch, heads, key_len, head_dim, v),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)


def _attention_autograd(ctx, grad_out, _grad_lse):
    q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
    grad_q, grad_k, grad_v = _attention_backward_op(grad_out, q, k, v, key_padding_mask, out, lse)
    return grad_q, grad_k, grad_v, None


_attention_op.register_autograd(_attention_autograd, setup_context=_setup_context)


def _check_inputs(q, k, v, key_padding_mask):
    check_tensors(OP, q=q, k=k, v=v)
    check_shape(OP, "q", q, (None, None, None, None))
    batch, heads, _, head_dim = q.shape
    check_shape(OP, "k", k, (batch, heads, None, head_dim))
    check_shape(OP, "v", v, k.shape)
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{OP}: head dim {head_dim} is outside the supported 1..{MAX_HEAD_DIM}")
    if heads > _MOST_BATCH_HEADS:
        raise ValueError(f"{OP}: {heads} heads exceed the {_MOST_BATCH_HEADS} that one launch's grid holds")
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
        what = key_padding_mask.dtype if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask).__name__
        raise ValueError(f"{OP}: key_padding_mask must be a bool tensor (True = padding), got {what}")
    check_shape(OP, "key_padding_mask", key_padding_mask, (batch, k.shape[2]))
    if key_padding_mask.device != q.device:
        raise ValueError(f"{OP}: key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")


def attention(q, k, v, key_padding_mask=None):
    """softmax(q k^T / sqrt(D)) v over (B,H,Tq,D) x (B,H,Tk,D) -> (B,H,Tq,D), like
    fusedit.kernels.reference.attention, differentiable in q, k and v.

    key_padding_mask: optional bool (B, Tk), True where a key is padding and must be
    ignored; a query whose keys are all padding gets a zero output (and zero gradients).
    Inputs may be any strided views; the output is a (B,H,Tq,D) view of (B,Tq,H,D) memory.
    """
    q, k, v = autocast_inputs(q, k, v)
    _check_inputs(q, k, v, key_padding_mask)
    out, _lse = _attention_op(q, k, v, key_padding_mask)
    return out
