"""Checkpoints: written atomically, loaded safely, pruned to the last K.

A training checkpoint is a dict {"model", "ema", "opt", "args", "step", "rng", "scaler",
"world_size", "elapsed_sec"}: the state dicts, the run's flags as plain values (so
torch.load(weights_only=True) reads it), the number of finished steps, every RNG state, the
number of ranks that trained it and the seconds of training behind it (log.csv's elapsed_sec
goes on from there). It is written to a temporary file in the same folder and
renamed over the target, so a crash mid-write never leaves a half-written checkpoint.

For sampling, `load_sampling_weights` also reads the published DiT files: a bare state dict
(DiT-XL-2-256x256.pt), a published training checkpoint (its "ema" entry), or safetensors.
"""
import argparse
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from fusedit.files import write_atomically

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^(\d+)\.pt$")


def checkpoint_path(run_dir, step):
    return Path(run_dir) / CHECKPOINT_DIR / f"{step:07d}.pt"


def list_checkpoints(run_dir):
    """[(step, path)] of the run's checkpoints, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(match.group(1)), folder / name) for name in os.listdir(folder) if (match := _NAME.match(name))]
    return sorted(found)


def newest_checkpoint(folder):
    """The newest checkpoint of a run folder (or of its checkpoints/ folder itself), or None."""
    folder = Path(folder)
    found = list_checkpoints(folder) or (list_checkpoints(folder.parent) if folder.name == CHECKPOINT_DIR else [])
    return found[-1][1] if found else None


def run_folder_of(path):
    """The run folder a checkpoint file (<run>/checkpoints/NNNNNNN.pt), a run folder or its
    checkpoints/ folder belongs to, or None for a path laid out otherwise."""
    path = Path(path)
    if path.is_file():
        return path.parent.parent if path.parent.name == CHECKPOINT_DIR and _NAME.match(path.name) else None
    if path.name == CHECKPOINT_DIR:
        return path.parent
    return path if (path / CHECKPOINT_DIR).is_dir() else None


def prune_checkpoints(run_dir, keep_last):
    """Delete all but the newest keep_last checkpoints (keep_last 0 keeps everything)."""
    if keep_last <= 0:
        return
    for _, path in list_checkpoints(run_dir)[:-keep_last]:
        path.unlink(missing_ok=True)


def save_atomic(payload, path):
    """torch.save to a temporary file beside `path`, flushed to disk, then renamed over it."""
    def write(temporary):
        with open(temporary, "wb") as file:
            torch.save(payload, file)

    return write_atomically(path, write, durable=True)


def plain_args(args):
    """The flags of a run as a dict of plain values (str/int/float/bool/None and lists of them)."""
    def plain(value):
        if value is None or isinstance(value, (str, int, float, bool)):
            return True
        return isinstance(value, (list, tuple)) and all(plain(item) for item in value)

    items = vars(args).items() if isinstance(args, argparse.Namespace) else dict(args).items()
    return {key: (list(value) if isinstance(value, tuple) else value) for key, value in items if plain(value)}


def checkpoint_file(path):
    """The file a checkpoint argument names: the path itself, or a run folder's newest checkpoint."""
    path = Path(path)
    if path.is_dir():
        newest = newest_checkpoint(path)
        if newest is None:
            raise FileNotFoundError(f"{path} is a folder without checkpoints (a run folder keeps them in {CHECKPOINT_DIR}/)")
        return newest
    return path


def load_file(path):
    """A checkpoint file's contents: safetensors, or torch.load(weights_only=True) on the CPU;
    for a run folder, its newest checkpoint's. A file that is neither gives a ValueError that
    names it and says why."""
    path = checkpoint_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty, not a checkpoint")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(str(path), device="cpu")
        except OSError as error:
            _raise_unless_about_contents(path, error)
        except Exception as error:  # safetensors raises its own SafetensorError for a bad header
            raise ValueError(f"{path} is not a readable safetensors file ({_first_line(error)})") from error
    # The published train.py stores its flags as an argparse.Namespace; allow just that class.
    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        _raise_unless_about_contents(path, error)
    except Exception as error:  # any garbage reaches the unpickler: it fails in many ways
        raise ValueError(f"{path} is not a checkpoint fusedit loads ({_why_not_loaded(error)}): fusedit reads "
                         "safetensors, or torch.save files of tensors and plain values, and never runs code "
                         "that a file brings (torch.load with weights_only=True)") from error


def _raise_unless_about_contents(path, error):
    """An OSError naming a file is the file system's (permissions, a disk error): raised as it
    is. One that names none came from parsing the contents (torch.load raises EINVAL on
    some truncated zips): a ValueError naming the file."""
    if error.filename is not None:
        raise error
    raise ValueError(f"{path} is not a readable checkpoint ({_first_line(error)}): truncated, or only partly "
                     "copied?") from error


def _first_line(error):
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _why_not_loaded(error):
    """The unpickler's own reason when the weights-only loader refused the file (torch wraps it
    in advice to load unsafely, which is not ours to give), else the error's first line."""
    # a global of a blocked module (os, subprocess: what a malicious file calls) is reported
    # without the "WeightsUnpickler error:" prefix
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\n|$)|(Trying to load unsupported GLOBAL .+?)\s*(?:\n|$)",
                      str(error))
    return f"weights-only unpickler: {(found.group(1) or found.group(2)).strip()}" if found else _first_line(error)


def load_strictly(module, state_dict, what):
    """module.load_state_dict(state_dict) (strict), or a ValueError that starts with `what` and
    names a few of the missing and unexpected keys and of the mismatched shapes."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    shapes = [f"{key} {tuple(state_dict[key].shape)} (model {tuple(value.shape)})" for key, value in expected.items()
              if key in state_dict and tuple(state_dict[key].shape) != tuple(value.shape)]
    problems = [f"{len(items)} {kind}: {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
                for kind, items in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if items]
    if problems:
        raise ValueError(f"{what}: {'; '.join(problems)}")
    module.load_state_dict(state_dict)


def load_training_checkpoint(path):
    payload = load_file(path)
    missing = [key for key in ("model", "ema", "opt", "args", "step") if not isinstance(payload, dict) or key not in payload]
    if missing:
        raise ValueError(f"{path} is not a fusedit training checkpoint (missing {', '.join(missing)})")
    return payload


def _is_state_dict(value):
    return isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values())


def load_sampling_weights(path, weights="ema"):
    """(state_dict, training args as a dict or None) from any checkpoint a DiT can be sampled from.

    weights: "ema" (default, what the paper samples with) or "model" for a training checkpoint's
    raw weights; a bare state dict is used as it is.
    """
    payload = load_file(path)
    if _is_state_dict(payload):
        return dict(payload), None
    if isinstance(payload, dict) and weights in payload and _is_state_dict(payload[weights]):
        args = payload.get("args")
        if isinstance(args, argparse.Namespace):
            args = vars(args)
        return dict(payload[weights]), (dict(args) if isinstance(args, dict) else None)
    keys = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
    raise ValueError(f"{path} holds neither a DiT state dict nor an {weights!r} entry (found {keys})")


# ----------------------------------------------------------------------------- RNG states
def rng_state():
    """Every RNG a run may draw from, as tensors and plain values (weights_only-loadable)."""
    numpy_state = np.random.get_state()
    python_version, python_internal, python_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
        "python": {"version": python_version, "internal": list(python_internal), "gauss": python_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
