"""fusedit.kernels.attention_backends: SDPA and xformers behind the reference attention's
signature, padding masks included. xformers runs on CUDA only, so here a stand-in with its
layout, its bias-alignment rule (xformers' fmha checks) and its NaN for fully padded rows
checks our side of the call."""
import sys
import types

import pytest
import torch

from fusedit.kernels import attention_backends, reference
from fusedit.kernels.testing import random_like_nonzero

MASKS = [None, torch.tensor([[False, True, False, False, True, True, False], [True] * 7])]  # sample 1: all padding


def draw(*shape, seed=0):
    return random_like_nonzero(shape, torch.float64, "cpu", torch.Generator().manual_seed(seed))


def qkv():
    return draw(2, 3, 5, 8), draw(2, 3, 7, 8, seed=1), draw(2, 3, 7, 8, seed=2)  # Tq != Tk


@pytest.mark.parametrize("key_padding_mask", MASKS, ids=["no-mask", "mask"])
def test_sdpa_attention_is_the_reference(key_padding_mask):
    q, k, v = qkv()
    got = attention_backends.sdpa_attention(q, k, v, key_padding_mask)
    torch.testing.assert_close(got, reference.attention(q, k, v, key_padding_mask), rtol=1e-12, atol=1e-12)


def stand_in_memory_efficient_attention(query, key, value, attn_bias=None):
    """xformers' (B, T, H, D) math, refusing a bias with a stride it refuses: any but the last
    not a multiple of 16 bytes."""
    scores = torch.einsum("bqhd,bkhd->bhqk", query, key) * query.shape[-1] ** -0.5
    if attn_bias is not None:
        alignment = 128 // torch.finfo(attn_bias.dtype).bits
        if any(stride % alignment for stride in attn_bias.stride()[:-1]) or attn_bias.stride(-1) != 1:
            raise ValueError(f"attn_bias strides {attn_bias.stride()} are not aligned to {alignment} elements")
        scores = scores + attn_bias
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), value)  # NaN where a row is all -inf


@pytest.mark.parametrize("key_padding_mask", MASKS, ids=["no-mask", "mask"])
def test_xformers_attention_transposes_aligns_its_bias_and_zeroes_fully_padded_rows(monkeypatch, key_padding_mask):
    stand_in = types.ModuleType("xformers.ops")
    stand_in.memory_efficient_attention = stand_in_memory_efficient_attention
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", stand_in)
    q, k, v = qkv()
    got = attention_backends.xformers_attention(q, k, v, key_padding_mask)
    torch.testing.assert_close(got, reference.attention(q, k, v, key_padding_mask), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("keys", [1, 2, 7, 8, 13])
def test_padding_bias_rows_are_aligned_and_minus_infinity_at_padding(keys):
    mask = torch.rand(3, keys, generator=torch.Generator().manual_seed(keys)) < 0.5
    q, k = torch.empty(3, 2, 4, 16, dtype=torch.float16), torch.empty(3, 2, keys, 16, dtype=torch.float16)
    bias = attention_backends._padding_to_additive_bias(mask, q, k)
    assert bias.shape == (3, 2, 4, keys) and bias.dtype == torch.float16 and bias.stride(-1) == 1
    assert all(stride % 8 == 0 for stride in bias.stride()[:-1]), bias.stride()  # 16 bytes
    want = torch.zeros(3, 2, 4, keys, dtype=torch.float16).masked_fill(mask[:, None, None, :], float("-inf"))
    assert torch.equal(bias, want)
