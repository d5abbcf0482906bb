"""`fusedit train`: backends agree, resume is exact, SIGTERM loses nothing, DDP equals one process,
the loss falls, the EMA, label dropout, flips and the vb term do what they say, bad input
fails clearly before anything is overwritten, the defaults are the published recipe, and a resume
restores the RNG states."""
import copy
import csv
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fusedit.cli import main as cli_main
from fusedit.dit.models import DiT
from fusedit.train.checkpoint import checkpoint_path, list_checkpoints
from fusedit.train.data import DigitsDataset, LatentsDataset, StepBatches
from fusedit.train.loop import draw_step_randomness, update_ema

# Full fp32 on a GPU too: these runs are compared to each other at fp32 tolerances.
TINY = ["--depth", "1", "--hidden-size", "64", "--num-heads", "2", "--global-batch-size", "8", "--log-every", "1",
        "--no-progress", "--lr", "1e-3", "--ema-decay", "0.9", "--no-tf32"]
# Bit-for-bit comparisons run on the CPU wherever the suite runs: GPU kernels with atomics
# (cuDNN's convolution backward among them) are not bitwise reproducible run to run.
ON_CPU = ["--device", "cpu"]
# Subprocesses get one thread each: the machine is small and shared.
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def train(run_dir, *flags):
    return cli_main(["train", *TINY, "--results-dir", str(run_dir), *flags])


def logged(run_dir, column="loss"):
    with open(Path(run_dir) / "log.csv", newline="") as file:
        return [float(row[column]) for row in csv.DictReader(file)]


def final_checkpoint(run_dir):
    return torch.load(list_checkpoints(run_dir)[-1][1], map_location="cpu", weights_only=True)


def assert_states_equal(first, second, what):
    if isinstance(first, torch.Tensor):
        assert torch.equal(first, second), what
    elif isinstance(first, dict):
        assert first.keys() == second.keys(), what
        for key in first:
            assert_states_equal(first[key], second[key], f"{what}.{key}")
    elif isinstance(first, (list, tuple)):
        assert len(first) == len(second), what
        for index, (a, b) in enumerate(zip(first, second)):
            assert_states_equal(a, b, f"{what}[{index}]")
    else:
        assert first == second, what


def assert_runs_identical(dir_a, dir_b):
    a, b = final_checkpoint(dir_a), final_checkpoint(dir_b)
    assert a["step"] == b["step"]
    for key in ("model", "ema", "opt"):
        assert_states_equal(a[key], b[key], key)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    assert train(run_dir, "--steps", "3", "--kernels", "reference") == 0
    return run_dir


@pytest.mark.parametrize("variant", [[], ["--kernels", "triton"], ["--kernels", "reference", "--grad-checkpoint"]],
                         ids=["sdpa-by-default", "triton", "grad-checkpoint"])
def test_backends_give_matching_losses(tmp_path, reference_run, capsys, variant):
    assert train(tmp_path, "--steps", "3", *variant) == 0
    assert f"kernels {variant[1] if variant else 'sdpa'}," in capsys.readouterr().out
    np.testing.assert_allclose(logged(tmp_path), logged(reference_run), rtol=1e-4)
    reference, other = final_checkpoint(reference_run), final_checkpoint(tmp_path)
    for name, weight in reference["model"].items():
        torch.testing.assert_close(other["model"][name], weight, rtol=1e-3, atol=1e-5, msg=name)


@pytest.fixture
def compiled_models(monkeypatch):
    """torch.compile through aot_eager (inductor's C++ build of even a tiny model takes minutes
    on our CPUs), keeping each model it was asked to compile."""
    compiled, compile = [], torch.compile

    def compile_with_aot_eager(model, **options):
        compiled.append(model)
        return compile(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_with_aot_eager)
    return compiled


@pytest.mark.parametrize("variant, ops", [(["--kernels", "compile"], "reference"),
                                          (["--kernels", "triton", "--compile"], "triton")], ids=["compile", "triton-compile"])
def test_compiled_training_matches_the_reference(tmp_path, reference_run, compiled_models, capsys, variant, ops):
    assert train(tmp_path, "--steps", "3", *variant) == 0
    assert [model.kernels for model in compiled_models] == [ops]
    assert f"kernels {variant[1]}{' + torch.compile' * ('--compile' in variant)}," in capsys.readouterr().out
    np.testing.assert_allclose(logged(tmp_path), logged(reference_run), rtol=1e-4)


def test_bf16_autocast_trains_close_to_fp32(tmp_path, reference_run):
    assert train(tmp_path, "--steps", "3", "--kernels", "reference", "--precision", "bf16") == 0
    np.testing.assert_allclose(logged(tmp_path), logged(reference_run), rtol=3e-2)


