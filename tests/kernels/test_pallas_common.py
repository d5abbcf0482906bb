"""The guards every Pallas kernel shares: TPU block rules, NaN for unwritten outputs, op-set lookup."""
import pytest

pytest.importorskip("jax", reason="JAX is an optional extra: pip install -e '.[jax]'")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

from fusedit.kernels.pallas import JAX_KERNEL_BACKENDS, get_jax_ops, xla  # noqa: E402
from fusedit.kernels.pallas._common import pallas_call, padded_block, token_block, tpu_block_problem  # noqa: E402


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
    assert token_block(256, 256) == 256 and token_block(24, 8) == 8 and token_block(17, 256) == 17
    assert token_block(40, 16) == 8
    assert padded_block(20, 8) == (8, 24) and padded_block(5, 8) == (5, 5)


def test_op_sets():
    assert JAX_KERNEL_BACKENDS == ("xla", "pallas")
    assert get_jax_ops("xla").attention is xla.attention
    assert get_jax_ops("pallas").name == "pallas"
    with pytest.raises(ValueError, match="unknown JAX kernels 'sdpa'; choose one of xla, pallas"):
        get_jax_ops("sdpa")
