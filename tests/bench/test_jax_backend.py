"""The `jax` rows of `fusedit bench`: the runner's forward and parameter gradients equal the
PyTorch DiT's on the same weights, its training step runs and learns, its sampling loop
runs, and bad requests get clear errors."""
import pytest

pytest.importorskip("jax", reason="JAX is an optional extra: pip install -e '.[jax]'")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fusedit.bench.jax_backend import build_jax_runner, jax_available, model_input_size  # noqa: E402
from fusedit.dit.models import DiT  # noqa: E402
from fusedit.kernels.pallas.testing import FAST_COMPILE  # noqa: E402
from fusedit.kernels.testing import relative_error  # noqa: E402
from fusedit.train import jax_train  # noqa: E402

# a pixel-space model (1 channel, 8x8 input: its pos_embed says so); a tiny width
TINY = dict(depth=1, hidden_size=32, num_heads=2)


@pytest.fixture
def torch_model():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=4, in_channels=1, num_classes=10, **TINY).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)  # the default init zeroes adaLN / final layer
    return model


def test_jax_is_available_here():
    ok, why = jax_available()
    assert ok, why
    assert "cpu" in why


def test_jax_unavailable_says_why(monkeypatch):
    import sys

    import jax

    def no_device():
        raise RuntimeError("backend 'cuda' failed to initialize")

    monkeypatch.setattr(jax, "devices", no_device)
    assert jax_available() == (False, "JAX found no usable device (backend 'cuda' failed to initialize)")
    monkeypatch.setitem(sys.modules, "fusedit.train.jax_train", None)  # what an import of a missing module meets
    ok, why = jax_available()
    assert not ok and why.startswith("JAX is not installed (") and why.endswith("pip install -e '.[jax]'")


@pytest.fixture
def tiny_runner(torch_model, monkeypatch):
    """build(batch_size, dtype_name): a runner of torch_model's weights and architecture."""
    monkeypatch.setattr(jax_train, "COMPILER_OPTIONS", FAST_COMPILE)
    import fusedit.dit.jax.model as jax_model_module

    # the small architecture under a real config name (DiT-S/4's patch size)
    config = jax_model_module.DiT_models["DiT-S/4"]
    monkeypatch.setitem(jax_model_module.DiT_models, "DiT-S/4", lambda **kwargs: config(**{**TINY, **kwargs}))
    return lambda batch_size, dtype_name: build_jax_runner("DiT-S/4", 8, batch_size, dtype_name, torch_model.state_dict(),
                                                           num_classes=10, in_channels=1)


def test_runner_forward_matches_torch_and_trains(torch_model, tiny_runner):
    runner = tiny_runner(4, "fp32")
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 8, 8, generator=generator)
    t, y = torch.tensor([0, 10, 500, 999]), torch.tensor([1, 2, 3, 10])
    with torch.no_grad():
        want = torch_model(x, t, y)
    got = runner.forward(x.numpy(), t.numpy(), y.numpy())
    assert isinstance(got, np.ndarray) and relative_error(torch.from_numpy(got), want) < 1e-5
    # what the benchmark times: a batch placed on the devices beforehand, the output left there
    import jax

    on_devices = runner.forward_and_wait(runner.place(x.numpy(), t.numpy(), y.numpy()))
    assert isinstance(on_devices, jax.Array) and np.array_equal(np.asarray(on_devices, np.float32), got)
    # the seed draws the step's timesteps, noise and label dropout: the same state's loss
    # depends on it (the state is donated to each step, hence the copies)
    start = jax.tree.map(lambda leaf: leaf.copy(), runner.state)
    seeded = {}
    for seed in (0, 1, 0):
        runner.state = jax.tree.map(lambda leaf: leaf.copy(), start)
        seeded.setdefault(seed, []).append(runner.train_step(x.numpy(), y.numpy() % 10, seed=seed))
    assert seeded[0][0] == seeded[0][1] and seeded[0][0] != seeded[1][0], seeded
    runner.state = start
    losses = [runner.train_step(x.numpy(), y.numpy()[:4] % 10, seed=0) for _ in range(3)]
    assert all(np.isfinite(losses)) and losses[2] < losses[0]  # same draws each step: it fits them
    assert "cpu" in runner.device_name.lower()
    assert runner.peak_memory_bytes() is None or runner.peak_memory_bytes() > 0


def test_runner_gradients_match_torch(torch_model, tiny_runner):
    # Small timesteps: at t ~ 700 the two frameworks' fp32 sin/cos of t * freq differ by ~3e-5,
    # which the gradient of the timestep MLP's first weight carries (the forward test covers
    # large t at the output's tolerance).
    generator = torch.Generator().manual_seed(2)
    x, cotangent = torch.randn(2, 1, 8, 8, generator=generator), torch.randn(2, 2, 8, 8, generator=generator)
    t, y = torch.tensor([3, 40]), torch.tensor([4, 10])
    output = torch_model(x, t, y)
    (output * cotangent).sum().backward()
    got_output, gradients = tiny_runner(2, "fp32").output_and_gradients(x.numpy(), t.numpy(), y.numpy(), cotangent.numpy())
    assert relative_error(torch.from_numpy(got_output), output.detach()) < 1e-5
    wanted = {name: p.grad for name, p in torch_model.named_parameters() if p.requires_grad}
    assert set(wanted) <= set(gradients)
    for name, gradient in wanted.items():
        assert relative_error(gradients[name], gradient) < 1e-5, name