def test_resume_is_bitwise_identical(tmp_path):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    assert train(straight, "--steps", "6", "--kernels", "reference", *ON_CPU) == 0
    assert train(halves, "--steps", "3", "--kernels", "reference", *ON_CPU) == 0
    # a first session that trained for 1000 s: the resumed log's elapsed_sec goes on from there
    (step, path), = list_checkpoints(halves)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    saved["elapsed_sec"] += 1000.0
    torch.save(saved, path)
    assert train(halves, "--steps", "6", "--kernels", "reference", "--resume", *ON_CPU) == 0
    assert_runs_identical(straight, halves)
    assert logged(halves) == logged(straight)  # the log rows of both halves, once each
    elapsed = logged(halves, "elapsed_sec")
    assert max(elapsed[:step]) < 1000 <= min(elapsed[step:]) and elapsed == sorted(elapsed), elapsed
    # ... and so does the checkpoint it writes, for the next resume (saved after the last row, rounded to 0.1 s)
    assert final_checkpoint(halves)["elapsed_sec"] >= elapsed[-1] - 0.05


def test_a_resume_between_log_rows_logs_what_a_straight_run_logs(tmp_path):
    every4 = ["--kernels", "reference", "--log-every", "4", *ON_CPU]
    straight, halves, middle = tmp_path / "straight", tmp_path / "halves", tmp_path / "middle"
    assert train(straight, "--steps", "8", *every4) == 0
    # a run ended (or stopped) at step 6 logged a row there; resumed, its row at 8 averages 5-8
    assert train(halves, "--steps", "6", *every4) == 0
    assert logged(halves, "step") == [4, 6]
    assert train(halves, "--steps", "8", *every4, "--resume") == 0
    # a checkpoint inside a window (every 3 steps), resumed from: the steps before it count too
    assert train(middle, "--steps", "8", "--ckpt-every", "3", *every4) == 0
    (middle / "checkpoints" / "0000008.pt").unlink()
    assert train(middle, "--steps", "8", "--ckpt-every", "3", *every4, "--resume") == 0
    for run in (halves, middle):
        assert logged(run, "step") == logged(straight, "step") == [4, 8]
        for column in ("loss", "mse", "vb"):
            assert logged(run, column) == logged(straight, column), (run.name, column)
    assert_runs_identical(straight, halves)


def test_keeps_the_last_k_checkpoints(tmp_path):
    assert train(tmp_path, "--steps", "5", "--ckpt-every", "1", "--keep-last", "2") == 0
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 5]
    saved = final_checkpoint(tmp_path)
    assert {"model", "ema", "opt", "args", "step", "rng"} <= set(saved)
    assert saved["args"]["depth"] == 1 and saved["step"] == 5 and saved["world_size"] == 1
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_ema_starts_as_a_copy_and_covers_pos_embed(tmp_path):
    assert train(tmp_path, "--steps", "0") == 0
    saved = final_checkpoint(tmp_path)
    assert_states_equal(saved["model"], saved["ema"], "ema")
    assert "pos_embed" in saved["ema"]


def test_loss_falls_on_digits(tmp_path):
    assert train(tmp_path, "--steps", "80", "--global-batch-size", "32", "--log-every", "20") == 0
    losses = logged(tmp_path)
    assert len(losses) == 4 and losses[-1] < 0.6 * losses[0], losses


def test_sigterm_checkpoints_and_resume_loses_nothing(tmp_path):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    command = [sys.executable, "-m", "fusedit.train", *TINY, *ON_CPU, "--kernels", "reference", "--steps", "400",
               "--ckpt-every", "1000", "--results-dir", str(killed)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=CHILD_ENV)
    output = []
    for line in process.stdout:
        output.append(line)
        if line.startswith("step") and int(line.split()[1]) >= 3:
            process.send_signal(signal.SIGTERM)
            break
    output += process.stdout.readlines()
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, "".join(output)
    assert "stopped by SIGTERM" in "".join(output)
    stopped_at = list_checkpoints(killed)[-1][0]
    assert 3 <= stopped_at < 400
    target = str(stopped_at + 2)
    assert train(killed, "--kernels", "reference", "--steps", target, "--resume", *ON_CPU) == 0
    assert train(straight, "--kernels", "reference", "--steps", target, *ON_CPU) == 0
    assert_runs_identical(straight, killed)


