"""The guards every Pallas kernel shares: TPU block rules, accumulating axes kept sequential,
NaN for unwritten outputs, op-set lookup; and what every op owes its caller: outputs and
gradients in the inputs' dtype, fp32 matmuls at full precision, empty arrays handled as the
reference handles them."""
import pytest
import torch

pytest.importorskip("jax", reason="JAX is an optional extra: pip install -e '.[jax]'")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

from fusedit.kernels.pallas import (JAX_KERNEL_BACKENDS, adaln_modulate, attention, get_jax_ops,  # noqa: E402
                                    linear_gelu, residual_adaln_modulate, xla)
from fusedit.kernels import reference  # noqa: E402
from fusedit.kernels.pallas.testing import check_against_float64, random_array  # noqa: E402
from fusedit.kernels.pallas._common import (even_blocks, pallas_call, padded_block, split_evenly,  # noqa: E402
                                            token_tiling, tpu_block_problem, vmem_bytes)


@pytest.mark.parametrize("block,array,dtype,problem", [
    ((None, 256, 1152), (32, 256, 1152), jnp.bfloat16, None),
    ((None, 8, 72), (2, 24, 72), jnp.float32, None),          # last dim = the array's
    ((None, 1, 72), (2, 1, 72), jnp.float32, None),           # (1, C) vectors
    ((None, None, 24, 1), (2, 4, 48, 1), jnp.float32, None),  # lse rows
    ((None, 12, 72), (2, 24, 72), jnp.float32, "second-to-last block dim 12"),
    ((8, 100), (16, 200), jnp.float32, "last block dim 100"),
    ((None, 1, 72), (2, 3, 72), jnp.float32, "second-to-last block dim 1"),
    ((8, 128), (16, 128), jnp.float16, "float16"),
])
def test_tpu_block_rules(block, array, dtype, problem):
    found = tpu_block_problem(block, array, dtype)
    assert found is None if problem is None else problem in found


def test_an_illegal_block_is_refused_before_running():
    def copy(x_ref, out_ref):
        out_ref[...] = x_ref[...]

    call = pallas_call(copy, name="copy", grid=(2,), in_specs=[pl.BlockSpec((4, 128), lambda i: (i, 0))],
                       out_specs=pl.BlockSpec((4, 128), lambda i: (i, 0)),
                       out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32))
    with pytest.raises(ValueError, match="copy: operand 0 would not lower on a TPU: second-to-last block dim 4"):
        call(jnp.ones((8, 128)))


def test_an_accumulating_axis_marked_parallel_is_refused():
    # a row sum over column blocks: axis 1 revisits the output block, so on a TPU it must run
    # in order ("arbitrary"); the interpreter would run a "parallel" one in order too and
    # hide the race Mosaic's split across cores would start
    def row_sum(x_ref, out_ref):
        @pl.when(pl.program_id(1) == 0)
        def _zero():
            out_ref[...] = jnp.zeros_like(out_ref)

        out_ref[...] += x_ref[...].sum(axis=1, keepdims=True)

    arguments = dict(name="row_sum", grid=(2, 3), in_specs=[pl.BlockSpec((8, 128), lambda i, j: (i, j))],
                     out_specs=pl.BlockSpec((8, 1), lambda i, j: (i, 0)),
                     out_shape=jax.ShapeDtypeStruct((16, 1), jnp.float32))
    with pytest.raises(ValueError, match="row_sum: grid axis 1 revisits output 0's block .* marked parallel"):
        pallas_call(row_sum, **arguments)
    with pytest.raises(ValueError, match="grid axis 1 revisits"):
        pallas_call(row_sum, semantics=("parallel", "parallel"), **arguments)
    out = pallas_call(row_sum, semantics=("parallel", "arbitrary"), **arguments)(jnp.ones((16, 384)))
    assert np.all(np.asarray(out) == 384)


def test_an_unwritten_block_reaches_the_comparison_as_nan():
    """The tests need no explicit poisoning: the interpreter NaN-fills output buffers."""
    def first_block_only(x_ref, out_ref):
        @pl.when(pl.program_id(0) == 0)
        def _write():
            out_ref[...] = x_ref[...]

    call = pallas_call(first_block_only, name="first_block_only", grid=(2,),
                       in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
                       out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
                       out_shape=jax.ShapeDtypeStruct((16, 128), jnp.float32))
    out = np.asarray(call(jnp.ones((16, 128))))
    assert np.all(out[:8] == 1) and np.all(np.isnan(out[8:]))


