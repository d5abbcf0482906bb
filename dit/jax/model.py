"""The DiT in JAX / Flax NNX, with the same numerics as fusedit.dit.models: the paper's four
block designs (`block="adaln_zero"|"adaln"|"cross_attn"|"in_context"`) and, for cross_attn,
an external context with a padding mask and a learned null context.

Module and parameter names mirror the PyTorch state dict (x_embedder.proj, blocks.3.attn.qkv,
blocks.0.norm1, ...), so the conversion in convert.py is a renaming plus layout changes. All
math goes through a JAX op set (`kernels="xla"|"pallas"`, fusedit.kernels.pallas); the
modules only hold parameters and reshape. Inputs and outputs are NCHW, like the PyTorch model;
internally the patch conv runs NHWC.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fusedit.dit.models import MODEL_SIZES, check_config, sincos_pos_embed
from fusedit.kernels.pallas import get_jax_ops

FREQUENCY_SIZE = 256


class PositionEmbedding(nnx.Variable):
    """The fixed sin-cos position table: state, not a trainable nnx.Param."""


def timestep_embedding(t, dim=FREQUENCY_SIZE, max_period=10000):
    """[cos, sin] of t * exp(-ln(max_period) * i / (dim/2)), i < dim/2; t (N,) -> (N, dim) float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _xavier_uniform():
    """torch's xavier_uniform_ on a (fan_in..., fan_out) kernel: fans from the flattened 2-D view."""
    return nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=-2, out_axis=-1)


def _linear(in_features, out_features, rngs, zero=False, std=None):
    if zero:
        kernel_init = nnx.initializers.zeros_init()
    elif std is not None:
        kernel_init = nnx.initializers.normal(std)
    else:
        kernel_init = _xavier_uniform()
    return nnx.Linear(in_features, out_features, kernel_init=kernel_init, bias_init=nnx.initializers.zeros_init(),
                      rngs=rngs)


class PatchEmbed(nnx.Module):
    def __init__(self, patch_size, in_channels, hidden_size, rngs):
        # torch initializes the conv as xavier on its (out, in*p*p) view: fan_in = in*p*p
        init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)
        self.proj = nnx.Conv(in_channels, hidden_size, kernel_size=(patch_size, patch_size),
                             strides=(patch_size, patch_size), padding="VALID", kernel_init=init,
                             bias_init=nnx.initializers.zeros_init(), rngs=rngs)

    def __call__(self, x_nhwc):
        out = self.proj(x_nhwc)
        # (N, T, C), tokens row-major; sizes explicit, not -1, so that an empty batch reshapes too
        return out.reshape(out.shape[0], out.shape[1] * out.shape[2], out.shape[3])


class TimestepEmbedder(nnx.Module):
    def __init__(self, hidden_size, rngs):
        self.mlp_0 = _linear(FREQUENCY_SIZE, hidden_size, rngs, std=0.02)
        self.mlp_2 = _linear(hidden_size, hidden_size, rngs, std=0.02)

    def __call__(self, t):
        frequencies = timestep_embedding(t).astype(self.mlp_0.kernel[...].dtype)
        return self.mlp_2(nnx.silu(self.mlp_0(frequencies)))


class LabelEmbedder(nnx.Module):
    """Class embedding; with dropout_prob > 0 a last row is the null class (index num_classes).

    Label dropout needs randomness, so the caller decides it (a training step draws it
    from its own key) and passes force_drop_ids.
    """

    def __init__(self, num_classes, hidden_size, dropout_prob, rngs):
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nnx.Embed(num_classes + int(dropout_prob > 0), hidden_size,
                                         embedding_init=nnx.initializers.normal(0.02), rngs=rngs)

    def __call__(self, labels, force_drop_ids=None):
        if force_drop_ids is not None:
            labels = jnp.where(force_drop_ids == 1, self.num_classes, labels)
        return self.embedding_table(labels)


