"""`fusedit train`: train a class-conditional DiT (the digits demo by default; torchrun for DDP).

    fusedit train                                   # digits demo: a few minutes on a CPU
    fusedit train --data latents DIR --model DiT-XL/2 --image-size 256
    torchrun --nproc_per_node=8 -m fusedit.train --data latents DIR --model DiT-XL/2

`build_model(args)` is the one place a model is made from the flags (training, sampling and
evaluation all go through it).
"""
import argparse
import contextlib
import math

import torch

from fusedit.dit.models import BLOCKS, DiT, DiT_models, MODEL_SIZES
from fusedit.kernels import KERNEL_BACKENDS

from fusedit.files import check_output_folder

from .checkpoint import run_folder_of
from .data import DATA_SOURCES, DIGITS_SIZE, LATENT_CHANNELS, VAE_DOWNSAMPLE, open_dataset

KERNEL_CHOICES = KERNEL_BACKENDS + ("compile",)  # the PyTorch model's op sets
JAX_KERNELS = ("xla", "pallas")  # the JAX model's, for `fusedit train --framework jax`
DEFAULT_KERNELS = {"torch": "sdpa", "jax": "xla"}
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cuda", "cpu")

# The published DiT recipe, used for real data (latents / images).
PUBLISHED_DEFAULTS = dict(model="DiT-XL/2", image_size=256, global_batch_size=256, epochs=1400, lr=1e-4, ema_decay=0.9999,
                          flip=True, ckpt_every=50_000, num_workers=4)
# The digits demo: a small DiT-S/2 on 8x8 pixels, a larger learning rate and a shorter EMA so that
# a few minutes on a CPU give recognisable class-conditional samples.
DIGITS_DEFAULTS = dict(model="DiT-S/2", image_size=DIGITS_SIZE, depth=4, hidden_size=64, num_heads=4, global_batch_size=128,
                       steps=3000, lr=1e-3, ema_decay=0.995, flip=False, ckpt_every=1000, num_workers=0)

# Flags that must match when a run resumes: they fix the model, the data order or the optimiser.
RESUME_MUST_MATCH = ("data", "model", "block", "image_size", "depth", "hidden_size", "num_heads", "num_classes",
                     "learn_sigma", "label_dropout", "global_batch_size", "global_seed", "lr", "weight_decay", "ema_decay",
                     "flip")


# Appended to the help of flags whose default the text itself describes (often: it depends on
# --data): renders as nothing, and stops ArgumentDefaultsHelpFormatter adding "(default: None)".
DEFAULT_IN_TEXT = "%(default).0s"


class DataSource(argparse.Action):
    """--data digits | --data latents DIR | --data images DIR -> args.data, args.data_dir."""

    def __call__(self, parser, namespace, values, option_string=None):
        source, rest = values[0], values[1:]
        if source not in DATA_SOURCES:
            parser.error(f"--data: unknown source {source!r}; choose digits, latents DIR or images DIR")
        if source == "digits" and rest:
            parser.error("--data digits takes no directory")
        if source != "digits" and len(rest) != 1:
            parser.error(f"--data {source} needs exactly one directory: --data {source} DIR")
        namespace.data, namespace.data_dir = source, (rest[0] if rest else None)