def test_two_process_ddp_equals_one_process(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    # Two ranks need no two GPUs on gloo; a seed other than 0 catches a seed scaled by the rank count.
    flags = [*TINY, *ON_CPU, "--kernels", "reference", "--steps", "3", "--global-seed", "3"]
    assert train(single, *flags[len(TINY):]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fusedit.train",
               *flags, "--results-dir", str(ddp)]
    result = subprocess.run(command, capture_output=True, text=True, env=CHILD_ENV, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rank(s)" in result.stdout
    np.testing.assert_allclose(logged(ddp), logged(single), rtol=1e-5)
    a, b = final_checkpoint(single), final_checkpoint(ddp)
    assert (a["world_size"], b["world_size"]) == (1, 2)  # the ranks that trained it, as the checkpoint says
    for key in ("model", "ema"):
        for name, weight in a[key].items():
            torch.testing.assert_close(b[key][name], weight, rtol=1e-4, atol=1e-6, msg=f"{key}.{name}")


def test_tf32_is_set_for_the_run_and_restored_after(tmp_path, monkeypatch):
    import fusedit.train.loop as loop

    seen = []
    monkeypatch.setattr(loop, "_train", lambda args, ranks: seen.append(
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)) or 0)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    flags = [flag for flag in TINY if flag != "--no-tf32"]
    assert cli_main(["train", *flags, "--results-dir", str(tmp_path / "a"), "--tf32"]) == 0
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    assert cli_main(["train", *flags, "--results-dir", str(tmp_path / "b"), "--no-tf32"]) == 0
    assert seen == [(True, True), (False, False)]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_device_errors_name_the_problem(monkeypatch):
    from fusedit.train.loop import setup_distributed

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda, but torch .* sees no CUDA device"):
            setup_distributed("cuda")
    # torchrun with more processes than GPUs: say so before torch.cuda.set_device fails obscurely
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: pytest.fail("set_device was called"))
    with pytest.raises(ValueError, match="LOCAL_RANK 1 has no GPU of its own: 1 CUDA device"):
        setup_distributed("auto")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        setup_distributed("tpu")


def write_latents(directory, count=16, side=2, classes=3, image_size=16):
    directory.mkdir(parents=True)
    generator = np.random.default_rng(0)
    shape = (count, 2, 4, side, side)
    np.save(directory / "mean.npy", generator.normal(size=shape).astype(np.float16))
    np.save(directory / "std.npy", np.full(shape, 0.1, dtype=np.float16))
    np.save(directory / "labels.npy", np.arange(count, dtype=np.int64) % classes)
    meta = {"format": "fusedit-latents-v1", "image_size": image_size, "latent_shape": [4, side, side], "count": count,
            "num_classes": classes}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def test_trains_on_latents(tmp_path):
    latents = write_latents(tmp_path / "latents")
    assert train(tmp_path / "run", "--data", "latents", str(latents), "--image-size", "16", "--model", "DiT-S/2",
                 "--steps", "3", "--num-workers", "0") == 0
    saved = final_checkpoint(tmp_path / "run")
    assert saved["args"]["num_classes"] == 3 and saved["args"]["flip"] is True
    assert saved["model"]["x_embedder.proj.weight"].shape[1] == 4
    assert all(np.isfinite(logged(tmp_path / "run")))


def fails(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_inputs_fail_clearly(tmp_path, capsys):
    run = ["train", *TINY, "--steps", "1"]
    assert "does not exist" in fails(capsys, *run, "--data", "latents", str(tmp_path / "missing"), "--results-dir", str(tmp_path / "a"))
    latents = write_latents(tmp_path / "latents")
    error = fails(capsys, *run, "--data", "latents", str(latents), "--image-size", "256", "--results-dir", str(tmp_path / "b"))
    assert "(4, 2, 2)" in error and "(4, 32, 32)" in error
    assert "larger than the dataset" in fails(capsys, *run, "--global-batch-size", "4096", "--results-dir", str(tmp_path / "c"))
    assert "--keep-last must not be negative" in fails(capsys, *run, "--keep-last", "-1", "--results-dir", str(tmp_path / "c"))
    assert "--lr must be positive" in fails(capsys, *run, "--lr", "-1", "--results-dir", str(tmp_path / "c"))
    assert "--ema-decay must lie in [0, 1)" in fails(capsys, *run, "--ema-decay", "1.0", "--results-dir", str(tmp_path / "c"))
    assert "--label-dropout must lie in [0, 1)" in fails(capsys, *run, "--label-dropout", "1.0", "--results-dir", str(tmp_path / "c"))
    assert "--weight-decay not negative" in fails(capsys, *run, "--weight-decay", "-1", "--results-dir", str(tmp_path / "c"))
    assert "--data digits takes no directory" in fails(capsys, *run, "--data", "digits", "somedir", "--results-dir", str(tmp_path / "c"))
    assert "--kernels pallas is an op set of the JAX model: add --framework jax" in fails(
        capsys, *run, "--kernels", "pallas", "--results-dir", str(tmp_path / "c"))
    assert "--num-workers must not be negative" in fails(capsys, *run, "--num-workers", "-1", "--results-dir", str(tmp_path / "c"))
    for flag in ("--depth", "--hidden-size", "--num-heads", "--image-size", "--global-batch-size"):  # 0 is a value, not "the config's"
        assert f"{flag} must be positive, got 0" in fails(capsys, *run, flag, "0", "--results-dir", str(tmp_path / "c"))
    if importlib.util.find_spec("triton") is not None:
        from fusedit.kernels.triton import _common

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_common, "INTERPRET", False)  # as on a CPU machine without TRITON_INTERPRET=1
            error = fails(capsys, *run, *ON_CPU, "--kernels", "triton", "--results-dir", str(tmp_path / "c"))
        assert "fusedit train --kernels triton: fusedit's triton kernels need a CUDA device" in error
        assert "TRITON_INTERPRET=1" in error and "--kernels reference" in error
    assert not any((tmp_path / name).exists() for name in "abc")  # nothing was written

    from fusedit.train.cli import add_arguments
    from fusedit.train.loop import Ranks, _train
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([*TINY, "--global-batch-size", "8", "--results-dir", str(tmp_path / "d")])
    with pytest.raises(ValueError, match="does not divide across 3 ranks"):
        _train(args, Ranks(rank=0, world_size=3))
    assert not (tmp_path / "d").exists()


