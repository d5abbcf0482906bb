"""The DiT training loss in jnp: the same math, tables and rounding as fusedit.dit.diffusion.

The float64 schedule tables are fusedit.dit.diffusion's own (linear betas 1e-4..0.02 over 1000
steps); a value is gathered at the batch's timesteps and used as float32, as there. The loss is
the hybrid one: mean-squared error on epsilon, plus with learn_sigma the variational-bound term in
bits per dimension on a detached epsilon (it trains the variance only): the KL between the true
posterior and the model's reverse step for t > 0, the discretized Gaussian decoder NLL at t = 0.
"""
import math

import jax
import jax.numpy as jnp

from fusedit.dit.diffusion import NUM_TIMESTEPS, linear_beta_schedule, schedule_tables

LOG_2 = math.log(2.0)


class JaxDiffusion:
    """Training losses of the (unrespaced) DiT diffusion; tables held as float32 device arrays."""

    def __init__(self, learn_sigma=True, num_timesteps=NUM_TIMESTEPS):
        tables = schedule_tables(linear_beta_schedule(num_timesteps))
        self.learn_sigma, self.num_timesteps = learn_sigma, tables.num_timesteps
        names = ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_log_variance_clipped", "posterior_mean_coef1",
                 "posterior_mean_coef2", "log_betas")
        self.tables = {name: jnp.asarray(getattr(tables, name), jnp.float32) for name in names}

    def gather(self, name, t):
        """tables[name][t] shaped (N, 1, 1, 1) to broadcast against NCHW."""
        return self.tables[name][t][:, None, None, None]

    def q_sample(self, x_start, t, noise):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        return self.gather("sqrt_alphas_cumprod", t) * x_start + self.gather("sqrt_one_minus_alphas_cumprod", t) * noise

    def posterior_mean(self, x_start, x_t, t):
        return self.gather("posterior_mean_coef1", t) * x_start + self.gather("posterior_mean_coef2", t) * x_t

    def training_losses(self, model, x_start, t, noise, model_kwargs=None):
        """Per-sample losses dict(loss, mse, vb), each (N,) float32; model(x_t, t, **kwargs) -> output."""
        x_t = self.q_sample(x_start, t, noise)
        output = model(x_t, t, **(model_kwargs or {}))
        return self.losses_from_output(output.astype(jnp.float32), x_start, x_t, t, noise)

    def losses_from_output(self, output, x_start, x_t, t, noise):
        channels = x_start.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if output.shape != (x_start.shape[0], expected) + tuple(x_start.shape[2:]):
            raise ValueError(f"model output has shape {tuple(output.shape)}, expected "
                             f"{(x_start.shape[0], expected) + tuple(x_start.shape[2:])} (learn_sigma={self.learn_sigma})")
        eps = output[:, :channels]
        mse = _mean_flat((noise - eps) ** 2)
        if not self.learn_sigma:
            return {"loss": mse, "mse": mse, "vb": jnp.zeros_like(mse)}
        # the bound trains only the variance: its mean comes from a detached epsilon
        frozen_eps, variance_values = jax.lax.stop_gradient(eps), output[:, channels:]
        frac = (variance_values + 1) / 2
        clipped_log_variance = self.gather("posterior_log_variance_clipped", t)
        log_variance = frac * self.gather("log_betas", t) + (1 - frac) * clipped_log_variance
        pred_xstart = self.gather("sqrt_recip_alphas_cumprod", t) * x_t - self.gather("sqrt_recipm1_alphas_cumprod", t) * frozen_eps
        mean = self.posterior_mean(pred_xstart, x_t, t)
        true_mean = self.posterior_mean(x_start, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, clipped_log_variance, mean, log_variance)) / LOG_2
        decoder_nll = -_mean_flat(discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_variance)) / LOG_2
        vb = jnp.where(t == 0, decoder_nll, kl) * (self.num_timesteps / 1000.0)
        return {"loss": mse + vb, "mse": mse, "vb": vb}


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
