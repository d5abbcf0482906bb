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


# ---- mutation testing: the names, the flags, the refusals and the cached draws ----

def test_checkpoints_are_named_by_their_step_in_seven_digits(tmp_path):
    # the published layout (<run>/checkpoints/0050000.pt); names sort as the steps do
    assert checkpoint.checkpoint_path(tmp_path, 42) == tmp_path / "checkpoints" / "0000042.pt"
    assert checkpoint.checkpoint_path(tmp_path, 1_234_567).name == "1234567.pt"


def test_plain_args_keeps_plain_values_with_tuples_as_lists_and_drops_the_rest(tmp_path):
    import argparse

    args = argparse.Namespace(depth=3, lr=1e-4, flip=True, resume=None, data="digits", sizes=(2, 4),
                              mixed=[1, tmp_path], folder=tmp_path, names=["a", "b"])
    plain = checkpoint.plain_args(args)
    assert plain == {"depth": 3, "lr": 1e-4, "flip": True, "resume": None, "data": "digits", "sizes": [2, 4],
                     "names": ["a", "b"]}
    assert type(plain["sizes"]) is list  # as args.json and a checkpoint read it back
    path = checkpoint.save_atomic({"args": plain}, tmp_path / "0000001.pt")
    assert checkpoint.load_file(path)["args"] == plain  # weights_only loads every value kept


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_file_that_would_run_code_when_loaded_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "the-code-ran"
    torch.save({"model": {"w": torch.ones(2)}, "payload": _RunsCodeWhenUnpickled(marker)}, tmp_path / "evil.pt")
    # torch's unpickler words its refusal by version: "Trying to load unsupported GLOBAL posix.mkdir whose
    # module posix is blocked." (2.13), "Unsupported global: GLOBAL posix.mkdir was not an allowed global by
    # default" (2.4)
    with pytest.raises(ValueError, match=r"evil\.pt is not a checkpoint fusedit loads \(weights-only unpickler: "
                       r"(Trying to load unsupported GLOBAL \w+\.mkdir whose module \w+ is blocked\."
                       r"|Unsupported global: GLOBAL \w+\.mkdir was not an allowed global by default)\)") as error:
        checkpoint.load_file(tmp_path / "evil.pt")
    assert not marker.exists()
    # and never torch's advice to load it with weights_only=False, which would run the code
    assert "False" not in str(error.value) and "weights_only" not in str(error.value).replace("weights_only=True", "")


def test_a_file_that_cannot_be_read_is_an_os_error_not_a_verdict_on_its_contents(tmp_path, monkeypatch):
    path = checkpoint.save_atomic({"step": 1}, tmp_path / "0000001.pt")

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint.torch, "load", unreadable)
    with pytest.raises(PermissionError, match="Permission denied"):
        checkpoint.load_file(path)


@pytest.mark.parametrize("count, listed", [(3, "0, 1, 2"), (4, "0, 1, 2, ...")], ids=["three", "more"])
def test_load_strictly_names_at_most_three_keys_of_a_kind(count, listed):
    module = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(2)) for _ in range(count)])
    with pytest.raises(ValueError) as error:
        checkpoint.load_strictly(module, {}, "the weights")
    assert str(error.value) == f"the weights: {count} missing: {listed}"


@pytest.mark.parametrize("key", ["model", "ema", "opt", "args", "step"])
def test_a_training_checkpoint_without_an_entry_is_refused_by_name(tmp_path, key):
    payload = {"model": {"w": torch.randn(2)}, "ema": {"w": torch.randn(2)}, "opt": {}, "args": {}, "step": 3}
    del payload[key]
    path = checkpoint.save_atomic(payload, tmp_path / "0000003.pt")
    with pytest.raises(ValueError, match=rf"0000003\.pt is not a fusedit training checkpoint \(missing {key}\)"):
        checkpoint.load_training_checkpoint(path)


def test_a_dict_of_tensors_and_other_values_is_no_state_dict(tmp_path):
    path = checkpoint.save_atomic({"w": torch.randn(2), "note": "not a weight"}, tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match=r"mixed\.pt holds neither a DiT state dict nor an 'ema' entry \(found \['note', 'w'\]\)"):
        checkpoint.load_sampling_weights(path)


def test_the_cached_normal_draws_survive_a_checkpoint_round_trip(tmp_path):
    # numpy's legacy normals and random.gauss draw in pairs and keep the second for the next
    # call: a state saved between the two must carry the cached one
    np.random.seed(2)
    random.seed(2)
    np.random.randn(1)
    random.gauss(0.0, 1.0)
    assert np.random.get_state()[3] == 1 and random.getstate()[2] is not None
    torch.save(rng_state(), tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)

    def draw():
        return np.random.randn(3), [random.gauss(0.0, 1.0) for _ in range(3)]

    first = draw()
    restore_rng_state(loaded)
    second = draw()
    assert np.array_equal(first[0], second[0]) and first[1] == second[1]
