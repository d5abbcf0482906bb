"""The training loop behind `fusedit train`: single process or DDP under torchrun.

The published DiT recipe: AdamW (lr 1e-4, no weight decay), an EMA (0.9999) of every weight
including the fixed pos_embed that starts as a copy of the model, label dropout 0.1, random
flips, a global batch split evenly across ranks, TF32 allowed on GPU.

Exactness: every random draw of step s (timesteps, noise, label dropout, the latent draw, and in
fusedit.train.data the batch order and flips) comes from generators seeded by (global seed, s)
for the whole global batch, of which each rank takes its slice. Hence a run does not depend on
the rank count (up to the float rounding of the gradient all-reduce), and a run resumed from a
checkpoint (model, EMA, optimiser, grad scaler, RNG states, step) retraces the uninterrupted run
bit for bit on the CPU. SIGTERM or SIGINT finishes the current step, writes a checkpoint and
exits with 128 + the signal number.
"""
import contextlib
import copy
import csv
import functools
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from fusedit.dit.diffusion import NUM_TIMESTEPS, create_diffusion
from fusedit.files import write_atomically, write_text
from fusedit.kernels import tf32_matmuls

from .checkpoint import (checkpoint_path, list_checkpoints, load_strictly, load_training_checkpoint, newest_checkpoint,
                         plain_args, prune_checkpoints, restore_rng_state, rng_state, save_atomic)
from .cli import DEVICES, RESUME_MUST_MATCH, build_model, compiles_model, cpu_threads, model_geometry, open_training_data
from .data import RankBatchSampler, StepBatches, diffusion_inputs, load_vae, seeded_generator

TRAIN_STREAM = 3  # stream id of the per-step draws (fusedit.train.data uses 1 and 2)
LOG_COLUMNS = ("step", "epoch", "loss", "mse", "vb", "steps_per_sec", "images_per_sec", "elapsed_sec")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- distributed setup
@dataclass
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_process_group: bool = False

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def setup_distributed(device="auto"):
    """One process, or one of WORLD_SIZE under torchrun (NCCL on GPUs, gloo on the CPU).
    device: "auto" (CUDA where torch sees it, one GPU per rank), "cuda" or "cpu"."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda, but torch {torch.__version__} sees no CUDA device here; use --device cpu")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks(device=torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} has no GPU of its own: {torch.cuda.device_count()} CUDA device(s) "
                             "are visible; start at most that many processes per node (torchrun --nproc_per_node), "
                             "or train on the CPU with --device cpu")
        torch.cuda.set_device(local_rank)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)


# ----------------------------------------------------------------------------- per-step randomness
@dataclass
class StepDraws:
    """The random draws of one step for the whole global batch (CPU tensors)."""

    timesteps: torch.Tensor
    noise: torch.Tensor
    drop_labels: torch.Tensor
    latent_noise: torch.Tensor = None

    def rank_slice(self, rank, world_size, device):
        local = self.timesteps.shape[0] // world_size
        part = slice(rank * local, (rank + 1) * local)
        take = lambda tensor: None if tensor is None else tensor[part].to(device, non_blocking=True)  # noqa: E731
        return StepDraws(take(self.timesteps), take(self.noise), take(self.drop_labels), take(self.latent_noise))


def draw_step_randomness(seed, step, global_batch_size, sample_shape, label_dropout, latent=False,
                         num_timesteps=NUM_TIMESTEPS):
    """Timesteps (uniform), epsilon noise, label-dropout flags and, for latent data, the noise of
    the latent draw, for every sample of step `step`'s global batch, in that order."""
    generator = seeded_generator(seed, step, TRAIN_STREAM)
    timesteps = torch.randint(0, num_timesteps, (global_batch_size,), generator=generator)
    noise = torch.randn((global_batch_size,) + tuple(sample_shape), generator=generator)
    drop = torch.rand(global_batch_size, generator=generator) < label_dropout
    latent_noise = torch.randn((global_batch_size,) + tuple(sample_shape), generator=generator) if latent else None
    return StepDraws(timesteps, noise, drop, latent_noise)


# ----------------------------------------------------------------------------- model helpers
def enable_gradient_checkpointing(model):
    """Recompute every block's activations in the backward pass. The block's forward is wrapped on
    the instance, so the state dict keys do not change (make the EMA copy before calling this)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, over every parameter (pos_embed included)."""
    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_params, [param.detach() for param in model_params], 1.0 - decay)


class StopRequest:
    """Remembers a SIGTERM / SIGINT so the loop can checkpoint and stop after the current step; a
    second SIGINT interrupts at once."""

    def __init__(self):
        self.signum, self._previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# ----------------------------------------------------------------------------- run folder and resume
