"""The JAX diffusion against fusedit.dit.diffusion: the hybrid loss on the same model output,
full and respaced; the sampling loop against sample_images on the same weights and the same
noise (torch's draws replayed): guided and unguided, learned and fixed variance, 3-channel and
all-channel guidance; then its own noise, and bad requests."""
import pytest

pytest.importorskip("jax", reason="JAX is an optional extra: pip install -e '.[jax]'")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from fusedit.dit.diffusion import create_diffusion  # noqa: E402
from fusedit.dit.diffusion import sample_images as torch_sample_images  # noqa: E402
from fusedit.dit.jax import from_torch_state_dict  # noqa: E402
from fusedit.dit.jax.diffusion import JaxDiffusion, sample_images  # noqa: E402
from fusedit.dit.models import DiT  # noqa: E402
from fusedit.kernels.pallas.testing import FAST_COMPILE  # noqa: E402
from fusedit.kernels.testing import randomize_parameters_, relative_error  # noqa: E402

TINY = dict(depth=1, hidden_size=32, num_heads=2)
STEPS = 4


@pytest.mark.parametrize("respacing", ["", "10"])
def test_losses_match_torch_on_the_same_output(respacing):
    generator = torch.Generator().manual_seed(4)
    torch_diffusion, jax_diffusion = create_diffusion(respacing), JaxDiffusion(timestep_respacing=respacing)
    x_start, noise = torch.randn(2, 6, 3, 4, 4, generator=generator).unbind(0)
    output = torch.randn(6, 6, 4, 4, generator=generator)  # eps and variance values of 3 channels
    t = torch.tensor([0, 1, 2, 5, 8, 9]) * torch_diffusion.num_timesteps // 10  # t=0: the decoder term
    x_t = x_start + noise  # any x_t: the losses are functions of it
    want = torch_diffusion.losses_from_output(output, x_start, x_t, t, noise)
    got = jax_diffusion.losses_from_output(*(jnp.asarray(a.numpy()) for a in (output, x_start, x_t, t, noise)))
    for name in ("loss", "mse", "vb"):
        np.testing.assert_allclose(np.asarray(got[name]), want[name].numpy(), rtol=1e-5, atol=1e-6, err_msg=name)



@pytest.mark.parametrize("respacing", ["", "10"])
def test_training_losses_show_the_model_original_timesteps(respacing):
    """Respaced step t is timestep timestep_map[t] to the model, as in torch's training_losses."""
    torch_diffusion, jax_diffusion = create_diffusion(respacing), JaxDiffusion(timestep_respacing=respacing)
    x_start, noise = (jnp.asarray(a.numpy()) for a in torch.randn(2, 3, 3, 4, 4, generator=torch.Generator().manual_seed(5)).unbind(0))
    t = torch.tensor([0, 4, torch_diffusion.num_timesteps - 1])
    seen = {}

    def torch_model(x_t, timesteps):
        seen["torch"] = timesteps.numpy()
        return torch.cat([x_t, x_t], dim=1)

    def jax_model(x_t, timesteps):
        seen["jax"] = np.asarray(timesteps)
        return jnp.concatenate([x_t, x_t], axis=1)

    torch_diffusion.training_losses(torch_model, torch.from_numpy(np.asarray(x_start)), t, noise=torch.from_numpy(np.asarray(noise)))
    jax_diffusion.training_losses(jax_model, x_start, jnp.asarray(t.numpy()), noise)
    np.testing.assert_array_equal(seen["jax"], seen["torch"])
    assert respacing == "" or seen["jax"].max() > t.max().item()  # respaced: the original, larger timesteps

def test_vb_trains_only_the_variance_channels():
    """As torch's: the bound's mean comes from a detached epsilon."""
    generator = torch.Generator().manual_seed(6)
    x_start, noise = (jnp.asarray(a.numpy()) for a in torch.randn(2, 3, 1, 4, 4, generator=generator).unbind(0))
    output = jnp.asarray(torch.randn(3, 2, 4, 4, generator=generator).numpy())
    t = jnp.array([0, 10, 500])
    diffusion = JaxDiffusion()
    x_t = diffusion.q_sample(x_start, t, noise)
    grad = jax.grad(lambda out: diffusion.losses_from_output(out, x_start, x_t, t, noise)["vb"].sum())(output)
    assert np.abs(np.asarray(grad[:, 0])).max() == 0 and np.abs(np.asarray(grad[:, 1])).max() > 0


def twins(in_channels, learn_sigma):
    torch_model = randomize_parameters_(DiT(input_size=8, patch_size=4, in_channels=in_channels, num_classes=10,
                                            learn_sigma=learn_sigma, **TINY), seed=3).eval()
    jax_model = from_torch_state_dict("DiT-S/4", torch_model.state_dict(), input_size=8, **TINY)
    return torch_model, jax_model


