import os
import stat
from pathlib import Path

import numpy as np
import pytest

from fusedit.files import write_atomically, write_npz, write_text


@pytest.mark.parametrize("failure", [OSError, KeyboardInterrupt], ids=["error", "ctrl-c"])
def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, failure):
    path = write_atomically(tmp_path / "results.json", lambda temporary: Path(temporary).write_text("old\n"))

    def crash(temporary):
        with open(temporary, "w") as file:
            file.write("half")
        raise failure("disk full")

    with pytest.raises(failure, match="disk full"):
        write_atomically(path, crash)
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["results.json"]


def test_the_temporary_file_has_the_targets_extension_and_folder(tmp_path):
    seen = []
    write_atomically(tmp_path / "new" / "grid.png", lambda temporary: seen.append(temporary))
    assert os.path.dirname(seen[0]) == str(tmp_path / "new") and seen[0].endswith(".png")  # PIL/matplotlib read it


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_the_file_gets_a_normal_mode_under_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        path = write_atomically(tmp_path / "a.md", lambda temporary: None)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == mode  # not mkstemp's private 0o600 whatever the umask


@pytest.mark.parametrize("name", ["samples.npz", "samples"])
def test_write_npz_writes_the_named_file_even_without_the_npz_extension(tmp_path, name):
    images = np.arange(12, dtype=np.uint8).reshape(3, 2, 2)
    write_npz(tmp_path / name, arr_0=images)
    assert os.listdir(tmp_path) == [name]
    with np.load(tmp_path / name) as saved:
        assert np.array_equal(saved["arr_0"], images)


def test_write_text_replaces_the_file_whole(tmp_path, monkeypatch):
    path = write_text(tmp_path / "args.json", "old\n")
    write_text(path, "new\n")
    assert path.read_text() == "new\n" and os.listdir(tmp_path) == ["args.json"]

    def crash(self, text):
        Path.write_bytes(self, text[:2].encode())
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", crash)
    with pytest.raises(OSError, match="disk full"):
        write_text(path, "newer\n")
    monkeypatch.undo()
    assert path.read_text() == "new\n" and os.listdir(tmp_path) == ["args.json"]


def test_output_checks_name_what_stands_in_the_way_and_make_nothing(tmp_path):
    from fusedit.files import check_output_file, check_output_folder

    (tmp_path / "afile").write_text("")
    for check in (check_output_file, check_output_folder):
        assert check("--x", None) is None
        assert check("--x", str(tmp_path / "new" / "deeper" / "name")) == str(tmp_path / "new" / "deeper" / "name")
        with pytest.raises(ValueError, match=f"--x {tmp_path}/afile/name: {tmp_path}/afile is a file, so no folder"):
            check("--x", str(tmp_path / "afile" / "name"))
        with pytest.raises(ValueError, match="--x /proc/name: cannot write files in /proc"):
            check("--x", "/proc/name")
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match=f"--x {tmp_path} is a folder; give a file name"):
        check_output_file("--x", str(tmp_path))
    with pytest.raises(ValueError, match=f"--x {tmp_path}/afile is a file, not a folder"):
        check_output_folder("--x", str(tmp_path / "afile"))
    assert check_output_folder("--x", str(tmp_path)) == str(tmp_path)
