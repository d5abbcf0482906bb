"""The JAX training step: its loss and gradients against the PyTorch diffusion loss, the sharded
step against the single-device step (8 CPU devices, in a subprocess), the Pallas kernels under
shard_map, and `fusedit train --framework jax` end to end with PyTorch-format checkpoints."""
import argparse
import csv
import os
import subprocess
import sys

import pytest

pytest.importorskip("jax", reason="JAX is an optional extra: pip install -e '.[jax]'")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from fusedit.dit.diffusion import create_diffusion  # noqa: E402
from fusedit.dit.jax import from_torch_state_dict  # noqa: E402
from fusedit.dit.jax.diffusion import JaxDiffusion  # noqa: E402
from fusedit.dit.models import DiT  # noqa: E402
from fusedit.kernels.pallas.testing import FAST_COMPILE  # noqa: E402
from fusedit.train import jax_train  # noqa: E402
from fusedit.train.jax_train import JaxTrainer, make_mesh, parameter_spec  # noqa: E402

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=5)
TINY_JAX = {key: TINY[key] for key in ("depth", "hidden_size", "num_heads")}
DEVICES = 8


def random_tiny_models(seed=0, learn_sigma=True):
    """A tiny torch DiT with every parameter random and non-zero, and its JAX twin."""
    generator = torch.Generator().manual_seed(seed)
    model = DiT(**TINY, learn_sigma=learn_sigma)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                std = param[0].numel() ** -0.5 if param.dim() > 1 else 0.1
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model, from_torch_state_dict("DiT-S/2", model.state_dict(), input_size=8, **TINY_JAX)


