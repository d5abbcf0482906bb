"""`fusedit sample`: images from a fusedit training checkpoint or a published DiT checkpoint.

    fusedit sample --ckpt results/checkpoints/0003000.pt --out digits.png
    fusedit sample --ckpt DiT-XL-2-256x256.pt --vae sd-vae-ft-ema/ --class-labels 207 360 387 974
    torchrun --nproc_per_node=8 -m fusedit sample --ckpt ... --vae ... --num-samples 50000 --npz samples.npz

A fusedit checkpoint carries its flags, so the model is rebuilt exactly (with `build_model`); a
published state dict's architecture is read off its tensor shapes (heads from the matching DiT
config, or --num-heads; a class table of N rows is N - 1 classes and the null class of
classifier-free guidance unless --num-classes N says the model was trained without one).
Latent models are decoded through the VAE from a local folder.
`--num-samples N --npz PATH` writes the uint8 NHWC `arr_0` (and the labels as `arr_1`) that the ADM FID
evaluator reads, each rank sampling its share of the batches under torchrun.
"""
import argparse
import math
from pathlib import Path

import numpy as np
import torch

from fusedit.dit.diffusion import NUM_TIMESTEPS, SAMPLERS, sample_images
from fusedit.dit.models import MODEL_SIZES, block_of_state_dict
from fusedit.files import check_output_file, write_atomically, write_npz

from .checkpoint import checkpoint_file, load_sampling_weights, load_strictly
from .cli import DEFAULT_IN_TEXT, KERNEL_CHOICES, add_cpu_threads_argument, build_model, cpu_threads
from .data import LATENT_CHANNELS, VAE_DOWNSAMPLE, decode_latents, load_vae, to_uint8_images

# The classes the DiT paper's sample.py draws for ImageNet models.
PUBLISHED_SAMPLE_LABELS = (207, 360, 387, 974, 88, 979, 417, 279)


def add_sampling_arguments(parser, cfg_default=4.0):
    """The flags shared by `fusedit sample` and `fusedit eval digits`."""
    parser.add_argument("--ckpt", metavar="PATH", help="a fusedit training checkpoint or run folder (its newest "
                        "checkpoint), a published DiT state dict (.pt, or .safetensors), or a published training "
                        "checkpoint (its 'ema' entry)" + DEFAULT_IN_TEXT)
    parser.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights of a training checkpoint")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="attention heads of a bare state dict whose width matches no DiT config" + DEFAULT_IN_TEXT)
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classes of a bare state dict: its class table holds one row per class, plus the null "
                             "class if it was trained with label dropout (default: table rows - 1, as published; "
                             "pass the table's row count for a model trained with --label-dropout 0)" + DEFAULT_IN_TEXT)
    parser.add_argument("--cfg-scale", type=float, default=cfg_default, help="classifier-free guidance scale (1.0: none; the paper's FID-50K of 2.27 is at 1.5)")
    parser.add_argument("--steps", type=int, default=250, help="sampling steps (evenly strided over the 1000)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm", help="ancestral DDPM or DDIM")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise in [0, 1] (0: deterministic; 1: the DDPM variance)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--kernels", choices=KERNEL_CHOICES, default="sdpa",
                        help="op set the model runs with; compile is short for --kernels reference --compile")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model's forward on its op set (e.g. --kernels triton --compile)")
    parser.add_argument("--batch-size", type=int, default=64, help="images sampled at once")
    parser.add_argument("--guide-all-channels", action="store_true",
                        help="guide all latent channels (the paper guides the first 3 of 4)")
    add_cpu_threads_argument(parser)
    parser.add_argument("--clip-denoised", action=argparse.BooleanOptionalAction, default=None,
                        help="clamp each predicted x_0 to [-1, 1] (default: on for pixel models such as digits, "
                             "off for latent models, as published)" + DEFAULT_IN_TEXT)


