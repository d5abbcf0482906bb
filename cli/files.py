"""Writing a file so that a crash never leaves half of it, nor destroys the one it replaces.

Used by every command that writes a file (benchmark JSON/markdown/plots, Gflops tables,
checkpoints, a run's args.json and log, latents, samples, evaluation reports): a failure mid-write
leaves the previous file untouched and no temporary file behind."""
import os
import tempfile
from pathlib import Path


def write_atomically(path, write, durable=False):
    """Call `write(temporary)` with a path beside `path` (same folder, same extension, so tools
    that pick a format from the name pick the right one), then rename it over `path`.

    durable: fsync the file before the rename, so that after a power loss `path` holds either
    the old or the new contents (checkpoints); results that can be made again skip the cost.
    Missing parent folders are made. Returns `path` as a Path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(handle)
    try:
        write(temporary)
        if durable:
            with open(temporary, "rb+") as file:
                os.fsync(file.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes it private; give it a normal file's mode
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_text(path, text):
    """`text` to `path`, atomically (see write_atomically)."""
    return write_atomically(path, lambda temporary: Path(temporary).write_text(text))


def write_npz(path, **arrays):
    """np.savez of `arrays` to `path`, atomically; through an open file, since numpy appends
    .npz to a file name that lacks it and would miss the temporary file."""
    import numpy as np

    def write(temporary):
        with open(temporary, "wb") as file:
            np.savez(file, **arrays)

    return write_atomically(path, write)


def check_output_file(option, path):
    """Fail before a long run, not after it, when `path` (given as `option`) cannot take the
    file a command will write: it is a folder, a file stands where a folder of it must be,
    or the folder it goes in (or the nearest existing one, as missing folders are made)
    takes no new file. Returns `path`."""
    if path is None:
        return None
    if Path(path).is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name")
    _check_folder_can_hold(option, path, Path(path).absolute().parent)
    return path


def check_output_folder(option, path):
    """As check_output_file, for a folder a command fills (made if missing). Returns `path`."""
    if path is None:
        return None
    if Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"{option} {path} is a file, not a folder")
    _check_folder_can_hold(option, path, Path(path).absolute())
    return path


def _check_folder_can_hold(option, path, folder):
    existing = folder
    while not existing.exists():  # the folders to be made, up to the first one there
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option} {path}: {existing} is a file, so no folder can be made in it")
    try:
        with tempfile.TemporaryFile(dir=existing):  # tried, not guessed from permission bits
            pass
    except OSError as error:
        raise ValueError(f"{option} {path}: cannot write files in {existing} ({error.strerror or error})") from error
