"""fusedit.train.checkpoint: a failed write keeps the previous file, the file in place was
synced, and the RNG states survive a round trip through a checkpoint."""
import os
import random
import stat

import numpy as np
import pytest
import torch

from fusedit.train import checkpoint
from fusedit.train.checkpoint import restore_rng_state, rng_state


def test_a_checkpoint_gets_a_normal_files_mode(tmp_path):
    umask = os.umask(0o022)  # readable by others, as log.csv and args.json are
    try:
        path = checkpoint.save_atomic({"step": 1}, tmp_path / "0000001.pt")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's private 0o600


def test_a_failed_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = checkpoint.save_atomic({"step": 1, "w": torch.arange(4.0)}, tmp_path / "0000001.pt")

    def crash(payload, file):  # a crash mid-write: some bytes written, then an error
        file.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save_atomic({"step": 2, "w": torch.zeros(4)}, path)
    saved = checkpoint.load_file(path)
    assert saved["step"] == 1 and torch.equal(saved["w"], torch.arange(4.0))
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind


def test_a_checkpoint_is_fsynced_before_it_replaces_the_target(tmp_path, monkeypatch):
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace", os.stat(source).st_ino))
        real_replace(source, target)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    path = checkpoint.save_atomic({"step": 1}, tmp_path / "0000001.pt")
    inode = path.stat().st_ino  # a rename keeps the inode: the file synced is the one now in place
    assert events == [("fsync", inode), ("replace", inode)]


def test_rng_state_survives_a_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    np.random.rand(3)  # mid-stream states (numpy's pos not 0 or 624), not fresh seeds
    random.random()
    torch.rand(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)

    def draw():
        return np.random.rand(5), random.random(), torch.rand(3)

    first = draw()
    restore_rng_state(loaded)
    second = draw()
    assert np.array_equal(first[0], second[0]) and first[1] == second[1] and torch.equal(first[2], second[2])


def test_the_temporary_file_sits_beside_the_checkpoint(tmp_path, monkeypatch):
    # os.replace cannot move a file across file systems: a temporary file in /tmp would fail
    # every checkpoint of a run whose folder is on another disk
    moves, replace = [], os.replace
    monkeypatch.setattr(checkpoint.os, "replace", lambda source, target: moves.append((source, target)) or
                        replace(source, target))
    path = checkpoint.save_atomic({"step": 1}, tmp_path / "run" / "0000001.pt")
    assert [(os.path.dirname(source), target) for source, target in moves] == [(str(path.parent), path)]


def test_a_run_folder_names_its_newest_checkpoint_and_sampling_takes_the_ema(tmp_path):
    for step in (1, 2, 10):
        weights = {"w": torch.full((2,), float(step))}
        checkpoint.save_atomic({"model": weights, "ema": {"w": -weights["w"]}, "opt": {}, "args": {}, "step": step},
                               checkpoint.checkpoint_path(tmp_path, step))
    newest = checkpoint.checkpoint_path(tmp_path, 10)
    assert checkpoint.newest_checkpoint(tmp_path) == checkpoint.checkpoint_file(tmp_path) == newest
    state_dict, _ = checkpoint.load_sampling_weights(tmp_path)  # the EMA by default, as the paper samples
    assert torch.equal(state_dict["w"], torch.full((2,), -10.0))
