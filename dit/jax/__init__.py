"""fusedit.dit.jax: the DiT in JAX / Flax NNX, and weight conversion to and from PyTorch.

    model = from_torch_state_dict("DiT-XL/2", torch_state_dict, input_size=32, kernels="xla")
    out = model(x, t, y)                      # NCHW jnp/numpy arrays, like the PyTorch DiT
    out = model.forward_with_cfg(x, t, y, cfg_scale=4.0)
    torch_model.load_state_dict(to_torch_state_dict(model), strict=True)

Needs the `jax` extra: pip install -e ".[jax]".
"""
try:
    import flax  # noqa: F401
    import jax  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"fusedit.dit.jax needs JAX and Flax ({error}); pip install -e '.[jax]'") from error

from .convert import from_torch_state_dict, to_torch_state_dict
from .model import DiT, DiT_models, create_model, timestep_embedding

__all__ = ["DiT", "DiT_models", "create_model", "from_torch_state_dict", "to_torch_state_dict", "timestep_embedding"]