def test_existing_run_is_never_overwritten(tmp_path, capsys):
    assert train(tmp_path, "--steps", "2") == 0
    checkpoint = list_checkpoints(tmp_path)[-1][1]
    before = checkpoint.read_bytes()
    assert "already holds checkpoints" in fails(capsys, "train", *TINY, "--steps", "2", "--results-dir", str(tmp_path))
    error = fails(capsys, "train", *TINY, "--depth", "2", "--steps", "4", "--resume", "--results-dir", str(tmp_path))
    assert "another config" in error and "depth=1" in error
    error = fails(capsys, "train", *TINY, "--block", "adaln", "--steps", "4", "--resume", "--results-dir", str(tmp_path))
    assert "another config: block='adaln_zero' (now 'adaln')" in error
    error = fails(capsys, "train", *TINY, "--steps", "1", "--resume", "--results-dir", str(tmp_path))
    assert "is at step 2, past the 1 steps asked for" in error  # --steps counts all steps
    assert checkpoint.read_bytes() == before and len(list_checkpoints(tmp_path)) == 1
    assert "no checkpoint" in fails(capsys, "train", *TINY, "--resume", "--results-dir", str(tmp_path / "empty"))


@pytest.mark.parametrize("resume", ["checkpoints/0000002.pt", ".", "checkpoints"])
def test_resuming_a_named_checkpoint_goes_on_in_its_run_folder(tmp_path, monkeypatch, resume):
    run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    assert train(run_dir, "--steps", "2", "--kernels", "reference") == 0
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no --results-dir: not ./results, but the checkpoint's own run
    assert cli_main(["train", *TINY, "--steps", "3", "--kernels", "reference", "--resume", str(run_dir / resume)]) == 0
    assert [step for step, _ in list_checkpoints(run_dir)] == [2, 3] and not any(elsewhere.iterdir())
    assert len(logged(run_dir)) == 3  # the log goes on too


def test_resuming_another_runs_checkpoint_into_a_run_folder_is_refused(tmp_path, capsys):
    source, other = tmp_path / "source", tmp_path / "other"
    assert train(source, "--steps", "2", "--kernels", "reference") == 0
    assert train(other, "--steps", "1", "--kernels", "reference") == 0
    before = (other / "log.csv").read_bytes()
    error = fails(capsys, "train", *TINY, "--steps", "3", "--resume", str(source / "checkpoints" / "0000002.pt"),
                  "--results-dir", str(other))
    assert f"{other} already holds checkpoints of another run (newest: 0000001.pt)" in error, error
    assert [step for step, _ in list_checkpoints(other)] == [1] and (other / "log.csv").read_bytes() == before
    # into a new folder it goes on (a fork of the run), and from its own checkpoint in its own folder
    assert train(tmp_path / "fork", "--steps", "3", "--kernels", "reference", "--resume", str(source)) == 0
    assert train(source, "--steps", "3", "--kernels", "reference", "--resume", str(source / "checkpoints")) == 0


