"""The Diffusion Transformer (Peebles & Xie, 2022), adaLN-Zero, in one screen.

State-dict keys and shapes match the published checkpoints (DiT-XL-2-256x256.pt ...),
so they load with strict=True. All math goes through an op set from fusedit.kernels
(`kernels="reference"|"sdpa"|"xformers"|"triton"`); the model itself only holds
parameters and reshapes.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fusedit.kernels import get_ops


def timestep_embedding(t, dim=256, max_period=10000):
    """[cos, sin] of t * exp(-ln(max_period) * i / (dim/2)), i < dim/2; t (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed(dim, grid_size):
    """Fixed 2-D sin-cos position embedding (float64), (grid_size**2, dim), row-major tokens.

    The first dim/2 channels encode the column index, the last dim/2 the row index;
    each half is [sin, cos] of position * 1/10000**(i/(dim/4)).
    """
    def one_axis(positions):
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
        angles = np.outer(positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64), indexing="ij")
    return np.concatenate([one_axis(cols), one_axis(rows)], axis=1)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D), tokens row-major


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_size=256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.frequency_size).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding; with dropout_prob > 0 a last row is the null class (index num_classes)."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels, train, force_drop_ids=None):
        if force_drop_ids is not None:
            labels = torch.where(force_drop_ids == 1, self.num_classes, labels)
        elif train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


def split_heads(x, num_heads):
    """(B, T, C) -> (B, H, T, C/H). Sizes are explicit, not -1, so an empty batch reshapes too."""
    return x.reshape(x.shape[0], x.shape[1], num_heads, x.shape[2] // num_heads).transpose(1, 2)


def merge_heads(x):
    """(B, H, T, D) -> (B, T, H*D). Sizes are explicit, not -1, so an empty batch reshapes too."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], x.shape[1] * x.shape[3])


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)  # rows Q|K|V, heads contiguous within each
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, ops):
        B, T, C = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(merge_heads(ops.attention(q, k, v)))


class CrossAttention(nn.Module):
    """Queries from the image tokens, keys and values from a context sequence (B, L, C)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)  # rows K|V
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context, context_mask, ops):
        k, v = self.kv(context).chunk(2, dim=-1)
        q, k, v = (split_heads(z, self.num_heads) for z in (self.q(x), k, v))
        return self.proj(merge_heads(ops.attention(q, k, v, key_padding_mask=context_mask)))


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x, ops):
        return self.fc2(ops.linear_gelu(x, self.fc1.weight, self.fc1.bias))


class DiTBlock(nn.Module):
    """adaLN-Zero: x += gate_msa * attn(modulate(LN(x))); x += gate_mlp * mlp(modulate(LN(x))).
    adaLN (gated=False): the same without gates, shift and scale regressed from t+y (4D outputs)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, gated=True):
        super().__init__()
        self.gated = gated
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (6 if gated else 4) * hidden_size))

    def forward(self, x, c, ops, context=None, context_mask=None):
        if self.gated:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        else:
            shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            gate_msa = gate_mlp = torch.ones_like(shift_msa)
        attn_out = self.attn(ops.adaln_modulate(x, shift_msa, scale_msa), ops)
        x, h = ops.residual_adaln_modulate(x, gate_msa, attn_out, shift_mlp, scale_mlp)
        return ops.gated_residual(x, gate_mlp, self.mlp(h, ops))


def layer_norm(ops, norm, x):
    """An affine nn.LayerNorm through the op set: LN(x) * w + b == adaln_modulate(x, b, w - 1)."""
    batch = x.shape[0]
    return ops.adaln_modulate(x, norm.bias.expand(batch, -1), (norm.weight - 1).expand(batch, -1), norm.eps)


class ViTBlock(nn.Module):
    """A standard pre-LN transformer block (in-context conditioning), optionally with a
    cross-attention layer after self-attention (cross-attention conditioning)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, cross_attention=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        if cross_attention:
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x, c, ops, context=None, context_mask=None):
        ones = x.new_ones(x.shape[0], x.shape[-1])
        x = ops.gated_residual(x, ones, self.attn(layer_norm(ops, self.norm1, x), ops))
        if hasattr(self, "cross_attn"):
            x = ops.gated_residual(x, ones, self.cross_attn(layer_norm(ops, self.norm_cross, x), context, context_mask, ops))
        return ops.gated_residual(x, ones, self.mlp(layer_norm(ops, self.norm2, x), ops))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c, ops):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(ops.adaln_modulate(x, shift, scale))


# The paper's four ways to condition a block on t and y (its Figure 3).
BLOCKS = ("adaln_zero", "adaln", "cross_attn", "in_context")


def make_block(block, hidden_size, num_heads, mlp_ratio):
    if block in ("adaln_zero", "adaln"):
        return DiTBlock(hidden_size, num_heads, mlp_ratio, gated=block == "adaln_zero")
    return ViTBlock(hidden_size, num_heads, mlp_ratio, cross_attention=block == "cross_attn")


