"""The diffusion math against closed forms, and the samplers' contracts (seeds, CFG, timesteps)."""
import math

import numpy as np
import pytest
import torch

from fusedit.dit import diffusion as diffusion_module
from fusedit.dit.diffusion import (SAMPLERS, create_diffusion, discretized_gaussian_log_likelihood, linear_beta_schedule,
                                   normal_kl, on_device, q_posterior_mean_variance, q_sample, respaced_betas,
                                   sample_images, schedule_tables, space_timesteps)
from fusedit.dit.models import DiT
from fusedit.kernels.testing import randomize_parameters_

TABLES = schedule_tables(linear_beta_schedule())


def test_linear_schedule_is_the_published_one():
    betas = linear_beta_schedule()
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == 1e-4 and abs(betas[-1] - 0.02) < 1e-15
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)
    for name, table in vars(TABLES).items():
        assert table.dtype == np.float64 and table.shape == (1000,), name
    np.testing.assert_allclose(TABLES.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-15)


def test_tables_go_to_a_device_once(monkeypatch):
    # a host-to-device copy per use would wait for the GPU a dozen times per sampling step;
    # "meta" stands in for a GPU here (a device that is not the CPU, no data)
    monkeypatch.setattr(diffusion_module, "_DEVICE_COPIES", {})
    monkeypatch.setattr(diffusion_module, "_MOST_DEVICE_COPIES", 4)
    copy = on_device(TABLES.betas, "meta")
    assert copy.device.type == "meta" and copy.shape == (1000,) and copy.dtype == torch.float64
    assert on_device(TABLES.betas, torch.device("meta")) is copy
    assert on_device(TABLES.log_betas, "meta") is not copy
    assert on_device(TABLES.betas, "cpu").data_ptr() == TABLES.betas.ctypes.data  # the CPU shares the array
    for table in list(vars(TABLES).values())[:6]:  # past the bound the oldest copies go
        on_device(table, "meta")
    assert len(diffusion_module._DEVICE_COPIES) == 4
    t = torch.tensor([0, 999], device="meta")
    assert diffusion_module.gather(TABLES.betas, t, 4).shape == (2, 1, 1, 1)


@pytest.mark.parametrize("t", [0, 1, 500, 999])
def test_q_sample_moments(t):
    generator = torch.Generator().manual_seed(t)
    x_start = torch.tensor([-0.7, 0.3, 0.9]).repeat(20000, 1)
    timesteps = torch.full((len(x_start),), t)
    samples = q_sample(TABLES, x_start, timesteps, torch.randn(x_start.shape, generator=generator)).double()
    mean, std = math.sqrt(TABLES.alphas_cumprod[t]), math.sqrt(1 - TABLES.alphas_cumprod[t])
    standard_error = std / math.sqrt(len(x_start))
    assert (samples.mean(0) - mean * x_start[0].double()).abs().max() < 5 * standard_error
    assert (samples.std(0) - std).abs().max() < 0.02 * std
    # exactly affine in the noise
    exact = q_sample(TABLES, x_start[:2], timesteps[:2], torch.ones(2, 3))
    torch.testing.assert_close(exact, mean * x_start[:2] + std, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t", [1, 2, 10, 400, 999])
def test_posterior_is_bayes_rule(t):
    """q(x_{t-1} | x_t, x_0) from the product of the two Gaussians, in float64."""
    beta, abar_prev = TABLES.betas[t], TABLES.alphas_cumprod[t - 1]
    variance = 1.0 / ((1 - beta) / beta + 1.0 / (1 - abar_prev))
    x_start, x_t = torch.tensor([[0.4, -0.8]]), torch.tensor([[1.3, 0.2]])
    expected_mean = variance * (math.sqrt(1 - beta) / beta * x_t.double() + math.sqrt(abar_prev) / (1 - abar_prev) * x_start.double())
    mean, var, log_var = q_posterior_mean_variance(TABLES, x_start, x_t, torch.tensor([t]))
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-5, atol=1e-6)
    assert var.item() == pytest.approx(variance, rel=1e-6)
    assert log_var.item() == pytest.approx(math.log(variance), rel=1e-6)