def test_a_results_dir_that_cannot_be_a_folder_fails_before_training(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert "--results-dir " + str(tmp_path / "afile") + " is a file, not a folder" in fails(
        capsys, "train", *TINY, "--steps", "1", "--results-dir", str(tmp_path / "afile"))
    assert "is a file, so no folder can be made in it" in fails(
        capsys, "train", *TINY, "--steps", "1", "--results-dir", str(tmp_path / "afile" / "run"))


def test_data_flag_needs_a_directory(capsys):
    assert "needs exactly one directory" in fails(capsys, "train", "--data", "latents")
    assert "unknown source" in fails(capsys, "train", "--data", "imagenet", "x")


# ---- the values the bitwise comparisons above cannot see (both sides share any bug) ----

def test_update_ema_is_the_decay_recursion_over_every_entry():
    torch.manual_seed(0)
    model = DiT(input_size=4, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    before = {name: value.clone() for name, value in ema.state_dict().items()}
    update_ema(ema, model, 0.75)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ema.state_dict()[name], 0.75 * before[name] + 0.25 * value, msg=name)


def test_one_step_checkpoints_the_ema_of_the_updated_weights_and_trains_the_variance(tmp_path):
    assert train(tmp_path / "init", "--steps", "0", *ON_CPU) == 0
    assert train(tmp_path / "one", "--steps", "1", *ON_CPU) == 0
    init, one = final_checkpoint(tmp_path / "init")["model"], final_checkpoint(tmp_path / "one")
    for name, weight in one["model"].items():  # --ema-decay 0.9, applied after the optimizer step
        torch.testing.assert_close(one["ema"][name], 0.9 * init[name] + 0.1 * weight, msg=name)
    # the final linear starts at zero; its variance rows (odd, 2 channels) move only through
    # the vb term of the hybrid loss, its epsilon rows through the mse
    weight = one["model"]["final_layer.linear.weight"]
    assert weight[0::2].abs().max() > 0 and weight[1::2].abs().max() > 0


def test_label_dropout_and_flips_are_drawn_at_their_rates():
    draws = draw_step_randomness(0, 3, 4000, (1, 2, 2), 0.1)
    assert 0.08 < draws.drop_labels.float().mean().item() < 0.12
    _, flips = StepBatches(4000, 4000, seed=0, flip=True).global_batch(0)
    assert 0.45 < flips.float().mean().item() < 0.55


def test_a_flip_mirrors_left_and_right(tmp_path):
    dataset = DigitsDataset()
    (image, label), (flipped, flipped_label) = dataset[(5, False)], dataset[(5, True)]
    assert label == flipped_label and not torch.equal(flipped, image)
    assert torch.equal(flipped, image.flip(-1))
    # latents store each image's flip beside it (encoded separately): a flip reads that one
    latents = write_latents(tmp_path / "latents")
    mean = np.load(latents / "mean.npy")
    dataset = LatentsDataset(latents, 16)
    for flip in (False, True):
        (got_mean, _), _ = dataset[(2, flip)]
        assert np.array_equal(got_mean.numpy(), mean[2, int(flip)].astype(np.float32))


# ---- the published recipe and the RNG states of a resume ----

def parse_train(*flags):
    import argparse

    from fusedit.train.cli import add_arguments, resolve_defaults

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return resolve_defaults(parser.parse_args(list(flags)))


def test_defaults_are_the_published_recipe_and_the_digits_demo():
    # every run above passes --lr and --ema-decay, so only this sees the defaults themselves
    args = parse_train("--data", "latents", "unused")
    assert (args.model, args.image_size, args.depth, args.hidden_size, args.num_heads) == ("DiT-XL/2", 256, 28, 1152, 16)
    assert (args.global_batch_size, args.epochs, args.steps) == (256, 1400, None)
    assert (args.lr, args.weight_decay, args.ema_decay) == (1e-4, 0.0, 0.9999)
    assert args.kernels == "sdpa" and parse_train("--framework", "jax").kernels == "xla"
    assert (args.label_dropout, args.learn_sigma, args.flip, args.global_seed) == (0.1, True, True, 0)
    assert (args.ckpt_every, args.num_workers) == (50_000, 4)
    assert (args.log_every, args.keep_last, args.precision, args.device, args.tf32) == (100, 3, "fp32", "auto", True)
    assert args.results_dir == "results"
    args = parse_train()
    assert args.data == "digits"
    assert (args.model, args.image_size, args.depth, args.hidden_size, args.num_heads) == ("DiT-S/2", 8, 4, 64, 4)
    assert (args.global_batch_size, args.steps, args.lr, args.ema_decay, args.flip) == (128, 3000, 1e-3, 0.995, False)
    assert (args.label_dropout, args.weight_decay, args.ckpt_every, args.num_workers) == (0.1, 0.0, 1000, 0)


def test_resume_restores_the_checkpoints_rng_states(tmp_path, monkeypatch):
    import fusedit.train.loop as loop

    # training draws come from seeded generators, so the results cannot show a missing restore;
    # look at the process-global states right after the resumed run set them
    assert train(tmp_path, "--steps", "1", *ON_CPU) == 0
    saved = final_checkpoint(tmp_path)["rng"]
    restored, real_restore = [], loop.restore_rng_state

    def restore(state):
        real_restore(state)
        restored.append((torch.get_rng_state(), np.random.get_state(), random.getstate()))

    monkeypatch.setattr(loop, "restore_rng_state", restore)
    assert train(tmp_path, "--steps", "1", "--resume", *ON_CPU) == 0
    assert len(restored) == 1, "the resumed run did not restore the checkpoint's RNG states"
    (torch_state, numpy_state, python_state), = restored
    assert torch.equal(torch_state, saved["torch"])
    assert np.array_equal(numpy_state[1], saved["numpy"]["keys"].numpy()) and numpy_state[2] == saved["numpy"]["pos"]
    assert list(python_state[1]) == saved["python"]["internal"]


# ---- what a run does with its flags: logging, epochs, resuming and pruning, the optimiser ----

def logged_column(run_dir, column):
    with open(Path(run_dir) / "log.csv", newline="") as file:
        return [int(row[column]) for row in csv.DictReader(file)]


def test_the_last_step_is_logged_and_the_optimiser_takes_the_flags(tmp_path, reference_run):
    assert train(tmp_path, "--steps", "5", "--log-every", "2", "--kernels", "reference", "--weight-decay", "0.05") == 0
    assert logged_column(tmp_path, "step") == [2, 4, 5]  # 5 is no multiple of 2, but the run ends there
    assert final_checkpoint(tmp_path)["opt"]["param_groups"][0]["weight_decay"] == 0.05
    assert final_checkpoint(tmp_path)["opt"]["param_groups"][0]["lr"] == 1e-3  # TINY's --lr, not the default 1e-4
    assert final_checkpoint(reference_run)["opt"]["param_groups"][0]["weight_decay"] == 0.0  # the published default


def test_epochs_count_steps_and_the_log_says_which_epoch(tmp_path):
    latents = write_latents(tmp_path / "latents")  # 16 samples at batch 8: 2 steps an epoch
    assert train(tmp_path / "run", "--data", "latents", str(latents), "--image-size", "16", "--model", "DiT-S/2",
                 "--epochs", "2", "--kernels", "reference") == 0
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [4]
    assert logged_column(tmp_path / "run", "epoch") == [0, 0, 1, 1]


def test_latent_training_starts_from_the_posterior_mean_plus_std_noise(tmp_path, monkeypatch):
    from fusedit.dit.diffusion import GaussianDiffusion

    latents = write_latents(tmp_path / "latents")
    np.save(latents / "std.npy", np.zeros((16, 2, 4, 2, 2), dtype=np.float16))  # x_start is then the scaled mean
    seen, training_losses = [], GaussianDiffusion.training_losses
    monkeypatch.setattr(GaussianDiffusion, "training_losses",
                        lambda self, model, x_start, *rest, **kw: seen.append(x_start.cpu()) or training_losses(
                            self, model, x_start, *rest, **kw))
    assert train(tmp_path / "run", "--data", "latents", str(latents), "--image-size", "16", "--model", "DiT-S/2",
                 "--steps", "1", "--kernels", "reference") == 0
    means = torch.from_numpy(np.load(latents / "mean.npy").astype(np.float32)).flatten(0, 1) * 0.18215
    for sample in seen[0]:
        assert min((sample - mean).abs().max().item() for mean in means) < 1e-6


def test_resume_takes_the_newest_and_never_overwrites_a_later_checkpoint(tmp_path, capsys):
    assert train(tmp_path, "--steps", "3", "--ckpt-every", "1", "--kernels", "reference") == 0
    assert train(tmp_path, "--steps", "4", "--ckpt-every", "1", "--kernels", "reference", "--resume") == 0
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 3, 4]  # from 3 on; --keep-last 3 pruned 1
    error = fails(capsys, "train", *TINY, "--steps", "5", "--ckpt-every", "1", "--resume",
                  str(checkpoint_path(tmp_path, 3)), "--results-dir", str(tmp_path))
    assert "holds checkpoints after step 3 ([4]) that resuming would overwrite" in error
    for flag in (["--global-seed", "1"], ["--flip"]):  # they fix the draws and the data: a resume keeps them
        error = fails(capsys, "train", *TINY, "--steps", "5", *flag, "--resume", "--results-dir", str(tmp_path))
        assert "belongs to another config" in error and flag[0].lstrip("-").replace("-", "_") in error


