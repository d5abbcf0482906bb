"""The `jax` rows of `fusedit bench`: the runner's forward equals the PyTorch DiT on the same
weights, its training step runs and learns, and bad requests get clear errors."""
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


def test_runner_forward_matches_torch_and_trains(torch_model, monkeypatch):
    monkeypatch.setattr(jax_train, "COMPILER_OPTIONS", FAST_COMPILE)
    import fusedit.dit.jax.model as jax_model_module

    # the small architecture under a real config name (DiT-S/4's patch size)
    config = jax_model_module.DiT_models["DiT-S/4"]
    monkeypatch.setitem(jax_model_module.DiT_models, "DiT-S/4", lambda **kwargs: config(**{**TINY, **kwargs}))
    runner = build_jax_runner("DiT-S/4", 8, 4, "fp32", torch_model.state_dict(), num_classes=10, in_channels=1)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 8, 8, generator=generator)
    t, y = torch.tensor([0, 10, 500, 999]), torch.tensor([1, 2, 3, 10])
    with torch.no_grad():
        want = torch_model(x, t, y)
    got = runner.forward(x.numpy(), t.numpy(), y.numpy())
    assert isinstance(got, np.ndarray) and relative_error(torch.from_numpy(got), want) < 1e-5
    losses = [runner.train_step(x.numpy(), y.numpy()[:4] % 10, seed=0) for _ in range(3)]
    assert all(np.isfinite(losses)) and losses[2] < losses[0]  # same draws each step: it fits them
    assert "cpu" in runner.device_name.lower()
    assert runner.peak_memory_bytes() is None or runner.peak_memory_bytes() > 0


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