def test_posterior_at_t0_returns_x0_and_clipped_log_variance():
    mean, _, log_var = q_posterior_mean_variance(TABLES, torch.tensor([[0.25]]), torch.tensor([[3.0]]), torch.tensor([0]))
    assert mean.item() == pytest.approx(0.25, abs=1e-6)
    assert log_var.item() == pytest.approx(math.log(TABLES.posterior_variance[1]), rel=1e-6)


def test_space_timesteps():
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert set(np.diff(kept)) <= {4, 5}
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim1000") == list(range(1000))  # stride 1 is a fixed stride too
    assert space_timesteps(1000, "") == list(range(1000))
    assert space_timesteps(1000, "1000") == list(range(1000))
    sections = space_timesteps(1000, "2,3")
    assert sections == [0, 499, 500, 750, 999]
    # the published running sum of strides: 49.95 ten times is 499.49999999999994, not 499.5
    assert 499 in space_timesteps(1000, "21") and 500 not in space_timesteps(1000, "21")
    assert 167 in space_timesteps(1000, "333,333,333")
    for bad in ("abc", "0", "ddim", "1001", "ddim999"):
        with pytest.raises(ValueError):
            space_timesteps(1000, bad)


@pytest.mark.parametrize("spacing", ["250", "ddim25", "7"])
def test_respaced_betas_keep_the_kept_alpha_bars(spacing):
    kept = space_timesteps(1000, spacing)
    betas = respaced_betas(TABLES.alphas_cumprod, kept)
    np.testing.assert_allclose(np.cumprod(1 - betas), TABLES.alphas_cumprod[kept], rtol=1e-12)
    diffusion = create_diffusion(spacing)
    assert diffusion.num_timesteps == len(kept)
    assert list(diffusion.timestep_map) == kept


def test_normal_kl():
    mean = torch.tensor([0.3, -1.0, 2.0])
    log_var = torch.tensor([-2.0, 0.0, 1.5])
    assert normal_kl(mean, log_var, mean, log_var).abs().max() == 0
    other_mean, other_log_var = torch.tensor([0.1, 0.5, -1.0]), torch.tensor([0.5, -1.0, 0.2])
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean, (0.5 * log_var).exp()),
                                                 torch.distributions.Normal(other_mean, (0.5 * other_log_var).exp()))
    torch.testing.assert_close(normal_kl(mean, log_var, other_mean, other_log_var), expected)


@pytest.mark.parametrize("mean,log_scale", [(0.0, math.log(0.1)), (0.5, math.log(0.3)), (-0.98, math.log(0.01))])
def test_discretized_likelihood_sums_to_one_over_the_256_levels(mean, log_scale):
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    log_probs = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale))
    # the bins tile the line (levels 2/255 apart, bins +-1/255), so the sum telescopes to 1
    # whatever the CDF's own error
    assert log_probs.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_tanh_cdf_is_within_its_stated_error():
    x = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    assert (diffusion_module.approx_standard_normal_cdf(x) - torch.special.ndtr(x)).abs().max() < 3e-4


def test_clip_denoised_clamps_the_predicted_x0_before_the_posterior():
    diffusion = create_diffusion("10", learn_sigma=False)
    x, eps, t = 3 * torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.tensor([2, 7])
    _, _, unclipped = diffusion.reverse_step_distribution(eps, x, t)
    mean, _, pred_xstart = diffusion.reverse_step_distribution(eps, x, t, clip_denoised=True)
    assert unclipped.abs().max() > 1.5  # the case is one where clipping acts
    torch.testing.assert_close(pred_xstart, unclipped.clamp(-1, 1))
    want, _, _ = q_posterior_mean_variance(diffusion.tables, unclipped.clamp(-1, 1), x, t)
    torch.testing.assert_close(mean, want)


