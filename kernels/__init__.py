"""fusedit.kernels: every op the DiT computes, in interchangeable op sets.

An op set has the five ops of `fusedit.kernels.reference` with the same signatures:
`adaln_modulate`, `gated_residual`, `residual_adaln_modulate`, `attention`,
`linear_gelu`. `get_ops(name)` returns one; the model holds one and calls its math
only through it, so one switch changes every call site.

    reference  plain eager PyTorch (the ground truth)
    sdpa       reference, attention through F.scaled_dot_product_attention
    xformers   reference, attention through xformers.ops.memory_efficient_attention
    triton     fusedit's fused Triton kernels (fusedit.kernels.triton)

`tf32_matmuls(enabled)` sets whether torch's CUDA matmuls and convolutions may round their
operands to TF32, for a block of code, and restores the previous setting after it.
"""
import contextlib
from dataclasses import dataclass, replace
from typing import Callable

import torch

from . import reference

KERNEL_BACKENDS = ("reference", "sdpa", "xformers", "triton")


@dataclass(frozen=True)
class OpSet:
    name: str
    adaln_modulate: Callable
    gated_residual: Callable
    residual_adaln_modulate: Callable
    attention: Callable
    linear_gelu: Callable


def _from_module(name, module):
    return OpSet(
        name=name,
        adaln_modulate=module.adaln_modulate,
        gated_residual=module.gated_residual,
        residual_adaln_modulate=module.residual_adaln_modulate,
        attention=module.attention,
        linear_gelu=module.linear_gelu,
    )


def get_ops(name: str) -> OpSet:
    """The op set called `name` (one of KERNEL_BACKENDS); a ValueError names the problem."""
    if isinstance(name, OpSet):
        return name
    if name == "reference":
        return _from_module("reference", reference)
    if name == "sdpa":
        from .attention_backends import sdpa_attention

        return replace(_from_module("sdpa", reference), attention=sdpa_attention)
    if name == "xformers":
        from .attention_backends import xformers_attention, xformers_available

        ok, why = xformers_available()
        if not ok:
            raise ValueError(f"kernels='xformers' is unavailable: {why}; pip install xformers")
        return replace(_from_module("xformers", reference), attention=xformers_attention)
    if name == "triton":
        from . import triton as triton_ops

        return _from_module("triton", triton_ops)
    raise ValueError(f"unknown kernels {name!r}; choose one of {', '.join(KERNEL_BACKENDS)}")


@contextlib.contextmanager
def tf32_matmuls(enabled):
    """torch.backends' allow_tf32 for CUDA matmuls and cuDNN convolutions set to `enabled`
    inside the block, then restored (no effect on a CPU)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
