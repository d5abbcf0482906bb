"""fusedit.dit: the DiT model (PyTorch), its Gflops, diffusion and samplers."""
from .models import DiT, DiT_models, create_model

__all__ = ["DiT", "DiT_models", "create_model"]