def random_batch(batch_size=6, seed=1):
    """x_0 in [-1, 1] (as data is), t including 0 (the decoder NLL), 1 and 999; one dropped label."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(batch_size, 4, 8, 8, generator=generator) * 2 - 1
    t = torch.tensor([0, 1, 2, 500, 999, 0] * 2)[:batch_size]
    noise = torch.randn(batch_size, 4, 8, 8, generator=generator)
    y = torch.randint(0, 5, (batch_size,), generator=generator)
    drop = (torch.arange(batch_size) == 1).long()
    return x, y, t, noise, drop


def test_loss_and_gradients_match_torch():
    """Per-sample loss terms and parameter gradients of the mean loss, against the PyTorch
    diffusion (fusedit.dit.diffusion) on the float64 copy of the same model and draws."""
    torch_model, jax_model = random_tiny_models()
    x, y, t, noise, drop = random_batch()
    torch_model = torch_model.double()
    want = create_diffusion("", learn_sigma=True).training_losses(
        torch_model, x.double(), t, {"y": y, "force_drop_ids": drop}, noise=noise.double())
    want["loss"].mean().backward()

    graph, params, rest = nnx.split(jax_model, nnx.Param, ...)
    diffusion = JaxDiffusion()

    def mean_loss(params):
        losses = diffusion.training_losses(nnx.merge(graph, params, rest), jnp.asarray(x.numpy()), jnp.asarray(t.numpy()),
                                           jnp.asarray(noise.numpy()), {"y": jnp.asarray(y.numpy()),
                                                                        "force_drop_ids": jnp.asarray(drop.numpy())})
        return jnp.mean(losses["loss"]), losses

    (_, got), grads = jax.jit(jax.value_and_grad(mean_loss, has_aux=True)).lower(params).compile(FAST_COMPILE)(params)
    for name in ("loss", "mse", "vb"):
        wanted = want[name].detach().numpy()
        # float32 against float64: the t=0 decoder NLL subtracts two nearly equal normal CDFs
        np.testing.assert_allclose(np.asarray(got[name]), wanted, rtol=1e-4, atol=1e-6, err_msg=name)
    assert np.all(np.asarray(got["vb"]) > 0)
    jax_grads = {name: np.asarray(value) for name, value in
                 _torch_named(nnx.merge(graph, grads, rest)).items()}
    for name, param in torch_model.named_parameters():
        if param.grad is None:
            continue
        scale = float(param.grad.abs().max())
        assert scale > 0, name
        error = np.abs(jax_grads[name] - param.grad.numpy()).max() / scale
        assert error < 1e-4, f"{name}: gradient relative error {error:.2e}"


def _torch_named(model):
    from fusedit.dit.jax import to_torch_state_dict

    return {key: value.numpy() for key, value in to_torch_state_dict(model).items()}


def test_loss_without_learned_sigma_is_the_mse():
    _, jax_model = random_tiny_models(learn_sigma=False)
    x, y, t, noise, drop = random_batch()
    graph, state = nnx.split(jax_model)

    def losses_of(state, *arrays):
        x, t, noise, y = arrays
        return JaxDiffusion(learn_sigma=False).training_losses(nnx.merge(graph, state), x, t, noise, {"y": y})

    arrays = [jnp.asarray(array.numpy()) for array in (x, t, noise, y)]
    losses = jax.jit(losses_of).lower(state, *arrays).compile(FAST_COMPILE)(state, *arrays)
    np.testing.assert_array_equal(np.asarray(losses["loss"]), np.asarray(losses["mse"]))
    assert not np.any(np.asarray(losses["vb"]))
    with pytest.raises(ValueError, match="model output has shape"):
        JaxDiffusion(learn_sigma=True).losses_from_output(jnp.zeros((6, 4, 8, 8)), *(jnp.zeros((6, 4, 8, 8)),) * 2,
                                                          jnp.zeros(6, jnp.int32), jnp.zeros((6, 4, 8, 8)))


def test_parameter_spec_and_mesh_errors():
    assert parameter_spec((64, 4608), 4) == jax.sharding.PartitionSpec(None, "fsdp")
    assert parameter_spec((6, 5), 4) == jax.sharding.PartitionSpec()
    assert parameter_spec((8,), 1) == jax.sharding.PartitionSpec()
    with pytest.raises(ValueError, match="does not use the 1 devices"):
        make_mesh(data=2, fsdp=2)


# ----------------------------------------------------------------------------- 8 devices
def _on_eight_devices():
    """Run in a subprocess with 8 host devices (XLA_FLAGS must precede jax's import)."""
    assert jax.device_count() == DEVICES, jax.devices()
    from jax.sharding import PartitionSpec

    from fusedit.kernels.pallas import get_jax_ops
    from fusedit.kernels.pallas.adaln_modulate import _modulate_op

    _, model = random_tiny_models()
    single = JaxTrainer(model, make_mesh(1, 1, devices=jax.devices()[:1]), lr=1e-3, ema_decay=0.9)
    sharded = JaxTrainer(model, make_mesh(2, 4), lr=1e-3, ema_decay=0.9)
    states = [single.init_state(), sharded.init_state()]
    kernel_spec = states[1]["params"]["blocks"][0]["mlp"]["fc1"]["kernel"][...].sharding.spec
    assert "fsdp" in tuple(kernel_spec), kernel_spec  # parameters really are split
    for step in range(2):
        x, y, t, noise, drop = random_batch(DEVICES, seed=step)
        arrays = dict(x=x.numpy(), y=y.numpy().astype(np.int32), t=t.numpy().astype(np.int32), noise=noise.numpy(),
                      drop=drop.numpy().astype(np.int32))
        metrics = []
        for index, trainer in enumerate((single, sharded)):
            states[index], result = trainer.step(states[index], trainer.global_batch(**arrays))
            metrics.append({name: float(value) for name, value in result.items()})
        for name in metrics[0]:
            np.testing.assert_allclose(metrics[1][name], metrics[0][name], rtol=1e-5, err_msg=name)
    _assert_same_state(states[0], states[1], lr=1e-3, steps=2)
    # a batch that does not split over the 8 devices is refused by name, before the step runs
    with pytest.raises(ValueError, match="the global batch 6 does not split over the 8 devices"):
        sharded.step(states[1], {"x": np.zeros((6, 4, 8, 8), np.float32)})
    with pytest.raises(ValueError, match="the global batch 6 does not split over the 8 devices"):
        sharded.forward(states[1]["params"], *(np.zeros(shape, dtype) for shape, dtype in
                                               (((6, 4, 8, 8), np.float32), ((6,), np.int32), ((6,), np.int32))))

    # the default mesh: fsdp over one host's devices (all 8 here), data over the hosts; either size gives the other
    assert dict(make_mesh().shape) == {"data": 1, "fsdp": 8}
    assert dict(make_mesh(data=2).shape) == {"data": 2, "fsdp": 4}
    assert dict(make_mesh(fsdp=2).shape) == {"data": 4, "fsdp": 2}
    with pytest.raises(ValueError, match="a mesh of data=3 x fsdp=0 does not use the 8 devices exactly"):
        make_mesh(data=3)

    # The Pallas ops run per shard: every pallas_call of the whole train step sits in a shard_map
    pallas_model = random_tiny_models()[1].set_kernels("pallas")
    pallas_trainer = JaxTrainer(pallas_model, make_mesh(2, 4))
    state = pallas_trainer.init_state()
    batch = pallas_trainer.global_batch(**arrays)
    with jax.set_mesh(pallas_trainer.mesh):
        jaxpr = jax.make_jaxpr(pallas_trainer._train_step)(state, pallas_trainer.constants, batch)
    outside, inside = _pallas_calls(jaxpr.jaxpr)
    assert inside >= 10 and outside == 0, (inside, outside)

    # ... and give the unsharded numbers, forward and backward
    ops = get_jax_ops("pallas")
    generator = torch.Generator().manual_seed(3)
    x, y = (jnp.asarray(torch.randn(DEVICES, 16, 64, generator=generator).numpy()) for _ in range(2))
    gate, shift, scale = (jnp.asarray(torch.randn(DEVICES, 64, generator=generator).numpy()) for _ in range(3))
    kernel, bias = jnp.asarray(torch.randn(64, 128, generator=generator).numpy()) / 8, jnp.zeros(128)

    def block(x, y, gate, shift, scale, kernel):
        h = ops.adaln_modulate(x, shift, scale)
        q = h.reshape(x.shape[0], 16, 4, 16).transpose(0, 2, 1, 3)
        h = ops.attention(q, q, q).transpose(0, 2, 1, 3).reshape(x.shape[0], 16, 64)
        x, h = ops.residual_adaln_modulate(x, gate, h + y, shift, scale)
        return jnp.sum(jnp.sin(x) + ops.linear_gelu(h, kernel, bias).mean(-1, keepdims=True))

    value_and_grad = jax.value_and_grad(block, argnums=tuple(range(6)))
    want = jax.jit(value_and_grad)(x, y, gate, shift, scale, kernel)
    mesh = make_mesh(2, 4)
    with jax.set_mesh(mesh):
        spread = jax.device_put((x, y, gate, shift, scale), jax.sharding.NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
        got = jax.jit(value_and_grad)(*spread, kernel)
    for one, other in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        one, other = np.asarray(one), np.asarray(other)
        assert np.abs(one - other).max() <= 1e-5 * np.abs(one).max(), "sharded Pallas ops differ"
    # a batch the 8 shards do not split (guided sampling doubles N): filled up per shard, same numbers
    for rows in (6, 1):
        part = tuple(array[:rows] for array in (x, y, gate, shift, scale))
        want = jax.jit(value_and_grad)(*part, kernel)
        with jax.set_mesh(mesh):
            got = jax.jit(value_and_grad)(*part, kernel)
        for one, other in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            one, other = np.asarray(one), np.asarray(other)
            assert one.shape == other.shape and np.abs(one - other).max() <= 1e-5 * np.abs(one).max(), rows

    # a raw kernel under automatic sharding is refused on the CPU too (a TPU could not partition it)
    with jax.set_mesh(mesh):
        try:
            jax.jit(_modulate_op(1e-6, 256))(x, shift[:, None], scale[:, None])
        except RuntimeError as error:
            assert "cannot be partitioned" in str(error)
        else:
            raise AssertionError("a Pallas kernel ran under automatic sharding")
    print("EIGHT DEVICES OK")


def _assert_same_state(want, got, lr, steps):
    """Adam moments (the gradients' running averages) equal, relative to each leaf's largest
    value. Weights and EMA within 0.1 lr: Adam divides each gradient by its own running size,
    so a small gradient's rounding moves its weight by up to ~lr; up to 2 lr a step where the
    gradient is rounding noise around an exact zero (e.g. the key bias, which softmax ignores)."""
    def relative(one, other):
        return float(np.abs(one - other).max()) / max(float(np.abs(other).max()), 1e-30)

    for one, other in zip(jax.tree.leaves(got["opt_state"]), jax.tree.leaves(want["opt_state"])):
        assert relative(np.asarray(one), np.asarray(other)) < 1e-4, "Adam moments differ"
    adam = [part for part in want["opt_state"] if hasattr(part, "mu")][0]
    for part in ("params", "ema"):
        for one, other, mu in zip(jax.tree.leaves(got[part]), jax.tree.leaves(want[part]), jax.tree.leaves(adam.mu)):
            difference, mu = np.abs(np.asarray(one) - np.asarray(other)), np.abs(np.asarray(mu))
            noise = mu <= 1e-4 * mu.max()
            assert difference[~noise].max(initial=0) <= 0.1 * lr, (part, difference.max())
            assert difference[noise].max(initial=0) <= 2 * lr * steps, (part, difference.max())


def _pallas_calls(jaxpr, in_shard_map=False):
    """(pallas_calls outside any shard_map, inside one) in a jaxpr and every sub-jaxpr."""
    outside = inside = 0
    for equation in jaxpr.eqns:
        name = equation.primitive.name
        if name == "pallas_call":
            inside += in_shard_map
            outside += not in_shard_map
            continue
        for sub in _sub_jaxprs(equation.params):
            more_outside, more_inside = _pallas_calls(sub, in_shard_map or name == "shard_map")
            outside, inside = outside + more_outside, inside + more_inside
    return outside, inside


def _sub_jaxprs(params):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(item, "jaxpr") and hasattr(item, "consts"):  # ClosedJaxpr
                yield item.jaxpr
            elif hasattr(item, "eqns"):
                yield item


def test_sharded_step_equals_single_device():
    # unoptimized XLA code: these small programs run once, and compile 3x faster
    flags = f"--xla_force_host_platform_device_count={DEVICES} --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "EIGHT DEVICES OK" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]


# ----------------------------------------------------------------------------- fusedit train --framework jax
def _train_args(results_dir, *extra):
    from fusedit.train.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--data", "digits", "--depth", "1", "--hidden-size", "32", "--num-heads", "2",
                              "--global-batch-size", "8", "--steps", "2", "--ckpt-every", "1", "--log-every", "1",
                              "--lr", "1e-3", "--results-dir", str(results_dir), "--no-progress", *extra])