def add_arguments(parser):
    parser.add_argument("--data", nargs="+", action=DataSource, default="digits", metavar=("SOURCE", "DIR"),
                        help="digits (scikit-learn's bundled 8x8 digits, pixel space; nothing downloaded) | "
                             "latents DIR (written by `fusedit extract`) | images DIR (an ImageFolder, encoded by --vae on the fly)")
    parser.set_defaults(data_dir=None)
    parser.add_argument("--framework", choices=("torch", "jax"), default="torch",
                        help="torch (this trainer) or jax (fusedit.train.jax_train, same flags and data)")
    parser.add_argument("--model", choices=list(DiT_models), default=None,
                        help="DiT config; patch size and, unless overridden below, depth/width/heads "
                             "(default: DiT-S/2 for digits, DiT-XL/2 otherwise)" + DEFAULT_IN_TEXT)
    parser.add_argument("--block", choices=BLOCKS, default="adaln_zero",
                        help="block design (the paper's Figure 5): adaln_zero (published), adaln, cross_attn, in_context")
    parser.add_argument("--depth", type=int, default=None, help="override the config's number of blocks (digits default: 4)" + DEFAULT_IN_TEXT)
    parser.add_argument("--hidden-size", type=int, default=None, help="override the config's width (digits default: 64)" + DEFAULT_IN_TEXT)
    parser.add_argument("--num-heads", type=int, default=None, help="override the config's attention heads (digits default: 4)" + DEFAULT_IN_TEXT)
    parser.add_argument("--image-size", type=int, default=None,
                        help="image side in pixels (default: 8 for digits, trained in pixel space; 256 otherwise, "
                             "trained on VAE latents of side image_size/8)" + DEFAULT_IN_TEXT)
    parser.add_argument("--num-classes", type=int, default=None, help="number of classes (default: from the data)" + DEFAULT_IN_TEXT)
    parser.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=True,
                        help="learned variance with the hybrid loss (published); --no-learn-sigma: plain MSE, fixed variance")
    parser.add_argument("--label-dropout", type=float, default=0.1,
                        help="probability a label is replaced by the null class (enables classifier-free guidance)")
    parser.add_argument("--global-batch-size", type=int, default=None,
                        help="images per step over all ranks, split evenly (default: 128 for digits, 256 otherwise)" + DEFAULT_IN_TEXT)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="training steps in all (default: 3000 for digits)" + DEFAULT_IN_TEXT)
    length.add_argument("--epochs", type=int, default=None, help="epochs in all, instead of --steps (default: 1400 for real data)" + DEFAULT_IN_TEXT)
    parser.add_argument("--lr", type=float, default=None,
                        help="AdamW learning rate (default: 1e-4 as published; 1e-3 for the digits demo)" + DEFAULT_IN_TEXT)
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    parser.add_argument("--ema-decay", type=float, default=None,
                        help="EMA decay of every weight (default: 0.9999 as published; 0.995 for the short digits demo)" + DEFAULT_IN_TEXT)
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help="random horizontal flips (default: on for real data as published, off for digits, "
                             "whose mirror images are not digits)" + DEFAULT_IN_TEXT)
    parser.add_argument("--global-seed", type=int, default=0,
                        help="seed of every random draw (data order, flips, timesteps, noise, label dropout); "
                             "each sample's draws come from it and the step, so any rank count gives the same run")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="autocast precision (fp16 adds a gradient scaler); weights stay fp32")
    parser.add_argument("--grad-checkpoint", action="store_true", help="recompute each block in the backward pass to save memory")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto: CUDA where torch sees it (one GPU per torchrun process), else the CPU; cpu also "
                             "where there is a GPU (DDP over gloo); --framework torch only (JAX: JAX_PLATFORMS)")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="let CUDA matmuls and convolutions round fp32 operands to TF32, as the published "
                             "training does (--no-tf32: full fp32, e.g. to compare runs closely; with --framework "
                             "jax it sets JAX's default matmul precision to highest)")
    parser.add_argument("--kernels", choices=KERNEL_CHOICES + JAX_KERNELS, default=None,
                        help="op set (fusedit.kernels; default: sdpa, or xla with --framework jax); compile is short "
                             "for --kernels reference --compile; xla and pallas are the JAX model's (--framework jax, "
                             "which runs a PyTorch op set's name as xla)" + DEFAULT_IN_TEXT)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model on its op set: with --kernels triton, the fused kernels "
                             "stay whole and the compiler fuses everything between them; --framework torch only "
                             "(the JAX step is always jit-compiled)")
    parser.add_argument("--vae", default=None, metavar="PATH",
                        help="local diffusers AutoencoderKL folder (needed by --data images)" + DEFAULT_IN_TEXT)
    parser.add_argument("--results-dir", default=None,
                        help="the run's folder: checkpoints/, log.csv, args.json; refused if it holds checkpoints and "
                             "--resume is not given (default: results, or the run folder --resume CKPT names)"
                             + DEFAULT_IN_TEXT)
    parser.add_argument("--ckpt-every", type=int, default=None,
                        help="save a checkpoint every N steps (default: 1000 for digits, 50000 otherwise); always at the end and on SIGTERM/SIGINT" + DEFAULT_IN_TEXT)
    parser.add_argument("--keep-last", type=int, default=3, help="keep only the newest K checkpoints (0: keep all)")
    parser.add_argument("--log-every", type=int, default=100, help="log loss, steps/s and images/s every N steps")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                        help="continue a run: a checkpoint file, a run folder, or nothing for the newest in --results-dir; "
                             "the run goes on in CKPT's run folder unless --results-dir names another" + DEFAULT_IN_TEXT)
    parser.add_argument("--num-workers", type=int, default=None, help="data loader workers (default: 0 for digits, 4 otherwise)" + DEFAULT_IN_TEXT)
    add_cpu_threads_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")


def add_cpu_threads_argument(parser):
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="torch CPU threads (default: 1 for the tiny digits model on a CPU, where more threads only "
                             "add overhead, and torch's own choice otherwise)" + DEFAULT_IN_TEXT)