def add_arguments(parser):
    add_sampling_arguments(parser)
    parser.add_argument("--class-labels", type=int, nargs="+", default=None, metavar="LABEL",
                        help="classes to draw, one image each (default: each digit 10 times for a 10-class model, "
                             "the paper's 8 ImageNet classes otherwise)" + DEFAULT_IN_TEXT)
    parser.add_argument("--vae", default=None, metavar="PATH", help="local diffusers AutoencoderKL folder, to decode a latent model's samples" + DEFAULT_IN_TEXT)
    parser.add_argument("--out", default=None, metavar="PNG", help="the PNG grid to write (default: samples.png unless --npz)" + DEFAULT_IN_TEXT)
    parser.add_argument("--nrow", type=int, default=None, help="images per grid row (default: 10 for digits, about sqrt(N) otherwise)" + DEFAULT_IN_TEXT)
    parser.add_argument("--upscale", type=int, default=None,
                        help="nearest-neighbour upscaling of each tile in the PNG (default: to at least 64 px)" + DEFAULT_IN_TEXT)
    parser.add_argument("--num-samples", type=int, default=None, help="with --npz: how many samples, random classes from --seed" + DEFAULT_IN_TEXT)
    parser.add_argument("--npz", default=None, metavar="PATH", help="write uint8 NHWC samples (arr_0) and labels (arr_1) for FID" + DEFAULT_IN_TEXT)


# ----------------------------------------------------------------------------- loading a model
def classes_of_table(table_rows, num_classes=None):
    """(num_classes, label_dropout) of a class-embedding table with `table_rows` rows: a model trained with
    label dropout has a null class in its last row, one without does not, and only the caller knows which."""
    if num_classes is None or num_classes == table_rows - 1:
        return table_rows - 1, 0.1
    if num_classes == table_rows:
        return num_classes, 0.0
    raise ValueError(f"--num-classes {num_classes}: the state dict's class table has {table_rows} rows, so it holds "
                     f"{table_rows - 1} classes and the null class, or {table_rows} classes without one")


def infer_model_args(state_dict, num_heads=None, num_classes=None):
    """The flags of `build_model` that recreate a DiT from its state dict's keys and shapes. The
    label table is taken to end with the null class of classifier-free guidance, as published
    (a bare state dict does not say whether it was trained with label dropout), unless
    num_classes is its row count (see classes_of_table)."""
    try:
        _, tokens, width = state_dict["pos_embed"].shape
        _, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
        out_rows = state_dict["final_layer.linear.weight"].shape[0]
        table_rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
    except KeyError as error:
        raise ValueError(f"not a DiT state dict: {error} is missing") from error
    depth = len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})
    grid = math.isqrt(tokens)
    if in_channels not in (1, LATENT_CHANNELS):
        raise ValueError(f"a DiT with {in_channels} input channels is neither a digits pixel model (1) nor a latent model (4)")
    size = next((name for name, (d, w, _) in MODEL_SIZES.items() if (d, w) == (depth, width)), None)
    if num_heads is None:
        num_heads = next((h for _, w, h in MODEL_SIZES.values() if w == width), None)
        if num_heads is None:
            raise ValueError(f"width {width} matches no DiT config: pass --num-heads")
    learn_sigma = out_rows == patch * patch * in_channels * 2
    num_classes, label_dropout = classes_of_table(table_rows, num_classes)
    input_size = grid * patch
    return argparse.Namespace(
        data="digits" if in_channels == 1 else "latents", model=f"DiT-{size or 'S'}/{patch}", depth=depth,
        hidden_size=width, num_heads=num_heads, image_size=input_size if in_channels == 1 else input_size * VAE_DOWNSAMPLE,
        num_classes=num_classes, label_dropout=label_dropout, learn_sigma=learn_sigma, kernels="reference",
        block=block_of_state_dict(state_dict))