def find_resume_checkpoint(args, run_dir):
    """The checkpoint to resume from (or None), refusing to start over a run that has checkpoints."""
    existing = list_checkpoints(run_dir)
    if args.resume is None:
        if existing:
            raise FileExistsError(f"{run_dir} already holds checkpoints (newest: {existing[-1][1].name}); "
                                  "pass --resume to continue that run, or choose another --results-dir")
        return None
    if args.resume == "latest":
        if not existing:
            raise FileNotFoundError(f"--resume: no checkpoint in {run_dir / 'checkpoints'} to continue from")
        return existing[-1][1]
    path = Path(args.resume)
    if path.is_dir():
        newest = newest_checkpoint(path)
        if newest is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {path}")
        path = newest
    elif not path.is_file():
        raise FileNotFoundError(f"--resume: checkpoint {path} does not exist")
    if existing and not any(path.resolve() == own.resolve() for _, own in existing):
        raise FileExistsError(f"--resume {args.resume}: {run_dir} already holds checkpoints of another run (newest: "
                              f"{existing[-1][1].name}), which continuing there would mix with this one's, in its "
                              "checkpoints and log.csv; resume into a new --results-dir, or leave --results-dir out "
                              "to go on in the resumed run's own folder")
    return path


def open_resume_checkpoint(args, run_dir):
    """(checkpoint or None, its path, the step to start from): the run --resume continues,
    refusing a checkpoint of another config, or later checkpoints that resuming would overwrite."""
    resume_path = find_resume_checkpoint(args, run_dir)
    checkpoint = load_training_checkpoint(resume_path) if resume_path else None
    if checkpoint is not None:
        check_same_config(checkpoint["args"], args, resume_path)
    start_step = int(checkpoint["step"]) if checkpoint else 0
    later = [step for step, _ in list_checkpoints(run_dir) if step > start_step]
    if later:
        raise FileExistsError(f"{run_dir} holds checkpoints after step {start_step} ({later}) that resuming would overwrite; "
                              "resume from the newest or use another --results-dir")
    return checkpoint, resume_path, start_step


def open_run(args, dataset):
    """(run folder, checkpoint or None, its path, start step, StepBatches, total steps) of a
    training run, either framework's: refuses what open_resume_checkpoint refuses, and a
    checkpoint past the steps asked for."""
    run_dir = Path(args.results_dir)
    checkpoint, resume_path, start_step = open_resume_checkpoint(args, run_dir)
    step_batches = StepBatches(len(dataset), args.global_batch_size, args.global_seed, args.flip)
    total_steps = args.steps if args.steps is not None else args.epochs * step_batches.steps_per_epoch
    if checkpoint is not None and total_steps < start_step:
        raise ValueError(f"--resume: {resume_path} is at step {start_step}, past the {total_steps} steps asked for "
                         "(--steps / --epochs count all steps, not more steps): ask for more to continue")
    return run_dir, checkpoint, resume_path, start_step, step_batches, total_steps


def check_same_config(saved_args, args, path):
    current = plain_args(args)
    differ = [f"{key}={saved_args.get(key)!r} (now {current.get(key)!r})" for key in RESUME_MUST_MATCH
              if saved_args.get(key) != current.get(key)]
    if differ:
        raise ValueError(f"checkpoint {path} belongs to another config: {', '.join(differ)}; "
                         "resume with the same flags or start a new --results-dir")


class LogWindow:
    """The steps since log.csv's last row on its grid (every --log-every steps): how many,
    their (loss, mse, vb) means summed over the steps, and their seconds. Checkpoints carry
    it, so a run resumed between two rows (stopped at step 52 of rows every 10, or
    checkpointed there) logs at 60 the mean of steps 51-60, as a straight run does (bit for
    bit on one process); the row a stop wrote at 52 is dropped from the log on resume. A
    checkpoint without one (an older one) resumes with an empty window after its step."""

    def __init__(self, after_step, steps=0, sums=(0.0, 0.0, 0.0), seconds=0.0):
        self.after_step, self.steps, self.sums, self.seconds_before = after_step, steps, list(sums), seconds
        self.started = time.perf_counter()

    @classmethod
    def resumed(cls, checkpoint, step):
        saved = checkpoint.get("log_window") if checkpoint is not None else None
        if not saved:
            return cls(step)
        return cls(int(saved["after_step"]), int(saved["steps"]), [float(value) for value in saved["sums"]],
                   float(saved["seconds"]))

    def seconds(self):
        return self.seconds_before + time.perf_counter() - self.started

    def state(self, steps, sums):
        """For a checkpoint: `steps` steps after `after_step`, `sums` their means summed."""
        return {"after_step": self.after_step, "steps": steps, "sums": [float(value) for value in sums],
                "seconds": self.seconds()}