def test_keep_last_one_keeps_only_the_newest(tmp_path):
    assert train(tmp_path, "--steps", "3", "--ckpt-every", "1", "--keep-last", "1", "--kernels", "reference") == 0
    assert [step for step, _ in list_checkpoints(tmp_path)] == [3]


def test_fp16_autocasts_to_float16_and_resumes_its_loss_scale(tmp_path):
    from fusedit.train import loop

    assert loop.AUTOCAST_DTYPES == {"bf16": torch.bfloat16, "fp16": torch.float16}
    fp16 = ["--kernels", "reference", "--precision", "fp16", *ON_CPU]
    assert train(tmp_path / "straight", "--steps", "4", *fp16) == 0
    assert train(tmp_path / "resumed", "--steps", "2", *fp16) == 0
    assert train(tmp_path / "resumed", "--steps", "4", *fp16, "--resume") == 0
    assert_runs_identical(tmp_path / "straight", tmp_path / "resumed")
    # the scaler's growth count goes on from the checkpoint, as the scale would after an overflow
    assert final_checkpoint(tmp_path / "resumed")["scaler"] == final_checkpoint(tmp_path / "straight")["scaler"]


def test_flag_values_that_cannot_run_are_refused_and_valid_edges_run(tmp_path, capsys):
    run = ["train", *TINY, "--steps", "1", "--results-dir", str(tmp_path / "refused")]
    for flag, value, message in (("--log-every", "0", "--log-every must be positive"),
                                 ("--ckpt-every", "0", "--ckpt-every must be positive"),
                                 ("--steps", "-1", "--steps must not be negative, got -1"),
                                 ("--lr", "0", "--lr must be positive"),
                                 ("--lr", "inf", "--lr must be positive and --weight-decay not negative, both finite"),
                                 ("--weight-decay", "nan", "--weight-decay not negative, both finite"),
                                 ("--weight-decay", "inf", "--weight-decay not negative, both finite"),
                                 ("--ema-decay", "-0.1", "--ema-decay must lie in [0, 1)"),
                                 ("--num-classes", "5", "smaller than the 10 classes")):
        assert message in fails(capsys, *run, flag, value), flag
    assert "--epochs must not be negative, got -1" in fails(capsys, "train", *TINY, "--epochs", "-1", "--results-dir",
                                                             str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    assert train(tmp_path / "ok", "--steps", "1", "--label-dropout", "0", "--ema-decay", "0", "--keep-last", "0",
                 "--num-classes", "20", "--kernels", "reference") == 0


def test_a_model_flag_on_digits_builds_that_config_and_steps_and_epochs_replace_each_others_default():
    assert [getattr(parse_train("--model", "DiT-B/2"), key) for key in ("depth", "hidden_size", "num_heads")] == [12, 768, 12]
    args = parse_train("--epochs", "2")
    assert (args.epochs, args.steps) == (2, None)
    args = parse_train("--data", "latents", "unused", "--steps", "5")  # the checkpoint's args say how long the run is
    assert (args.epochs, args.steps) == (None, 5)


@pytest.mark.parametrize("requested, pixel_model", [(None, True), (None, False), ("more", False), ("more", True)])
def test_cpu_threads_sets_torchs_threads_for_the_command_only(requested, pixel_model):
    from fusedit.train.cli import cpu_threads

    outside = torch.get_num_threads()
    torch.set_num_threads(2)  # not 1, the pixel model's default, whatever the machine (OMP_NUM_THREADS=1 included)
    try:
        requested = 3 if requested == "more" else None  # differs from torch's setting, so it must be applied
        expected = requested or (1 if pixel_model and not torch.cuda.is_available() else 2)
        with cpu_threads(requested, pixel_model):
            assert torch.get_num_threads() == expected
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(outside)


def test_cpu_threads_must_be_positive():
    from fusedit.train.cli import cpu_threads

    with pytest.raises(ValueError, match="--cpu-threads must be positive, got 0"):
        with cpu_threads(0, pixel_model=False):
            pass


# ---- mutation testing: what each step hands the loss, and the signal handling ----

def test_each_step_trains_on_its_own_timesteps_noise_and_label_dropout(tmp_path, monkeypatch):
    from fusedit.dit.diffusion import GaussianDiffusion

    seen, training_losses = [], GaussianDiffusion.training_losses

    def spy(self, model, x_start, t, model_kwargs=None, noise=None):
        seen.append(tuple(value.clone().cpu() for value in (t, noise, model_kwargs["force_drop_ids"])))  # CUDA ones on a GPU
        return training_losses(self, model, x_start, t, model_kwargs, noise)

    monkeypatch.setattr(GaussianDiffusion, "training_losses", spy)
    assert train(tmp_path, "--steps", "2", "--label-dropout", "0.5", "--global-seed", "5", "--kernels", "reference") == 0
    assert len(seen) == 2
    for step, (timesteps, noise, dropped) in enumerate(seen):
        draws = draw_step_randomness(5, step, 8, (1, 8, 8), 0.5)
        assert torch.equal(timesteps, draws.timesteps) and torch.equal(noise, draws.noise), step
        assert torch.equal(dropped, draws.drop_labels.long()), step
    assert any(dropped.any() and not dropped.all() for _, _, dropped in seen)  # the check sees dropping


def test_a_stop_request_remembers_the_signal_a_second_sigint_interrupts_and_the_handlers_come_back():
    from fusedit.train.loop import StopRequest

    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    with StopRequest() as stop:
        assert stop.signum is None
        signal.raise_signal(signal.SIGTERM)
        assert stop.signum == signal.SIGTERM  # no exception: the step finishes, then the loop checkpoints
        signal.raise_signal(signal.SIGINT)
        assert stop.signum == signal.SIGINT  # a SIGINT after a SIGTERM is still the first SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # a second Ctrl-C stops at once
    assert {signum: signal.getsignal(signum) for signum in before} == before


@pytest.mark.parametrize("flags, wrapped", [(["--grad-checkpoint"], 2), ([], 0)], ids=["grad-checkpoint", "default"])
def test_grad_checkpoint_recomputes_every_block(tmp_path, monkeypatch, flags, wrapped):
    import torch.utils.checkpoint

    calls, checkpoint = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *args, **kw: calls.append(kw) or checkpoint(*args, **kw))
    assert train(tmp_path, "--steps", "1", "--depth", "2", "--kernels", "reference", *flags) == 0
    assert len(calls) == wrapped  # each of the 2 blocks once in the step's forward
    assert all(kw == {"use_reentrant": False} for kw in calls)


