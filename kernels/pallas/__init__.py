"""fusedit.kernels.pallas: the JAX op sets of the JAX DiT (fusedit.dit.jax).

Same five ops as fusedit.kernels.reference (`adaln_modulate`, `gated_residual`,
`residual_adaln_modulate`, `attention`, `linear_gelu`), on JAX arrays; `linear_gelu`
takes a flax-layout kernel (K, N). `get_jax_ops(name)` returns one:

    xla     plain jnp, compiled by XLA (fusedit.kernels.pallas.xla): any backend, any dtype
    pallas  Pallas kernels written for TPU (Mosaic), each with a custom_vjp backward;
            float32/bfloat16. Off a TPU they run in Pallas' interpreter: correct, slow,
            never a speed number. gated_residual stays XLA's (an elementwise op XLA fuses
            into the matmul that produces its input).

Under a multi-device mesh (`jax.set_mesh`) the Pallas ops run per shard through
jax.shard_map over the batch dim; see _common.py.
"""
try:
    import jax  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"fusedit.kernels.pallas needs JAX ({error}); pip install -e '.[jax]'") from error

from fusedit.kernels import OpSet

from . import xla
from .adaln_modulate import adaln_modulate, residual_adaln_modulate
from .attention import attention
from .linear_gelu import linear_gelu

JAX_KERNEL_BACKENDS = ("xla", "pallas")


def get_jax_ops(name):
    """The JAX op set called `name` (one of JAX_KERNEL_BACKENDS); a ValueError names the problem."""
    if isinstance(name, OpSet):
        return name
    if name == "xla":
        return OpSet(name="xla", adaln_modulate=xla.adaln_modulate, gated_residual=xla.gated_residual,
                     residual_adaln_modulate=xla.residual_adaln_modulate, attention=xla.attention,
                     linear_gelu=xla.linear_gelu)
    if name == "pallas":
        return OpSet(name="pallas", adaln_modulate=adaln_modulate, gated_residual=xla.gated_residual,
                     residual_adaln_modulate=residual_adaln_modulate, attention=attention, linear_gelu=linear_gelu)
    raise ValueError(f"unknown JAX kernels {name!r}; choose one of {', '.join(JAX_KERNEL_BACKENDS)}")


__all__ = ["JAX_KERNEL_BACKENDS", "get_jax_ops", "xla", "adaln_modulate", "residual_adaln_modulate", "attention",
           "linear_gelu"]