def load_model_for_sampling(path, kernels="sdpa", weights="ema", num_heads=None, device=None, compile_model=False,
                            num_classes=None):
    """(model in eval mode on device, its flags) from any checkpoint `load_sampling_weights` reads
    (a run folder: its newest checkpoint, whose path the flags' `loaded_from` names);
    compile_model (or kernels="compile", the reference ops): its forward torch.compiled."""
    file = checkpoint_file(path)  # once: the file printed is the file loaded
    if file != Path(path):
        print(f"{path}: using its newest checkpoint, {file}", flush=True)
    state_dict, saved_args = load_sampling_weights(file, weights)
    if saved_args and {"depth", "hidden_size", "num_heads", "data"} <= set(saved_args):
        args = argparse.Namespace(**saved_args)
        for flag, given, recorded in (("heads", num_heads, args.num_heads), ("classes", num_classes, args.num_classes)):
            if given is not None and given != recorded:
                raise ValueError(f"--num-{flag} {given}: {path} was trained with {recorded} {flag}, which its "
                                 f"checkpoint records (--num-{flag} is for bare state dicts)")
    else:
        try:
            args = infer_model_args(state_dict, num_heads, num_classes)
        except ValueError as error:
            raise ValueError(f"{file}: {error}") from error
    args.kernels, args.loaded_from = kernels, str(file)
    model = build_model(args)
    load_strictly(model, state_dict, f"the weights in {path} do not fit the model they describe")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    if compile_model or kernels == "compile":
        model.forward = torch.compile(model.forward)
    return model, args


