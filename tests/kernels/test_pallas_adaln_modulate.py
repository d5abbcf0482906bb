"""Pallas adaln_modulate and the residual chain (interpreted on CPU) and their XLA references,
forward and gradients, against the PyTorch reference ops in float64."""
import pytest

pytest.importorskip("jax", reason="JAX is an optional extra: pip install -e '.[jax]'")

import jax.numpy as jnp  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
import torch  # noqa: E402

from fusedit.kernels import reference  # noqa: E402
from fusedit.kernels.pallas import xla  # noqa: E402
from fusedit.kernels.pallas.adaln_modulate import (adaln_modulate, fitting_block_tokens,  # noqa: E402
                                                   residual_adaln_modulate)
from fusedit.kernels.pallas.testing import check_against_float64, random_array  # noqa: E402

# (B, T, C, block_tokens), dtype: one token; T a multiple of the block (3 blocks accumulate the
# gradients of shift/scale/gate); T not a multiple of 8 (one whole-T block); T not a multiple
# of 8 and past one block (padded: 20 tokens run as 3 blocks of 8); C 40/72/64
CASES = [((1, 1, 40, 8), jnp.float32), ((2, 24, 72, 8), jnp.float32), ((3, 17, 64, 256), jnp.float32),
         ((2, 20, 72, 8), jnp.float32), ((2, 24, 72, 8), jnp.bfloat16), ((2, 20, 40, 8), jnp.bfloat16)]
XLA_CASES = [((2, 24, 72, 8), jnp.float32), ((1, 1, 40, 8), jnp.bfloat16)]


def _case_id(case):
    shape, dtype = case
    return "x".join(map(str, shape[:3])) + "-" + jnp.dtype(dtype).name


def _inputs(shape, dtype, rows, vectors, seed=0):
    batch, tokens, channels, _ = shape
    generator = torch.Generator().manual_seed(seed)
    return ([random_array((batch, tokens, channels), dtype, generator) for _ in range(rows)]
            + [random_array((batch, channels), dtype, generator) for _ in range(vectors)])


PARAMETRIZE = pytest.mark.parametrize(
    "backend,shape,dtype", [("pallas",) + case for case in CASES] + [("xla",) + case for case in XLA_CASES],
    ids=[f"pallas-{_case_id(case)}" for case in CASES] + [f"xla-{_case_id(case)}" for case in XLA_CASES])


@PARAMETRIZE
def test_adaln_modulate(backend, shape, dtype):
    op = (lambda x, shift, scale: adaln_modulate(x, shift, scale, block_tokens=shape[3])) if backend == "pallas" \
        else xla.adaln_modulate
    check_against_float64(op, reference.adaln_modulate, _inputs(shape, dtype, 1, 2), dtype, what=backend)


@PARAMETRIZE
def test_residual_adaln_modulate(backend, shape, dtype):
    x, y, gate, shift, scale = _inputs(shape, dtype, 2, 3)
    if backend == "pallas":
        def op(x, gate, y, shift, scale):
            return residual_adaln_modulate(x, gate, y, shift, scale, block_tokens=shape[3])
    else:
        op = xla.residual_adaln_modulate
    check_against_float64(op, reference.residual_adaln_modulate, [x, gate, y, shift, scale], dtype, what=backend)


@pytest.mark.parametrize("chain", [False, True], ids=["adaln_modulate", "residual_adaln_modulate"])
def test_eps_zero_with_padded_tokens(chain):
    # the padding rows copy a real one: rows of zeros would have variance 0, and with eps = 0
    # put NaN into the gradients' sums over tokens
    x, y, gate, shift, scale = _inputs((2, 20, 40, 8), jnp.float32, 2, 3)
    if chain:
        check_against_float64(lambda *a: residual_adaln_modulate(*a, eps=0.0, block_tokens=8),
                              lambda *a: reference.residual_adaln_modulate(*a, eps=0.0), [x, gate, y, shift, scale],
                              jnp.float32, what="pallas")
    else:
        check_against_float64(lambda *a: adaln_modulate(*a, eps=0.0, block_tokens=8),
                              lambda *a: reference.adaln_modulate(*a, eps=0.0), [x, shift, scale], jnp.float32,
                              what="pallas")


def _check_chain(arrays, dtype, block_tokens, seed):
    """Pallas residual_adaln_modulate on (x, gate, y, shift, scale) against float64."""
    check_against_float64(lambda *arrays: residual_adaln_modulate(*arrays, block_tokens=block_tokens),
                          reference.residual_adaln_modulate, arrays, dtype, seed=seed, what="residual_adaln_modulate")


