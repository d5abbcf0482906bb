"""Reference ops: the plain, obvious eager PyTorch version of every op the DiT uses.

They are the ground truth every fused backend is tested against (evaluated in
float64), and the model calls its math only through an op set with exactly these
signatures, so switching `kernels=` changes every call site at once.

Shapes: B batch, T tokens, C channels, H heads, D head dim.
"""
import math

import torch
import torch.nn.functional as F


def adaln_modulate(x, shift, scale, eps=1e-6):
    """LayerNorm(x) * (1 + scale) + shift; x (B,T,C), shift/scale (B,C); no affine."""
    normed = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return normed * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gated_residual(x, gate, y):
    """x + gate * y; x, y (B,T,C), gate (B,C)."""
    return x + gate.unsqueeze(1) * y


def residual_adaln_modulate(x, gate, y, shift, scale, eps=1e-6):
    """The chain between a block's halves: returns (x + gate*y, adaln_modulate(x + gate*y))."""
    x_new = gated_residual(x, gate, y)
    return x_new, adaln_modulate(x_new, shift, scale, eps)


def attention(q, k, v, key_padding_mask=None):
    """softmax(q k^T / sqrt(D)) v over (B,H,Tq,D) x (B,H,Tk,D) -> (B,H,Tq,D).

    key_padding_mask: optional bool (B, Tk), True where a key is padding and must be
    ignored. A query whose keys are all padding gets a zero output (not NaN).
    """
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        # a fully padded row would be softmax(-inf...) = NaN; make it all zeros instead
        all_padded = key_padding_mask.all(dim=-1)[:, None, None, None]
        scores = scores.masked_fill(all_padded, 0.0)
        probs = torch.softmax(scores, dim=-1).masked_fill(all_padded, 0.0)
    else:
        probs = torch.softmax(scores, dim=-1)
    return probs @ v


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def linear_gelu(x, weight, bias):
    """gelu_tanh(x @ weight.T + bias); x (..., K), weight (N, K), bias (N,)."""
    return gelu_tanh(F.linear(x, weight, bias))
