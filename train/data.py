"""Training data: where images come from and in which order they are drawn.

Three sources, each a dataset indexed by (index, flip) that returns (tensor, label):
    digits   scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes) as pixels
             in [-1, 1], (1, S, S); nothing is downloaded.
    latents  a folder written by `fusedit extract`: the VAE posterior mean and std of every image
             and of its mirror image, returned stacked as (2, C, h, w) [mean, std] (unscaled); the
             trainer samples mean + std * noise and multiplies by LATENT_SCALE, so flips and the
             latent draw stay random per epoch.
    images   an ImageFolder (one sub-folder per class), ADM center-cropped, as pixels in [-1, 1],
             (3, S, S), encoded by the VAE on the fly by the trainer.

Order: `StepBatches` fixes which samples make up the global batch of every step, and whether each
is mirrored, from the global seed alone (a fresh permutation per epoch, the last partial batch
dropped); rank r of W takes the r-th slice. So a run is the same for any number of ranks, and a
resumed run draws exactly the batches it would have drawn.
"""
import json
import os
from pathlib import Path

import numpy as np
import torch

DATA_SOURCES = ("digits", "latents", "images")
LATENT_SCALE = 0.18215  # the Stable Diffusion VAE's latent scale, as the DiT paper uses it
VAE_DOWNSAMPLE = 8
LATENT_CHANNELS = 4
DIGITS_SIZE = 8
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".gif", ".tif", ".tiff")
LATENTS_FORMAT = "fusedit-latents-v1"


# ----------------------------------------------------------------------------- random streams
def seeded_generator(*key):
    """A CPU torch.Generator whose seed is derived from a tuple of ints (seed, step, stream ...)."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


ORDER_STREAM, FLIP_STREAM = 1, 2  # stream ids, so order and flips never share draws


class StepBatches:
    """The global batch of every step: indices into the dataset and mirror flags, from the seed."""

    def __init__(self, dataset_size, global_batch_size, seed, flip):
        if global_batch_size < 1:
            raise ValueError(f"the global batch size must be positive, got {global_batch_size}")
        if dataset_size < global_batch_size:
            raise ValueError(f"the global batch size {global_batch_size} is larger than the dataset ({dataset_size} samples)")
        self.dataset_size, self.global_batch_size = dataset_size, global_batch_size
        self.seed, self.flip = seed, flip
        self.steps_per_epoch = dataset_size // global_batch_size
        self._epoch, self._order = None, None

    def global_batch(self, step):
        """(indices (B,), flips (B,) bool) of step `step` (0-based)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = torch.randperm(self.dataset_size, generator=seeded_generator(self.seed, epoch, ORDER_STREAM))
        indices = self._order[position * self.global_batch_size:(position + 1) * self.global_batch_size]
        if self.flip:
            flips = torch.rand(self.global_batch_size, generator=seeded_generator(self.seed, step, FLIP_STREAM)) < 0.5
        else:
            flips = torch.zeros(self.global_batch_size, dtype=torch.bool)
        return indices, flips


class RankBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's slice of each step's global batch as a list of (index, flip) pairs."""

    def __init__(self, step_batches, start_step, end_step, rank=0, world_size=1):
        if step_batches.global_batch_size % world_size:
            raise ValueError(f"the global batch size {step_batches.global_batch_size} does not divide "
                             f"across {world_size} ranks")
        self.step_batches, self.start_step, self.end_step = step_batches, start_step, end_step
        self.local = step_batches.global_batch_size // world_size
        self.rank = rank

    def __len__(self):
        return max(0, self.end_step - self.start_step)

    def __iter__(self):
        for step in range(self.start_step, self.end_step):
            indices, flips = self.step_batches.global_batch(step)
            part = slice(self.rank * self.local, (self.rank + 1) * self.local)
            yield list(zip(indices[part].tolist(), flips[part].tolist()))


# ----------------------------------------------------------------------------- digits
def load_digits_arrays(image_size=DIGITS_SIZE):
    """All 1,797 digits as numpy arrays: x float32 (N, 1, S, S) in [-1, 1], y int64 (N,).

    The 8x8 images hold intensities 0..16; another size is a bilinear resize.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]
    if image_size != DIGITS_SIZE:
        if image_size < 2:
            raise ValueError(f"--image-size {image_size} is too small for the digits")
        images = torch.nn.functional.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images.numpy(), digits.target.astype(np.int64)


class DigitsDataset(torch.utils.data.Dataset):
    kind = "pixels"
    in_channels = 1

    def __init__(self, image_size=DIGITS_SIZE):
        x, y = load_digits_arrays(image_size)
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.image_size = image_size
        self.num_classes = 10

    def __len__(self):
        return len(self.y)

    def __getitem__(self, key):
        index, flip = key
        image = self.x[index]
        return (image.flip(-1) if flip else image), int(self.y[index])


# ----------------------------------------------------------------------------- latents
def latent_shape(image_size):
    if image_size < 1:
        raise ValueError(f"--image-size must be positive, got {image_size}")
    if image_size % VAE_DOWNSAMPLE:
        raise ValueError(f"--image-size {image_size} must be a multiple of {VAE_DOWNSAMPLE} (the VAE's downsampling)")
    side = image_size // VAE_DOWNSAMPLE
    return (LATENT_CHANNELS, side, side)


def _not_a_folder(path):
    return "is a file, not a folder" if Path(path).exists() else "does not exist"


def read_latents_meta(directory):
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"latents directory {directory} {_not_a_folder(directory)} (write one with `fusedit extract`)")
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} is missing: {directory} is not a finished `fusedit extract` output")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != LATENTS_FORMAT:
        raise ValueError(f"{meta_path} has format {meta.get('format')!r}, expected {LATENTS_FORMAT!r}")
    return meta