def block_of_state_dict(state_dict):
    """The block design block 0's keys say: adaLN modulation with 6C outputs (adaln_zero) or 4C
    (adaln), cross-attention (cross_attn), plain LayerNorms (in_context). Without a block 0:
    adaln_zero, and the strict load that follows names what is missing."""
    modulation = state_dict.get("blocks.0.adaLN_modulation.1.weight")
    if modulation is not None:
        return "adaln" if modulation.shape[0] == 4 * modulation.shape[1] else "adaln_zero"
    if "blocks.0.cross_attn.q.weight" in state_dict:
        return "cross_attn"
    if "blocks.0.norm1.weight" in state_dict:
        return "in_context"
    return "adaln_zero"


def check_config(input_size, patch_size, hidden_size, num_heads, class_dropout_prob, num_classes, block, context_dim):
    """A ValueError naming what no DiT (torch or JAX) can be built with."""
    if input_size % patch_size:
        raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if hidden_size % 4:
        raise ValueError(f"hidden_size {hidden_size} must be a multiple of 4 (the 2-D sin-cos position embedding)")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if not 0.0 <= class_dropout_prob <= 1.0:  # written so that NaN fails too
        raise ValueError(f"class_dropout_prob must lie in [0, 1], got {class_dropout_prob}")
    if block not in BLOCKS:
        raise ValueError(f"unknown block {block!r}; choose one of {', '.join(BLOCKS)}")
    if context_dim is not None and block != "cross_attn":
        raise ValueError(f"context_dim needs block='cross_attn' (an external context is read by cross-attention), "
                         f"got block={block!r}")


class DiT(nn.Module):
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, kernels="reference",
                 block="adaln_zero", context_dim=None):
        super().__init__()
        check_config(input_size, patch_size, hidden_size, num_heads, class_dropout_prob, num_classes, block, context_dim)
        self.input_size, self.patch_size, self.num_heads, self.block = input_size, patch_size, num_heads, block
        self.in_channels, self.learn_sigma, self.num_classes = in_channels, learn_sigma, num_classes
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.class_dropout_prob, self.context_dim = class_dropout_prob, context_dim
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = input_size // patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size), requires_grad=False)
        if context_dim is not None:  # an external context (e.g. text-encoder embeddings) and its learned null
            self.context_embedder = nn.Linear(context_dim, hidden_size)
            self.null_context = nn.Parameter(torch.zeros(1, context_dim))
        self.blocks = nn.ModuleList([make_block(block, hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()
        self.set_kernels(kernels)

    def set_kernels(self, kernels):
        """Switch every op call site to another op set (a name from fusedit.kernels.KERNEL_BACKENDS)."""
        self.ops = get_ops(kernels)
        self.kernels = self.ops.name
        return self

    def initialize_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        grid = int(self.pos_embed.shape[1] ** 0.5)
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed(self.pos_embed.shape[-1], grid)).float()[None])
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.data.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.context_dim is not None:
            nn.init.normal_(self.null_context, std=0.02)
        zeroed = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        if self.block == "adaln_zero":  # the "Zero": every block starts as the identity
            zeroed += [block.adaLN_modulation[-1] for block in self.blocks]
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x):
        """(N, T, p*p*C) with each token laid out (p_row, p_col, C) -> (N, C, H, W)."""
        p, c, h = self.patch_size, self.out_channels, int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, h, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x, t, y=None, context=None, context_mask=None, force_drop_ids=None):
        """x (N, C, H, W) latents, t (N,) timesteps, y (N,) labels -> (N, out_channels, H, W).

        block='cross_attn' models built with context_dim also take context (N, L, context_dim)
        and context_mask (N, L) bool, True = padding; y may then be None.
        """
        if not torch.compiler.is_compiling():
            check_inputs(self, x, t, y, context, context_mask)
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t)
        condition_tokens = [c]  # the sequence in-context and cross-attention blocks read t and y from
        if y is not None:
            label = self.y_embedder(y, self.training, force_drop_ids)
            c, condition_tokens = c + label, condition_tokens + [label]
        condition_tokens = torch.stack(condition_tokens, dim=1)
        if self.block == "in_context":
            x = torch.cat([x, condition_tokens], dim=1)
        if self.block == "cross_attn":
            context, context_mask = self.cross_attention_context(condition_tokens, context, context_mask, force_drop_ids)
        for block in self.blocks:
            x = block(x, c, self.ops, context, context_mask)
        if self.block == "in_context":
            x = x[:, : -condition_tokens.shape[1]]
        return self.unpatchify(self.final_layer(x, c, self.ops))

    def cross_attention_context(self, condition_tokens, context, context_mask, force_drop_ids):
        """[t, y] tokens followed by the embedded external context; dropped rows (label dropout in
        training, or force_drop_ids) see the learned null context as their only valid token."""
        if context is None:
            return condition_tokens, None
        batch, length = context.shape[:2]
        if context_mask is None:
            context_mask = torch.zeros(batch, length, dtype=torch.bool, device=context.device)
        drop = None
        if force_drop_ids is not None:
            drop = force_drop_ids == 1
        elif self.training and self.class_dropout_prob > 0:
            drop = torch.rand(batch, device=context.device) < self.class_dropout_prob
        if drop is not None:
            null_row = F.pad(self.null_context.to(context.dtype)[None], (0, 0, 0, length - 1))
            null_mask = torch.arange(length, device=context.device) > 0
            context = torch.where(drop[:, None, None], null_row, context)
            context_mask = torch.where(drop[:, None], null_mask, context_mask)
        tokens = torch.cat([condition_tokens, self.context_embedder(context)], dim=1)
        condition_mask = context_mask.new_zeros(batch, condition_tokens.shape[1])
        return tokens, torch.cat([condition_mask, context_mask], dim=1)

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
            force_drop_ids = torch.cat([torch.zeros(len(half)), torch.ones(len(half))]).to(x.device, torch.long)
        out = self.forward(torch.cat([half, half]), t, y, context, context_mask, force_drop_ids)
        guided = self.in_channels if guide_all_channels else min(3, self.in_channels)
        eps, rest = out[:, :guided], out[:, guided:]
        cond, uncond = eps.chunk(2)
        half_eps = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)


