"""Training the JAX DiT: a jit-compiled, sharded step, and `fusedit train --framework jax`.

The step computes the DiT's hybrid diffusion loss (fusedit.dit.jax.diffusion), its gradients,
an AdamW update (optax.adamw, the torch.optim.AdamW math: decoupled weight decay, bias-corrected
moments) and the EMA ema <- ema + (1 - decay) (params - ema), in one XLA program.

Sharding: one `jax.sharding.Mesh` with axes ("data", "fsdp") (automatic axis types). Every
parameter, its two Adam moments and its EMA are split along their largest dim divisible by the
fsdp size (FSDP / ZeRO-3: XLA gathers a weight where it is used and reduce-scatters its
gradient); the batch is split along its first dim over both axes. The same code runs on one CPU
(a 1x1 mesh), on several GPUs, and on a TPU pod slice, where each host feeds its part of the
batch. The Pallas ops run per shard through shard_map (fusedit.kernels.pallas).

`train_jax(args)` takes the parsed `fusedit train` flags: the same data sources, batch order,
per-step draws (timesteps, noise, label dropout, latent draw: fusedit.train.loop's, from the
global seed and the step) and initial weights (the PyTorch model the torch trainer would build
from the same seed), so a JAX run follows the torch run up to float rounding. Its checkpoints are
PyTorch checkpoints ({"model", "ema", "opt", "args", "step", ...}, state dicts of tensors and a
torch.optim.AdamW state): `fusedit sample` reads them, and either trainer resumes the other's.
"""
import argparse
import contextlib
import json
import math
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from fusedit.dit.jax.convert import flatten_tree, from_torch_state_dict, jax_path, to_jax_layout, to_torch_state_dict, torch_tensor
from fusedit.dit.jax.diffusion import JaxDiffusion
from fusedit.files import write_text

MESH_AXES = ("data", "fsdp")
# Extra XLA options for compiling the step (None: XLA's defaults). The tests lower the backend
# optimization level: their tiny steps run a few times, and compile 3x faster unoptimized.
COMPILER_OPTIONS = None
COMPUTE_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


# ----------------------------------------------------------------------------- the mesh
def make_mesh(data=None, fsdp=None, devices=None):
    """A ("data", "fsdp") mesh over `devices` (default: all). By default fsdp spans the devices
    of one host (fast links) and data the hosts; either size may be given, the other follows."""
    devices = list(devices if devices is not None else jax.devices())
    count = len(devices)
    if fsdp is None and data is None:
        fsdp = count // max(jax.process_count(), 1) or 1
    if fsdp is None:
        fsdp = count // data if data and count % data == 0 else 0
    if data is None:
        data = count // fsdp if fsdp and count % fsdp == 0 else 0
    if data < 1 or fsdp < 1 or data * fsdp != count:
        raise ValueError(f"a mesh of data={data} x fsdp={fsdp} does not use the {count} devices exactly")
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def parameter_spec(shape, fsdp_size):
    """Split the largest dim divisible by the fsdp size over "fsdp"; replicate the rest."""
    candidates = [axis for axis, size in enumerate(shape) if fsdp_size > 1 and size % fsdp_size == 0]
    if not candidates:
        return PartitionSpec()
    axis = max(candidates, key=lambda a: shape[a])
    return PartitionSpec(*([None] * axis + ["fsdp"]))


def batch_spec():
    return PartitionSpec(MESH_AXES)


