"""`fusedit eval digits`: offline sample quality of a digits model, with nothing downloaded.

A small MLP classifier (64 -> 128 ReLU -> 10) is trained once on 75% of scikit-learn's digits
(held-out accuracy about 98%) and cached as plain arrays. It scores generated digits by:
    label accuracy   the share of samples classified as the class they were asked for, per class
                     and overall, with guidance (--cfg-scale) and without (1.0);
    Frechet distance between the Gaussians fitted to the classifier's 128 hidden features of all
                     1,797 real digits and of the samples (FID's formula in this feature space;
                     the held-out real quarter against all real digits is printed as a floor).
Samples of another size are area-resized to 8x8, and pixels quantized to the real data's 17
levels (0..16) before scoring.

    fusedit eval digits --ckpt results/checkpoints/0003000.pt --json metrics.json
    fusedit eval digits --npz samples.npz          # arr_0 images, arr_1 the asked-for labels
"""
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from fusedit.files import check_output_file, check_output_folder, write_npz, write_text

from .cli import DEFAULT_IN_TEXT, cpu_threads
from .data import DIGITS_SIZE
from .sample import add_sampling_arguments, check_sampler_flags, generate, load_model_for_sampling, resolve_clip

CLASSIFIER_VERSION = "mlp128-v1"  # part of the cache file name: change it when the recipe changes
HIDDEN_UNITS = 128
NUM_CLASSES = 10


def add_arguments(parser):
    parser.add_argument("suite", choices=("digits",), help="what to evaluate (digits: a model trained with --data digits)")
    add_sampling_arguments(parser)
    parser.add_argument("--npz", default=None, metavar="PATH",
                        help="score these samples (arr_0 uint8 NHWC, arr_1 labels) instead of sampling --ckpt" + DEFAULT_IN_TEXT)
    parser.add_argument("--num-per-class", type=int, default=50, help="samples per class and guidance setting")
    parser.add_argument("--no-unguided", action="store_true", help="skip the unguided (cfg 1.0) run")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the metrics as JSON" + DEFAULT_IN_TEXT)
    parser.add_argument("--cache-dir", default=None,
                        help="where the fitted classifier is cached (default: $FUSEDIT_CACHE or ~/.cache/fusedit)" + DEFAULT_IN_TEXT)


# ----------------------------------------------------------------------------- the classifier
def default_cache_dir():
    return Path(os.environ.get("FUSEDIT_CACHE") or Path.home() / ".cache" / "fusedit")