def test_block_choices():
    assert token_tiling(256, 256) == (256, 256) and token_tiling(24, 8) == (8, 24) and token_tiling(17, 256) == (17, 17)
    assert token_tiling(40, 16) == (8, 40) and token_tiling(258, 256) == (136, 272)
    # in-context blocks at 512 px: no multiple of 8 divides 1,026, and one block of it all would
    # overflow a TPU's VMEM
    assert token_tiling(1026, 256) == (208, 1040) and token_tiling(1026, 1024) == (520, 1040)
    assert padded_block(20, 8) == (8, 24) and padded_block(5, 8) == (5, 5) and padded_block(258, 128) == (128, 384)
    # a row dim: the fewest equal blocks; the in-context block's 258 queries pad to 264, not 384
    assert even_blocks(258, 128) == (88, 264) and even_blocks(5, 8) == (5, 5) and even_blocks(8192, 512) == (512, 8192)
    # rounding the blocks up to 8 rows can leave one of them empty: the padded length drops it
    assert split_evenly(100, 8) == (16, 112) and split_evenly(300, 2) == (152, 304)


def test_vmem_bytes_count_whole_tiles():
    assert vmem_bytes((None, 256, 1152), jnp.bfloat16) == 256 * 1152 * 2
    assert vmem_bytes((None, 1, 72), jnp.float32) == 8 * 128 * 4          # a (1, C) vector: one 8 x 128 tile
    assert vmem_bytes((None, None, 24, 1), jnp.float32) == 24 * 128 * 4    # lse rows: 128 lanes each
    assert vmem_bytes((8, 72), jnp.bfloat16) == 16 * 128 * 2               # a bf16 tile holds 16 rows
    assert vmem_bytes((384,), jnp.float32) == 8 * 384 * 4


def _copy(x_ref, out_ref):
    out_ref[...] = x_ref[...]


@pytest.mark.parametrize("rows,refused", [(1024, False), (1032, True)])
def test_blocks_over_a_tpu_kernels_vmem_are_refused(rows, refused):
    # in and out blocks, each held twice: 4 x 4 MiB fills the 16 MiB a kernel gets by default
    call = pallas_call(_copy, name="copy", grid=(1,), in_specs=[pl.BlockSpec((rows, 1024), lambda i: (i, 0))],
                       out_specs=pl.BlockSpec((rows, 1024), lambda i: (i, 0)),
                       out_shape=jax.ShapeDtypeStruct((rows, 1024), jnp.float32))
    x = jnp.ones((rows, 1024))
    if refused:
        with pytest.raises(ValueError, match=r"copy: its blocks would take 16.1 MiB of a TPU's VMEM \(each in and out "
                                             r"block twice\), over the 16 MiB a kernel gets by default on TPU v4/v5e; "
                                             r"the largest: \(1032, 1024\) float32, \(1032, 1024\) float32\. "):
            call(x)
    else:
        assert np.all(np.asarray(call(x)) == 1)


def _pallas_grids(op, arrays):
    """{kernel name: grid} of every pallas_call in op's forward and backward."""
    def loss(*arrays):
        return sum(out.astype(jnp.float32).sum() for out in jax.tree.leaves(op(*arrays)))

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=tuple(range(len(arrays)))))(*arrays).jaxpr
    return {equation.params["name"]: equation.params["grid_mapping"].grid for equation in _equations(jaxpr)
            if equation.primitive.name == "pallas_call"}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bfloat16", "float32"])
