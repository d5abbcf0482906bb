"""Pallas flash attention (interpreted on CPU) and its XLA reference, forward and gradients,
against the PyTorch reference attention in float64."""
import pytest

pytest.importorskip("jax", reason="JAX is an optional extra: pip install -e '.[jax]'")

import jax.numpy as jnp  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fusedit.kernels import reference  # noqa: E402
from fusedit.kernels.pallas import xla  # noqa: E402
from fusedit.kernels.pallas.attention import attention  # noqa: E402
from fusedit.kernels.pallas.testing import check_against_float64, random_array  # noqa: E402

# (B, H, Tq, Tk, D, block_q), dtype, key padding:
#   several query blocks with padding (20 -> 24) and key blocks with padding (130 -> 256), D 72;
#   a single query against a single key; a single key against three query blocks (dq and dk
#   exactly 0: p must be exactly 1 in both backward passes); Tq != Tk inside one block, D 40;
#   padding mask with a fully padded batch row (output 0, not NaN), D 80, in bf16 and fp32;
#   D 64 in bf16; 40 queries at block_q 32 as 2 equal blocks of 24 (over 48 rows, not 64).
CASES = [
    ((2, 2, 20, 130, 72, 8), jnp.float32, False),
    ((1, 2, 40, 20, 72, 32), jnp.float32, False),
    ((1, 1, 1, 1, 40, 8), jnp.float32, False),
    ((1, 2, 17, 1, 72, 8), jnp.float32, False),
    ((2, 1, 9, 5, 80, 8), jnp.float32, True),
    ((1, 2, 17, 30, 64, 8), jnp.bfloat16, False),
    ((2, 1, 9, 5, 80, 8), jnp.bfloat16, True),
]
XLA_CASES = [((2, 1, 9, 5, 72, 8), jnp.float32, True), ((1, 2, 17, 30, 64, 8), jnp.bfloat16, False)]


def _case_id(case):
    shape, dtype, masked = case
    return "x".join(map(str, shape[:5])) + "-" + jnp.dtype(dtype).name + ("-masked" if masked else "")


def _inputs(shape, dtype, masked):
    batch, heads, queries, keys, head_dim, _ = shape
    generator = torch.Generator().manual_seed(0)
    q = random_array((batch, heads, queries, head_dim), dtype, generator)
    k, v = (random_array((batch, heads, keys, head_dim), dtype, generator) for _ in range(2))
    if not masked:
        return [q, k, v]
    mask = np.zeros((batch, keys), bool)
    mask[0, :] = True  # every key of sample 0 is padding
    mask[1:, 1::2] = True
    return [q, k, v, jnp.asarray(mask)]


@pytest.mark.parametrize(
    "backend,shape,dtype,masked", [("pallas",) + case for case in CASES] + [("xla",) + case for case in XLA_CASES],
    ids=[f"pallas-{_case_id(case)}" for case in CASES] + [f"xla-{_case_id(case)}" for case in XLA_CASES])
def test_attention(backend, shape, dtype, masked):
    if backend == "pallas":
        def op(*arrays):
            return attention(*arrays, block_q=shape[5])
    else:
        op = xla.attention

    def reference_op(q, k, v, mask=None):
        return reference.attention(q, k, v, key_padding_mask=mask)

    check_against_float64(op, reference_op, _inputs(shape, dtype, masked), dtype, op="attention", what=backend)


def _reference_attention(q, k, v, key_padding_mask=None):
    return reference.attention(q, k, v, key_padding_mask=key_padding_mask)


def _check_random_attention(shape, dtype, seed):
    """Pallas attention on fresh random q, k, v of (B, H, Tq, Tk, D, block_q) against float64."""
    batch, heads, queries, keys, head_dim, block_q = shape
    generator = torch.Generator().manual_seed(seed)
    arrays = [random_array((batch, heads, length, head_dim), dtype, generator) for length in (queries, keys, keys)]
    check_against_float64(lambda *arrays: attention(*arrays, block_q=block_q), _reference_attention, arrays,
                          dtype, op="attention", seed=seed)