def real_digits():
    """(x float64 (N, 64) in [0, 1], y (N,)) of scikit-learn's digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data / 16.0, digits.target


class DigitsClassifier:
    """relu(x W0 + b0) = features; argmax(features W1 + b1) = class. Plain numpy arrays."""

    def __init__(self, weights):
        self.weights = weights

    @classmethod
    def fit(cls):
        from sklearn.model_selection import train_test_split
        from sklearn.neural_network import MLPClassifier
        from threadpoolctl import threadpool_limits

        x, y = real_digits()
        x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
        # One BLAS thread: the matrices are tiny, and extra threads only fight over a busy CPU.
        with threadpool_limits(limits=1):
            mlp = MLPClassifier(hidden_layer_sizes=(HIDDEN_UNITS,), alpha=1e-3, max_iter=1000, random_state=0).fit(x_train, y_train)
        weights = {"w0": mlp.coefs_[0], "b0": mlp.intercepts_[0], "w1": mlp.coefs_[1], "b1": mlp.intercepts_[1],
                   "test_index": np.isin(np.arange(len(x)), _test_positions(x, x_test))}
        classifier = cls(weights)
        weights["held_out_accuracy"] = np.float64((classifier.predict(x_test) == y_test).mean())
        return classifier

    @classmethod
    def load_or_fit(cls, cache_dir=None):
        path = Path(cache_dir or default_cache_dir()) / f"digits_classifier_{CLASSIFIER_VERSION}.npz"
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as stored:
                    weights = {key: stored[key] for key in stored.files}
                if set(weights) >= {"w0", "b0", "w1", "b1", "test_index", "held_out_accuracy"}:
                    return cls(weights)
                why = f"it holds only {', '.join(sorted(weights)) or 'nothing'}"
            except (OSError, ValueError, TypeError, zipfile.BadZipFile) as error:  # TypeError: a .npy, no archive
                why = f"numpy cannot read it ({type(error).__name__})"
            # A cache, fitted again the same way (fixed seed): nothing of the user's is lost.
            print(f"fusedit eval: the cached classifier {path} is unusable ({why}); fitting it again", flush=True)
        classifier = cls.fit()
        write_npz(path, **classifier.weights)
        return classifier

    @property
    def held_out_accuracy(self):
        return float(self.weights["held_out_accuracy"])

    def features(self, x):
        return np.maximum(x @ self.weights["w0"] + self.weights["b0"], 0.0)

    def predict(self, x):
        return (self.features(x) @ self.weights["w1"] + self.weights["b1"]).argmax(axis=1)


def _test_positions(x, x_test):
    """Rows of x that are in x_test (train_test_split returns copies, not indices)."""
    lookup = {row.tobytes(): index for index, row in enumerate(x)}
    return [lookup[row.tobytes()] for row in x_test]


def to_classifier_input(images):
    """uint8 (N, H, W, 1) or float (N, 1, H, W) in [-1, 1] -> (N, 64) in [0, 1] on 17 levels."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"expected uint8 NHWC grayscale images, got shape {images.shape}")
        pixels = torch.from_numpy(images[..., :1].astype(np.float64) / 255.0).permute(0, 3, 1, 2)
    else:
        pixels = (torch.as_tensor(images, dtype=torch.float64).clamp(-1, 1) + 1) / 2
    if pixels.shape[-1] != DIGITS_SIZE:
        pixels = torch.nn.functional.adaptive_avg_pool2d(pixels, DIGITS_SIZE)
    return (torch.round(pixels * 16) / 16).reshape(len(pixels), -1).numpy()


