"""Every Pallas op, forward and backward, lowers to Mosaic for a TPU on a machine without one.

The other Pallas tests run the kernels in Pallas' interpreter, which accepts what Mosaic
rejects (block shapes off the (8, 128) tiling, primitives Mosaic cannot lower). Here
jax.export lowers each op for platform "tpu" with the kernels in compiled (not interpret)
mode: Pallas' TPU lowering builds the Mosaic module of every kernel and enforces its rules.
It stops short of libtpu, which compiles the module on a TPU host, so a kernel can still
fail there (vector layouts, VMEM size); this catches what fails before that.
"""
import pytest

pytest.importorskip("jax", reason="JAX is an optional extra: pip install -e '.[jax]'")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fusedit.kernels import pallas  # noqa: E402
from fusedit.kernels.pallas import _common  # noqa: E402

# DiT-XL/2 (C=1152, 16 heads of 72) at 256px and 512px (256 and 1,024 tokens) and with the
# in-context block's 258 tokens at 256px (equal blocks of 88 or 136 rows), batch 2;
# cross-attention over 77 context tokens with a padding mask; fc1 1152 -> 4608. pallas_call
# also refuses, here as anywhere, blocks that would not fit a TPU kernel's VMEM.
BATCH, CHANNELS, HEADS, HEAD_DIM, CONTEXT = 2, 1152, 16, 72, 77


def _struct(*shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def _cases(dtype, tokens):
    x, vector = _struct(BATCH, tokens, CHANNELS, dtype=dtype), _struct(BATCH, CHANNELS, dtype=dtype)
    q = _struct(BATCH, HEADS, tokens, HEAD_DIM, dtype=dtype)
    context = _struct(BATCH, HEADS, CONTEXT, HEAD_DIM, dtype=dtype)
    mask = _struct(BATCH, CONTEXT, dtype=jnp.bool_)
    return {
        "adaln_modulate": (pallas.adaln_modulate, (x, vector, vector)),
        "residual_adaln_modulate": (pallas.residual_adaln_modulate, (x, vector, x, vector, vector)),
        "attention": (pallas.attention, (q, q, q)),
        "cross_attention_masked": (pallas.attention, (q, context, context, mask)),
        "linear_gelu": (pallas.linear_gelu, (x, _struct(CHANNELS, 4 * CHANNELS, dtype=dtype),
                                             _struct(4 * CHANNELS, dtype=dtype))),
    }


def _float_sum(op):
    def loss(*arrays):
        outputs = op(*arrays)
        return sum(out.astype(jnp.float32).sum() for out in (outputs if isinstance(outputs, tuple) else (outputs,)))

    return loss


@pytest.fixture
def compiled_kernels(monkeypatch):
    """Kernels built for Mosaic, as on a TPU, instead of for the interpreter."""
    monkeypatch.setattr(_common, "interpret_mode", lambda: False)


@pytest.mark.parametrize("tokens", [256, 258, 1024], ids=["256px", "256px-in-context", "512px"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bfloat16", "float32"])
@pytest.mark.parametrize("case", list(_cases(jnp.float32, 256)))
def test_forward_and_backward_lower_to_mosaic(case, dtype, tokens, compiled_kernels):
    op, arrays = _cases(dtype, tokens)[case]
    differentiable = tuple(index for index, array in enumerate(arrays) if array.dtype != jnp.bool_)
    for what, function in (("forward", op), ("backward", jax.grad(_float_sum(op), argnums=differentiable))):
        module = jax.export.export(jax.jit(function), platforms=["tpu"])(*arrays).mlir_module()
        # a Mosaic kernel lowers to a tpu_custom_call; none would mean the op never reached Pallas
        assert "tpu_custom_call" in module, f"{case} {what}: no Mosaic kernel in the lowered module"