# ----------------------------------------------------------------------------- the step
class JaxTrainer:
    """The jit-compiled, sharded training step of one JAX DiT.

    state: {"params", "opt_state", "ema"} (nnx.State / optax pytrees, sharded on the mesh);
    batch: {"x" (N,C,H,W) float32 x_0, "y" (N,) labels, "t" (N,) timesteps, "noise" like x,
    "drop" (N,) label-dropout flags}. compute_dtype: the dtype the model runs in (weights are
    cast inside the step; master weights, moments, EMA and the loss stay float32).
    """

    def __init__(self, model, mesh, *, lr=1e-4, weight_decay=0.0, ema_decay=0.9999, compute_dtype=jnp.float32):
        self.graphdef, params, self.constants = nnx.split(model, nnx.Param, ...)
        self.mesh, self.ema_decay, self.compute_dtype = mesh, ema_decay, jnp.dtype(compute_dtype)
        self.tx = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
        self.diffusion = JaxDiffusion(learn_sigma=model.learn_sigma)
        self.num_timesteps = self.diffusion.num_timesteps
        fsdp = mesh.shape["fsdp"]
        self.shards = mesh.size

        def sharding_of(tree):
            return jax.tree.map(lambda leaf: NamedSharding(mesh, parameter_spec(leaf.shape, fsdp)), tree)

        abstract_params = jax.eval_shape(lambda p: p, params)
        self.state_shardings = {"params": sharding_of(abstract_params),
                                "opt_state": sharding_of(jax.eval_shape(self.tx.init, abstract_params)),
                                "ema": sharding_of(abstract_params)}
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(mesh, batch_spec())
        self.constants = jax.device_put(self.constants, self.replicated)
        self._initial_params = params
        options = COMPILER_OPTIONS
        self._step = jax.jit(self._train_step, donate_argnums=(0,), compiler_options=options,
                             in_shardings=(self.state_shardings, self.replicated, self.batch_sharding),
                             out_shardings=(self.state_shardings, self.replicated))
        self._forward = jax.jit(self._forward_fn, compiler_options=options,
                                in_shardings=(self.state_shardings["params"], self.replicated, self.batch_sharding,
                                              self.batch_sharding, self.batch_sharding),
                                out_shardings=self.batch_sharding)
        self._draw = jax.jit(self._draw_fn, static_argnums=(2,), out_shardings=self.batch_sharding,
                             compiler_options=options)
        self._place = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=self.state_shardings,
                              compiler_options=options)

    # --- state
    def init_state(self, params=None, ema=None, opt_state=None):
        """The sharded train state: the model's weights (or `params`), a fresh Adam state (or
        `opt_state`) and an EMA that starts as a copy of the weights (or `ema`)."""
        params = params if params is not None else self._initial_params
        with jax.set_mesh(self.mesh):
            state = {"params": params, "ema": ema if ema is not None else params,
                     "opt_state": opt_state if opt_state is not None else self.tx.init(params)}
            # a jitted copy places every leaf with its sharding and gives params and ema their own buffers
            return self._place(state)

    def model(self, state, which="ema"):
        """The JAX DiT holding state[which] ("params" or "ema")."""
        return nnx.merge(self.graphdef, state[which], self.constants)

    # --- the compiled functions
    def _cast(self, params):
        if self.compute_dtype == jnp.float32:
            return params
        return jax.tree.map(lambda leaf: leaf.astype(self.compute_dtype), params)

    def _loss(self, params, constants, batch):
        model = nnx.merge(self.graphdef, self._cast(params), constants)

        def model_fn(x_t, t, **kwargs):
            return model(x_t.astype(self.compute_dtype), t, **kwargs)

        losses = self.diffusion.training_losses(model_fn, batch["x"], batch["t"], batch["noise"],
                                                {"y": batch["y"], "force_drop_ids": batch["drop"]})
        return jnp.mean(losses["loss"]), losses

    def _train_step(self, state, constants, batch):
        (_, losses), grads = jax.value_and_grad(self._loss, has_aux=True)(state["params"], constants, batch)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        decay = self.ema_decay
        ema = jax.tree.map(lambda average, weight: average + (1.0 - decay) * (weight - average), state["ema"], params)
        metrics = {name: jnp.mean(value) for name, value in losses.items()}
        return {"params": params, "opt_state": opt_state, "ema": ema}, metrics

    def _draw_fn(self, key, x, label_dropout):
        t_key, noise_key, drop_key = jax.random.split(key, 3)
        batch = x.shape[0]
        return {"t": jax.random.randint(t_key, (batch,), 0, self.num_timesteps),
                "noise": jax.random.normal(noise_key, x.shape, jnp.float32),
                "drop": (jax.random.uniform(drop_key, (batch,)) < label_dropout).astype(jnp.int32)}

    def _forward_fn(self, params, constants, x, t, y):
        model = nnx.merge(self.graphdef, self._cast(params), constants)
        return model(x.astype(self.compute_dtype), t, y)

    # --- calls
    def global_batch(self, **arrays):
        """Host arrays (this process's part of the global batch, numpy) -> sharded global arrays."""
        return {name: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(value))
                for name, value in arrays.items()}

    def step(self, state, batch):
        """(new state, {"loss", "mse", "vb"} device scalars); `state` is donated (do not reuse it)."""
        self._check_batch(batch["x"].shape[0])
        with jax.set_mesh(self.mesh):
            return self._step(state, self.constants, batch)

    def forward(self, params, x, t, y):
        self._check_batch(x.shape[0])
        with jax.set_mesh(self.mesh):
            return self._forward(params, self.constants, x, t, y)

    def _check_batch(self, size):
        if size % self.shards:
            raise ValueError(f"the global batch {size} does not split over the {self.shards} devices of the mesh "
                             f"{dict(self.mesh.shape)}; use a multiple of {self.shards}")

    def random_batch(self, key, x, y, label_dropout):
        """A batch for sharded (x, y) whose timesteps, noise and label dropout come from `key`, drawn on device."""
        with jax.set_mesh(self.mesh):
            return {"x": x, "y": y, **self._draw(key, x, float(label_dropout))}