class LatentsDataset(torch.utils.data.Dataset):
    """Memory-mapped mean.npy / std.npy (N, 2, C, h, w) [original, mirrored] and labels.npy (N,)."""

    kind = "latents"
    in_channels = LATENT_CHANNELS

    def __init__(self, directory, image_size):
        self.directory = Path(directory)
        meta = read_latents_meta(self.directory)
        self.num_classes = int(meta["num_classes"])
        self.mean = self._array("mean.npy")
        self.std = self._array("std.npy")
        self.labels = self._array("labels.npy")
        stored = tuple(self.mean.shape[2:])
        wanted = latent_shape(image_size)
        if stored != wanted:
            raise ValueError(f"latents in {self.directory} have shape {stored} (images of {meta.get('image_size')} px), "
                             f"but --image-size {image_size} needs {wanted}")
        if self.std.shape != self.mean.shape or self.mean.shape[1] != 2 or len(self.labels) != len(self.mean):
            raise ValueError(f"latents in {self.directory} are inconsistent: mean {self.mean.shape}, std {self.std.shape}, "
                             f"labels {self.labels.shape}")
        self.image_size = image_size

    def _array(self, name):
        path = self.directory / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing")
        return np.load(path, mmap_mode="r", allow_pickle=False)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, key):
        index, flip = key
        side = int(flip)
        pair = np.stack([self.mean[index, side], self.std[index, side]]).astype(np.float32)
        return torch.from_numpy(pair), int(self.labels[index])


# ----------------------------------------------------------------------------- image folders
def list_image_folder(directory):
    """(paths, labels, class names) of an ImageFolder: one sub-folder per class, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"image directory {directory} {_not_a_folder(directory)}")
    classes = sorted(entry.name for entry in directory.iterdir() if entry.is_dir())
    if not classes:
        raise ValueError(f"{directory} has no class sub-folders (expected DIR/<class>/<image>.jpg)")
    paths, labels = [], []
    for label, name in enumerate(classes):
        for root, _, files in sorted(os.walk(directory / name)):
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(root, file))
                    labels.append(label)
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {directory}")
    return paths, labels, classes


def center_crop_arr(image, image_size):
    """ADM's center crop: halve with a box filter while the short side is >= 2x the target, resize
    bicubically so the short side is image_size, then cut the central square. PIL in, uint8 HWC out."""
    from PIL import Image

    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - image_size) // 2, (array.shape[1] - image_size) // 2
    return array[top:top + image_size, left:left + image_size]


def load_image(path, image_size):
    """(3, S, S) float32 in [-1, 1], center-cropped."""
    from PIL import Image

    with Image.open(path) as image:
        array = center_crop_arr(image.convert("RGB"), image_size)
    return torch.from_numpy(array.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


class ImageFolderDataset(torch.utils.data.Dataset):
    kind = "images"
    in_channels = LATENT_CHANNELS  # what the model sees after the VAE

    def __init__(self, directory, image_size):
        latent_shape(image_size)
        self.paths, self.labels, self.classes = list_image_folder(directory)
        self.num_classes = len(self.classes)
        self.image_size = image_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        index, flip = key
        image = load_image(self.paths[index], self.image_size)
        return (image.flip(-1) if flip else image), self.labels[index]


def open_dataset(source, directory, image_size):
    """The dataset of one source; a clear error when its directory or files are missing or unfit."""
    if source == "digits":
        return DigitsDataset(image_size)
    if directory is None:
        raise ValueError(f"--data {source} needs a directory: --data {source} DIR")
    if source == "latents":
        return LatentsDataset(directory, image_size)
    if source == "images":
        return ImageFolderDataset(directory, image_size)
    raise ValueError(f"unknown data source {source!r}; choose one of {', '.join(DATA_SOURCES)}")


# ----------------------------------------------------------------------------- the VAE
def load_vae(path, device="cpu"):
    """diffusers' AutoencoderKL from a local folder (config.json + weights); nothing is downloaded."""
    if path is None:
        raise ValueError("a VAE is needed here: pass --vae PATH, a local diffusers AutoencoderKL folder "
                         "(e.g. a copy of stabilityai/sd-vae-ft-ema)")
    if not Path(path).is_dir():
        raise FileNotFoundError(f"VAE folder {path} does not exist (a local diffusers AutoencoderKL folder is expected)")
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as error:
        raise RuntimeError(f"the VAE needs diffusers ({error}); pip install 'fusedit[vae]' or pip install diffusers") from error
    try:
        vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"cannot load an AutoencoderKL from {path}: {error}") from error
    return vae.to(device).eval().requires_grad_(False)


def encode_posterior(vae, images):
    """The VAE posterior (mean, std) of images in [-1, 1], unscaled."""
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    return posterior.mean, posterior.std


def sample_latents(mean, std, noise):
    """A scaled latent draw from a stored posterior: (mean + std * noise) * LATENT_SCALE."""
    return (mean + std * noise) * LATENT_SCALE


def diffusion_inputs(kind, images, vae, latent_noise):
    """A batch from a dataset of `kind` -> the x_start the diffusion trains on: pixels as they
    come; latents drawn from the stored posterior (latents) or from the VAE's (images)."""
    if kind == "pixels":
        return images
    if kind == "latents":
        return sample_latents(images[:, 0], images[:, 1], latent_noise)
    return sample_latents(*encode_posterior(vae, images), latent_noise)


def decode_latents(vae, latents):
    """Model-space latents -> images in [-1, 1]."""
    with torch.no_grad():
        return vae.decode(latents / LATENT_SCALE).sample.clamp(-1, 1)


def to_uint8_images(images):
    """(N, C, H, W) in [-1, 1] -> uint8 numpy (N, H, W, C), rounding to the nearest level."""
    scaled = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).cpu().numpy()
