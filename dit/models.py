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


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)  # rows Q|K|V, heads contiguous within each
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, ops):
        B, T, C = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(ops.attention(q, k, v).transpose(1, 2).reshape(B, T, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x, ops):
        return self.fc2(ops.linear_gelu(x, self.fc1.weight, self.fc1.bias))


class DiTBlock(nn.Module):
    """x += gate_msa * attn(modulate(LN(x))); x += gate_mlp * mlp(modulate(LN(x)))."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c, ops):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        attn_out = self.attn(ops.adaln_modulate(x, shift_msa, scale_msa), ops)
        x, h = ops.residual_adaln_modulate(x, gate_msa, attn_out, shift_mlp, scale_mlp)
        return ops.gated_residual(x, gate_mlp, self.mlp(h, ops))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c, ops):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(ops.adaln_modulate(x, shift, scale))


class DiT(nn.Module):
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, kernels="reference"):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.input_size, self.patch_size, self.num_heads = input_size, patch_size, num_heads
        self.in_channels, self.learn_sigma, self.num_classes = in_channels, learn_sigma, num_classes
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = input_size // patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
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
        for layer in [block.adaLN_modulation[-1] for block in self.blocks] + [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x):
        """(N, T, p*p*C) with each token laid out (p_row, p_col, C) -> (N, C, H, W)."""
        p, c, h = self.patch_size, self.out_channels, int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, h, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x, t, y, force_drop_ids=None):
        """x (N, C, H, W) latents, t (N,) timesteps, y (N,) labels -> (N, out_channels, H, W)."""
        if not torch.compiler.is_compiling():
            check_inputs(self, x, t, y)
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)
        for block in self.blocks:
            x = block(x, c, self.ops)
        return self.unpatchify(self.final_layer(x, c, self.ops))

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_all_channels=False):
        """Classifier-free guidance over a batch whose second half holds the null labels.

        As published, guidance is applied to the first 3 channels only (kept to reproduce
        the paper's FID); guide_all_channels=True guides all in_channels.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        guided = self.in_channels if guide_all_channels else 3
        eps, rest = out[:, :guided], out[:, guided:]
        cond, uncond = eps.chunk(2)
        half_eps = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)


def check_inputs(model, x, t, y):
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
    for name, tensor in (("t", t), ("y", y)):
        if tensor.dim() != 1 or tensor.shape[0] != n:
            raise ValueError(f"{name} must have shape ({n},) to match x's batch, got {tuple(tensor.shape)}")
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"y must hold integer class labels, got {y.dtype}")
    top = model.num_classes if model.y_embedder.dropout_prob > 0 else model.num_classes - 1
    if n and (int(y.min()) < 0 or int(y.max()) > top):
        raise ValueError(f"labels must lie in 0..{top} (num_classes={model.num_classes}"
                         f"{', the last being the null class' if top == model.num_classes else ''}), "
                         f"got min {int(y.min())} max {int(y.max())}")


MODEL_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def _make(size, patch):
    depth, width, heads = MODEL_SIZES[size]

    def build(**kwargs):
        return DiT(depth=depth, hidden_size=width, patch_size=patch, num_heads=heads, **kwargs)

    build.__name__ = build.__qualname__ = f"DiT_{size}_{patch}"
    return build


DiT_models = {f"DiT-{size}/{patch}": _make(size, patch) for size in MODEL_SIZES for patch in (2, 4, 8)}


def create_model(name, **kwargs):
    """DiT_models[name](**kwargs), with a ValueError listing the configs for an unknown name."""
    if name not in DiT_models:
        raise ValueError(f"unknown model config {name!r}; choose one of {', '.join(DiT_models)}")
    return DiT_models[name](**kwargs)
