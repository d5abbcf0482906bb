"""Gated residual `x + gate*y`, and the chain between a DiT block's halves fused with it:
`residual_adaln_modulate(x, gate, y, shift, scale, eps) -> (x_new, adaln_modulate(x_new))`.

Math (fp32 inside, storage dtype outside), x, y (B,T,C), gate/shift/scale (B,C):
    gated_residual:   out = x + gate[b] * y
        backward:     d x = g (returned as is, no copy),  d y = gate[b] * g,
                      d gate[b] = sum_t g * y
    residual chain:   x_new = x + gate[b] * y,  modulated = adaln_modulate(x_new, shift, scale)
        backward:     gradients flow into BOTH outputs. With G the gradient reaching x_new
                      from modulated (adaln_modulate.py's LayerNorm backward) plus d x_new:
                      d x = G,  d y = gate[b] * G,  d gate[b] = sum_t G * y,
                      d shift, d scale as in adaln_modulate.py.
The kernels are adaln_modulate.py's row kernels with the residual prologue switched on
(and, for the plain gated residual, the normalization off): one read of the residual stream
per block half where the unfused chain reads it three times. The chain saves x, y, gate and
scale rather than x_new: x is kept alive by the block's first adaln_modulate anyway, and the
backward rebuilds x_new and its row statistics in registers from the x and y it must read.
Sums over T use fp32 per-program partials and a fixed-order second kernel (deterministic).
Inputs are made contiguous on purpose (see adaln_modulate.py).

Roofline at DiT-XL/2 (B=32, T=256, C=1152: 18.9 MB per (B,T,C) tensor in bf16/fp16, twice
that in fp32; (B,C) vectors ignored; times at 3.35 TB/s HBM):
    gated_residual  forward   reads x, y, writes out:                  3 tensors = 56.6 MB, 16.9 us
                              2 flops/element = 0.02 GFLOP (memory-bound)
                    backward  reads d out, y, writes d y:              3 tensors = 56.6 MB, 16.9 us
                              + fp32 d gate partials, B * splits * C * 4 B = 1.2 MB each way
    residual chain  forward   reads x, y, writes x_new, modulated:     4 tensors = 75.5 MB, 22.5 us
                              (unfused: gated_residual 3 + adaln_modulate 2 = 5 tensors)
                              ~10 flops/element = 0.09 GFLOP (memory-bound)
                    backward  reads x, y, d x_new, d modulated,
                              writes d x, d y:                         6 tensors = 113 MB, 33.8 us
                              + 3 groups of fp32 partials, 3.5 MB each way
                              (unfused: 3 + 3 (adding the two gradients) + 3 = 9 tensors)
                              ~25 flops/element = 0.24 GFLOP (memory-bound)
Target: >= 85% of the measured copy bandwidth, forward and backward.
"""
from typing import Optional

import torch

from .adaln_modulate import check_modulate_inputs, modulate_backward, modulate_forward
from ._common import promote_inputs


@torch.library.custom_op("fusedit::gated_residual", mutates_args=())
def _gated_residual_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    (out,) = modulate_forward(x.contiguous(), gate=gate.contiguous(), y=y.contiguous())
    return out


@_gated_residual_op.register_fake
def _(x, gate, y):
    return x.new_empty(x.shape)


@torch.library.custom_op("fusedit::gated_residual_backward", mutates_args=())
def _gated_residual_backward_op(
    grad_out: torch.Tensor, gate: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    y = y.contiguous()
    # without the normalization the kernel reads no x: y stands in for its shape
    _, grad_y, grad_vectors = modulate_backward(None, y, gate=gate.contiguous(), y=y, grad_x_new=grad_out.contiguous())
    return grad_y, grad_vectors[0]


@_gated_residual_backward_op.register_fake
def _(grad_out, gate, y):
    return y.new_empty(y.shape), gate.new_empty(gate.shape)


def _gated_residual_setup_context(ctx, inputs, output):
    _, gate, y = inputs
    ctx.save_for_backward(gate, y)


def _gated_residual_backward(ctx, grad_out):
    gate, y = ctx.saved_tensors
    grad_y, grad_gate = _gated_residual_backward_op(grad_out, gate, y)
    return grad_out, grad_gate, grad_y


_gated_residual_op.register_autograd(_gated_residual_backward, setup_context=_gated_residual_setup_context)


@torch.library.custom_op("fusedit::residual_adaln_modulate", mutates_args=())
def _residual_adaln_modulate_op(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    x_new, modulated = modulate_forward(
        x.contiguous(), shift.contiguous(), scale.contiguous(), eps, gate=gate.contiguous(), y=y.contiguous()
    )
    return x_new, modulated


@_residual_adaln_modulate_op.register_fake
def _(x, gate, y, shift, scale, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.custom_op("fusedit::residual_adaln_modulate_backward", mutates_args=())
def _residual_adaln_modulate_backward_op(
    grad_modulated: torch.Tensor,
    grad_x_new: Optional[torch.Tensor],
    x: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns d x, d y and (3, B, C) stacking d shift, d scale, d gate."""
    return modulate_backward(
        grad_modulated.contiguous(), x.contiguous(), scale.contiguous(), eps,
        gate=gate.contiguous(), y=y.contiguous(),
        grad_x_new=None if grad_x_new is None else grad_x_new.contiguous(),
    )


@_residual_adaln_modulate_backward_op.register_fake
def _(grad_modulated, grad_x_new, x, gate, y, scale, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty((3, *gate.shape))


def _residual_adaln_modulate_setup_context(ctx, inputs, output):
    x, gate, y, _, scale, eps = inputs
    ctx.save_for_backward(x, gate, y, scale)
    ctx.eps = eps
    # an output nobody used arrives as None instead of a materialized (B,T,C) zero tensor
    ctx.set_materialize_grads(False)


def _residual_adaln_modulate_backward(ctx, grad_x_new, grad_modulated):
    x, gate, y, scale = ctx.saved_tensors
    if grad_modulated is None:
        if grad_x_new is None:
            return None, None, None, None, None, None
        grad_y, grad_gate = _gated_residual_backward_op(grad_x_new, gate, y)
        return grad_x_new, grad_gate, grad_y, None, None, None
    grad_x, grad_y, grad_vectors = _residual_adaln_modulate_backward_op(
        grad_modulated, grad_x_new, x, gate, y, scale, ctx.eps
    )
    grad_shift, grad_scale, grad_gate = grad_vectors.unbind(0)
    return grad_x, grad_gate, grad_y, grad_shift, grad_scale, None


_residual_adaln_modulate_op.register_autograd(
    _residual_adaln_modulate_backward, setup_context=_residual_adaln_modulate_setup_context
)


def gated_residual(x, gate, y):
    """x + gate * y with x, y (B,T,C) and gate (B,C)."""
    x, gate, y = promote_inputs(x, gate, y)
    check_modulate_inputs("gated_residual", x, y=y, gate=gate)
    return _gated_residual_op(x, gate, y)


def residual_adaln_modulate(x, gate, y, shift, scale, eps=1e-6):
    """(x_new, adaln_modulate(x_new, shift, scale, eps)) with x_new = x + gate * y, in one pass."""
    x, gate, y, shift, scale = promote_inputs(x, gate, y, shift, scale)
    check_modulate_inputs("residual_adaln_modulate", x, y=y, eps=eps, gate=gate, shift=shift, scale=scale)
    return _residual_adaln_modulate_op(x, gate, y, shift, scale, float(eps))
