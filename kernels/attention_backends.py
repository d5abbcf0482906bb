"""Attention through other libraries' kernels, with the reference op's signature.

`sdpa_attention` uses torch's F.scaled_dot_product_attention (flash / memory-efficient
/ cuDNN / math, whichever torch picks); `xformers_attention` uses
xformers.ops.memory_efficient_attention. They are the baselines the triton kernel is
measured against, and the `sdpa` / `xformers` op sets of the benchmark.
"""
import torch
import torch.nn.functional as F


def _zero_fully_padded(out, key_padding_mask):
    """The libraries return NaN for a query whose keys are all padding; the reference gives 0."""
    return out.masked_fill(key_padding_mask.all(dim=-1)[:, None, None, None], 0.0)


# xformers takes a tensor bias only when every stride but the last is a multiple of 16 bytes
# (8 fp16/bf16 elements, 4 fp32); its own error message advises slicing a wider tensor, as here.
# An expanded (B, Tk) mask would have a batch stride of Tk.
XFORMERS_BIAS_ALIGNMENT = 8


def _padding_to_additive_bias(key_padding_mask, q, k):
    """(B, H, Tq, Tk) additive bias, -inf at padded keys, materialized in rows padded to a
    multiple of XFORMERS_BIAS_ALIGNMENT and sliced back to Tk."""
    batch, heads, queries, keys = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    padded = -(-keys // XFORMERS_BIAS_ALIGNMENT) * XFORMERS_BIAS_ALIGNMENT
    bias = torch.zeros(batch, heads, queries, padded, dtype=q.dtype, device=q.device)[..., :keys]
    return bias.masked_fill_(key_padding_mask[:, None, None, :], float("-inf"))


def sdpa_attention(q, k, v, key_padding_mask=None):
    """(B,H,Tq,D) layout, like reference.attention."""
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=~key_padding_mask[:, None, None, :])
    return _zero_fully_padded(out, key_padding_mask)


def xformers_available():
    try:
        import xformers.ops  # noqa: F401
    except Exception as error:  # ImportError, or a broken build raising at import
        return False, f"xformers not importable ({type(error).__name__}: {error})"
    return True, ""


def xformers_attention(q, k, v, key_padding_mask=None):
    """(B,H,Tq,D) layout in and out; xformers itself wants (B,T,H,D)."""
    import xformers.ops as xops

    bias = None
    if key_padding_mask is not None:
        bias = _padding_to_additive_bias(key_padding_mask, q, k)
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
    )
    out = out.transpose(1, 2)
    return out if key_padding_mask is None else _zero_fully_padded(out, key_padding_mask)
