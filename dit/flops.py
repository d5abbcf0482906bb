"""Gflops of one DiT forward pass, counted as the paper counts them.

One multiply-add = one flop, attention matmuls included, measured with fvcore on the
real model (a trace, not a formula) at batch 1. `fusedit flops` prints the table;
`flops_table()` returns its rows for the benchmark to reuse.

Where fvcore is not installed (a GPU image without a package registry, say), torch's own
FlopCounterMode counts the same trace with fvcore's conventions: matmuls and convolutions
by their multiply-adds, a LayerNorm without affine parameters as 4 flops per element. The
two differ by exactly fvcore's count of the unpatchify einsum, a pure permutation it scores
as half its elements: 4,096 of DiT-XL/2's 118.69 Gflops (tests/dit/test_flops.py).
"""
import json
import math
import time

import torch

from fusedit.files import check_output_file, write_text

from .models import BLOCKS, DiT_models, config_patch_size, create_model

# Table 4 of the paper (256x256 images, i.e. 32x32 latents), plus DiT-XL/2 at 512x512.
PAPER_GFLOPS = {
    256: {"DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06, "DiT-B/8": 1.42, "DiT-B/4": 5.56, "DiT-B/2": 23.01,
          "DiT-L/8": 5.01, "DiT-L/4": 19.70, "DiT-L/2": 80.71, "DiT-XL/8": 7.39, "DiT-XL/4": 29.05, "DiT-XL/2": 118.64},
    512: {"DiT-XL/2": 524.60},
}
# DiT-XL/2 at 256x256 with each of the paper's block designs (its Figure 5).
PAPER_GFLOPS_BY_BLOCK = {"adaln_zero": 118.64, "adaln": 118.56, "cross_attn": 137.62, "in_context": 119.37}
VAE_DOWNSAMPLE = 8


def _attention_multiply_adds(q, k, v):
    """q@k^T and p@v of an attention over shapes (..., Tq, D), (..., Tk, D), (..., Tk, Dv)."""
    return math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def _sdpa_flop_handle(inputs, outputs):
    """fvcore has no handle for aten::scaled_dot_product_attention: count q@k^T and p@v."""
    from fvcore.nn.jit_handles import get_shape

    return _attention_multiply_adds(*(get_shape(value) for value in inputs[:3]))


def _shape(value):
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)


# FlopCounterMode counts 2 flops per multiply-add: these return its units. It hands a custom
# formula the shapes of the op's tensors, or in some torch versions the tensors: both work.
def _layer_norm_flops(x, normalized_shape, weight=None, bias=None, *args, **kwargs):
    return 2 * (4 if weight is None else 5) * math.prod(_shape(x))


def _cpu_sdpa_flops(q, k, v, *args, **kwargs):
    return 2 * _attention_multiply_adds(_shape(q), _shape(k), _shape(v))


def flop_counter():
    """The counter count_gflops uses here: "fvcore", or "torch FlopCounterMode" without it."""
    try:
        import fvcore.nn  # noqa: F401
    except ImportError:
        return "torch FlopCounterMode"
    return "fvcore"


def _count_with_fvcore(model, inputs):
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(model, inputs)
    analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop_handle)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis.total()


def _count_with_torch(model, inputs):
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    formulas = {aten.native_layer_norm: _layer_norm_flops}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):  # not in torch's own table
        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
    counter = FlopCounterMode(display=False, custom_mapping=formulas)
    with counter:
        model(*inputs)
    return counter.get_total_flops() / 2


def _build_cheaply(name, **kwargs):
    # Weights do not change the count: build on the meta device (skipping the seconds-long
    # random init of the larger configs), then zero the storage: left uninitialised it holds
    # denormals and NaNs that slow the traced forward several times over.
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.zero_()
    return model