def test_default_blocks_leave_room_in_vmem_at_dit_xl_shapes(dtype):
    """DiT-XL/2 at batch 32: the chain's backward would hold 16.5 MB (bf16) to 23.6 MB (fp32) at
    256-token blocks, and linear_gelu's fp32 training tiles 16.5 MB at 512 rows, against the
    16 MiB a TPU v4/v5e kernel gets: they run at 128 tokens and 256 rows."""
    x, vector = (jax.ShapeDtypeStruct(shape, dtype) for shape in ((32, 256, 1152), (32, 1152)))
    modulate_tokens, row_block = (256, 512) if dtype == jnp.bfloat16 else (128, 256)
    assert _pallas_grids(adaln_modulate, (x, vector, vector)) == {
        "adaln_modulate": (32, 256 // modulate_tokens), "adaln_modulate_backward": (32, 256 // modulate_tokens)}
    assert _pallas_grids(residual_adaln_modulate, (x, vector, x, vector, vector)) == {
        "residual_adaln_modulate": (32, 2), "residual_adaln_modulate_backward": (32, 2)}
    kernel, bias = jax.ShapeDtypeStruct((1152, 4608), dtype), jax.ShapeDtypeStruct((4608,), dtype)
    assert _pallas_grids(linear_gelu, (x, kernel, bias)) == {"linear_gelu": (32 * 256 // row_block, 6, 3)}


def test_op_sets():
    assert JAX_KERNEL_BACKENDS == ("xla", "pallas")
    assert get_jax_ops("xla").attention is xla.attention
    assert get_jax_ops("pallas").name == "pallas"
    with pytest.raises(ValueError, match="unknown JAX kernels 'sdpa'; choose one of xla, pallas"):
        get_jax_ops("sdpa")


def _ops_on(dtype):
    """Each Pallas op with inputs of `dtype`, at small sizes that still span several blocks."""
    generator = torch.Generator().manual_seed(3)
    x, y = (random_array((2, 24, 72), dtype, generator) for _ in range(2))
    gate, shift, scale = (random_array((2, 72), dtype, generator) for _ in range(3))
    q, k, v = random_array((1, 2, 16, 64), dtype, generator), *(random_array((1, 2, 200, 64), dtype, generator)
                                                                  for _ in range(2))
    x_wide, kernel, bias = (random_array(shape, dtype, generator) for shape in ((2, 25, 256), (256, 384), (384,)))
    return {
        "adaln_modulate": (lambda *a: adaln_modulate(*a, block_tokens=8), (x, shift, scale)),
        "residual_adaln_modulate": (lambda *a: residual_adaln_modulate(*a, block_tokens=8), (x, gate, y, shift, scale)),
        "attention": (lambda *a: attention(*a, block_q=8), (q, k, v)),
        "linear_gelu": (lambda *a: linear_gelu(*a, block_m=16, block_n=128, block_k=128), (x_wide, kernel, bias)),
    }


@pytest.mark.parametrize("op_name", ["adaln_modulate", "residual_adaln_modulate", "attention", "linear_gelu"])
def test_bf16_inputs_give_bf16_outputs_and_gradients(op_name):
    # JAX takes an fp32 cotangent for a bf16 input without complaint: only a check sees it
    op, arrays = _ops_on(jnp.bfloat16)[op_name]
    outputs, pullback = jax.vjp(op, *arrays)
    grads = pullback(jax.tree.map(jnp.ones_like, outputs))
    assert [out.dtype for out in jax.tree.leaves(outputs)] == [jnp.bfloat16] * len(jax.tree.leaves(outputs))
    assert [grad.dtype for grad in grads] == [array.dtype for array in arrays]


def _equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in its equations' parameters."""
    for equation in jaxpr.eqns:
        yield equation
        for value in equation.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(item, "jaxpr", item)  # a ClosedJaxpr holds its Jaxpr
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


@pytest.mark.parametrize("op_name", ["attention", "linear_gelu"])
def test_float32_matmuls_run_at_highest_precision(op_name):
    # the interpreter computes in fp32 whatever the precision says; a TPU's default
    # rounds fp32 operands through bf16 on the MXU. Inside the kernels and around them (the
    # backward's XLA matmuls) alike.
    op, arrays = _ops_on(jnp.float32)[op_name]

    def loss(*arrays):
        return sum(out.sum() for out in jax.tree.leaves(op(*arrays)))

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=tuple(range(len(arrays)))))(*arrays).jaxpr
    assert any(equation.primitive.name == "pallas_call" for equation in _equations(jaxpr))
    matmuls = [equation for equation in _equations(jaxpr)
               if equation.primitive.name == "dot_general" and equation.invars[0].aval.dtype == jnp.float32]
    assert matmuls
    for matmul in matmuls:
        precision = matmul.params["precision"]
        assert all(p == jax.lax.Precision.HIGHEST for p in (precision if isinstance(precision, tuple) else (precision,))), \
            precision


EMPTY_CASES = {  # op, its torch reference, and the shapes of its arrays
    "adaln_modulate-no-batch": (adaln_modulate, reference.adaln_modulate, [(0, 5, 8), (0, 8), (0, 8)]),
    "adaln_modulate-no-tokens": (adaln_modulate, reference.adaln_modulate, [(2, 0, 8), (2, 8), (2, 8)]),
    "chain-no-batch": (residual_adaln_modulate, reference.residual_adaln_modulate,
                       [(0, 5, 8), (0, 8), (0, 5, 8), (0, 8), (0, 8)]),
    "chain-no-tokens": (residual_adaln_modulate, reference.residual_adaln_modulate,
                        [(2, 0, 8), (2, 8), (2, 0, 8), (2, 8), (2, 8)]),
    "attention-no-queries": (attention, reference.attention, [(1, 2, 0, 8), (1, 2, 5, 8), (1, 2, 5, 8)]),
    "attention-no-keys": (attention, reference.attention, [(1, 2, 3, 8), (1, 2, 0, 8), (1, 2, 0, 8)]),  # zeros
    "attention-no-heads": (attention, reference.attention, [(1, 0, 3, 8)] * 3),
    "linear_gelu-no-rows": (linear_gelu, lambda x, kernel, bias: reference.linear_gelu(x, kernel.T, bias),
                            [(0, 8), (8, 4), (4,)]),
    "linear_gelu-no-depth": (linear_gelu, lambda x, kernel, bias: reference.linear_gelu(x, kernel.T, bias),
                             [(3, 0), (0, 4), (4,)]),  # gelu(bias), and a d bias
    "linear_gelu-no-columns": (linear_gelu, lambda x, kernel, bias: reference.linear_gelu(x, kernel.T, bias),
                               [(3, 8), (8, 0), (0,)]),
}


@pytest.mark.parametrize("case", EMPTY_CASES)
def test_empty_arrays_match_the_reference(case):
    op, reference_op, shapes = EMPTY_CASES[case]
    generator = torch.Generator().manual_seed(0)
    arrays = [random_array(shape, jnp.float32, generator) for shape in shapes]
    check_against_float64(op, reference_op, arrays, jnp.float32, op=op.__name__)
