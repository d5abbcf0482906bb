"""Checking a JAX op against the PyTorch reference op evaluated in float64, forward and backward,
with the project's tolerances (fusedit.kernels.testing). Used by the JAX tests.

No explicit poisoning is needed: Pallas' interpreter allocates every output buffer NaN-filled,
so a block a kernel forgets to write reaches the comparison as NaN, which never passes.
"""
import jax
import jax.numpy as jnp
import numpy as np
import torch

from fusedit.kernels.testing import assert_close, random_like_nonzero

# Test programs run once: XLA's LLVM optimizations would cost more compile time (3x for the
# interpreted flash attention) than they save.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
TORCH_DTYPES = {jnp.dtype(jnp.float32): torch.float32, jnp.dtype(jnp.bfloat16): torch.bfloat16,
                jnp.dtype(jnp.float16): torch.float16}


def random_array(shape, dtype, generator):
    """Standard-normal values pushed away from zero (|v| >= 0.1), as a JAX array of `dtype`."""
    return jnp.asarray(random_like_nonzero(shape, torch.float32, "cpu", generator).numpy()).astype(dtype)


def to_torch(array):
    """A float64 (or bool / int64) torch copy of a JAX array."""
    array = np.asarray(array)
    if array.dtype == np.bool_:
        return torch.from_numpy(array.copy())
    if np.issubdtype(array.dtype, np.integer):
        return torch.from_numpy(array.astype(np.int64))
    return torch.from_numpy(array.astype(np.float64))


def value_and_input_grads(function, arrays, cotangents):
    """(outputs, gradients of sum(outputs * cotangents) w.r.t. every floating array), jit-compiled."""
    floating = [index for index, array in enumerate(arrays) if jnp.issubdtype(array.dtype, jnp.floating)]

    def run(arrays, cotangents):
        def of_floats(*values):
            full = list(arrays)
            for index, value in zip(floating, values):
                full[index] = value
            return function(*full)

        outputs, pullback = jax.vjp(of_floats, *[arrays[index] for index in floating])
        return outputs, pullback(cotangents)

    arguments = (list(arrays), cotangents)
    return jax.jit(run).lower(*arguments).compile(compiler_options=FAST_COMPILE)(*arguments)


def check_against_float64(jax_op, torch_op, arrays, dtype, op=None, seed=0, what=""):
    """Assert jax_op(*arrays) and its input gradients match torch_op on float64 copies.

    The cotangent of every output is random and non-zero; returns the largest relative error.
    """
    generator = torch.Generator().manual_seed(seed)
    shapes = jax.eval_shape(jax_op, *arrays)
    single = not isinstance(shapes, (tuple, list))
    shapes = [shapes] if single else list(shapes)
    cotangents = [random_array(shape.shape, shape.dtype, generator) for shape in shapes]
    outputs, grads = value_and_input_grads(jax_op, arrays, cotangents[0] if single else tuple(cotangents))
    outputs = [outputs] if single else list(outputs)

    lifted = [to_torch(array) for array in arrays]
    for tensor in lifted:
        if tensor.is_floating_point():
            tensor.requires_grad_(True)
    wanted = torch_op(*lifted)
    wanted = [wanted] if single else list(wanted)
    torch.autograd.backward(wanted, [to_torch(cotangent) for cotangent in cotangents])

    torch_dtype = TORCH_DTYPES[jnp.dtype(dtype)]
    worst = 0.0
    for index, (got, want) in enumerate(zip(outputs, wanted)):
        worst = max(worst, assert_close(to_torch(got), want, torch_dtype, op, f"{what} output {index}"))
    floating = [tensor for tensor in lifted if tensor.is_floating_point()]
    for index, (got, tensor) in enumerate(zip(grads, floating)):
        worst = max(worst, assert_close(to_torch(got), tensor.grad, torch_dtype, op, f"{what} gradient {index}"))
    return worst
