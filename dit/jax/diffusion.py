"""The DiT diffusion in jnp: the same math, tables and rounding as fusedit.dit.diffusion.

The float64 schedule tables are fusedit.dit.diffusion's own (linear betas 1e-4..0.02 over 1000
steps, respaced for sampling as there); a value is gathered at the batch's timesteps and used as
float32, as there. The loss is the hybrid one: mean-squared error on epsilon, plus with
learn_sigma the variational-bound term in bits per dimension on a detached epsilon (it trains
the variance only): the KL between the true posterior and the model's reverse step for t > 0,
the discretized Gaussian decoder NLL at t = 0. `sample_images` is the guided ancestral DDPM
loop of fusedit.dit.diffusion.sample_images, one jit-able `lax.fori_loop`.
"""
import math

import jax
import jax.numpy as jnp

from fusedit.dit.diffusion import NUM_TIMESTEPS, check_sampling_request, create_diffusion

LOG_2 = math.log(2.0)


class JaxDiffusion:
    """Training losses and reverse steps of the DiT diffusion (respaced by `timestep_respacing`,
    as fusedit.dit.diffusion.create_diffusion takes it); tables held as float32 device arrays,
    indexed by the respaced step, and timestep_map[step] the original timestep the model sees."""

    def __init__(self, learn_sigma=True, num_timesteps=NUM_TIMESTEPS, timestep_respacing=""):
        diffusion = create_diffusion(timestep_respacing, learn_sigma=learn_sigma, num_timesteps=num_timesteps)
        tables = diffusion.tables
        self.learn_sigma, self.num_timesteps = learn_sigma, tables.num_timesteps
        names = ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_log_variance_clipped", "posterior_mean_coef1",
                 "posterior_mean_coef2", "log_betas", "fixed_large_log_variance")
        self.tables = {name: jnp.asarray(getattr(tables, name), jnp.float32) for name in names}
        self.timestep_map = jnp.asarray(diffusion.timestep_map, jnp.int32)

    def gather(self, name, t):
        """tables[name][t] shaped (N, 1, 1, 1) to broadcast against NCHW."""
        return self.tables[name][t][:, None, None, None]

    def q_sample(self, x_start, t, noise):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        return self.gather("sqrt_alphas_cumprod", t) * x_start + self.gather("sqrt_one_minus_alphas_cumprod", t) * noise

    def posterior_mean(self, x_start, x_t, t):
        return self.gather("posterior_mean_coef1", t) * x_start + self.gather("posterior_mean_coef2", t) * x_t

    def training_losses(self, model, x_start, t, noise, model_kwargs=None):
        """Per-sample losses dict(loss, mse, vb), each (N,) float32, at respaced steps t;
        model(x_t, original timesteps, **kwargs) -> output."""
        x_t = self.q_sample(x_start, t, noise)
        output = model(x_t, self.timestep_map[t], **(model_kwargs or {}))
        return self.losses_from_output(output.astype(jnp.float32), x_start, x_t, t, noise)

    def split_output(self, output, x):
        """(eps, variance values or None) of a raw model output, with a clear error when its
        channels don't fit."""
        channels = x.shape[1]
        expected = (x.shape[0], 2 * channels if self.learn_sigma else channels) + tuple(x.shape[2:])
        if output.shape != expected:
            raise ValueError(f"model output has shape {tuple(output.shape)}, expected {expected} "
                             f"(learn_sigma={self.learn_sigma})")
        return (output[:, :channels], output[:, channels:]) if self.learn_sigma else (output, None)

    def reverse_step_distribution(self, eps, variance_values, x_t, t):
        """Mean and log variance of p(x_{t-1} | x_t): the learned-range variance
        frac * log beta_t + (1 - frac) * log beta~_t, frac = (v + 1) / 2, or without
        learn_sigma the fixed large one."""
        if variance_values is None:
            log_variance = jnp.broadcast_to(self.gather("fixed_large_log_variance", t), x_t.shape)
        else:
            frac = (variance_values + 1) / 2
            log_variance = (frac * self.gather("log_betas", t)
                            + (1 - frac) * self.gather("posterior_log_variance_clipped", t))
        pred_xstart = self.gather("sqrt_recip_alphas_cumprod", t) * x_t - self.gather("sqrt_recipm1_alphas_cumprod", t) * eps
        return self.posterior_mean(pred_xstart, x_t, t), log_variance

    def losses_from_output(self, output, x_start, x_t, t, noise):
        eps, variance_values = self.split_output(output, x_start)
        mse = _mean_flat((noise - eps) ** 2)
        if variance_values is None:
            return {"loss": mse, "mse": mse, "vb": jnp.zeros_like(mse)}
        # the bound trains only the variance: its mean comes from a detached epsilon
        mean, log_variance = self.reverse_step_distribution(jax.lax.stop_gradient(eps), variance_values, x_t, t)
        clipped_log_variance = self.gather("posterior_log_variance_clipped", t)
        true_mean = self.posterior_mean(x_start, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, clipped_log_variance, mean, log_variance)) / LOG_2
        decoder_nll = -_mean_flat(discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_variance)) / LOG_2
        vb = jnp.where(t == 0, decoder_nll, kl)  # unscaled when respaced, as torch's
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def ddpm_sample_loop(self, model_fn, noise, step_noise):
        """x_0 from x_T = `noise` by the ancestral chain over every (respaced) step, last first:
        x_{t-1} = mean + sigma * step_noise(i) (no noise at step 0), i counting steps done;
        model_fn(x, original timesteps) -> raw output (cast to float32 here)."""
        steps = self.num_timesteps

        def step(index, x):
            t = jnp.full((x.shape[0],), steps - 1 - index, jnp.int32)
            output = model_fn(x, self.timestep_map[t]).astype(jnp.float32)
            mean, log_variance = self.reverse_step_distribution(*self.split_output(output, x), x, t)
            nonzero = (t != 0).astype(jnp.float32)[:, None, None, None]
            return mean + nonzero * jnp.exp(0.5 * log_variance) * step_noise(index)

        return jax.lax.fori_loop(0, steps, step, noise)


