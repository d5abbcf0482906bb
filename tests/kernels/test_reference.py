"""fusedit.kernels.reference, the ground truth of every fused op, against the formulas written
out by hand (and attention against torch's SDPA) in float64: a bug in a reference op would
otherwise pass wherever a kernel repeats it."""
import math

import torch
import torch.nn.functional as F

from fusedit.kernels import reference
from fusedit.kernels.testing import random_like_nonzero

B, T, C = 2, 5, 12


def draw(*shape, seed=0):
    return random_like_nonzero(shape, torch.float64, "cpu", torch.Generator().manual_seed(seed + sum(shape)))


def layer_norm(x, eps):
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)  # the biased variance, as LayerNorm's
    return (x - mean) / torch.sqrt(variance + eps)


def test_adaln_modulate_and_its_published_eps():
    x, shift, scale = draw(B, T, C), draw(B, C, seed=1), draw(B, C, seed=2)

    def modulated(x, eps):
        return layer_norm(x, eps) * (1 + scale[:, None]) + shift[:, None]

    torch.testing.assert_close(reference.adaln_modulate(x, shift, scale), modulated(x, 1e-6), rtol=1e-12, atol=1e-12)
    # rows of tiny variance, where eps weighs: the default is the published LayerNorm's 1e-6
    small = x * 1e-3
    torch.testing.assert_close(reference.adaln_modulate(small, shift, scale), modulated(small, 1e-6),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reference.adaln_modulate(small, shift, scale, 1e-4), modulated(small, 1e-4),
                               rtol=1e-12, atol=1e-12)


def test_gated_residual_and_the_chain():
    x, gate, y, shift, scale = draw(B, T, C), draw(B, C, seed=1), draw(B, T, C, seed=2), draw(B, C, seed=3), draw(B, C, seed=4)
    x_new = x + gate[:, None] * y
    torch.testing.assert_close(reference.gated_residual(x, gate, y), x_new, rtol=0, atol=0)
    got_x_new, got_modulated = reference.residual_adaln_modulate(x, gate, y, shift, scale)
    torch.testing.assert_close(got_x_new, x_new, rtol=0, atol=0)
    torch.testing.assert_close(got_modulated, layer_norm(x_new, 1e-6) * (1 + scale[:, None]) + shift[:, None],
                               rtol=1e-12, atol=1e-12)


def test_linear_gelu_is_the_tanh_approximation():
    x, weight, bias = draw(B, T, 7), draw(9, 7, seed=1), draw(9, seed=2)
    z = x @ weight.T + bias
    want = 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
    torch.testing.assert_close(reference.linear_gelu(x, weight, bias), want, rtol=1e-12, atol=1e-12)


def test_attention_is_sdpa_with_padding_masked_and_fully_padded_rows_zero():
    q, k, v = draw(B, 3, 4, 8), draw(B, 3, 6, 8, seed=1), draw(B, 3, 6, 8, seed=2)  # Tq != Tk
    torch.testing.assert_close(reference.attention(q, k, v), F.scaled_dot_product_attention(q, k, v),
                               rtol=1e-12, atol=1e-12)
    key_padding_mask = torch.tensor([[False, True, False, False, True, True], [True] * 6])
    want = F.scaled_dot_product_attention(q[:1], k[:1], v[:1], attn_mask=~key_padding_mask[:1, None, None, :])
    got = reference.attention(q, k, v, key_padding_mask)
    torch.testing.assert_close(got[:1], want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[1], torch.zeros_like(got[1]))  # every key of sample 1 is padding