def test_a_mask_that_differs_between_key_blocks():
    # 200 keys are two blocks of 128: each block must read its own slice of the mask, in the
    # forward and in the dq pass
    generator = torch.Generator().manual_seed(0)
    q = random_array((2, 1, 9, 64), jnp.float32, generator)
    k, v = (random_array((2, 1, 200, 64), jnp.float32, generator) for _ in range(2))
    mask = np.zeros((2, 200), bool)
    mask[0, 150:] = True  # padding in the second key block only
    mask[1, 1::3] = True
    check_against_float64(lambda *arrays: attention(*arrays, block_q=8), _reference_attention,
                          [q, k, v, jnp.asarray(mask)], jnp.float32, op="attention", what="mask over 2 key blocks")


# Found by random sweeps: with a few keys ds = p (dp - delta) cancels (two keys: ds_1 = -ds_2),
# so an error in delta dominates the gradients; delta from out rounded to bf16 put these over 1e-2.
@pytest.mark.parametrize("queries, keys, head_dim, seed", [(17, 2, 8, 58126), (5, 3, 24, 65447)],
                         ids=["two-keys", "three-keys"])
def test_few_keys_in_bfloat16(queries, keys, head_dim, seed):
    _check_random_attention((1, 1, queries, keys, head_dim, 8), jnp.bfloat16, seed)


@settings(max_examples=8, deadline=None)
@given(batch=st.integers(1, 2), heads=st.integers(1, 2), queries=st.integers(1, 40),
       keys=st.integers(1, 200), head_dim=st.sampled_from([8, 40, 64, 72, 80]), block_q=st.sampled_from([8, 16]),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]), seed=st.integers(0, 2**16))
def test_shape_sweep(batch, heads, queries, keys, head_dim, block_q, dtype, seed):
    _check_random_attention((batch, heads, queries, keys, head_dim, block_q), dtype, seed)


def test_scores_far_below_zero_and_masked_keys_far_above():
    # every score ~ -128: a running max started at 0 instead of -inf underflows every exp;
    # masked keys scoring ~ +128 must not enter the running max either
    generator = torch.Generator().manual_seed(1)
    q = 4.0 + 0.1 * random_array((1, 1, 8, 64), jnp.float32, generator)
    v = random_array((1, 1, 16, 64), jnp.float32, generator)
    k = -4.0 + 0.1 * random_array((1, 1, 16, 64), jnp.float32, generator)
    check_against_float64(attention, _reference_attention, [q, k, v], jnp.float32, op="attention",
                          what="scores ~ -128")
    k = random_array((1, 1, 16, 64), jnp.float32, generator).at[:, :, 8:].set(4.0)
    mask = jnp.asarray(np.arange(16)[None, :] >= 8)
    check_against_float64(attention, _reference_attention, [q, k, v, mask], jnp.float32, op="attention",
                          what="masked keys scoring ~ +128")


def test_fully_padded_rows_are_zero():
    q, k, v, mask = _inputs((2, 1, 9, 5, 80, 8), jnp.float32, True)
    out = np.asarray(attention(q, k, v, mask))
    assert np.all(out[0] == 0) and np.isfinite(out).all() and np.abs(out[1]).min() > 0


def test_bad_inputs_name_the_problem():
    q, k, v = _inputs((1, 2, 8, 8, 40, 8), jnp.float32, False)
    with pytest.raises(ValueError, match="k must have shape"):
        attention(q, k[:, :1], v)
    with pytest.raises(ValueError, match="v must have shape"):
        attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match="key_padding_mask must be bool"):
        attention(q, k, v, jnp.zeros((1, 8), jnp.int32))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        attention(q, k, v, jnp.zeros((1, 7), bool))
    with pytest.raises(ValueError, match="block_k=.* multiple of 128"):
        attention(q, k, v, block_k=64)
    with pytest.raises(ValueError, match="float16"):
        attention(q.astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16))
