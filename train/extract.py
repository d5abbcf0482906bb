"""`fusedit extract IMAGE_DIR OUT_DIR --vae PATH`: encode an ImageFolder to VAE latents once, so
that `fusedit train --data latents OUT_DIR` never runs the encoder.

Every image is ADM center-cropped to --image-size and encoded together with its mirror image;
the posterior mean and std of both are stored (float16, unscaled), so the trainer still draws a
fresh flip and a fresh latent sample (mean + std * noise) * 0.18215 every epoch instead of the
single draw of extraction time.

OUT_DIR holds mean.npy and std.npy (N, 2, 4, S/8, S/8) [original, mirrored], labels.npy (N,) and
meta.json, written last: a folder without meta.json is an unfinished extraction. Under torchrun
each rank encodes every W-th image into the same memory-mapped files.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from fusedit.files import check_output_folder, write_text

from .cli import DEFAULT_IN_TEXT
from .data import (LATENT_SCALE, LATENTS_FORMAT, ImageFolderDataset, encode_posterior, latent_shape, load_vae)

STORED_DTYPE = np.float16
ARRAYS = ("mean.npy", "std.npy", "labels.npy")


def add_arguments(parser):
    parser.add_argument("image_dir", help="an ImageFolder: IMAGE_DIR/<class>/<image>")
    parser.add_argument("out_dir", help="where mean.npy, std.npy, labels.npy and meta.json go")
    parser.add_argument("--vae", required=True, metavar="PATH",
                        help="local diffusers AutoencoderKL folder (e.g. sd-vae-ft-ema); required" + DEFAULT_IN_TEXT)
    parser.add_argument("--image-size", type=int, default=256, help="center-crop side in pixels (latents are 1/8 of it)")
    parser.add_argument("--batch-size", type=int, default=32, help="images encoded at once (each with its mirror)")
    parser.add_argument("--num-workers", type=int, default=4, help="image decoding workers")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished extraction in OUT_DIR")


def extract_latents(image_dir, out_dir, encode, image_size=256, batch_size=32, num_workers=0, device="cpu",
                    overwrite=False, progress=True):
    """Encode every image of image_dir and its mirror with `encode(images) -> (mean, std)`; returns meta."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    dataset = check_extraction(image_dir, out_dir, image_size, batch_size, num_workers, overwrite)
    out_dir = Path(out_dir)
    shape = (len(dataset), 2) + latent_shape(image_size)
    partial = out_dir / ".partial"
    if rank == 0:
        partial.mkdir(parents=True, exist_ok=True)
        for name in ("mean.npy", "std.npy"):
            np.lib.format.open_memmap(partial / name, mode="w+", dtype=STORED_DTYPE, shape=shape)
        np.save(partial / "labels.npy", np.asarray(dataset.labels, dtype=np.int64))
    if distributed:
        dist.barrier()
    mean_out = np.load(partial / "mean.npy", mmap_mode="r+")
    std_out = np.load(partial / "std.npy", mmap_mode="r+")
    mine = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=[(index, False) for index in mine],
                                         num_workers=num_workers)
    batches = loader
    if progress and rank == 0:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc="encoding", unit="batch")
    position = 0
    for images, _ in batches:
        images = images.to(device)
        with torch.no_grad():
            mean, std = encode(torch.cat([images, images.flip(-1)]))
        count = len(images)
        for tensor in (mean, std):  # before the reshape, which would scramble (16, S/16, S/16) into (4, S/8, S/8)
            if tuple(tensor.shape) != (2 * count,) + shape[2:]:
                raise ValueError(f"the encoder gave latents of shape {tuple(tensor.shape)} for a batch of {2 * count} "
                                 f"images (each image and its mirror), expected {(2 * count,) + shape[2:]}")
        rows = mine[position:position + count]
        position += count
        both = lambda tensor: tensor.float().reshape(2, count, *shape[2:]).transpose(0, 1).cpu().numpy()  # noqa: E731
        mean_out[rows], std_out[rows] = both(mean), both(std)
    mean_out.flush()
    std_out.flush()
    del mean_out, std_out
    if distributed:
        dist.barrier()
    meta = {"format": LATENTS_FORMAT, "image_size": image_size, "latent_shape": list(shape[2:]), "count": len(dataset),
            "num_classes": dataset.num_classes, "classes": dataset.classes, "scale": LATENT_SCALE,
            "dtype": np.dtype(STORED_DTYPE).name, "image_dir": str(image_dir)}
    if rank == 0:
        (out_dir / "meta.json").unlink(missing_ok=True)
        for name in ARRAYS:
            (partial / name).replace(out_dir / name)
        shutil.rmtree(partial, ignore_errors=True)
        write_text(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


def check_extraction(image_dir, out_dir, image_size, batch_size, num_workers, overwrite):
    """The image folder as a dataset, once the flags are checked: before the (slow) VAE loads."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"--num-workers must not be negative (0 decodes in the main process), got {num_workers}")
    dataset = ImageFolderDataset(image_dir, image_size)
    check_output_folder("OUT_DIR", out_dir)
    if (Path(out_dir) / "meta.json").exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already holds an extraction (meta.json); pass --overwrite to replace it")
    return dataset


def main(args):
    import os

    import torch.distributed as dist

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        check_extraction(args.image_dir, args.out_dir, args.image_size, args.batch_size, args.num_workers, args.overwrite)
        vae = load_vae(args.vae, device)
        meta = extract_latents(args.image_dir, args.out_dir, lambda images: encode_posterior(vae, images), args.image_size,
                               args.batch_size, args.num_workers, device, args.overwrite)
        print(f"wrote latents {meta['latent_shape']} of {meta['count']} images ({meta['num_classes']} classes) "
              f"and their mirrors to {args.out_dir}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