def check_inputs(model, x, t, y, context=None, context_mask=None):
    """Raise a ValueError naming the problem, instead of a shape error deep inside."""
    size, p = model.input_size, model.patch_size
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if c != model.in_channels:
        raise ValueError(f"x has {c} channels, the model expects in_channels={model.in_channels}")
    if h != w:
        raise ValueError(f"x must be square, got H={h} W={w}")
    if h % p:
        raise ValueError(f"x side {h} is not divisible by the patch size {p}")
    if h != size:
        raise ValueError(f"x side {h} does not match the model's input_size={size} (its pos_embed is fixed)")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    weight = model.x_embedder.proj.weight
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the model is on {weight.device}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"x is {x.dtype} but the model's weights are {weight.dtype}; cast one or use autocast")
    if y is None and context is None:
        raise ValueError("y (class labels) is required" + (" unless a context is given" if model.context_dim else ""))
    if context is not None and model.context_dim is None:
        raise ValueError(f"this model takes no context: build it with block='cross_attn' and context_dim (block={model.block!r})")
    if context_mask is not None and context is None:
        raise ValueError("context_mask marks padding in a context, and no context was given")
    for name, tensor, shape in (("t", t, (n,)), ("y", y, (n,)), ("context_mask", context_mask, (n, None))):
        if tensor is None:
            continue
        if tensor.dim() != len(shape) or tensor.shape[0] != n:
            raise ValueError(f"{name} must have shape {shape} to match x's batch, got {tuple(tensor.shape)}")
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")
    if context is not None:
        if context.dim() != 3 or context.shape[0] != n or context.shape[2] != model.context_dim:
            raise ValueError(f"context must be (N={n}, L, context_dim={model.context_dim}), got {tuple(context.shape)}")
        if context.device != x.device:
            raise ValueError(f"context is on {context.device} but x is on {x.device}")
        if context_mask is not None and (context_mask.dtype != torch.bool or context_mask.shape[1] != context.shape[1]):
            raise ValueError(f"context_mask must be bool (N, L={context.shape[1]}) with True = padding, "
                             f"got {context_mask.dtype} {tuple(context_mask.shape)}")
    if y is None:
        return
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"y must hold integer class labels, got {y.dtype}")
    top = model.num_classes if model.y_embedder.dropout_prob > 0 else model.num_classes - 1
    low, high = torch.stack([y.min(), y.max()]).tolist() if n else (0, 0)  # one wait for the device, not two
    if low < 0 or high > top:
        raise ValueError(f"labels must lie in 0..{top} (num_classes={model.num_classes}"
                         f"{', the last being the null class' if top == model.num_classes else ''}), "
                         f"got min {low} max {high}")


MODEL_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def _make(size, patch):
    depth, width, heads = MODEL_SIZES[size]

    def build(**kwargs):
        return DiT(depth=depth, hidden_size=width, patch_size=patch, num_heads=heads, **kwargs)

    build.__name__ = build.__qualname__ = f"DiT_{size}_{patch}"
    return build


DiT_models = {f"DiT-{size}/{patch}": _make(size, patch) for size in MODEL_SIZES for patch in (2, 4, 8)}


def config_patch_size(name):
    """The patch size of config `name` ('DiT-XL/2' -> 2), with a ValueError listing the configs
    for an unknown name."""
    if name not in DiT_models:
        raise ValueError(f"unknown model config {name!r}; choose one of {', '.join(DiT_models)}")
    return int(name.rsplit("/", 1)[1])


def create_model(name, **kwargs):
    """DiT_models[name](**kwargs), with a ValueError listing the configs for an unknown name."""
    config_patch_size(name)
    return DiT_models[name](**kwargs)
