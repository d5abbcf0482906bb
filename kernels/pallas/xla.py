"""The plain jnp (XLA) version of every op the JAX DiT uses: the `xla` op set, and the
reference each Pallas kernel is tested against.

Same ops and shapes as fusedit.kernels.reference (the PyTorch ground truth), with one
layout difference: `linear_gelu` takes a flax-style kernel (K, N), the transpose of
torch's (N, K) weight. Normalization statistics and softmax run in float32 whatever the
storage dtype, like the fused kernels.

Shapes: B batch, T tokens, C channels, H heads, D head dim.
"""
import math

import jax
import jax.numpy as jnp


def _layer_norm(x, eps):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centered = x - mean
    return centered * jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + eps)


def adaln_modulate(x, shift, scale, eps=1e-6):
    """LayerNorm(x) * (1 + scale) + shift; x (B,T,C), shift/scale (B,C); no affine."""
    normed = _layer_norm(x.astype(jnp.float32), eps)
    modulated = normed * (1 + scale[:, None, :].astype(jnp.float32)) + shift[:, None, :].astype(jnp.float32)
    return modulated.astype(x.dtype)


def gated_residual(x, gate, y):
    """x + gate * y; x, y (B,T,C), gate (B,C)."""
    return x + gate[:, None, :] * y


def residual_adaln_modulate(x, gate, y, shift, scale, eps=1e-6):
    """The chain between a block's halves: returns (x + gate*y, adaln_modulate(x + gate*y))."""
    x_new = gated_residual(x, gate, y)
    return x_new, adaln_modulate(x_new, shift, scale, eps)


def attention(q, k, v, key_padding_mask=None):
    """softmax(q k^T / sqrt(D)) v over (B,H,Tq,D) x (B,H,Tk,D) -> (B,H,Tq,D).

    key_padding_mask: optional bool (B, Tk), True where a key is padding and must be
    ignored. A query whose keys are all padding gets a zero output (not NaN).
    """
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    if key_padding_mask is None:
        probs = jax.nn.softmax(scores, axis=-1)
    else:
        keep = ~key_padding_mask[:, None, None, :]
        probs = jax.nn.softmax(jnp.where(keep, scores, -jnp.inf), axis=-1, where=keep)
        # a fully padded row would be softmax(-inf...) = NaN; make it all zeros instead
        probs = jnp.where(keep.any(axis=-1, keepdims=True), probs, 0.0)
    return jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v,
                      preferred_element_type=jnp.float32).astype(q.dtype)


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def linear_gelu(x, kernel, bias):
    """gelu_tanh(x @ kernel + bias); x (..., K), kernel (K, N) (flax layout), bias (N,)."""
    pre = jnp.dot(x, kernel, preferred_element_type=jnp.float32) + bias.astype(jnp.float32)
    return gelu_tanh(pre).astype(x.dtype)
