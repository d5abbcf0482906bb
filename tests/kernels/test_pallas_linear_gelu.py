"""Pallas linear_gelu (interpreted on CPU) and its XLA reference, forward and gradients, against
the PyTorch reference in float64 (the JAX ops take the kernel as (K, N), torch's weight.T)."""
import pytest

pytest.importorskip("jax", reason="JAX is an optional extra: pip install -e '.[jax]'")

import jax.numpy as jnp  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
import torch  # noqa: E402

from fusedit.kernels import reference  # noqa: E402
from fusedit.kernels.pallas import xla  # noqa: E402
from fusedit.kernels.pallas.linear_gelu import linear_gelu  # noqa: E402
from fusedit.kernels.pallas.testing import check_against_float64, random_array  # noqa: E402

# (leading dims, K, N, block_m), dtype: rows padded (50 -> 64) over 4 row blocks, 2 K blocks
# accumulated, 3 N blocks; one row with K and N that are not multiples of 128 (whole-dim blocks)
CASES = [(((2, 25), 256, 384, 16), jnp.float32), (((1, 1), 40, 72, 8), jnp.float32),
         (((2, 25), 256, 384, 16), jnp.bfloat16)]
XLA_CASES = [(((3, 5), 72, 144, 8), jnp.float32), (((3, 5), 72, 144, 8), jnp.bfloat16)]


def _case_id(case):
    (leading, inner, outer, _), dtype = case
    return f"{'x'.join(map(str, leading))}x{inner}-to-{outer}-{jnp.dtype(dtype).name}"


def _inputs(shape, dtype):
    leading, inner, outer, _ = shape
    generator = torch.Generator().manual_seed(0)
    x = random_array(leading + (inner,), dtype, generator)
    # scaled so the pre-activations spread over gelu's curved region, not only its linear tails
    kernel = (random_array((inner, outer), jnp.float32, generator) / inner ** 0.5).astype(dtype)
    return [x, kernel, random_array((outer,), dtype, generator)]


def _torch_linear_gelu(x, kernel, bias):
    return reference.linear_gelu(x, kernel.T, bias)


@pytest.mark.parametrize(
    "backend,shape,dtype", [("pallas",) + case for case in CASES] + [("xla",) + case for case in XLA_CASES],
    ids=[f"pallas-{_case_id(case)}" for case in CASES] + [f"xla-{_case_id(case)}" for case in XLA_CASES])
def test_linear_gelu(backend, shape, dtype):
    if backend == "pallas":
        def op(x, kernel, bias):
            return linear_gelu(x, kernel, bias, block_m=shape[3], block_n=128, block_k=128)
    else:
        op = xla.linear_gelu
    check_against_float64(op, _torch_linear_gelu, _inputs(shape, dtype), dtype, what=backend)


@settings(max_examples=8, deadline=None)
@given(leading=st.tuples(st.integers(1, 3), st.integers(1, 30)), inner=st.integers(1, 200),
       outer=st.integers(1, 200), block_m=st.sampled_from([8, 16]), block_n=st.sampled_from([128, 256]),
       block_k=st.sampled_from([128, 256]), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]))
def test_shape_sweep(leading, inner, outer, block_m, block_n, block_k, dtype):
    check_against_float64(lambda x, kernel, bias: linear_gelu(x, kernel, bias, block_m=block_m, block_n=block_n,
                                                              block_k=block_k),
                          _torch_linear_gelu, _inputs((leading, inner, outer, block_m), dtype), dtype)


def test_bad_inputs_name_the_problem():
    x, kernel, bias = _inputs(((2, 3), 40, 72, 8), jnp.float32)
    with pytest.raises(ValueError, match="kernel must have shape"):
        linear_gelu(x, kernel.T, bias)
    with pytest.raises(ValueError, match="bias must have shape"):
        linear_gelu(x, kernel, bias[:3])
    with pytest.raises(ValueError, match="block_n"):
        linear_gelu(x, kernel, bias, block_n=100)
    with pytest.raises(ValueError, match="leading batch dim"):
        linear_gelu(x[0, 0], kernel, bias)


def test_row_blocks_split_evenly_until_the_tiles_fit_vmem():
    from fusedit.kernels.pallas.linear_gelu import _fitting_row_block

    # fc1 of DiT-XL/2 (K=1152 in 384-wide tiles, N=4608 in 768-wide ones): bf16 tiles fit at 512 rows;
    # 600 rows run as 2 blocks of 304, not 2 of 512 over 1,024
    assert _fitting_row_block(8192, 512, 768, 384, jnp.bfloat16) == (512, 8192)
    assert _fitting_row_block(600, 512, 768, 384, jnp.bfloat16) == (304, 608)
    # fp32 ones at 512 rows would take 16.5 MB: 8192 rows run as 32 blocks of 256; 600 rows as 2
    # of 304 (10.8 MB), or with 1024 x 512 tiles, where neither 304 nor 256 rows fit, as 4 of 152
    assert _fitting_row_block(8192, 512, 768, 384, jnp.float32) == (256, 8192)
    assert _fitting_row_block(600, 512, 768, 384, jnp.float32) == (304, 608)
    assert _fitting_row_block(600, 512, 1024, 512, jnp.float32) == (152, 608)
    assert _fitting_row_block(5, 512, 768, 384, jnp.float32) == (5, 5)