def sample_images(model, class_labels, key, num_steps=250, cfg_scale=4.0, guide_all_channels=False, noise=None):
    """Class-conditional samples (N, C, H, W) float32 from a JAX DiT: the guided ancestral DDPM
    loop of fusedit.dit.diffusion.sample_images (respaced to num_steps; cfg_scale 1.0 runs the
    conditional model alone; the published 3-channel guidance, or all channels with
    guide_all_channels or fewer than 3 input channels). jit-able with num_steps, cfg_scale and
    guide_all_channels static.

    Noise comes from `key` (x_T, then one draw per step); `noise` = (x_T (N, C, H, W), steps
    (num_steps, M, C, H, W)) replaces it, M being 2N when guided (the doubled batch), N if not:
    that is how a test replays torch's draws.
    """
    check_sampling_request(num_steps, cfg_scale, model.class_dropout_prob)
    guided = cfg_scale != 1.0
    labels = jnp.asarray(class_labels, jnp.int32).reshape(-1)
    shape = (labels.shape[0], model.in_channels, model.input_size, model.input_size)
    chain_shape = (2 * shape[0],) + shape[1:] if guided else shape
    if noise is None:
        start_key, steps_key = jax.random.split(key)
        x_T = jax.random.normal(start_key, shape, jnp.float32)

        def step_noise(index):
            return jax.random.normal(jax.random.fold_in(steps_key, index), chain_shape, jnp.float32)
    else:
        x_T, step_noises = (jnp.asarray(part, jnp.float32) for part in noise)
        if x_T.shape != shape or step_noises.shape != (num_steps,) + chain_shape:
            raise ValueError(f"noise must be (x_T {shape}, steps {(num_steps,) + chain_shape}), got "
                             f"({x_T.shape}, {step_noises.shape})")

        def step_noise(index):
            return step_noises[index]

    diffusion = JaxDiffusion(learn_sigma=model.learn_sigma, timestep_respacing=str(num_steps))
    dtype = model.x_embedder.proj.kernel[...].dtype
    if not guided:
        return diffusion.ddpm_sample_loop(lambda x, t: model(x.astype(dtype), t, labels), x_T, step_noise)
    all_channels = guide_all_channels or model.in_channels < 3
    both_labels = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)])

    def model_fn(x, t):
        return model.forward_with_cfg(x.astype(dtype), t, both_labels, cfg_scale, guide_all_channels=all_channels)

    return diffusion.ddpm_sample_loop(model_fn, jnp.concatenate([x_T, x_T]), step_noise)[: shape[0]]


def _mean_flat(array):
    return jnp.mean(array, axis=tuple(range(1, array.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """fusedit.dit.diffusion's tanh approximation 0.5 (1 + tanh z), computed as sigmoid(2 z): the
    same function, without the float32 cancellation of 1 + tanh z in the tails (XLA's tanh rounds
    to -1 below z ~ -7.9, where the cdf is still ~1e-7)."""
    return jax.nn.sigmoid(2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) of data in [-1, 1] quantized to 256 levels under N(means, e^(2 log_scales))."""
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