class CsvLog:
    def __init__(self, path, keep_through_step):
        self.path = Path(path)
        rows = []
        if self.path.is_file() and keep_through_step is not None:
            # Keep the rows up to the checkpoint's window: the steps after it are about to be
            # redone, or logged again with those still to come.
            with open(self.path, newline="") as file:
                rows = [row for row in csv.DictReader(file) if int(row["step"]) <= keep_through_step]

        def write(temporary):
            with open(temporary, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=LOG_COLUMNS)
                writer.writeheader()
                writer.writerows(rows)

        # Atomic, so that a crash here keeps the rows up to the checkpoint; later rows are appended.
        write_atomically(self.path, write)

    def write(self, row):
        with open(self.path, "a", newline="") as file:
            csv.DictWriter(file, fieldnames=LOG_COLUMNS).writerow(row)


# ----------------------------------------------------------------------------- training
def train(args):
    """Run `fusedit train` with parsed flags; returns the exit code."""
    ranks = setup_distributed(args.device)
    try:
        # TF32 as published (--no-tf32: full fp32), for this run only
        with cpu_threads(args.cpu_threads, pixel_model=args.data == "digits"), tf32_matmuls(args.tf32):
            return _train(args, ranks)
    finally:
        if ranks.owns_process_group:
            dist.destroy_process_group()