@pytest.fixture
def fast_compile(monkeypatch):
    monkeypatch.setattr(jax_train, "COMPILER_OPTIONS", FAST_COMPILE)


def test_train_jax_writes_torch_checkpoints_that_resume_in_both_frameworks(tmp_path, capsys, fast_compile):
    from fusedit.train.checkpoint import checkpoint_path, list_checkpoints, load_training_checkpoint
    from fusedit.train.cli import build_model, main

    # rows every 2 steps: the checkpoint at step 1 holds the log window of step 1 (see below)
    assert main(_train_args(tmp_path / "jax", "--framework", "jax", "--log-every", "2")) == 0
    assert "names a PyTorch op set" not in capsys.readouterr().out  # no --kernels: the XLA ops, silently
    with pytest.raises(ValueError, match="is at step 2, past the 1 steps asked for"):  # as the torch trainer
        main(_train_args(tmp_path / "jax", "--framework", "jax", "--resume", "--steps", "1"))
    args = _train_args(tmp_path / "jax", "--framework", "jax")
    final = load_training_checkpoint(checkpoint_path(tmp_path / "jax", 2))
    assert final["framework"] == "jax" and final["step"] == 2
    from fusedit.train.cli import open_training_data

    open_training_data(args)
    args.kernels = "reference"  # a torch model of the JAX run's flags
    torch_model = build_model(args)
    torch_model.load_state_dict(final["model"], strict=True)
    torch_model.load_state_dict(final["ema"], strict=True)
    optimizer = torch.optim.AdamW(torch_model.parameters(), lr=1e-3, weight_decay=0.0)
    optimizer.load_state_dict(final["opt"])
    assert all(float(entry["step"]) == 2 for entry in optimizer.state_dict()["state"].values())

    # resuming from step 1 (through the torch format and back) retraces the uninterrupted run
    resumed_dir = tmp_path / "resumed"
    checkpoint_path(resumed_dir, 1).parent.mkdir(parents=True)
    step_one = load_training_checkpoint(checkpoint_path(tmp_path / "jax", 1))
    torch.save({**step_one, "elapsed_sec": step_one["elapsed_sec"] + 1000.0}, checkpoint_path(resumed_dir, 1))
    # the whole log of the run, as a run killed after logging step 2 but before checkpointing it leaves it
    (resumed_dir / "log.csv").write_bytes((tmp_path / "jax" / "log.csv").read_bytes())
    assert main(_train_args(resumed_dir, "--framework", "jax", "--resume", "--keep-last", "1", "--log-every", "2")) == 0
    assert [step for step, _ in list_checkpoints(resumed_dir)] == [2]  # --keep-last 1 pruned step 1
    # row 2 redone once, over steps 1 and 2 as in the straight run: step 1 came in the checkpoint
    assert _logged(resumed_dir, "step") == [2]
    assert _logged(resumed_dir, "loss") == _logged(tmp_path / "jax", "loss")
    resumed = load_training_checkpoint(checkpoint_path(resumed_dir, 2))
    for part in ("model", "ema"):
        for key, value in final[part].items():
            assert torch.equal(resumed[part][key], value), (part, key)
    for index, entry in final["opt"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(resumed["opt"]["state"][index][name], entry[name])
    # a first session of 1000 s: the resumed checkpoint and log go on from there
    assert resumed["elapsed_sec"] > step_one["elapsed_sec"] + 1000.0
    with open(resumed_dir / "log.csv", newline="") as file:
        assert float(list(csv.DictReader(file))[-1]["elapsed_sec"]) >= 1000.0

    # the torch trainer resumes the JAX checkpoint, and follows the same run as JAX did
    torch_dir = tmp_path / "torch"
    checkpoint_path(torch_dir, 1).parent.mkdir(parents=True)
    checkpoint_path(torch_dir, 1).write_bytes(checkpoint_path(tmp_path / "jax", 1).read_bytes())
    # on the CPU, where the suite runs JAX, and so compared at fp32 tolerances
    assert main(_train_args(torch_dir, "--framework", "torch", "--kernels", "reference", "--resume",
                            "--device", "cpu")) == 0
    by_torch = load_training_checkpoint(checkpoint_path(torch_dir, 2))
    for key, value in final["model"].items():
        np.testing.assert_allclose(by_torch["model"][key].numpy(), value.numpy(), rtol=1e-4, atol=2e-6, err_msg=key)


def _logged(run_dir, column):
    with open(run_dir / "log.csv", newline="") as file:
        return [float(row[column]) for row in csv.DictReader(file)]


def test_train_jax_logs_the_rows_the_torch_trainer_logs(tmp_path, fast_compile):
    """Every --log-every steps and at the last, the step, its epoch and the mean loss terms
    since the previous row; JAX follows the torch run up to float rounding."""
    from fusedit.train.cli import main

    # 1797 digits at batch 600: 2 steps an epoch, so step 3 starts epoch 1
    flags = ["--global-batch-size", "600", "--steps", "3", "--log-every", "2", "--ckpt-every", "1000"]
    assert main(_train_args(tmp_path / "jax", "--framework", "jax", *flags)) == 0
    assert main(_train_args(tmp_path / "torch", "--framework", "torch", "--kernels", "reference", "--device", "cpu",
                            *flags)) == 0
    assert _logged(tmp_path / "jax", "step") == [2, 3] and _logged(tmp_path / "jax", "epoch") == [0, 1]
    for column in ("loss", "mse", "vb"):
        np.testing.assert_allclose(_logged(tmp_path / "jax", column), _logged(tmp_path / "torch", column),
                                   rtol=1e-4, err_msg=column)


def test_train_jax_refuses_fp16_before_writing(tmp_path):
    from fusedit.train.cli import main

    with pytest.raises(ValueError, match="fp16 needs a loss scaler"):
        main(_train_args(tmp_path / "run", "--framework", "jax", "--precision", "fp16"))
    with pytest.raises(ValueError, match="--device cpu is for --framework torch; JAX picks its devices from JAX_PLATFORMS"):
        main(_train_args(tmp_path / "run", "--framework", "jax", "--device", "cpu"))
    with pytest.raises(ValueError, match="--compile is for --framework torch: the JAX trainer always jit-compiles"):
        main(_train_args(tmp_path / "run", "--framework", "jax", "--compile"))
    with pytest.raises(ValueError, match="--kernels compile is for --framework torch: the JAX trainer always jit"):
        main(_train_args(tmp_path / "run", "--framework", "jax", "--kernels", "compile"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, precision", [("--tf32", None), ("--no-tf32", "highest")])
def test_no_tf32_makes_the_jax_runs_matmuls_full_precision(monkeypatch, flag, precision):
    seen = []
    monkeypatch.setattr(jax_train, "_train_jax", lambda args: seen.append(jax.config.jax_default_matmul_precision) or 0)
    assert jax_train.train_jax(_train_args("unused", "--framework", "jax", flag)) == 0
    assert seen == [precision] and jax.config.jax_default_matmul_precision is None  # for the run only


def test_cpu_threads_sets_the_torch_side_of_a_jax_run(monkeypatch):
    before, seen = torch.get_num_threads(), []
    wanted = 1 if before > 1 else 2
    monkeypatch.setattr(jax_train, "_train_jax", lambda args: seen.append(torch.get_num_threads()) or 0)
    assert jax_train.train_jax(_train_args("unused", "--framework", "jax", "--cpu-threads", str(wanted))) == 0
    assert seen == [wanted] and torch.get_num_threads() == before  # for the run only
    with pytest.raises(ValueError, match="--cpu-threads must be positive, got 0"):
        jax_train.train_jax(_train_args("unused", "--framework", "jax", "--cpu-threads", "0"))


@pytest.mark.parametrize("flag, ops, notice", [(None, "xla", None), ("xla", "xla", None),
                                               ("pallas", "pallas", "run in Pallas' interpreter"),
                                               ("sdpa", "xla", "names a PyTorch op set; using the JAX 'xla' ops"),
                                               ("triton", "xla", "names a PyTorch op set; using the JAX 'xla' ops")])
def test_kernels_flag_picks_the_jax_op_set(capsys, flag, ops, notice):
    """No --kernels means the XLA ops without a word; a PyTorch op set named explicitly gets a notice."""
    from fusedit.train.cli import resolve_defaults

    args = resolve_defaults(_train_args("unused", "--framework", "jax", *(("--kernels", flag) if flag else ())))
    if jax.default_backend() == "tpu" and flag == "pallas":
        notice = None  # the kernels compile there
    assert jax_train._jax_kernels(args) == ops
    printed = capsys.readouterr().out
    assert (notice in printed) if notice else printed == ""


# ---- the optimizer, EMA and draws on their own (both sides of a resume share any bug) ----

def _one_device_trainer(model, **kwargs):
    return JaxTrainer(model, make_mesh(1, 1, devices=jax.devices()[:1]), **kwargs)


def test_step_is_adamw_on_the_mean_loss_then_the_ema_of_the_new_weights():
    """One step from a fresh state, against the gradient of the batch's mean loss computed apart
    from the trainer: Adam's first moment is (1 - b1) g (a mean, not a sum, over the batch), the
    weights move by lr (g / (|g| + eps) + wd w) (one step: the bias-corrected moments are g, g^2),
    and the EMA moves towards the *new* weights by (1 - decay)."""
    lr, weight_decay, decay = 1e-3, 0.1, 0.9
    _, model = random_tiny_models()
    trainer = _one_device_trainer(model, lr=lr, weight_decay=weight_decay, ema_decay=decay)
    x, y, t, noise, drop = random_batch()
    arrays = dict(x=x.numpy(), y=y.numpy().astype(np.int32), t=t.numpy().astype(np.int32), noise=noise.numpy(),
                  drop=drop.numpy().astype(np.int32))
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    diffusion = JaxDiffusion()

    def mean_loss(params):
        losses = diffusion.training_losses(nnx.merge(graph, params, rest), *(jnp.asarray(arrays[k]) for k in ("x", "t", "noise")),
                                           {"y": jnp.asarray(arrays["y"]), "force_drop_ids": jnp.asarray(arrays["drop"])})
        return jnp.mean(losses["loss"])

    grads = [np.asarray(g, np.float64) for g in jax.tree.leaves(jax.jit(jax.grad(mean_loss))(params))]
    before = [np.asarray(p, np.float64) for p in jax.tree.leaves(params)]
    state, _ = trainer.step(trainer.init_state(), trainer.global_batch(**arrays))
    adam = [part for part in state["opt_state"] if isinstance(part, optax.ScaleByAdamState)][0]
    after = [np.asarray(p, np.float64) for p in jax.tree.leaves(state["params"])]
    ema = [np.asarray(p, np.float64) for p in jax.tree.leaves(state["ema"])]
    assert len(grads) == len(after) == len(ema) == len(jax.tree.leaves(adam.mu))
    for g, w0, w1, average, mu in zip(grads, before, after, ema, jax.tree.leaves(adam.mu)):
        scale = np.abs(g).max()
        if scale == 0:
            continue
        np.testing.assert_allclose(np.asarray(mu), 0.1 * g, rtol=0, atol=1e-4 * 0.1 * scale)
        significant = np.abs(g) > 1e-3 * scale  # elsewhere g is rounding noise of an exact zero
        want = w0 - lr * (g / (np.abs(g) + 1e-8) + weight_decay * w0)
        np.testing.assert_allclose(w1[significant], want[significant], rtol=0, atol=1e-6)
        np.testing.assert_allclose(average, w0 + (1 - decay) * (w1 - w0), rtol=0, atol=1e-7)


def test_optimizer_is_torch_adamw():
    """The trainer's optimizer against torch.optim.AdamW (the checkpoints' format, the torch
    trainer's math) over gradients of every magnitude, down to below eps: the same eps, betas,
    bias correction and decoupled weight decay."""
    lr, weight_decay = 1e-2, 0.1
    _, model = random_tiny_models()
    tx = _one_device_trainer(model, lr=lr, weight_decay=weight_decay).tx
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(64).astype(np.float32)
    grads = [(rng.standard_normal(64) * np.logspace(-10, 0, 64)).astype(np.float32) for _ in range(4)]
    params = {"w": jnp.asarray(w0)}
    opt_state = tx.init(params)
    weight = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    optimizer = torch.optim.AdamW([weight], lr=lr, weight_decay=weight_decay)
    for g in grads:
        updates, opt_state = tx.update({"w": jnp.asarray(g)}, opt_state, params)
        params = optax.apply_updates(params, updates)
        weight.grad = torch.from_numpy(g.copy())
        optimizer.step()
    np.testing.assert_allclose(np.asarray(params["w"]), weight.detach().numpy(), rtol=0, atol=1e-6)


def test_the_optimizer_state_round_trips_through_the_torch_format():
    """A checkpoint's AdamW state read back gives the optax state it was written from, moments and
    step count (the bias correction) included: a resume from step 1 cannot see a count reset to 1."""
    torch_model, model = random_tiny_models()
    trainer = _one_device_trainer(model)
    params = nnx.state(model, nnx.Param)
    opt_state = trainer.tx.init(params)
    for step in range(3):
        grads = jax.tree.map(lambda weight: jnp.sin(weight * (7.0 + step)), params)
        _, opt_state = trainer.tx.update(grads, opt_state, params)
    names = [name for name, _ in torch_model.named_parameters()]
    param_groups = torch.optim.AdamW(torch_model.parameters()).state_dict()["param_groups"]
    saved = jax_train.torch_optimizer_state(opt_state, names, param_groups)
    assert all(float(entry["step"]) == 3 for entry in saved["state"].values())
    restored = jax_train.optax_state_from_torch(trainer, saved, names, params)
    assert jax.tree.structure(restored) == jax.tree.structure(opt_state)
    for want, got in zip(jax.tree.leaves(opt_state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_random_batch_draws_timesteps_noise_and_label_dropout():
    """trainer.random_batch (the benchmark's per-step draws): timesteps over the whole schedule,
    unit normal noise, and each label dropped with probability label_dropout."""
    _, model = random_tiny_models()
    trainer = _one_device_trainer(model)
    rows = 4096
    x = jnp.zeros((rows, 4, 8, 8), jnp.float32)
    y = jnp.zeros((rows,), jnp.int32)
    batch = trainer.random_batch(jax.random.key(0), x, y, 0.1)
    t, noise, drop = (np.asarray(batch[name]) for name in ("t", "noise", "drop"))
    assert t.min() >= 0 and t.max() <= 999 and t.max() > 900 and t.min() < 100
    assert abs(noise.mean()) < 0.01 and abs(noise.std() - 1) < 0.01
    assert set(np.unique(drop)) <= {0, 1} and 0.08 < drop.mean() < 0.12
    assert not np.asarray(trainer.random_batch(jax.random.key(1), x, y, 0.0)["drop"]).any()


if __name__ == "__main__":
    _on_eight_devices()