def test_runner_samples(tiny_runner):
    runner = tiny_runner(4, "bf16")
    labels = np.array([0, 7])
    images = runner.sample(labels, num_steps=3, cfg_scale=4.0, seed=5)
    assert images.shape == (2, 1, 8, 8) and images.dtype == np.float32 and np.isfinite(images).all()
    np.testing.assert_array_equal(images, runner.sample(labels, num_steps=3, cfg_scale=4.0, seed=5))
    assert np.abs(images - runner.sample(labels, num_steps=3, cfg_scale=4.0, seed=6)).max() > 1e-3
    for outside in (10, -1):
        with pytest.raises(ValueError, match=rf"class labels must lie in 0..9, got \[3, {outside}\]"):
            runner.sample(np.array([3, outside]), num_steps=3)


def test_bad_requests_name_the_problem(torch_model):
    with pytest.raises(ValueError, match="unknown dtype"):
        build_jax_runner("DiT-S/4", 8, 4, "fp8", None)
    with pytest.raises(ValueError, match="unknown JAX kernels"):
        build_jax_runner("DiT-S/4", 8, 4, "fp32", None, kernels="triton")
    with pytest.raises(RuntimeError, match="compiles for TPU only"):
        build_jax_runner("DiT-S/4", 8, 4, "fp32", None, kernels="pallas")
    with pytest.raises(ValueError, match="multiple of 8"):
        model_input_size("DiT-XL/2", 12)
    assert model_input_size("DiT-XL/2", 256) == 32
    assert model_input_size("DiT-S/4", 8, torch_model.state_dict()) == 8  # pixel space: pos_embed decides
    grid_of_16 = {"pos_embed": torch.empty(1, 16, 32)}
    assert model_input_size("DiT-S/4", 256, grid_of_16) == 16  # 4x4 tokens of the name's patch 4
    assert model_input_size("DiT-S/4", 256, grid_of_16, patch_size=2) == 8  # an override's patch wins
    with pytest.raises(ValueError, match="pos_embed holds 12 tokens, not a square grid"):
        model_input_size("DiT-S/4", 256, {"pos_embed": torch.empty(1, 12, 32)})


def test_bench_jax_row_times_forward_training_and_sampling_with_full_parity(monkeypatch):
    # A named config (the JAX runner builds those only), shrunk to one small block on both sides.
    import fusedit.bench as bench
    import fusedit.dit.jax.model as jax_model_module
    import fusedit.dit.models as torch_model_module

    monkeypatch.setattr(jax_train, "COMPILER_OPTIONS", FAST_COMPILE)
    config = jax_model_module.DiT_models["DiT-S/8"]
    monkeypatch.setitem(jax_model_module.DiT_models, "DiT-S/8", lambda **kwargs: config(**{**TINY, **kwargs}))
    monkeypatch.setitem(torch_model_module.DiT_models, "DiT-S/8",
                        lambda **kwargs: torch_model_module.DiT(patch_size=8, **TINY, **kwargs))
    records = bench.run_benchmark(models=["DiT-S/8"], backends=["reference", "jax"], image_size=128, batch_size=2,
                                  repeats=1, warmup=1, sample_steps=2, device="cpu")
    bench.report.check_records(records, "models")
    record = records[1]
    assert record["backend"] == "jax" and record["status"] == "ok", record
    for prefix in ("forward", "train"):
        assert record[f"{prefix}_ms"] > 0 and record[f"{prefix}_images_per_s"] > 0
    assert record["sample_seconds"] > 0 and record["sample_batch_size"] == 1 and record["sample_steps"] == 2
    assert record["sample_images_per_s"] == pytest.approx(1 / record["sample_seconds"])
    # the parity case draws timesteps up to 999: the timestep MLP's gradient carries ~1e-5 of
    # the frameworks' differing fp32 sin/cos (see test_runner_gradients_match_torch)
    assert record["parity_output_rel_error"] < 1e-5 and record["parity_grad_rel_error"] < 1e-4
    assert not any("no sampling" in note or "no gradients" in note for note in record["notes"])


def test_bench_jax_row_runs_a_named_config_with_another_block():
    # `fusedit bench --block cross_attn` makes {"config": "DiT-S/8", "block": ...}: still a named
    # config to the JAX runner, which reads the block off the weights
    import fusedit.bench as bench
    from fusedit.bench.configs import with_block

    model = with_block("DiT-S/8", "cross_attn")
    records = bench.run_benchmark(models=[model], backends=["reference", "jax"], image_size=64, batch_size=1,
                                  repeats=1, warmup=0, train=False, sample=False, device="cpu")
    bench.report.check_records(records, "models")
    record = records[1]
    assert (record["model"], record["backend"], record["status"]) == ("DiT-S/8 cross_attn", "jax", "ok"), record
    assert record["forward_ms"] > 0 and record["parity_output_rel_error"] < 1e-5