class ExactEpsilon(torch.nn.Module):
    """Predicts the true noise of data concentrated on one point x0, with a chosen variance output."""

    def __init__(self, x0, variance_value=-1.0, learn_sigma=True, alphas_cumprod=TABLES.alphas_cumprod):
        super().__init__()
        self.x0, self.variance_value, self.learn_sigma = x0, variance_value, learn_sigma
        self.alphas_cumprod = torch.from_numpy(alphas_cumprod)  # a respaced diffusion's own, if given
        self.seen_timesteps = []

    def forward(self, x, t, y=None):
        self.seen_timesteps.append(t.clone())
        abar = self.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
        eps = (x - abar.sqrt() * self.x0) / (1 - abar).sqrt()
        if not self.learn_sigma:
            return eps
        return torch.cat([eps, torch.full_like(eps, self.variance_value)], dim=1)


def test_hybrid_loss_of_a_perfect_model_is_zero_except_the_decoder_term():
    # its own generator: drawn from the global one, the inputs depended on the tests before it,
    # and at t=0 (eps rebuilt through 1 / sqrt(1 - abar) = 100) fp32 rounding put the mse
    # over 1e-8 for 3.5% of draws
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, 2, 4, 4, generator=generator) * 1.6 - 0.8
    diffusion = create_diffusion()
    t = torch.tensor([1, 5, 200, 999, 0])
    losses = diffusion.training_losses(ExactEpsilon(x0), x0.expand(5, -1, -1, -1), t, {},
                                       noise=torch.randn(5, 2, 4, 4, generator=generator))
    assert set(losses) == {"loss", "mse", "vb"} and losses["loss"].shape == (5,)
    assert losses["mse"].max() < 1e-8
    assert losses["vb"][:4].abs().max() < 1e-4  # v = -1 picks the true posterior variance: KL 0
    assert losses["vb"][4] > 0  # decoder NLL in bits at t = 0
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])


def test_vb_trains_only_the_variance_channels():
    diffusion = create_diffusion()
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    output = torch.randn(3, 2, 4, 4, requires_grad=True)
    t = torch.tensor([0, 10, 500])
    losses = diffusion.training_losses(lambda x, t: output, x0, t, {}, noise=torch.randn_like(x0))
    (grad,) = torch.autograd.grad(losses["vb"].sum(), output)
    assert grad[:, 0].abs().max() == 0 and grad[:, 1].abs().max() > 0