def _train(args, ranks):
    # Every check that can fail runs before anything is written.
    dataset = open_training_data(args)
    if args.global_batch_size % ranks.world_size:
        raise ValueError(f"--global-batch-size {args.global_batch_size} does not divide across {ranks.world_size} ranks")
    run_dir, checkpoint, resume_path, start_step, step_batches, total_steps = open_run(args, dataset)
    device = ranks.device
    if args.kernels == "triton":
        from fusedit.kernels.triton import check_device

        check_device(device, "fusedit train --kernels triton")
    vae = load_vae(args.vae, device) if dataset.kind == "images" else None
    # The same initial weights on every rank and for every rank count: DDP would broadcast rank
    # 0's to the model, but not to the EMA copied from it before.
    torch.manual_seed(args.global_seed)

    model = build_model(args)
    ema = copy.deepcopy(model).requires_grad_(False)
    if checkpoint is not None:
        for module, key in ((model, "model"), (ema, "ema")):
            load_strictly(module, checkpoint[key], f"checkpoint {resume_path} does not fit this model ({key})")
    model.to(device).train()
    ema.to(device).eval()
    if args.grad_checkpoint:
        enable_gradient_checkpointing(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["opt"])
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        if checkpoint.get("rng"):
            restore_rng_state(checkpoint["rng"])
    train_model = model
    if ranks.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[ranks.local_rank] if device.type == "cuda" else None)
    if compiles_model(args):
        train_model = torch.compile(train_model)
    diffusion = create_diffusion("", learn_sigma=args.learn_sigma)
    in_channels, input_size = model_geometry(args)
    sample_shape = (in_channels, input_size, input_size)

    window = LogWindow.resumed(checkpoint, start_step)
    if ranks.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "args.json", json.dumps(plain_args(args), indent=2, sort_keys=True) + "\n")
        log = CsvLog(run_dir / "log.csv", window.after_step if checkpoint else None)
        parameters = sum(p.numel() for p in model.parameters())
        print(f"fusedit train: {args.model} (depth {args.depth}, width {args.hidden_size}, {args.num_heads} heads, "
              f"{parameters / 1e6:.2f}M parameters) on {args.data} {tuple(sample_shape)}, {len(dataset)} samples, "
              f"{ranks.world_size} rank(s) on {device.type}, global batch {args.global_batch_size}, "
              f"steps {start_step}->{total_steps}, kernels {args.kernels}{' + torch.compile' * args.compile}, "
              f"{args.precision}; writing to {run_dir}", flush=True)
        if checkpoint is not None:
            print(f"resumed from {resume_path} at step {start_step}", flush=True)

    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=RankBatchSampler(step_batches, start_step, total_steps, ranks.rank, ranks.world_size),
        num_workers=args.num_workers, pin_memory=device.type == "cuda")
    autocast = (torch.autocast(device.type, dtype=AUTOCAST_DTYPES[args.precision]) if args.precision in AUTOCAST_DTYPES
                else contextlib.nullcontext())
    progress = None
    if ranks.is_main and not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False,
                        disable=None)  # None: off when stderr is no terminal (a log file)

    def save(step_count):
        sums = mean_sums()  # a collective: every rank saves
        if ranks.is_main:
            payload = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": optimizer.state_dict(),
                       "args": plain_args(args), "step": step_count, "rng": rng_state(), "scaler": scaler.state_dict(),
                       "world_size": ranks.world_size, "elapsed_sec": time.perf_counter() - run_start,
                       "log_window": window.state(logged_steps, sums.tolist())}
            path = save_atomic(payload, checkpoint_path(run_dir, step_count))
            prune_checkpoints(run_dir, args.keep_last)
            return path
        return None

    # loss, mse, vb: this rank's summed over the window's steps; every rank starts from the
    # window's saved sums of means, so the sum over ranks / ranks goes on from them
    running = torch.tensor(window.sums, device=device, dtype=torch.float64)
    logged_steps = window.steps

    def mean_sums():
        """The window's (loss, mse, vb) means over ranks, summed over its steps."""
        total = running.clone()
        if ranks.distributed:
            dist.all_reduce(total)
        return total / ranks.world_size

    # elapsed_sec counts the training time of every session of a resumed run
    run_start = time.perf_counter() - (checkpoint.get("elapsed_sec", 0.0) if checkpoint is not None else 0.0)
    step = start_step
    stop_flag = torch.zeros(1, device=device)
    exit_code = 0
    with StopRequest() as stop:
        for images, labels in loader:
            draws = draw_step_randomness(args.global_seed, step, args.global_batch_size, sample_shape, args.label_dropout,
                                         latent=dataset.kind != "pixels").rank_slice(ranks.rank, ranks.world_size, device)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            x_start = diffusion_inputs(dataset.kind, images, vae, draws.latent_noise)
            with autocast:
                losses = diffusion.training_losses(train_model, x_start, draws.timesteps,
                                                   {"y": labels, "force_drop_ids": draws.drop_labels.long()}, noise=draws.noise)
                loss = losses["loss"].mean()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            update_ema(ema, model, args.ema_decay)
            running += torch.stack([losses[key].detach().double().mean() for key in ("loss", "mse", "vb")])
            logged_steps += 1
            step += 1
            if progress is not None:
                progress.update(1)

            if ranks.distributed:
                stop_flag.fill_(1.0 if stop.signum else 0.0)
                dist.all_reduce(stop_flag, op=dist.ReduceOp.MAX)
                stopping = bool(stop_flag.item())
            else:
                stopping = stop.signum is not None
            if step % args.log_every == 0 or step == total_steps or stopping:
                mean = (mean_sums() / logged_steps).tolist()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                now = time.perf_counter()
                steps_per_sec = logged_steps / max(window.seconds(), 1e-9)
                if ranks.is_main:
                    row = {"step": step, "epoch": (step - 1) // step_batches.steps_per_epoch, "loss": f"{mean[0]:.6f}",
                           "mse": f"{mean[1]:.6f}", "vb": f"{mean[2]:.6f}", "steps_per_sec": f"{steps_per_sec:.3f}",
                           "images_per_sec": f"{steps_per_sec * args.global_batch_size:.1f}",
                           "elapsed_sec": f"{now - run_start:.1f}"}
                    log.write(row)
                    line = (f"step {step:7d}  loss {mean[0]:.4f} (mse {mean[1]:.4f}, vb {mean[2]:.4f})  "
                            f"{steps_per_sec:.2f} steps/s  {row['images_per_sec']} images/s")
                    if progress is not None:
                        progress.set_postfix(loss=f"{mean[0]:.4f}")
                        progress.write(line, file=sys.stdout)
                    else:
                        print(line, flush=True)
                if step % args.log_every == 0:  # a row off the grid (a stop, the last step) leaves its window to the checkpoint
                    running.zero_()
                    logged_steps, window = 0, LogWindow(step)
            if step % args.ckpt_every == 0 or step == total_steps or stopping:
                path = save(step)
                if ranks.distributed:
                    dist.barrier()
                if stopping:
                    exit_code = 128 + (stop.signum or signal.SIGTERM)
                    if ranks.is_main:
                        name = signal.Signals(stop.signum).name if stop.signum else "a signal on another rank"
                        print(f"stopped by {name} after step {step}; checkpoint {path}; continue with --resume", flush=True)
                    break
    if progress is not None:
        progress.close()
    if checkpoint is None and total_steps == 0:
        save(0)  # on every rank: saving sums the log window over them
    if ranks.is_main and exit_code == 0:
        print(f"done: {step} steps; checkpoints in {run_dir / 'checkpoints'}", flush=True)
    return exit_code