@contextlib.contextmanager
def cpu_threads(requested, pixel_model):
    """torch's intra-op CPU threads set for the duration of a command, then restored."""
    count = requested if requested is not None else (1 if pixel_model and not torch.cuda.is_available() else None)
    if count is None:
        yield
        return
    if count < 1:
        raise ValueError(f"--cpu-threads must be positive, got {count}")
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def resolve_defaults(args):
    """Fill the flags left at None with the defaults of the data source; returns args.

    The digits demo's small depth/width/heads apply only when --model is not given; otherwise the
    config's own (each overridable by --depth / --hidden-size / --num-heads)."""
    defaults = dict(DIGITS_DEFAULTS if args.data == "digits" else PUBLISHED_DEFAULTS)
    if args.model is not None:
        for key in ("depth", "hidden_size", "num_heads"):
            defaults.pop(key, None)
    if args.steps is not None or args.epochs is not None:
        defaults.pop("steps", None)
        defaults.pop("epochs", None)
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if getattr(args, "kernels", None) is None:
        args.kernels = DEFAULT_KERNELS[getattr(args, "framework", "torch")]
    if args.results_dir is None:  # a resumed run goes on in its own folder
        resumed = run_folder_of(args.resume) if args.resume not in (None, "latest") else None
        args.results_dir = str(resumed) if resumed is not None else "results"
    check_output_folder("--results-dir", args.results_dir)
    depth, width, heads = MODEL_SIZES[model_size(args.model)]
    for key, value in (("depth", depth), ("hidden_size", width), ("num_heads", heads)):
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("depth", "hidden_size", "num_heads", "image_size", "global_batch_size", "log_every"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must not be negative (0 loads in the main process), got {args.num_workers}")
    if args.ckpt_every < 1:
        raise ValueError(f"--ckpt-every must be positive, got {args.ckpt_every}")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must lie in [0, 1), got {args.ema_decay}")
    if not 0.0 <= args.label_dropout < 1.0:
        raise ValueError(f"--label-dropout must lie in [0, 1), got {args.label_dropout}")
    for flag, value in (("--steps", args.steps), ("--epochs", args.epochs)):
        if value is not None and value < 0:
            raise ValueError(f"{flag} must not be negative, got {value}")
    if args.keep_last < 0:
        raise ValueError(f"--keep-last must not be negative (0 keeps every checkpoint), got {args.keep_last}")
    if not (0 < args.lr < math.inf and 0 <= args.weight_decay < math.inf):  # written so that NaN fails too
        raise ValueError(f"--lr must be positive and --weight-decay not negative, both finite, got {args.lr} and "
                         f"{args.weight_decay}")
    return args


def model_size(name):
    """'DiT-XL/2' -> 'XL'."""
    return name.split("-", 1)[1].split("/")[0]


def model_geometry(args):
    """(in_channels, input_size) the model sees: pixels for digits, VAE latents otherwise."""
    if args.data == "digits":
        return 1, args.image_size
    if args.image_size % VAE_DOWNSAMPLE:
        raise ValueError(f"--image-size {args.image_size} must be a multiple of {VAE_DOWNSAMPLE} for latent models")
    return LATENT_CHANNELS, args.image_size // VAE_DOWNSAMPLE


def compiles_model(args):
    """Whether the flags ask for torch.compile of the model: --compile, or --kernels compile."""
    return args.compile or args.kernels == "compile"


def build_model(args):
    """The DiT the flags describe (fp32, on the CPU): --model's patch size with its or the
    overridden depth/width/heads (flags resolved by `resolve_defaults`); `compile` kernels build
    with the reference ops."""
    in_channels, input_size = model_geometry(args)
    patch_size = int(args.model.split("/")[1])
    kernels = "reference" if args.kernels == "compile" else args.kernels
    return DiT(input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=args.hidden_size,
               depth=args.depth, num_heads=args.num_heads, class_dropout_prob=args.label_dropout,
               num_classes=args.num_classes, learn_sigma=args.learn_sigma, kernels=kernels,
               block=getattr(args, "block", "adaln_zero"))


def open_training_data(args):
    """Resolve the defaults, open the data source (clear errors for missing or unfit data) and
    take --num-classes from it when not given; returns the dataset."""
    resolve_defaults(args)
    dataset = open_dataset(args.data, args.data_dir, args.image_size)
    if args.num_classes is None:
        args.num_classes = dataset.num_classes
    elif args.num_classes < dataset.num_classes:
        raise ValueError(f"--num-classes {args.num_classes} is smaller than the {dataset.num_classes} classes of the data")
    return dataset


def main(args):
    if args.framework == "jax":
        if args.device != "auto":
            raise ValueError(f"--device {args.device} is for --framework torch; JAX picks its devices from "
                             "JAX_PLATFORMS (e.g. JAX_PLATFORMS=cpu)")
        try:
            from fusedit.train.jax_train import train_jax
        except ImportError as error:
            raise RuntimeError(f"--framework jax needs JAX and fusedit.train.jax_train ({error}); "
                               "pip install 'fusedit[jax]' or use --framework torch") from error
        open_training_data(args)
        return train_jax(args)
    if args.kernels in JAX_KERNELS:
        raise ValueError(f"--kernels {args.kernels} is an op set of the JAX model: add --framework jax, or pick one "
                         f"of the PyTorch model's ({', '.join(KERNEL_CHOICES)})")
    from .loop import train

    return train(args)
