"""fusedit.kernels.triton: fused Triton kernels with backward passes, registered with
torch.library so torch.compile(fullgraph=True) traces through them.

Same five ops and signatures as fusedit.kernels.reference. On a machine without CUDA
they run only in Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported).
"""
from .adaln_modulate import adaln_modulate
from .gated_residual import gated_residual, residual_adaln_modulate
from .attention import attention
from .linear_gelu import linear_gelu
from ._common import check_device

__all__ = ["adaln_modulate", "gated_residual", "residual_adaln_modulate", "attention", "linear_gelu", "check_device"]