# ----------------------------------------------------------------------------- torch-format state
def _adam_index(opt_state):
    for index, part in enumerate(opt_state):
        if isinstance(part, optax.ScaleByAdamState):
            return index
    raise ValueError("the optimizer state holds no Adam moments (expected optax.adamw's)")


def _host(tree):
    """A host (numpy) copy of a possibly sharded, possibly multi-host pytree."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def torch_optimizer_state(opt_state, parameter_names, param_groups):
    """optax.adamw state -> torch.optim.AdamW.state_dict() for a torch DiT whose parameters are,
    in order, `parameter_names` (param_groups: the torch optimizer's own, for this torch version)."""
    adam = _host(opt_state[_adam_index(opt_state)])
    moments = {path: (mu, nu) for (path, mu), (_, nu) in zip(flatten_tree(nnx.to_pure_dict(adam.mu)),
                                                              flatten_tree(nnx.to_pure_dict(adam.nu)))}
    step = float(adam.count)
    state = {}
    for index, name in enumerate(parameter_names):
        path = jax_path(name)
        if path in moments and step > 0:
            mu, nu = moments[path]
            state[index] = {"step": torch.tensor(step), "exp_avg": torch_tensor(name, mu),
                            "exp_avg_sq": torch_tensor(name, nu)}
    return {"state": state, "param_groups": param_groups}


def optax_state_from_torch(trainer, torch_state, parameter_names, params):
    """torch.optim.AdamW.state_dict() -> optax.adamw state over `params` (an nnx.State)."""
    opt_state = trainer.tx.init(params)
    entries = torch_state.get("state", {})
    if not entries:
        return opt_state
    index = _adam_index(opt_state)
    adam = opt_state[index]
    mu, nu = nnx.to_pure_dict(adam.mu), nnx.to_pure_dict(adam.nu)
    steps = set()
    wanted = dict(flatten_tree(mu))
    for position, name in enumerate(parameter_names):
        path = jax_path(name)
        if path not in wanted:
            continue
        entry = entries.get(position, entries.get(str(position)))
        if entry is None:
            raise ValueError(f"the optimizer state has no moments for {name} (parameter {position})")
        steps.add(int(float(entry["step"])))
        for tree, key in ((mu, "exp_avg"), (nu, "exp_avg_sq")):
            value = to_jax_layout(name, entry[key].detach().to("cpu", torch.float32).numpy())
            if value.shape != wanted[path].shape:
                raise ValueError(f"optimizer moment {key} of {name} has shape {tuple(entry[key].shape)}, "
                                 "which does not fit the model")
            _set(tree, path, jnp.asarray(value))
    if len(steps) != 1:
        raise ValueError(f"the optimizer state's parameters disagree on the step count ({sorted(steps)})")
    mu_state, nu_state = jax.tree.map(lambda leaf: leaf, adam.mu), jax.tree.map(lambda leaf: leaf, adam.nu)
    nnx.replace_by_pure_dict(mu_state, mu)
    nnx.replace_by_pure_dict(nu_state, nu)
    adam = adam._replace(count=jnp.asarray(steps.pop(), adam.count.dtype), mu=mu_state, nu=nu_state)
    return opt_state[:index] + (adam,) + opt_state[index + 1:]


def _set(tree, path, value):
    for part in path[:-1]:
        tree = tree[part]
    tree[path[-1]] = value


# ----------------------------------------------------------------------------- fusedit train --framework jax
def _jax_kernels(args):
    requested = args.kernels
    if requested == "pallas" and jax.default_backend() != "tpu":
        print(f"fusedit train --framework jax: the Pallas kernels compile for TPU; on {jax.default_backend()} they "
              "run in Pallas' interpreter (correct, slow)", flush=True)
    if requested in ("xla", "pallas"):
        return requested
    print(f"fusedit train --framework jax: --kernels {requested} names a PyTorch op set; using the JAX 'xla' ops "
          "(pass --kernels pallas for the Pallas kernels)", flush=True)
    return "xla"


def _torch_twin(args):
    """The torch DiT the torch trainer builds from these flags and seed (reference ops)."""
    from .cli import build_model

    torch.manual_seed(args.global_seed)
    return build_model(argparse.Namespace(**{**vars(args), "kernels": "reference"}))


def train_jax(args):
    """Run `fusedit train --framework jax` with parsed (and default-resolved) flags; returns the
    exit code. --no-tf32 makes fp32 matmuls full fp32 for the run, as in the torch trainer
    (JAX's default lets a GPU round them to TF32 and a TPU to bf16 passes); --cpu-threads sets
    the threads of the torch side (data, VAE encoding), as it does for the torch trainer."""
    from .cli import cpu_threads

    precision = contextlib.nullcontext() if getattr(args, "tf32", True) else jax.default_matmul_precision("highest")
    with precision, cpu_threads(getattr(args, "cpu_threads", None), pixel_model=args.data == "digits"):
        return _train_jax(args)


def _train_jax(args):
    from .checkpoint import checkpoint_path, plain_args, prune_checkpoints, rng_state, save_atomic
    from .cli import model_geometry, open_training_data
    from .data import RankBatchSampler, diffusion_inputs, load_vae
    from .loop import CsvLog, LogWindow, StopRequest, draw_step_randomness, open_run

    # Every check that can fail runs before anything is written.
    dataset = open_training_data(args)
    if args.precision == "fp16":
        raise ValueError("--precision fp16 needs a loss scaler, which the JAX trainer does not have; use bf16 or fp32")
    if getattr(args, "grad_checkpoint", False):
        raise ValueError("--grad-checkpoint is not implemented for --framework jax; drop it or use --framework torch")
    if getattr(args, "compile", False) or getattr(args, "kernels", None) == "compile":
        flag = "--compile" if getattr(args, "compile", False) else "--kernels compile"
        raise ValueError(f"{flag} is for --framework torch: the JAX trainer always jit-compiles its step")
    kernels = _jax_kernels(args)
    mesh = make_mesh(*_mesh_flag(args))
    if args.global_batch_size % mesh.size:
        raise ValueError(f"--global-batch-size {args.global_batch_size} does not split over the {mesh.size} JAX devices")
    run_dir, checkpoint, resume_path, start_step, step_batches, total_steps = open_run(args, dataset)
    vae = load_vae(args.vae, "cpu") if dataset.kind == "images" else None

    twin = _torch_twin(args)
    parameter_names = [name for name, _ in twin.named_parameters()]
    param_groups = torch.optim.AdamW(twin.parameters(), lr=args.lr, weight_decay=args.weight_decay).state_dict()["param_groups"]
    initial = checkpoint["model"] if checkpoint is not None else twin.state_dict()
    del twin
    in_channels, input_size = model_geometry(args)
    overrides = dict(depth=args.depth, hidden_size=args.hidden_size, num_heads=args.num_heads, in_channels=in_channels,
                     num_classes=args.num_classes, learn_sigma=args.learn_sigma,
                     class_dropout_prob=args.label_dropout, kernels=kernels)
    try:
        model = from_torch_state_dict(args.model, initial, input_size=input_size, **overrides)
        ema = from_torch_state_dict(args.model, checkpoint["ema"], input_size=input_size, **overrides) if checkpoint else None
    except ValueError as error:
        raise ValueError(f"checkpoint {resume_path} does not fit this model: {error}") from error
    trainer = JaxTrainer(model, mesh, lr=args.lr, weight_decay=args.weight_decay, ema_decay=args.ema_decay,
                         compute_dtype=COMPUTE_DTYPES[args.precision])
    if checkpoint is not None:
        params = nnx.state(model, nnx.Param)
        state = trainer.init_state(params=params, ema=nnx.state(ema, nnx.Param),
                                   opt_state=optax_state_from_torch(trainer, checkpoint["opt"], parameter_names, params))
    else:
        state = trainer.init_state()
    sample_shape = (in_channels, input_size, input_size)
    rank, world = jax.process_index(), jax.process_count()
    is_main = rank == 0

    window = LogWindow.resumed(checkpoint, start_step)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "args.json", json.dumps(plain_args(args), indent=2, sort_keys=True) + "\n")
        log = CsvLog(run_dir / "log.csv", window.after_step if checkpoint else None)
        parameters = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state["params"]))
        print(f"fusedit train (jax): {args.model} (depth {args.depth}, width {args.hidden_size}, {args.num_heads} heads, "
              f"{parameters / 1e6:.2f}M parameters) on {args.data} {sample_shape}, {len(dataset)} samples, "
              f"mesh {dict(mesh.shape)} of {jax.devices()[0].platform}, global batch {args.global_batch_size}, "
              f"steps {start_step}->{total_steps}, kernels {kernels}, {args.precision}; writing to {run_dir}", flush=True)
        if checkpoint is not None:
            print(f"resumed from {resume_path} at step {start_step}", flush=True)

    def save(step_count):
        host_state = _host(state)
        payload = {"model": to_torch_state_dict(trainer.model(host_state, "params")),
                   "ema": to_torch_state_dict(trainer.model(host_state, "ema")),
                   "opt": torch_optimizer_state(host_state["opt_state"], parameter_names, param_groups),
                   "args": plain_args(args), "step": step_count, "rng": rng_state(), "scaler": {},
                   "world_size": world, "framework": "jax", "elapsed_sec": time.perf_counter() - run_start,
                   "log_window": window.state(logged_steps, running)}
        if not is_main:
            return None
        path = save_atomic(payload, checkpoint_path(run_dir, step_count))
        prune_checkpoints(run_dir, args.keep_last)
        return path

    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=RankBatchSampler(step_batches, start_step, total_steps, rank, world),
        num_workers=args.num_workers)
    running, logged_steps = np.asarray(window.sums), window.steps  # the step means (mesh-wide) summed
    # elapsed_sec counts the training time of every session of a resumed run
    run_start = time.perf_counter() - (checkpoint.get("elapsed_sec", 0.0) if checkpoint is not None else 0.0)
    step, exit_code = start_step, 0
    with StopRequest() as stop:
        for images, labels in loader:
            draws = draw_step_randomness(args.global_seed, step, args.global_batch_size, sample_shape, args.label_dropout,
                                         latent=dataset.kind != "pixels").rank_slice(rank, world, "cpu")
            x_start = diffusion_inputs(dataset.kind, images, vae, draws.latent_noise)
            batch = trainer.global_batch(x=x_start.float().numpy(), y=labels.numpy().astype(np.int32),
                                         t=draws.timesteps.numpy().astype(np.int32), noise=draws.noise.numpy(),
                                         drop=draws.drop_labels.numpy().astype(np.int32))
            state, metrics = trainer.step(state, batch)
            running += np.asarray([float(metrics[name]) for name in ("loss", "mse", "vb")])
            logged_steps += 1
            step += 1
            stopping = stop.signum is not None
            if step % args.log_every == 0 or step == total_steps or stopping:
                now = time.perf_counter()
                mean = running / logged_steps
                steps_per_sec = logged_steps / max(window.seconds(), 1e-9)
                if is_main:
                    log.write({"step": step, "epoch": (step - 1) // step_batches.steps_per_epoch,
                               "loss": f"{mean[0]:.6f}", "mse": f"{mean[1]:.6f}", "vb": f"{mean[2]:.6f}",
                               "steps_per_sec": f"{steps_per_sec:.3f}",
                               "images_per_sec": f"{steps_per_sec * args.global_batch_size:.1f}",
                               "elapsed_sec": f"{now - run_start:.1f}"})
                    print(f"step {step:7d}  loss {mean[0]:.4f} (mse {mean[1]:.4f}, vb {mean[2]:.4f})  "
                          f"{steps_per_sec:.2f} steps/s  {steps_per_sec * args.global_batch_size:.1f} images/s", flush=True)
                if step % args.log_every == 0:  # a row off the grid leaves its window to the checkpoint
                    running[:] = 0
                    logged_steps, window = 0, LogWindow(step)
            if step % args.ckpt_every == 0 or step == total_steps or stopping:
                path = save(step)
                if stopping:
                    exit_code = 128 + stop.signum
                    if is_main:
                        print(f"stopped by {signal.Signals(stop.signum).name} after step {step}; checkpoint {path}; "
                              "continue with --resume", flush=True)
                    break
    if checkpoint is None and total_steps == 0:
        save(0)
    if is_main and exit_code == 0:
        print(f"done: {step} steps; checkpoints in {run_dir / 'checkpoints'}", flush=True)
    return exit_code


def _mesh_flag(args):
    """(data, fsdp) from an optional --mesh DATAxFSDP flag (e.g. "2x4"); (None, None) for the default."""
    text = getattr(args, "mesh", None)
    if not text:
        return None, None
    try:
        data, fsdp = (int(part) for part in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"--mesh {text!r}: expected DATAxFSDP, e.g. 1x8") from None
    return data, fsdp