def compiled_sampler(model, **kwargs):
    graph, state = nnx.split(model)

    def run(state, labels, key, noise):
        return sample_images(nnx.merge(graph, state), labels, key, noise=noise, **kwargs)

    def call(labels, key, noise=None):
        arguments = (state, jnp.asarray(labels), key, noise)
        return np.array(jax.jit(run).lower(*arguments).compile(FAST_COMPILE)(*arguments))

    return call


def replayed_torch_noise(shape, guided, seed=0):
    """The draws fusedit.dit.diffusion.sample_images makes from its generator, in order."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(shape, generator=generator)
    chain = (2 * shape[0],) + shape[1:] if guided else shape
    steps = torch.stack([torch.randn(chain, generator=generator) for _ in range(STEPS)])
    return start.numpy(), steps.numpy()


@pytest.mark.parametrize("cfg_scale, in_channels, learn_sigma", [
    (4.0, 4, True),    # the published setting: learned variance, 3 of 4 channels guided
    (1.0, 4, False),   # unguided, fixed variance
    (2.5, 1, True),    # fewer than 3 channels: all of them guided
])
def test_sampling_matches_torch_on_the_same_noise(cfg_scale, in_channels, learn_sigma):
    torch_model, jax_model = twins(in_channels, learn_sigma)
    labels = [3, 0, 9]
    want = torch_sample_images(torch_model, labels, num_steps=STEPS, cfg_scale=cfg_scale, seed=0)
    noise = replayed_torch_noise((3, in_channels, 8, 8), guided=cfg_scale != 1.0)
    got = compiled_sampler(jax_model, num_steps=STEPS, cfg_scale=cfg_scale)(np.array(labels), jax.random.key(0), noise)
    assert got.shape == (3, in_channels, 8, 8) and np.isfinite(got).all()
    assert relative_error(torch.from_numpy(got), want) < 1e-5


def test_own_noise_is_reproducible_and_differs_by_key():
    _, jax_model = twins(4, True)
    sampler = compiled_sampler(jax_model, num_steps=STEPS, cfg_scale=4.0)
    labels = np.array([1, 2])
    first, again = sampler(labels, jax.random.key(0)), sampler(labels, jax.random.key(0))
    other = sampler(labels, jax.random.key(1))
    np.testing.assert_array_equal(first, again)
    assert np.isfinite(first).all() and np.abs(first - other).max() > 1e-3



def test_own_noise_draws_fresh_noise_at_every_step(monkeypatch):
    # the loop is handed x_T and a step-noise function; each step's draw must be new standard
    # normal noise, not x_T again nor one draw repeated (the chain would then be far from DDPM's)
    seen = {}

    def recording_loop(self, model_fn, noise, step_noise):
        seen.update(x_T=noise, steps=[step_noise(index) for index in range(self.num_timesteps)])
        return noise

    monkeypatch.setattr(JaxDiffusion, "ddpm_sample_loop", recording_loop)
    _, jax_model = twins(4, True)
    sample_images(jax_model, jnp.array([1, 2]), jax.random.key(0), num_steps=STEPS, cfg_scale=4.0)
    draws = [np.asarray(seen["x_T"])] + [np.asarray(step) for step in seen["steps"]]
    assert len(draws) == STEPS + 1 and all(draw.shape == (4, 4, 8, 8) for draw in draws)
    for i, first in enumerate(draws):
        assert abs(first.std() - 1.0) < 0.15
        for second in draws[i + 1:]:
            assert np.corrcoef(first.ravel(), second.ravel())[0, 1] < 0.2

@pytest.mark.parametrize("kwargs, message", [
    (dict(cfg_scale=0.5), "cfg_scale must be a finite number >= 1.0"),
    (dict(cfg_scale=float("nan")), "cfg_scale must be a finite number >= 1.0"),
    (dict(num_steps=0), "num_steps must lie in 1..1000"),
    (dict(num_steps=1001), "num_steps must lie in 1..1000"),
    (dict(noise=(np.zeros((2, 4, 8, 8)), np.zeros((STEPS, 2, 4, 8, 8)))), "noise must be"),
])
def test_bad_requests_name_the_problem(kwargs, message):
    _, jax_model = twins(4, True)
    with pytest.raises(ValueError, match=message):
        sample_images(jax_model, jnp.array([1, 2]), jax.random.key(0), **{"num_steps": STEPS, **kwargs})
    no_null_class = from_torch_state_dict("DiT-S/4", DiT(input_size=8, patch_size=4, num_classes=10,
                                                          class_dropout_prob=0.0, **TINY).state_dict(),
                                          input_size=8, class_dropout_prob=0.0, **TINY)
    with pytest.raises(ValueError, match="needs a model trained with label dropout"):
        sample_images(no_null_class, jnp.array([1]), jax.random.key(0), num_steps=STEPS, cfg_scale=4.0)