# ----------------------------------------------------------------------------- pictures
def save_grid(images, path, nrow, upscale=1, padding=4):
    """uint8 (N, H, W, C) -> one PNG grid, `nrow` images per row, tiles upscaled by an integer."""
    from PIL import Image

    count, height, width, channels = images.shape
    nrow = max(1, min(nrow, count))
    if upscale > 1:
        images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
        height, width = height * upscale, width * upscale
    rows = math.ceil(count / nrow)
    grid = np.full((rows * (height + padding) + padding, nrow * (width + padding) + padding, channels), 255, dtype=np.uint8)
    for index, image in enumerate(images):
        top, left = padding + (index // nrow) * (height + padding), padding + (index % nrow) * (width + padding)
        grid[top:top + height, left:left + width] = image
    image = Image.fromarray(grid[..., 0] if channels == 1 else grid)
    return write_atomically(path, image.save)


def generate(model, labels, args, vae=None, seed=None, progress=True):
    """uint8 NHWC pixels for `labels`, in batches of args.batch_size (batch b seeded seed + b)."""
    seed = args.seed if seed is None else seed
    outputs = []
    for batch, start in enumerate(range(0, len(labels), args.batch_size)):
        samples = sample_images(model, labels[start:start + args.batch_size], num_steps=args.steps, cfg_scale=args.cfg_scale,
                                sampler=args.sampler, eta=args.eta, seed=seed + batch, progress=progress,
                                guide_all_channels=args.guide_all_channels, clip_denoised=bool(args.clip_denoised))
        pixels = samples if vae is None else decode_latents(vae, samples.to(next(vae.parameters()).dtype))
        outputs.append(to_uint8_images(pixels))
    return np.concatenate(outputs) if outputs else np.zeros((0,), dtype=np.uint8)


def resolve_clip(args, model_args):
    if args.clip_denoised is None:
        args.clip_denoised = model_args.data == "digits"


def check_sampler_flags(args):
    """The flags of add_sampling_arguments that need no checkpoint to check."""
    if args.steps < 1 or args.batch_size < 1:
        raise ValueError("--steps and --batch-size must be positive")
    if args.steps > NUM_TIMESTEPS:
        raise ValueError(f"--steps {args.steps}: the diffusion has {NUM_TIMESTEPS} timesteps, so at most {NUM_TIMESTEPS}")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must lie in 0..2**63-1, got {args.seed}")
    if not math.isfinite(args.cfg_scale):
        raise ValueError(f"--cfg-scale must be a finite number, got {args.cfg_scale}")
    if not 0.0 <= args.eta <= 1.0:  # above 1 a step's noise outgrows the variance 1 - abar_prev left for it
        raise ValueError(f"--eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM's variance), got {args.eta}")
    if args.eta != 0.0 and args.sampler != "ddim":
        raise ValueError(f"--eta {args.eta} is DDIM's noise; pass --sampler ddim to use it (DDPM's noise is fixed)")


def _check_sampling_args(args):
    if args.ckpt is None:
        raise ValueError("--ckpt PATH is required")
    check_sampler_flags(args)
    if args.out is not None:  # before sampling, not after
        from PIL import Image

        suffix = Path(args.out).suffix.lower()
        if suffix not in Image.registered_extensions():
            why = f"PIL writes no {suffix!r} files" if suffix else "the name has no extension"
            raise ValueError(f"--out {args.out}: give an image file name, e.g. samples.png ({why})")
    for flag in ("nrow", "upscale"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be positive, got {getattr(args, flag)}")
    check_output_file("--out", args.out)
    check_output_file("--npz", args.npz)


def _default_labels(num_classes):
    if num_classes == 10:
        return [digit for digit in range(10) for _ in range(10)]
    return [label for label in PUBLISHED_SAMPLE_LABELS if label < num_classes] or list(range(min(num_classes, 8)))


def _write_npz(model, args, vae):
    """Each rank samples batches rank, rank + W, ...; rank 0 gathers the parts in batch order."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    labels = np.random.default_rng(args.seed).integers(0, model.num_classes, size=args.num_samples).tolist()
    batches = range(0, args.num_samples, args.batch_size)
    parts = {}
    for batch, start in enumerate(batches):
        if batch % world == rank:
            parts[batch] = generate(model, labels[start:start + args.batch_size], args, vae, seed=args.seed + batch,
                                    progress=rank == 0)
    npz = Path(args.npz)
    if distributed:
        gathered = [None] * world
        dist.all_gather_object(gathered, parts)
        parts = {batch: images for part in gathered for batch, images in part.items()}
    if rank == 0:
        images = np.concatenate([parts[batch] for batch in sorted(parts)])
        write_npz(npz, arr_0=images, arr_1=np.asarray(labels, dtype=np.int64))
        print(f"wrote {len(images)} samples {images.shape[1:]} to {npz}")
        return images, labels
    return None, labels


def main(args):
    _check_sampling_args(args)
    if (args.num_samples is None) != (args.npz is None):
        raise ValueError("--num-samples N and --npz PATH go together")
    if args.num_samples is not None and args.num_samples < 1:
        raise ValueError(f"--num-samples must be positive, got {args.num_samples}")
    import os

    import torch.distributed as dist

    device = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        model, model_args = load_model_for_sampling(args.ckpt, args.kernels, args.weights, args.num_heads, device,
                                                    compile_model=args.compile, num_classes=args.num_classes)
        resolve_clip(args, model_args)
        out = args.out if args.out is not None else (None if args.npz else "samples.png")
        labels = args.class_labels if args.class_labels is not None else _default_labels(model.num_classes)
        bad = [label for label in labels if not 0 <= label < model.num_classes]
        if bad:
            raise ValueError(f"--class-labels {bad} lie outside 0..{model.num_classes - 1}")
        vae = None
        if model_args.data != "digits":
            vae = load_vae(args.vae, next(model.parameters()).device)
        elif args.vae is not None:
            raise ValueError(f"--vae {args.vae}: {args.ckpt} is a pixel-space model, whose samples need no decoding")
        rank = dist.get_rank() if dist.is_initialized() else 0
        with cpu_threads(args.cpu_threads, pixel_model=vae is None):
            if args.npz is not None:
                _write_npz(model, args, vae)
            if out is not None and rank == 0:
                images = generate(model, labels, args, vae)
                nrow = args.nrow or (10 if model.num_classes == 10 else max(1, math.ceil(math.sqrt(len(labels)))))
                upscale = args.upscale or max(1, math.ceil(64 / images.shape[1]))
                path = save_grid(images, out, nrow, upscale)
                print(f"wrote {len(images)} samples ({args.sampler}, {args.steps} steps, cfg {args.cfg_scale}, "
                      f"seed {args.seed}) to {path}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