def test_images_per_second_counts_the_global_batch(reference_run):
    with open(Path(reference_run) / "log.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 3
    for row in rows:  # batch 8; steps_per_sec has 3 decimals, images_per_sec 1
        assert abs(float(row["images_per_sec"]) - 8 * float(row["steps_per_sec"])) <= 0.1, row


def test_the_step_draws_and_the_data_draws_use_distinct_streams():
    # a shared stream id would seed the timesteps' generator like the batch order's: the same
    # uniform draws would pick both which images and which noise levels
    from fusedit.train import data, loop

    assert len({loop.TRAIN_STREAM, data.ORDER_STREAM, data.FLIP_STREAM}) == 3
    draws = draw_step_randomness(0, 0, 64, (1, 2, 2), 0.1)
    for stream in (data.ORDER_STREAM, data.FLIP_STREAM):
        shared = torch.randint(0, 1000, (64,), generator=data.seeded_generator(0, 0, stream))
        assert not torch.equal(draws.timesteps, shared), stream


# ---- mutation testing: what a log row averages, and the log a resume keeps ----

def test_a_log_row_is_the_mean_over_the_steps_since_the_last_row(tmp_path, reference_run):
    # the reference run logs every step of the same training: a row every 2 steps averages its pairs
    assert train(tmp_path, "--steps", "3", "--log-every", "2", "--kernels", "reference") == 0
    assert logged_column(tmp_path, "step") == [2, 3]
    for column in ("loss", "mse", "vb"):
        each_step = logged(reference_run, column)
        want = [(each_step[0] + each_step[1]) / 2, each_step[2]]
        np.testing.assert_allclose(logged(tmp_path, column), want, rtol=0, atol=2e-6, err_msg=column)


def test_a_resumed_log_keeps_the_rows_up_to_the_checkpoint_and_a_new_run_starts_empty(tmp_path):
    from fusedit.train.loop import LOG_COLUMNS, CsvLog

    # rows past the checkpoint: a run killed after logging step 5 but before checkpointing it
    log = CsvLog(tmp_path / "log.csv", None)
    for step in range(1, 6):
        log.write({**dict.fromkeys(LOG_COLUMNS, "0"), "step": step})
    CsvLog(tmp_path / "log.csv", 3)  # resuming from step 3 redoes steps 4 and 5
    assert logged_column(tmp_path, "step") == [1, 2, 3]
    CsvLog(tmp_path / "log.csv", None)
    assert logged_column(tmp_path, "step") == []


def test_a_crash_while_a_resume_trims_the_log_keeps_the_whole_log(tmp_path, monkeypatch):
    from fusedit.train.loop import LOG_COLUMNS, CsvLog

    log = CsvLog(tmp_path / "log.csv", None)
    for step in range(1, 6):
        log.write({**dict.fromkeys(LOG_COLUMNS, "0"), "step": step})

    def crash(self, rows):
        raise KeyboardInterrupt

    monkeypatch.setattr(csv.DictWriter, "writerows", crash)
    with pytest.raises(KeyboardInterrupt):
        CsvLog(tmp_path / "log.csv", 3)
    assert logged_column(tmp_path, "step") == [1, 2, 3, 4, 5] and os.listdir(tmp_path) == ["log.csv"]


# ---- mutation testing: flags the runs above leave at one value ----

def test_a_bare_resume_looks_for_no_run_folder_named_latest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latest" / "checkpoints").mkdir(parents=True)
    assert parse_train("--resume").results_dir == "results"  # the newest in --results-dir's default


def test_open_training_data_takes_num_classes_equal_to_the_datas():
    from fusedit.train.cli import open_training_data

    args = parse_train("--num-classes", "10")
    open_training_data(args)
    assert args.num_classes == 10


def test_a_latent_image_size_must_be_a_multiple_of_the_vae_downsampling():
    from fusedit.train.cli import model_geometry

    assert model_geometry(parse_train("--data", "latents", "unused", "--image-size", "16")) == (4, 2)
    with pytest.raises(ValueError, match="--image-size 12 must be a multiple of 8 for latent models"):
        model_geometry(parse_train("--data", "latents", "unused", "--image-size", "12"))


def test_no_learn_sigma_trains_epsilon_only_on_the_mse(tmp_path):
    assert train(tmp_path, "--steps", "1", "--no-learn-sigma", "--kernels", "reference") == 0
    assert final_checkpoint(tmp_path)["model"]["final_layer.linear.weight"].shape[0] == 2 * 2 * 1  # patch 2, 1 channel
    assert logged(tmp_path, "vb") == [0.0] and logged(tmp_path) == logged(tmp_path, "mse")


def test_framework_jax_refuses_a_torch_device_and_says_how_to_install_jax(capsys, monkeypatch):
    # both before anything JAX runs, so they are checked where JAX is not installed too
    assert "--device cpu is for --framework torch" in fails(capsys, "train", "--framework", "jax", "--device", "cpu")
    monkeypatch.setitem(sys.modules, "fusedit.train.jax_train", None)  # as where JAX is missing
    assert "pip install 'fusedit[jax]'" in fails(capsys, "train", *TINY, "--framework", "jax")