def split_heads(x, num_heads):
    """(B, T, C) -> (B, H, T, C/H). Sizes are explicit, not -1, so an empty batch reshapes too."""
    return jnp.transpose(x.reshape(x.shape[0], x.shape[1], num_heads, x.shape[2] // num_heads), (0, 2, 1, 3))


def merge_heads(x):
    """(B, H, T, D) -> (B, T, H*D). Sizes are explicit, not -1, so an empty batch reshapes too."""
    return jnp.transpose(x, (0, 2, 1, 3)).reshape(x.shape[0], x.shape[2], x.shape[1] * x.shape[3])


class Attention(nnx.Module):
    def __init__(self, dim, num_heads, rngs):
        self.num_heads = num_heads
        self.qkv = _linear(dim, 3 * dim, rngs)  # columns Q|K|V, heads contiguous within each
        self.proj = _linear(dim, dim, rngs)

    def __call__(self, x, ops):
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, channels // self.num_heads)
        q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))
        return self.proj(merge_heads(ops.attention(q, k, v)))


class CrossAttention(nnx.Module):
    """Queries from the image tokens, keys and values from a context sequence (B, L, C)."""

    def __init__(self, dim, num_heads, rngs):
        self.num_heads = num_heads
        self.q = _linear(dim, dim, rngs)
        self.kv = _linear(dim, 2 * dim, rngs)  # columns K|V
        self.proj = _linear(dim, dim, rngs)

    def __call__(self, x, context, context_mask, ops):
        k, v = jnp.split(self.kv(context), 2, axis=-1)
        q, k, v = (split_heads(z, self.num_heads) for z in (self.q(x), k, v))
        return self.proj(merge_heads(ops.attention(q, k, v, key_padding_mask=context_mask)))


class Mlp(nnx.Module):
    def __init__(self, dim, hidden_dim, rngs):
        self.fc1 = _linear(dim, hidden_dim, rngs)
        self.fc2 = _linear(hidden_dim, dim, rngs)

    def __call__(self, x, ops):
        return self.fc2(ops.linear_gelu(x, self.fc1.kernel[...], self.fc1.bias[...]))


class DiTBlock(nnx.Module):
    """adaLN-Zero: x += gate_msa * attn(modulate(LN(x))); x += gate_mlp * mlp(modulate(LN(x))).
    adaLN (gated=False): the same without gates, shift and scale regressed from t+y (4D outputs)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio, rngs, gated=True):
        self.gated = gated
        self.attn = Attention(hidden_size, num_heads, rngs)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), rngs)
        # only adaLN-Zero starts every block as the identity
        self.adaLN_modulation_1 = _linear(hidden_size, (6 if gated else 4) * hidden_size, rngs, zero=gated)

    def __call__(self, x, c, ops, context=None, context_mask=None):
        modulation = self.adaLN_modulation_1(nnx.silu(c))
        if self.gated:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(modulation, 6, axis=1)
        else:
            shift_msa, scale_msa, shift_mlp, scale_mlp = jnp.split(modulation, 4, axis=1)
            gate_msa = gate_mlp = jnp.ones_like(shift_msa)
        attn_out = self.attn(ops.adaln_modulate(x, shift_msa, scale_msa), ops)
        x, h = ops.residual_adaln_modulate(x, gate_msa, attn_out, shift_mlp, scale_mlp)
        return ops.gated_residual(x, gate_mlp, self.mlp(h, ops))


def _layer_norm(hidden_size, rngs):
    return nnx.LayerNorm(hidden_size, epsilon=1e-6, rngs=rngs)  # scale 1, bias 0: torch's init


def layer_norm(ops, norm, x):
    """An affine nnx.LayerNorm through the op set: LN(x) * scale + bias == adaln_modulate(x, bias, scale - 1)."""
    batch_shape = (x.shape[0], norm.num_features)
    return ops.adaln_modulate(x, jnp.broadcast_to(norm.bias[...], batch_shape),
                              jnp.broadcast_to(norm.scale[...] - 1, batch_shape), norm.epsilon)


class ViTBlock(nnx.Module):
    """A standard pre-LN transformer block (in-context conditioning), optionally with a
    cross-attention layer after self-attention (cross-attention conditioning)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio, rngs, cross_attention=False):
        self.cross_attention = cross_attention
        self.norm1 = _layer_norm(hidden_size, rngs)
        self.attn = Attention(hidden_size, num_heads, rngs)
        if cross_attention:
            self.norm_cross = _layer_norm(hidden_size, rngs)
            self.cross_attn = CrossAttention(hidden_size, num_heads, rngs)
        self.norm2 = _layer_norm(hidden_size, rngs)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), rngs)

    def __call__(self, x, c, ops, context=None, context_mask=None):
        ones = jnp.ones((x.shape[0], x.shape[-1]), x.dtype)
        x = ops.gated_residual(x, ones, self.attn(layer_norm(ops, self.norm1, x), ops))
        if self.cross_attention:
            attended = self.cross_attn(layer_norm(ops, self.norm_cross, x), context, context_mask, ops)
            x = ops.gated_residual(x, ones, attended)
        return ops.gated_residual(x, ones, self.mlp(layer_norm(ops, self.norm2, x), ops))


