"""What both benchmarks share: checking their arguments, building a DiT for a config name or
a custom size, drawing its weights at random, and the per-row bookkeeping."""
import gc
import os
import sys

import torch

from fusedit.dit.flops import VAE_DOWNSAMPLE, check_image_size
from fusedit.dit.models import DiT, config_patch_size, create_model

from .devices import DTYPES

# A custom model (tests, experiments) is a dict: a 'name' for its rows plus DiT sizes, or a
# 'config' of DiT_models with other settings but its own sizes (`--block` makes {"config":
# "DiT-XL/2", "block": "cross_attn", ...}: still a named config to the JAX runner).
CONFIG_SIZE_KEYS = ("patch_size", "depth", "hidden_size", "num_heads")
CUSTOM_MODEL_KEYS = ("name", "config", *CONFIG_SIZE_KEYS, "mlp_ratio", "class_dropout_prob", "num_classes",
                     "in_channels", "learn_sigma", "block")


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- argument checks: a ValueError that names the problem ----------------------------------------

def as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def non_negative_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


SEED_LIMIT = 2**32  # JAX keys take 32-bit seeds; torch's generators more


def check_seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in 0..{SEED_LIMIT - 1}, got {seed!r}")
    return seed


def check_device(device):
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False; use --device cpu")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device {str(device)!r} is not supported; use cuda or cpu")
    return str(device)


def check_dtype(dtype):
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return dtype


def check_choices(what, values, choices):
    """values (one or a list) as a list without repeats, each one of `choices`."""
    chosen = list(dict.fromkeys(as_list(values)))
    if not chosen:
        raise ValueError(f"no {what} given; choose from {', '.join(choices)}")
    for value in chosen:
        if value not in choices:
            raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
    return chosen


def check_options(options, settings_class):
    """Keyword options of a run: each must be a field of its settings dataclass."""
    from dataclasses import fields

    names = [field.name for field in fields(settings_class) if field.name != "device"]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; choose from {', '.join(names)}")


def model_label(model):
    return model if isinstance(model, str) else str(model["name"])


def check_model(model, image_size):
    """A model entry: a name from DiT_models, or a dict of DiT sizes with a 'name'."""
    if isinstance(model, str):
        patch = config_patch_size(model)
    elif isinstance(model, dict):
        unknown = sorted(set(model) - set(CUSTOM_MODEL_KEYS))
        if unknown or "name" not in model:
            raise ValueError(f"a custom model is a dict with a 'name' and DiT sizes ({', '.join(CUSTOM_MODEL_KEYS)}); "
                             f"got keys {sorted(model)}")
        if "config" in model:
            resized = sorted(set(model) & set(CONFIG_SIZE_KEYS))
            if resized:
                raise ValueError(f"{model['name']!r}: a 'config' entry keeps that config's sizes, so it cannot also "
                                 f"set {', '.join(resized)}; give all the sizes without 'config' instead")
            patch = config_patch_size(model["config"])
        else:
            patch = model.get("patch_size", 2)
    else:
        raise ValueError(f"a model is a config name or a dict of DiT sizes, got {type(model).__name__}")
    check_image_size(image_size, patch, model_label(model))
    return model


def run_grid(models, image_size, dtype, batch_size, defaults):
    """The (model, image size, dtype, batch size) runs a call asks for, every value checked;
    a None argument takes its per-device default."""
    def pick(value, key):
        values = as_list(value if value is not None else defaults[key])
        if not values:
            raise ValueError(f"no {key.replace('_', ' ')} given: an empty list selects nothing to run")
        return values

    models, image_sizes = pick(models, "models"), pick(image_size, "image_size")
    dtypes = [check_dtype(d) for d in pick(dtype, "dtype")]
    batch_sizes = [positive_int("batch size", b) for b in pick(batch_size, "batch_size")]
    for model in models:
        for size in image_sizes:
            check_model(model, size)
    return [(m, s, d, b) for m in models for s in image_sizes for d in dtypes for b in batch_sizes]


# ---- models ------------------------------------------------------------------------------------------

def model_arguments(model):
    """The DiT arguments a custom-model dict gives (all its keys but 'name' and 'config')."""
    return {key: value for key, value in model.items() if key not in ("name", "config")}


def build_model(model, image_size, device, kernels="reference"):
    """A DiT for a config name or a custom dict, fp32, created directly on `device`."""
    latent = image_size // VAE_DOWNSAMPLE
    with torch.device(device):
        if isinstance(model, str):
            return create_model(model, input_size=latent, kernels=kernels)
        arguments = model_arguments(model)
        if "config" in model:
            return create_model(model["config"], input_size=latent, kernels=kernels, **arguments)
        return DiT(input_size=latent, kernels=kernels, **arguments)


def model_sizes(dit):
    """The custom-model dict (all DiT arguments but input_size) that rebuilds `dit`."""
    hidden = dit.x_embedder.proj.out_channels
    return {"name": "sizes", "patch_size": dit.patch_size, "depth": len(dit.blocks), "hidden_size": hidden,
            "num_heads": dit.num_heads, "mlp_ratio": dit.blocks[0].mlp.fc1.out_features / hidden,
            "class_dropout_prob": dit.y_embedder.dropout_prob, "num_classes": dit.num_classes,
            "in_channels": dit.in_channels, "learn_sigma": dit.learn_sigma, "block": dit.block}


def with_block(model, block):
    """A config name (or custom dict) as a custom model with another block design. Nothing is
    built here: a model made even on the meta device imports triton, which must wait until
    the run has switched on its interpreter (on CPU)."""
    if isinstance(model, dict):
        return {**model, "name": f"{model['name']} {block}", "block": block}
    config_patch_size(model)  # names an unknown config
    return {"name": f"{model} {block}", "config": model, "block": block}




def compile_options(settings):
    """torch.compile keyword arguments: the mode applies to inductor only. Static shapes, so
    each batch size gets its own graph, as a deployment would."""
    options = {"backend": settings.compile_backend, "dynamic": False}
    if settings.compile_backend == "inductor":
        options["mode"] = settings.compile_mode
    return options


def compile_label(settings):
    """What the records' compile_mode says: the inductor mode, or the other backend's name."""
    return settings.compile_mode if settings.compile_backend == "inductor" else f"{settings.compile_backend} backend"


# ---- bookkeeping ----------------------------------------------------------------------------------------

def enable_triton_interpreter_on_cpu():
    """Switch Triton's interpreter on for CPU rows; None when it is (or will be) on, else why
    it cannot be. Triton fixes the mode of its own library's jit functions when `triton` is
    imported, and of fusedit's kernels when fusedit.kernels.triton is: turning it on later
    gives kernels that fail inside the interpreter. Call this before anything imports triton
    (counting Gflops does, through torch.compile's modules)."""
    late = ("on CPU the triton kernels run in Triton's interpreter, which must be on before triton is "
            "imported: run with TRITON_INTERPRET=1 in the environment (e.g. TRITON_INTERPRET=1 fusedit bench)")
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        if "triton" in sys.modules:
            return late
        os.environ["TRITON_INTERPRET"] = "1"
    if "fusedit.kernels.triton" in sys.modules:
        from fusedit.kernels.triton._common import INTERPRET

        if not INTERPRET:
            return late
    return None


def note_error(record, what, error):
    """Append '<what>: <Type>: <first line>' to the record's notes."""
    text = str(error).strip()
    record["notes"].append(f"{what}: {type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300])


def free_memory(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