def test_without_learn_sigma_the_loss_is_plain_mse():
    diffusion = create_diffusion(learn_sigma=False)
    x0, noise = torch.rand(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    prediction = torch.randn(2, 1, 4, 4)
    losses = diffusion.training_losses(lambda x, t: prediction, x0, torch.tensor([3, 700]), {}, noise=noise)
    torch.testing.assert_close(losses["loss"], ((prediction - noise) ** 2).mean(dim=(1, 2, 3)))
    assert losses["vb"].abs().max() == 0
    with pytest.raises(ValueError, match="learn_sigma"):
        create_diffusion().training_losses(lambda x, t: prediction, x0, torch.tensor([3, 700]), {}, noise=noise)


@pytest.mark.parametrize("sampler,learn_sigma", [("ddpm", True), ("ddim", True), ("ddpm", False)])
def test_samplers_recover_a_point_mass_and_feed_original_timesteps(sampler, learn_sigma):
    x0 = torch.rand(2, 1, 4, 4) * 1.6 - 0.8
    model = ExactEpsilon(x0, learn_sigma=learn_sigma)
    diffusion = create_diffusion("10", learn_sigma=learn_sigma)
    generator = torch.Generator().manual_seed(0)
    result = diffusion.sample_loop(lambda x, t: model(x, t), torch.randn(2, 1, 4, 4), generator, sampler)
    torch.testing.assert_close(result, x0, rtol=0, atol=2e-4)
    seen = [int(t[0]) for t in model.seen_timesteps]
    assert seen == space_timesteps(1000, "10")[::-1] and seen[0] == 999 and seen[-1] == 0


def tiny_dit(num_classes=5, in_channels=1, learn_sigma=True):
    torch.manual_seed(0)
    model = DiT(input_size=4, patch_size=2, in_channels=in_channels, hidden_size=32, depth=1, num_heads=2,
                num_classes=num_classes, learn_sigma=learn_sigma)
    with torch.no_grad():  # adaLN-Zero starts as the zero function: give the output some signal
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_sample_images_is_reproducible_from_the_seed(sampler, eta):
    model = tiny_dit()
    kwargs = dict(num_steps=5, cfg_scale=3.0, sampler=sampler, eta=eta)
    first = sample_images(model, [0, 1, 4], seed=7, **kwargs)
    assert first.shape == (3, 1, 4, 4) and torch.isfinite(first).all()
    torch.testing.assert_close(sample_images(model, [0, 1, 4], seed=7, **kwargs), first, rtol=0, atol=0)
    assert not torch.equal(sample_images(model, [0, 1, 4], seed=8, **kwargs), first)
    assert model.training  # restored


def test_guided_sampling_through_a_wrapper_that_hides_the_dits_methods():
    # DistributedDataParallel passes no attribute on to its module, forward_with_cfg among them
    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    model = tiny_dit()
    want = sample_images(model, [0, 3], num_steps=3, cfg_scale=2.0, seed=1)
    torch.testing.assert_close(sample_images(Wrapper(model), [0, 3], num_steps=3, cfg_scale=2.0, seed=1), want,
                               rtol=0, atol=0)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_a_one_step_schedule_samples_and_trains_finite(sampler):
    """One step has no beta~_1 to stand in for beta~_0 = 0; log 0 must not reach the output."""
    model = tiny_dit()
    assert torch.isfinite(sample_images(model, [0, 1], num_steps=1, sampler=sampler)).all()
    diffusion = create_diffusion("1")
    assert np.isfinite(diffusion.tables.posterior_log_variance_clipped).all()
    losses = diffusion.training_losses(lambda x, t: model(x, t, torch.tensor([0, 1])), torch.randn(2, 1, 4, 4),
                                       torch.zeros(2, dtype=torch.long))
    assert all(torch.isfinite(value).all() for value in losses.values())


def test_guidance_doubles_the_batch_with_the_null_class_only_when_asked():
    model = tiny_dit().eval()
    calls = []
    model.y_embedder.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].tolist()))
    sample_images(model, [1, 2], num_steps=2, cfg_scale=1.0)
    assert calls == [[1, 2], [1, 2]]
    calls.clear()
    sample_images(model, [1, 2], num_steps=2, cfg_scale=2.5)
    assert calls == [[1, 2, 5, 5], [1, 2, 5, 5]]


def test_guidance_changes_the_samples():
    model = tiny_dit(in_channels=4)
    unguided = sample_images(model, [0, 3], num_steps=4, cfg_scale=1.0, seed=1)
    guided = sample_images(model, [0, 3], num_steps=4, cfg_scale=4.0, seed=1)
    guided_all = sample_images(model, [0, 3], num_steps=4, cfg_scale=4.0, seed=1, guide_all_channels=True)
    assert not torch.allclose(unguided, guided) and not torch.allclose(guided_all, guided)


@pytest.mark.parametrize("kwargs, message", [
    (dict(class_labels=[5]), "class labels"),
    (dict(cfg_scale=0.5), "cfg_scale"),
    (dict(cfg_scale=math.nan), "cfg_scale"),
    (dict(cfg_scale=math.inf), "cfg_scale"),
    (dict(sampler="euler"), "sampler"),
    (dict(num_steps=0), "num_steps"),
    (dict(sampler="ddim", eta=1.5), r"eta must lie in \[0, 1\]"),
    (dict(sampler="ddim", eta=-0.1), r"eta must lie in \[0, 1\]"),
    (dict(sampler="ddim", eta=math.nan), r"eta must lie in \[0, 1\]"),
])
def test_sample_images_rejects_bad_requests(kwargs, message):
    request = dict(class_labels=[0], num_steps=2) | kwargs
    with pytest.raises(ValueError, match=message):
        sample_images(tiny_dit(), **request)


