"""Where a benchmark ran: device, library versions, git commit and date, stamped on every record
so a result file can always be traced to the code and machine that produced it."""
import datetime
import importlib.metadata
import os
import platform
import subprocess

import torch

from .devices import device_name

_REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout, in an editable install


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*arguments):
    try:
        result = subprocess.run(["git", "-C", _REPOSITORY, *arguments], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def environment(device):
    """The fields every record carries: device, versions, git commit (None outside a
    checkout), whether tracked files had uncommitted changes, and the UTC date."""
    # Only fusedit's own checkout: an installed copy (site-packages/fusedit) may sit inside some
    # other repository, whose commit says nothing about this code.
    own_checkout = _git("rev-parse", "--show-toplevel") == os.path.realpath(_REPOSITORY)
    commit = _git("rev-parse", "HEAD") if own_checkout else None
    changes = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "triton_version": _version("triton"),
        "jax_version": _version("jax"),
        "python_version": platform.python_version(),
        "git_commit": commit,
        "git_dirty": None if changes is None else bool(changes),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