@settings(max_examples=8, deadline=None)
@given(batch=st.integers(1, 3), tokens=st.integers(1, 40), channels=st.integers(3, 160),
       block_tokens=st.sampled_from([8, 16, 256]), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       chained=st.booleans(), seed=st.integers(0, 2**16))
def test_shape_sweep(batch, tokens, channels, block_tokens, dtype, chained, seed):
    x, y, gate, shift, scale = _inputs((batch, tokens, channels, block_tokens), dtype, 2, 3, seed=seed)
    if chained:
        _check_chain([x, gate, y, shift, scale], dtype, block_tokens, seed)
    else:
        check_against_float64(lambda *arrays: adaln_modulate(*arrays, block_tokens=block_tokens),
                              reference.adaln_modulate, [x, shift, scale], dtype, seed=seed)


@pytest.mark.parametrize("seed", [2, 7, 8])
def test_chain_of_few_channels_in_bfloat16(seed):
    # 3 channels: LayerNorm amplifies x' rounded to bf16. Normalizing the rounded copy failed
    # 6 of 12 seeds here (these three at 1.4e-2 to 2.6e-2; a random sweep found 9e-2); the
    # float32 sum gives at most 3.3e-3
    x, y, gate, shift, scale = _inputs((2, 32, 3, 8), jnp.bfloat16, 2, 3, seed=seed)
    _check_chain([x, gate, y, shift, scale], jnp.bfloat16, 8, seed)


@pytest.mark.parametrize("eps", [None, 1e-4], ids=["default-eps", "eps-1e-4"])
def test_eps_on_rows_of_variance_near_eps(eps):
    # x, y ~ 1e-3: var ~ 1e-6, where eps's value and place (inside the rsqrt) show
    generator = torch.Generator().manual_seed(4)
    x, y = (1e-3 * random_array((2, 24, 72), jnp.float32, generator) for _ in range(2))
    gate, shift, scale = (random_array((2, 72), jnp.float32, generator) for _ in range(3))
    given_eps = {} if eps is None else {"eps": eps}
    check_against_float64(lambda *arrays: adaln_modulate(*arrays, block_tokens=8, **given_eps),
                          lambda *tensors: reference.adaln_modulate(*tensors, **given_eps), [x, shift, scale],
                          jnp.float32, what="adaln_modulate")
    check_against_float64(lambda *arrays: residual_adaln_modulate(*arrays, block_tokens=8, **given_eps),
                          lambda *tensors: reference.residual_adaln_modulate(*tensors, **given_eps),
                          [x, gate, y, shift, scale], jnp.float32, what="residual_adaln_modulate")


def test_gated_residual_xla():
    x, y, gate = _inputs((2, 5, 40, 8), jnp.float32, 2, 1)
    check_against_float64(xla.gated_residual, reference.gated_residual, [x, gate, y], jnp.float32)


def test_bad_inputs_name_the_problem():
    x, shift, scale = _inputs((2, 8, 40, 8), jnp.float32, 1, 2)
    with pytest.raises(ValueError, match="shift must have shape"):
        adaln_modulate(x, shift[:1], scale)
    with pytest.raises(ValueError, match="float16"):
        adaln_modulate(x.astype(jnp.float16), shift.astype(jnp.float16), scale.astype(jnp.float16))
    with pytest.raises(ValueError, match="scale is bfloat16 but x is float32"):
        adaln_modulate(x, shift, scale.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="block_tokens"):
        adaln_modulate(x, shift, scale, block_tokens=12)
    with pytest.raises(ValueError, match="adaln_modulate: eps must be a finite number >= 0, got -1e-06"):
        adaln_modulate(x, shift, scale, eps=-1e-6)
    with pytest.raises(ValueError, match="residual_adaln_modulate: eps must be a finite number >= 0, got inf"):
        residual_adaln_modulate(x, shift, x, shift, scale, eps=float("inf"))
    with pytest.raises(ValueError, match="y must have shape"):
        residual_adaln_modulate(x, shift, x[:, :4], shift, scale)


@pytest.mark.parametrize("op,dtype,channels,tokens", [
    ("adaln_modulate", jnp.bfloat16, 1152, 256), ("adaln_modulate", jnp.float32, 1152, 224),
    ("residual_adaln_modulate", jnp.bfloat16, 1152, 192), ("residual_adaln_modulate", jnp.float32, 1152, 136),
    ("residual_adaln_modulate", jnp.float32, 4096, 32), ("adaln_modulate", jnp.float32, 72, 256)])
def test_token_blocks_fit_vmem(op, dtype, channels, tokens):
    assert fitting_block_tokens(op, channels, dtype) == tokens
    assert fitting_block_tokens(op, channels, dtype, block_tokens=64) == min(64, tokens)