@pytest.mark.parametrize("betas", [[], [[0.1, 0.2]], [0.1, 0.0], [0.1, 1.5], [0.1, math.nan]])
def test_schedule_tables_refuse_bad_betas(betas):
    with pytest.raises(ValueError, match="betas must be a non-empty 1-D array"):
        schedule_tables(betas)


def test_sample_images_refuses_guidance_without_a_null_class():
    model = tiny_dit()
    model.y_embedder.dropout_prob = 0.0  # no null class to guide against
    with pytest.raises(ValueError, match="needs a model trained with label dropout"):
        sample_images(model, [0], num_steps=2, cfg_scale=4.0)


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_sample_images_hands_clip_denoised_and_eta_to_the_sampler(cfg_scale):
    # the last step (t=0) returns the predicted x0 (DDPM: posterior mean with coef2 = 0; DDIM:
    # abar_prev = 1), so clip_denoised bounds the samples; eta > 0 adds noise to DDIM's steps
    model = tiny_dit(in_channels=4)
    kwargs = dict(num_steps=3, cfg_scale=cfg_scale, seed=2)
    for sampler in SAMPLERS:
        assert sample_images(model, [0, 3], sampler=sampler, **kwargs).abs().max() > 1.0  # clipping acts
        assert sample_images(model, [0, 3], sampler=sampler, clip_denoised=True, **kwargs).abs().max() <= 1.0
    deterministic = sample_images(model, [0, 3], sampler="ddim", eta=0.0, **kwargs)
    assert not torch.allclose(sample_images(model, [0, 3], sampler="ddim", eta=1.0, **kwargs), deterministic)


# ---- closed forms the reverse steps, the bound and the sampler output must meet ----

def abar_table(diffusion):
    return np.cumprod(1.0 - np.asarray(diffusion.tables.betas, dtype=np.float64))


def gaussian_posterior_var(betas, i):
    abar = np.cumprod(1 - betas)
    abar_prev = 1.0 if i == 0 else abar[i - 1]
    return betas[i] * (1 - abar_prev) / (1 - abar[i])


# --- DDPM: x_{t-1} - mean == sigma * noise, with sigma from the variance rule -------------
@pytest.mark.parametrize("v", [-1.0, 0.0, 1.0])
def test_ddpm_step_noise_scale_follows_the_learned_range(v):
    diffusion = create_diffusion("10")
    betas = np.asarray(diffusion.tables.betas)
    i = 5
    t = torch.tensor([i])
    x = torch.randn(1, 1, 2, 2)
    output = torch.cat([torch.randn(1, 1, 2, 2), torch.full((1, 1, 2, 2), v)], dim=1)
    zero, _ = diffusion.ddpm_step(output, x, t, torch.zeros_like(x))
    one, _ = diffusion.ddpm_step(output, x, t, torch.ones_like(x))
    frac = (v + 1) / 2  # log sigma^2 = frac log beta + (1 - frac) log beta~
    sigma = math.exp(0.5 * (frac * math.log(betas[i]) + (1 - frac) * math.log(gaussian_posterior_var(betas, i))))
    torch.testing.assert_close(one - zero, torch.full_like(x, sigma), rtol=1e-4, atol=0)


def test_ddpm_step_fixed_variance_is_beta():
    diffusion = create_diffusion("10", learn_sigma=False)
    betas = np.asarray(diffusion.tables.betas)
    x, eps = torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2)
    zero, _ = diffusion.ddpm_step(eps, x, torch.tensor([4]), torch.zeros_like(x))
    one, _ = diffusion.ddpm_step(eps, x, torch.tensor([4]), torch.ones_like(x))
    torch.testing.assert_close(one - zero, torch.full_like(x, math.sqrt(betas[4])), rtol=1e-4, atol=0)