class FinalLayer(nnx.Module):
    def __init__(self, hidden_size, patch_size, out_channels, rngs):
        self.linear = _linear(hidden_size, patch_size * patch_size * out_channels, rngs, zero=True)
        self.adaLN_modulation_1 = _linear(hidden_size, 2 * hidden_size, rngs, zero=True)

    def __call__(self, x, c, ops):
        shift, scale = jnp.split(self.adaLN_modulation_1(nnx.silu(c)), 2, axis=1)
        return self.linear(ops.adaln_modulate(x, shift, scale))


def make_block(block, hidden_size, num_heads, mlp_ratio, rngs):
    if block in ("adaln_zero", "adaln"):
        return DiTBlock(hidden_size, num_heads, mlp_ratio, rngs, gated=block == "adaln_zero")
    return ViTBlock(hidden_size, num_heads, mlp_ratio, rngs, cross_attention=block == "cross_attn")


class DiT(nnx.Module):
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, kernels="xla",
                 block="adaln_zero", context_dim=None, *, rngs=None):
        check_config(input_size, patch_size, hidden_size, num_heads, class_dropout_prob, num_classes, block, context_dim)
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.input_size, self.patch_size, self.num_heads = input_size, patch_size, num_heads
        self.in_channels, self.learn_sigma, self.num_classes = in_channels, learn_sigma, num_classes
        self.hidden_size, self.depth, self.mlp_ratio = hidden_size, depth, mlp_ratio
        self.class_dropout_prob, self.block, self.context_dim = class_dropout_prob, block, context_dim
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size, rngs)
        self.t_embedder = TimestepEmbedder(hidden_size, rngs)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob, rngs)
        grid = input_size // patch_size
        self.pos_embed = PositionEmbedding(jnp.asarray(sincos_pos_embed(hidden_size, grid), jnp.float32)[None])
        if context_dim is not None:  # an external context (e.g. text-encoder embeddings) and its learned null
            self.context_embedder = _linear(context_dim, hidden_size, rngs)
            self.null_context = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, context_dim)))
        self.blocks = nnx.List([make_block(block, hidden_size, num_heads, mlp_ratio, rngs) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, rngs)
        self.set_kernels(kernels)

    def set_kernels(self, kernels):
        """Switch every op call site to another JAX op set ("xla" or "pallas")."""
        self.kernels = get_jax_ops(kernels).name
        return self

    def unpatchify(self, x):
        """(N, T, p*p*C) with each token laid out (p_row, p_col, C) -> (N, C, H, W)."""
        p, c, h = self.patch_size, self.out_channels, int(round(x.shape[1] ** 0.5))
        x = x.reshape(x.shape[0], h, h, p, p, c)
        return jnp.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, h * p)

    def __call__(self, x, t, y=None, context=None, context_mask=None, force_drop_ids=None):
        """x (N, C, H, W) latents, t (N,) timesteps, y (N,) labels -> (N, out_channels, H, W).

        block='cross_attn' models built with context_dim also take context (N, L, context_dim)
        and context_mask (N, L) bool, True = padding; y may then be None. Dropout needs
        randomness, so the caller decides it: force_drop_ids (N,) == 1 drops a row's label
        and, with a context, its context too (the training step draws it from its own key).
        """
        check_inputs(self, x, t, y, context, context_mask)
        ops = get_jax_ops(self.kernels)
        dtype = self.x_embedder.proj.kernel[...].dtype
        x = self.x_embedder(jnp.transpose(x, (0, 2, 3, 1))) + self.pos_embed[...].astype(dtype)
        c = self.t_embedder(t)
        condition_tokens = [c]  # the sequence in-context and cross-attention blocks read t and y from
        if y is not None:
            label = self.y_embedder(y, force_drop_ids)
            c, condition_tokens = c + label, condition_tokens + [label]
        condition_tokens = jnp.stack(condition_tokens, axis=1)
        if self.block == "in_context":
            x = jnp.concatenate([x, condition_tokens.astype(x.dtype)], axis=1)
        if self.block == "cross_attn":
            context, context_mask = self.cross_attention_context(condition_tokens, context, context_mask,
                                                                 force_drop_ids)
        for block in self.blocks:
            x = block(x, c, ops, context, context_mask)
        if self.block == "in_context":
            x = x[:, : -condition_tokens.shape[1]]
        return self.unpatchify(self.final_layer(x, c, ops))

    def cross_attention_context(self, condition_tokens, context, context_mask, force_drop_ids):
        """[t, y] tokens followed by the embedded external context; dropped rows (force_drop_ids)
        see the learned null context as their only valid token."""
        if context is None:
            return condition_tokens, None
        batch, length = context.shape[:2]
        if context_mask is None:
            context_mask = jnp.zeros((batch, length), jnp.bool_)
        if force_drop_ids is not None:
            drop = force_drop_ids == 1
            null_row = jnp.pad(self.null_context[...].astype(context.dtype)[None], ((0, 0), (0, length - 1), (0, 0)))
            null_mask = jnp.arange(length) > 0
            context = jnp.where(drop[:, None, None], null_row, context)
            context_mask = jnp.where(drop[:, None], null_mask, context_mask)
        tokens = jnp.concatenate([condition_tokens, self.context_embedder(context).astype(condition_tokens.dtype)],
                                 axis=1)
        condition_mask = jnp.zeros(condition_tokens.shape[:2], jnp.bool_)
        return tokens, jnp.concatenate([condition_mask, context_mask], axis=1)

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_all_channels=False, context=None, context_mask=None):
        """Classifier-free guidance over a batch whose second half is unconditional: null labels
        in y (as published), and with a context, the learned null context (forced here).

        As published, guidance is applied to the first 3 channels only (kept to reproduce
        the paper's FID); guide_all_channels=True guides all in_channels.
        """
        if len(x) % 2:
            raise ValueError(f"forward_with_cfg takes a batch of 2N: N conditional, then the same N with null "
                             f"labels (or context), got {len(x)}")
        half = x[: len(x) // 2]
        force_drop_ids = None
        if context is not None:
            force_drop_ids = jnp.concatenate([jnp.zeros(len(half), jnp.int32), jnp.ones(len(half), jnp.int32)])
        out = self(jnp.concatenate([half, half]), t, y, context, context_mask, force_drop_ids)
        guided = self.in_channels if guide_all_channels else min(3, self.in_channels)
        eps, rest = out[:, :guided], out[:, guided:]
        cond, uncond = jnp.split(eps, 2)
        half_eps = uncond + cfg_scale * (cond - uncond)
        return jnp.concatenate([jnp.concatenate([half_eps, half_eps]), rest], axis=1)

    @property
    def config(self):
        """The constructor arguments (without rngs) that rebuild this architecture."""
        return dict(input_size=self.input_size, patch_size=self.patch_size, in_channels=self.in_channels,
                    hidden_size=self.hidden_size, depth=self.depth, num_heads=self.num_heads,
                    mlp_ratio=self.mlp_ratio, class_dropout_prob=self.class_dropout_prob,
                    num_classes=self.num_classes, learn_sigma=self.learn_sigma, kernels=self.kernels,
                    block=self.block, context_dim=self.context_dim)


def check_inputs(model, x, t, y, context=None, context_mask=None):
    """Raise a ValueError naming the problem, instead of a shape error deep inside (trace time)."""
    size = model.input_size
    if x.ndim != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if c != model.in_channels:
        raise ValueError(f"x has {c} channels, the model expects in_channels={model.in_channels}")
    if h != w:
        raise ValueError(f"x must be square, got H={h} W={w}")
    if h != size:
        raise ValueError(f"x side {h} does not match the model's input_size={size} (its pos_embed is fixed)")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if y is None and context is None:
        raise ValueError("y (class labels) is required" + (" unless a context is given" if model.context_dim else ""))
    if context is not None and model.context_dim is None:
        raise ValueError(f"this model takes no context: build it with block='cross_attn' and context_dim "
                         f"(block={model.block!r})")
    if context_mask is not None and context is None:
        raise ValueError("context_mask marks padding in a context, and no context was given")
    for name, array, shape in (("t", t, (n,)), ("y", y, (n,)), ("context_mask", context_mask, (n, None))):
        if array is not None and (array.ndim != len(shape) or array.shape[0] != n):
            raise ValueError(f"{name} must have shape {shape} to match x's batch, got {tuple(array.shape)}")
    if context is not None:
        if context.ndim != 3 or context.shape[0] != n or context.shape[2] != model.context_dim:
            raise ValueError(f"context must be (N={n}, L, context_dim={model.context_dim}), got {tuple(context.shape)}")
        if context_mask is not None and (context_mask.dtype != jnp.bool_ or context_mask.shape[1] != context.shape[1]):
            raise ValueError(f"context_mask must be bool (N, L={context.shape[1]}) with True = padding, "
                             f"got {context_mask.dtype} {tuple(context_mask.shape)}")
    if y is None:
        return
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"y must hold integer class labels, got {y.dtype}")
    top = model.num_classes if model.y_embedder.dropout_prob > 0 else model.num_classes - 1
    try:
        labels = np.asarray(y)
    except jax.errors.TracerArrayConversionError:  # traced under jit: values unknown here
        return
    if n:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high > top:
            raise ValueError(f"labels must lie in 0..{top} (num_classes={model.num_classes}), got min {low} max {high}")


def _make(size, patch):
    depth, width, heads = MODEL_SIZES[size]

    def build(**kwargs):
        # keyword arguments may override the architecture too (tests build tiny DiTs)
        return DiT(**{"depth": depth, "hidden_size": width, "patch_size": patch, "num_heads": heads, **kwargs})

    build.__name__ = build.__qualname__ = f"DiT_{size}_{patch}"
    return build


DiT_models = {f"DiT-{size}/{patch}": _make(size, patch) for size in MODEL_SIZES for patch in (2, 4, 8)}


def create_model(name, **kwargs):
    """DiT_models[name](**kwargs) (kwargs as DiT's, rngs included), with a ValueError for an unknown name."""
    if name not in DiT_models:
        raise ValueError(f"unknown model config {name!r}; choose one of {', '.join(DiT_models)}")
    return DiT_models[name](**kwargs)