# ----------------------------------------------------------------------------- metrics
def frechet_distance(features_a, features_b):
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussian fits of two feature sets.

    Tr((S_a S_b)^(1/2)) is taken as the sum of the square roots of the eigenvalues of the symmetric
    S_a^(1/2) S_b S_a^(1/2), which stays exact when the covariances are singular (dead ReLUs)."""
    mu_a, mu_b = features_a.mean(axis=0), features_b.mean(axis=0)
    sigma_a, sigma_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    values, vectors = np.linalg.eigh(sigma_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ sigma_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_root)


def score(classifier, images, labels):
    """Label accuracy (overall, per class) and the Frechet distance to all real digits."""
    x = to_classifier_input(images)
    labels = np.asarray(labels)
    predicted = classifier.predict(x)
    real_x, _ = real_digits()
    per_class = {str(c): float((predicted[labels == c] == c).mean()) for c in range(NUM_CLASSES) if (labels == c).any()}
    return {"count": int(len(labels)), "accuracy": float((predicted == labels).mean()), "per_class_accuracy": per_class,
            "frechet_distance": frechet_distance(classifier.features(real_x), classifier.features(x))}


def real_floor(classifier):
    """The same metrics for the held-out real digits: what a perfect generator would get."""
    x, y = real_digits()
    held_out = classifier.weights["test_index"].astype(bool)
    images = np.round(x[held_out] * 16) / 16 * 2 - 1
    return score(classifier, images.reshape(-1, 1, DIGITS_SIZE, DIGITS_SIZE), y[held_out])


def print_table(results):
    names = list(results)
    print(f"{'':18s}" + "".join(f"{name:>16s}" for name in names))
    for c in range(NUM_CLASSES):
        print(f"accuracy digit {c}  " + "".join(f"{results[n]['per_class_accuracy'].get(str(c), float('nan')):16.3f}" for n in names))
    print(f"{'accuracy (all)':18s}" + "".join(f"{results[n]['accuracy']:16.3f}" for n in names))
    print(f"{'Frechet distance':18s}" + "".join(f"{results[n]['frechet_distance']:16.3f}" for n in names))
    print(f"{'samples':18s}" + "".join(f"{results[n]['count']:16d}" for n in names))


def read_samples_npz(path):
    """(images, labels) of a `fusedit sample --npz` file: arr_0 uint8 (N, H, W, 1 or 3) with
    N >= 2 (a Frechet distance needs two), arr_1 one digit label per image."""
    try:
        stored = np.load(path, allow_pickle=False)
    except (ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is not an .npz file numpy reads without unpickling ({type(error).__name__})") from error
    if not isinstance(stored, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds one array, not an .npz of samples (arr_0) and labels (arr_1)")
    with stored:
        missing = [key for key in ("arr_0", "arr_1") if key not in stored.files]
        if missing:
            raise ValueError(f"{path} has no {' or '.join(missing)} (arr_0: uint8 NHWC samples, arr_1: the labels "
                             f"each was asked for; found {', '.join(stored.files) or 'nothing'})")
        images, labels = stored["arr_0"], stored["arr_1"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) < 2:
        raise ValueError(f"{path}: arr_0 must hold at least 2 uint8 NHWC images with 1 or 3 channels, as `fusedit "
                         f"sample --npz` writes, got {images.dtype} {images.shape}")
    if (labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer)
            or labels.min() < 0 or labels.max() >= NUM_CLASSES):
        in_range = f", {labels.min()}..{labels.max()}" if labels.size and np.issubdtype(labels.dtype, np.number) else ""
        raise ValueError(f"{path}: arr_1 must hold one digit label in 0..{NUM_CLASSES - 1} per image of arr_0 "
                         f"({images.shape[0]}), got {labels.dtype} {labels.shape}{in_range}")
    return images, labels


def main(args):
    if (args.ckpt is None) == (args.npz is None):
        raise ValueError("pass exactly one of --ckpt PATH (sample and score) or --npz PATH (score these samples)")
    if args.num_per_class < 1:
        raise ValueError(f"--num-per-class must be positive, got {args.num_per_class}")
    check_sampler_flags(args)
    check_output_file("--json", args.json)  # before sampling, not after
    check_output_folder("--cache-dir", args.cache_dir)
    model = None
    if args.ckpt is not None:
        model, model_args = load_model_for_sampling(args.ckpt, args.kernels, args.weights, args.num_heads,
                                                    compile_model=args.compile, num_classes=args.num_classes)
        if model_args.data != "digits" or model.num_classes != NUM_CLASSES:
            raise ValueError(f"{args.ckpt} is not a digits model (data {model_args.data}, {model.num_classes} classes)")
        resolve_clip(args, model_args)
    elif not Path(args.npz).is_file():
        raise FileNotFoundError(f"--npz {args.npz} does not exist")
    else:
        samples = read_samples_npz(args.npz)
    classifier = DigitsClassifier.load_or_fit(args.cache_dir)
    results = {"real held-out": real_floor(classifier)}
    settings = {}
    if model is None:
        results[Path(args.npz).name] = score(classifier, *samples)
    else:
        labels = [digit for digit in range(NUM_CLASSES) for _ in range(args.num_per_class)]
        scales = [args.cfg_scale] + ([1.0] if args.cfg_scale != 1.0 and not args.no_unguided else [])
        with cpu_threads(args.cpu_threads, pixel_model=True):
            for scale in scales:
                args.cfg_scale = scale
                images = generate(model, labels, args)
                results[f"cfg {scale:g}"] = score(classifier, images, labels)
        settings = {"ckpt": model_args.loaded_from, "weights": args.weights, "cfg_scales": scales, "sampler": args.sampler, "steps": args.steps,
                    "eta": args.eta, "seed": args.seed, "clip_denoised": args.clip_denoised, "num_per_class": args.num_per_class}
    print(f"digits classifier: held-out accuracy {classifier.held_out_accuracy:.3f} on real digits")
    print_table(results)
    if args.json:
        report = {"classifier_held_out_accuracy": classifier.held_out_accuracy, "settings": settings, "results": results}
        write_text(args.json, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