# --- DDIM: x_{t-1} = sqrt(abar') x0 + sqrt(1 - abar' - s^2) eps + s z (Song et al. eq. 12) -----
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_matches_the_closed_form(eta):
    diffusion = create_diffusion("10", learn_sigma=False)
    abar = abar_table(diffusion)
    i = 6
    a, a_prev = abar[i], abar[i - 1]
    x, eps, z = torch.randn(3, 1, 1, 2, 2).unbind(0)
    x0 = (x.double() - math.sqrt(1 - a) * eps.double()) / math.sqrt(a)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    want = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps.double() + sigma * z.double()
    got, _ = diffusion.ddim_step(eps, x, torch.tensor([i]), z, eta=eta)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


# --- the variational bound, in bits -------------------------------------------------------
@pytest.mark.parametrize("spacing", ["", "10"])
def test_vb_kl_in_bits_for_the_beta_variance(spacing):
    diffusion = create_diffusion(spacing)
    betas = np.asarray(diffusion.tables.betas)
    x0 = torch.rand(1, 1, 4, 4) * 1.6 - 0.8
    i = 3
    # exact mean, model variance beta_t instead of beta~_t: KL = 0.5 (r - 1 - ln r), r = beta~/beta
    exact = ExactEpsilon(x0, variance_value=1.0, alphas_cumprod=abar_table(diffusion))
    t = torch.tensor([i])

    def model(x, original_timestep):
        # a respaced diffusion hands the model the original timestep; exact's table is the
        # respaced one, so it is asked for step i itself
        return exact(x, t)

    losses = diffusion.training_losses(model, x0, t, {}, noise=torch.randn_like(x0))
    r = gaussian_posterior_var(betas, i) / betas[i]
    kl_bits = 0.5 * (r - 1 - math.log(r)) / math.log(2)
    assert losses["vb"].item() == pytest.approx(kl_bits, rel=2e-3)  # not rescaled when respaced, as published


def test_vb_decoder_nll_in_bits_at_t0():
    diffusion = create_diffusion()
    betas = linear_beta_schedule()
    levels = torch.tensor([-1.0, -0.5, 0.0, 127 / 255, 1.0]).reshape(1, 1, 1, 5)
    model = ExactEpsilon(levels, variance_value=-1.0)
    losses = diffusion.training_losses(model, levels, torch.tensor([0]), {}, noise=torch.randn_like(levels))
    # the mean at t=0 is x0 exactly; the variance is the clipped posterior variance (beta~_1)
    sigma = math.sqrt(gaussian_posterior_var(betas, 1))
    normal = torch.distributions.Normal(0.0, sigma)
    half = torch.tensor(1 / 255)
    interior = (normal.cdf(half) - normal.cdf(-half)).item()
    edge = normal.cdf(half).item()
    probs = [edge, interior, interior, interior, edge]
    want = -np.mean(np.log2(probs))
    assert losses["vb"].item() == pytest.approx(want, rel=5e-3)


def test_linear_schedule_scales_with_length():
    betas = linear_beta_schedule(500)
    assert betas[0] == pytest.approx(2e-4) and betas[-1] == pytest.approx(0.04)


# --- guided sampling returns the conditional half -----------------------------------------
def test_guided_ddpm_samples_are_the_last_steps_predicted_x0():
    model = randomize_parameters_(DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1,
                                      num_heads=2, num_classes=5))
    seen = []
    original = model.forward_with_cfg

    def spy(x, t, y, scale, **kwargs):
        out = original(x, t, y, scale, **kwargs)
        seen.append((x.clone(), t.clone(), out.clone()))
        return out

    model.forward_with_cfg = spy
    samples = sample_images(model, [0, 3], num_steps=4, cfg_scale=4.0, sampler="ddpm", seed=3)
    x, t, out = seen[-1]
    assert int(t[0]) == 0
    abar0 = 1 - 1e-4  # the last step has no noise and returns the predicted x0 of the conditional rows
    want = (x[:2] - math.sqrt(1 - abar0) * out[:2, :4]) / math.sqrt(abar0)
    torch.testing.assert_close(samples, want, rtol=1e-4, atol=1e-4)