def count_gflops(model, batch=1, counter=None):
    """Gflops (1e9 multiply-adds) of model(x, t, y) at `batch`, counted by `counter`
    ("fvcore" or "torch FlopCounterMode"; default: flop_counter())."""
    counter = counter or flop_counter()
    count = {"fvcore": _count_with_fvcore, "torch FlopCounterMode": _count_with_torch}[counter]
    size = model.input_size
    x = torch.randn(batch, model.in_channels, size, size)
    t = torch.randint(0, 1000, (batch,))
    y = torch.randint(0, model.num_classes, (batch,))
    with torch.no_grad():  # the trace runs the real forward; no autograd graph needed
        return count(model, (x, t, y)) / 1e9


def paper_gflops(name, image_size=256, block="adaln_zero"):
    """The paper's figure for this config, or None where it gives none."""
    if block == "adaln_zero":
        return PAPER_GFLOPS.get(image_size, {}).get(name)
    return PAPER_GFLOPS_BY_BLOCK[block] if (name, image_size) == ("DiT-XL/2", 256) else None


def check_image_size(image_size, patch_size, model_label):
    """A ValueError unless image_size pixels give VAE latents that patch_size patches tile."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image size must be a positive integer, got {image_size!r}")
    if image_size % VAE_DOWNSAMPLE:
        raise ValueError(f"image size {image_size} is not divisible by {VAE_DOWNSAMPLE} (the VAE's downsampling)")
    latent = image_size // VAE_DOWNSAMPLE
    if latent % patch_size:
        raise ValueError(f"image size {image_size} gives {latent}x{latent} latents, "
                         f"not divisible by {model_label}'s patch size {patch_size}")


def flops_row(name, image_size=256, block="adaln_zero"):
    check_image_size(image_size, config_patch_size(name), name)
    model = _build_cheaply(name, input_size=image_size // VAE_DOWNSAMPLE, block=block)
    gflops = count_gflops(model)
    paper = paper_gflops(name, image_size, block)
    return {
        "model": name,
        "block": block,
        "image_size": image_size,
        "latent_size": image_size // VAE_DOWNSAMPLE,
        "tokens": (image_size // VAE_DOWNSAMPLE // model.patch_size) ** 2,
        "gflops": gflops,
        "params": sum(p.numel() for p in model.parameters()),
        "paper_gflops": paper,
        "diff_percent": None if paper is None else 100.0 * (gflops - paper) / paper,
    }


def flops_table(models=None, image_size=256, block="adaln_zero"):
    """One row per config (a name or a list of names; default: all 12): model, block, image_size,
    latent_size, tokens, gflops, params, paper_gflops, diff_percent."""
    models = [models] if isinstance(models, str) else (models or list(DiT_models))
    for name in models:  # every config checked before the first is counted
        check_image_size(image_size, config_patch_size(name), name)
    return [flops_row(name, image_size, block) for name in models]


# ---- `fusedit flops` ---------------------------------------------------------------

def add_arguments(parser):
    parser.add_argument("--model", nargs="+", metavar="NAME", help="configs to count (default: all 12)%(default).0s")  # .0s: no "(default: None)"
    parser.add_argument("--image-size", type=int, default=256, help="image side in pixels (latent = side/8)")
    parser.add_argument("--block", default="adaln_zero", choices=BLOCKS,
                        help="block design (the paper's Figure 5 gives DiT-XL/2 figures for each)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON%(default).0s")


def main(args):
    from rich.console import Console
    from rich.table import Table

    check_output_file("--json", args.json)  # before counting, not after
    started = time.perf_counter()
    rows = flops_table(args.model, args.image_size, args.block)
    table = Table(title=f"DiT Gflops per forward pass at {args.image_size}x{args.image_size}, {args.block} blocks "
                        f"(batch 1, {flop_counter()}; 1 multiply-add = 1 flop)")
    for column in ("model", "tokens", "params (M)", "Gflops", "paper", "diff"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        paper = "-" if row["paper_gflops"] is None else f"{row['paper_gflops']:.2f}"
        diff = "-" if row["diff_percent"] is None else f"{row['diff_percent']:+.2f}%"
        table.add_row(row["model"], str(row["tokens"]), f"{row['params'] / 1e6:.2f}", f"{row['gflops']:.2f}", paper, diff)
    Console().print(table)
    print(f"counted in {time.perf_counter() - started:.1f} s")
    if args.json:
        write_text(args.json, json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
