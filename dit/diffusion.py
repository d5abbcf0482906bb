"""Gaussian diffusion as the DiT paper trains and samples it (Ho et al. 2020; Nichol & Dhariwal 2021).

Forward process: q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), with a linear beta schedule
from 1e-4 to 0.02 over 1000 steps and abar_t = prod_{s<=t} (1 - beta_s). All tables are float64
numpy arrays (`ScheduleTables`); a value is gathered at the batch's timesteps and cast to float32
only at use, as the published code does.

Model output: epsilon, and with learn_sigma a second set of channels v in [-1, 1] that interpolates
the reverse-step log variance between the clipped posterior log variance and log beta_t:
    log sigma_t^2 = frac * log beta_t + (1 - frac) * log beta~_t,   frac = (v + 1) / 2.
Loss: mean-squared error on epsilon, plus with learn_sigma the variational-bound term in bits
per dimension computed on a detached mean (so it trains the variance only): KL(q(x_{t-1}|x_t,x_0)
|| p(x_{t-1}|x_t)) for t > 0 and the discretized Gaussian decoder NLL of x_0 at t = 0.

Sampling runs on a respaced schedule (`space_timesteps`): "250" keeps 250 evenly strided steps
including 0 and 999, "ddimN" a fixed stride; the betas are recomputed from the kept abar values and
the model is always fed the original timestep indices. `sample_images` draws class-conditional
samples with the ancestral DDPM sampler or DDIM, with classifier-free guidance through the model's
`forward_with_cfg` and its null class, reproducibly from a seed.

Every piece of math is a small function of explicit tensors so another implementation (the JAX
training step) can be checked against it term by term.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch

NUM_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02
SAMPLERS = ("ddpm", "ddim")


# ----------------------------------------------------------------------------- schedule tables
def linear_beta_schedule(num_timesteps=NUM_TIMESTEPS):
    """float64 betas, linear from 1e-4 to 0.02 when num_timesteps is 1000 (scaled so that other
    lengths keep the same total noise, as in the published schedule)."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * BETA_START, scale * BETA_END, num_timesteps, dtype=np.float64)


@dataclass(frozen=True)
class ScheduleTables:
    """Per-timestep float64 tables of one beta schedule, indexed by t in [0, len(betas))."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    log_betas: np.ndarray
    fixed_large_log_variance: np.ndarray  # used without learn_sigma: log beta_t, with beta~_1 at t=0

    @property
    def num_timesteps(self):
        return len(self.betas)


def schedule_tables(betas):
    """All the tables the losses and samplers read, from a float64 beta schedule."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0 or not ((betas > 0) & (betas <= 1)).all():
        raise ValueError(f"betas must be a non-empty 1-D array with values in (0, 1], got shape {betas.shape}")
    alphas_cumprod = np.cumprod(1.0 - betas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # beta~_0 is 0; its log is replaced by beta~_1's so the interpolation stays finite at t=0
    # (a one-step schedule has no beta~_1 and takes beta_0: t=0 adds no noise either way).
    clipped = np.append(posterior_variance[1], posterior_variance[1:]) if len(betas) > 1 else betas
    return ScheduleTables(
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=np.log(clipped),
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
        log_betas=np.log(betas),
        # a one-step schedule has no beta~_1 and keeps beta_0
        fixed_large_log_variance=np.log(np.append(posterior_variance[1], betas[1:])) if len(betas) > 1 else np.log(betas),
    )


def gather(table, t, ndim):
    """table[t] as float32 on t's device, shaped (N, 1, ..., 1) to broadcast against an ndim tensor."""
    values = on_device(table, t.device)[t].float()
    return values.reshape(values.shape + (1,) * (ndim - values.dim()))


# (id(array), device) -> (array, its copy there); the entry holds the array, so its id stays its own
_DEVICE_COPIES = {}
_MOST_DEVICE_COPIES = 512


def on_device(array, device):
    """A numpy table as a tensor on `device`, copied there once: a fresh host-to-device copy at
    each use would wait for the GPU (a blocking copy synchronizes), a dozen times per sampling
    step and per training step. On the CPU the tensor shares the array's memory."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.from_numpy(array)
    key = (id(array), device)
    if key not in _DEVICE_COPIES:
        if len(_DEVICE_COPIES) >= _MOST_DEVICE_COPIES:  # many diffusions built in one process: drop the oldest
            del _DEVICE_COPIES[next(iter(_DEVICE_COPIES))]
        _DEVICE_COPIES[key] = (array, torch.from_numpy(array).to(device))
    return _DEVICE_COPIES[key][1]


# ----------------------------------------------------------------------------- respacing
def space_timesteps(num_timesteps, spacing):
    """The sorted original timesteps a respaced sampler keeps.

    spacing: "" (all), "N" (N evenly strided steps including 0 and num_timesteps-1), "a,b,c" (the
    range cut in equal sections, a/b/c evenly strided steps in each), or "ddimN" (a fixed stride
    giving exactly N steps from 0).
    """
    spacing = str(spacing).strip()
    if not spacing:
        return list(range(num_timesteps))
    if spacing.startswith("ddim"):
        wanted = _positive_int(spacing[4:], spacing)
        for stride in range(1, num_timesteps + 1):
            if len(range(0, num_timesteps, stride)) == wanted:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"no fixed stride gives exactly {wanted} of {num_timesteps} steps for {spacing!r}")
    counts = [_positive_int(part, spacing) for part in spacing.split(",")]
    size, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for index, count in enumerate(counts):
        section = size + (1 if index < extra else 0)
        if count > section:
            raise ValueError(f"cannot keep {count} steps of a section of {section} ({spacing!r} over {num_timesteps})")
        stride = (section - 1) / (count - 1) if count > 1 else 1
        # the position is a running sum, as published: its float rounding decides the steps
        # that land on .5 (21 steps keep 499, not 500), and with it which steps a sample takes
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += section
    return sorted(set(kept))


def _positive_int(text, spacing):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"bad timestep respacing {spacing!r}: expected e.g. '250', '10,20' or 'ddim50'")
    return value


def respaced_betas(alphas_cumprod, kept):
    """Betas of the chain that visits only `kept`: 1 - abar[k_i] / abar[k_{i-1}] (abar before 0 is 1)."""
    kept_alphas = np.asarray(alphas_cumprod, dtype=np.float64)[list(kept)]
    previous = np.append(1.0, kept_alphas[:-1])
    return 1.0 - kept_alphas / previous


# ----------------------------------------------------------------------------- closed-form math
def q_sample(tables, x_start, t, noise):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    return (gather(tables.sqrt_alphas_cumprod, t, x_start.dim()) * x_start
            + gather(tables.sqrt_one_minus_alphas_cumprod, t, x_start.dim()) * noise)


def q_posterior_mean_variance(tables, x_start, x_t, t):
    """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
    ndim = x_t.dim()
    mean = gather(tables.posterior_mean_coef1, t, ndim) * x_start + gather(tables.posterior_mean_coef2, t, ndim) * x_t
    return mean, gather(tables.posterior_variance, t, ndim), gather(tables.posterior_log_variance_clipped, t, ndim)


def predict_xstart_from_eps(tables, x_t, t, eps):
    """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    ndim = x_t.dim()
    return gather(tables.sqrt_recip_alphas_cumprod, t, ndim) * x_t - gather(tables.sqrt_recipm1_alphas_cumprod, t, ndim) * eps


def predict_eps_from_xstart(tables, x_t, t, x_start):
    ndim = x_t.dim()
    return (gather(tables.sqrt_recip_alphas_cumprod, t, ndim) * x_t - x_start) / gather(tables.sqrt_recipm1_alphas_cumprod, t, ndim)


def learned_range_log_variance(tables, t, variance_values):
    """frac * log beta_t + (1 - frac) * log beta~_t (clipped), frac = (v + 1) / 2."""
    ndim = variance_values.dim()
    frac = (variance_values + 1) / 2
    return frac * gather(tables.log_betas, t, ndim) + (1 - frac) * gather(tables.posterior_log_variance_clipped, t, ndim)


def fixed_large_log_variance(tables, t, ndim):
    return gather(tables.fixed_large_log_variance, t, ndim)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """A fast tanh approximation of the standard normal CDF (max error ~3e-4)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) of data in [-1, 1] quantized to 256 levels under N(means, e^(2 log_scales)); the
    edge bins take the tails."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_flat(tensor):
    """Mean over every dimension but the batch."""
    return tensor.mean(dim=list(range(1, tensor.dim())))


def variational_bound_bits(tables, x_start, x_t, t, model_mean, model_log_variance):
    """The per-sample variational-bound term in bits per dimension: the decoder NLL at t=0, the
    KL between the true posterior and the model's reverse step otherwise."""
    true_mean, _, true_log_variance = q_posterior_mean_variance(tables, x_start, x_t, t)
    kl = mean_flat(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)) / math.log(2.0)
    decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_variance)) / math.log(2.0)
    return torch.where(t == 0, decoder_nll, kl)


# ----------------------------------------------------------------------------- the diffusion object
class GaussianDiffusion:
    """One (possibly respaced) diffusion: training losses, the reverse-step distribution and the
    DDPM / DDIM sampling loops. `timestep_map[i]` is the original timestep of respaced step i;
    the model always sees original indices."""

    def __init__(self, betas, learn_sigma=True, timestep_map=None):
        self.tables = schedule_tables(betas)
        self.learn_sigma = learn_sigma
        self.num_timesteps = self.tables.num_timesteps
        self.timestep_map = np.asarray(timestep_map if timestep_map is not None else range(self.num_timesteps), dtype=np.int64)

    def model_timesteps(self, t):
        return on_device(self.timestep_map, t.device)[t]

    def split_model_output(self, model_output, x):
        """(eps, variance values or None), with a clear error when the model's channels don't fit."""
        channels = x.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if model_output.shape[0] != x.shape[0] or model_output.shape[1] != expected or model_output.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"model output has shape {tuple(model_output.shape)}, expected {(x.shape[0], expected) + tuple(x.shape[2:])} "
                f"(learn_sigma={self.learn_sigma}); build the model and the diffusion with the same learn_sigma")
        if self.learn_sigma:
            return model_output[:, :channels], model_output[:, channels:]
        return model_output, None

    def reverse_step_distribution(self, model_output, x_t, t, clip_denoised=False):
        """Mean, log variance and predicted x_0 of p(x_{t-1} | x_t) from the model's raw output."""
        eps, variance_values = self.split_model_output(model_output, x_t)
        if variance_values is not None:
            log_variance = learned_range_log_variance(self.tables, t, variance_values)
        else:
            log_variance = fixed_large_log_variance(self.tables, t, x_t.dim()).expand_as(x_t)
        pred_xstart = predict_xstart_from_eps(self.tables, x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = q_posterior_mean_variance(self.tables, pred_xstart, x_t, t)
        return mean, log_variance, pred_xstart

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-sample losses at timesteps t: dict(loss, mse, vb), each (N,); vb is 0 without learn_sigma."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = q_sample(self.tables, x_start, t, noise)
        model_output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        return self.losses_from_output(model_output, x_start, x_t, t, noise)

    def losses_from_output(self, model_output, x_start, x_t, t, noise):
        eps, variance_values = self.split_model_output(model_output, x_t)
        mse = mean_flat((noise - eps.float()) ** 2)
        if variance_values is None:
            vb = torch.zeros_like(mse)
        else:
            # The bound trains only the variance: its mean comes from a detached epsilon.
            frozen = torch.cat([eps.detach(), variance_values], dim=1).float()
            mean, log_variance, _ = self.reverse_step_distribution(frozen, x_t, t)
            # Unscaled for a respaced diffusion too: the published DiT trains with the plain MSE
            # loss type, which leaves the bound as it is (only its RESCALED_MSE rescales it).
            vb = variational_bound_bits(self.tables, x_start, x_t, t, mean, log_variance)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def ddpm_step(self, model_output, x_t, t, noise, clip_denoised=False):
        """One ancestral step x_t -> x_{t-1} = mean + sigma * noise (no noise at t=0)."""
        mean, log_variance, pred_xstart = self.reverse_step_distribution(model_output, x_t, t, clip_denoised)
        nonzero = (t != 0).float().reshape(-1, *([1] * (x_t.dim() - 1)))
        return mean + nonzero * torch.exp(0.5 * log_variance) * noise, pred_xstart

    def ddim_step(self, model_output, x_t, t, noise, eta=0.0, clip_denoised=False):
        """One DDIM step (Song et al. 2021); eta=0 is deterministic, eta=1 matches DDPM's variance beta~."""
        _, _, pred_xstart = self.reverse_step_distribution(model_output, x_t, t, clip_denoised)
        eps = predict_eps_from_xstart(self.tables, x_t, t, pred_xstart)
        ndim = x_t.dim()
        alpha_bar = gather(self.tables.alphas_cumprod, t, ndim)
        alpha_bar_prev = gather(self.tables.alphas_cumprod_prev, t, ndim)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean = pred_xstart * torch.sqrt(alpha_bar_prev) + torch.sqrt((1 - alpha_bar_prev - sigma ** 2).clamp(min=0)) * eps
        nonzero = (t != 0).float().reshape(-1, *([1] * (ndim - 1)))
        return mean + nonzero * sigma * noise, pred_xstart

    def sample_loop(self, model_fn, noise, generator, sampler="ddpm", eta=0.0, clip_denoised=False, progress=False):
        """Run the reverse chain from `noise` (x_T); model_fn(x, original_t) -> raw model output."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not 0.0 <= eta <= 1.0:  # past 1 the DDIM step's clamp hides a variance beyond DDPM's
            raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM's variance), got {eta}")
        x = noise
        steps = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=f"{sampler} sampling", leave=False, disable=None)  # None: off in logs (no TTY)
        for index in steps:
            t = torch.full((x.shape[0],), index, device=x.device, dtype=torch.long)
            with torch.no_grad():
                output = model_fn(x, self.model_timesteps(t)).float()
                step_noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                if sampler == "ddpm":
                    x, _ = self.ddpm_step(output, x, t, step_noise, clip_denoised)
                else:
                    x, _ = self.ddim_step(output, x, t, step_noise, eta, clip_denoised)
        return x


def create_diffusion(timestep_respacing="", learn_sigma=True, num_timesteps=NUM_TIMESTEPS):
    """The DiT diffusion: linear schedule, epsilon prediction, learned-range variance and the
    hybrid loss when learn_sigma (plain MSE otherwise), optionally respaced for sampling."""
    betas = linear_beta_schedule(num_timesteps)
    kept = space_timesteps(num_timesteps, timestep_respacing)
    if len(kept) == num_timesteps:
        return GaussianDiffusion(betas, learn_sigma=learn_sigma)
    alphas_cumprod = np.cumprod(1.0 - betas)
    return GaussianDiffusion(respaced_betas(alphas_cumprod, kept), learn_sigma=learn_sigma, timestep_map=kept)


# ----------------------------------------------------------------------------- sampling images
def _unwrap(model):
    """The DiT under DDP / torch.compile wrappers (for its attributes; calls go through `model`)."""
    inner = model
    for attribute in ("_orig_mod", "module", "_orig_mod"):
        inner = getattr(inner, attribute, inner)
    return inner


def check_sampling_request(num_steps, cfg_scale, label_dropout):
    """What both sample_images (torch and JAX) refuse before sampling; label_dropout: the
    model's training rate (0: no null class to guide against)."""
    if not 1.0 <= cfg_scale < math.inf:
        raise ValueError(f"cfg_scale must be a finite number >= 1.0 (1.0 = no guidance), got {cfg_scale}")
    if not 1 <= num_steps <= NUM_TIMESTEPS:
        raise ValueError(f"num_steps must lie in 1..{NUM_TIMESTEPS}, got {num_steps}")
    if cfg_scale != 1.0 and label_dropout <= 0:
        raise ValueError("classifier-free guidance needs a model trained with label dropout (it has no null class); use cfg_scale=1.0")


def sample_images(model, class_labels, num_steps=250, cfg_scale=4.0, sampler="ddpm", eta=0.0, seed=0,
                  progress=False, guide_all_channels=False, clip_denoised=False):
    """Class-conditional samples (N, C, H, W) in the model's space (latents or pixels).

    cfg_scale 1.0 runs the conditional model alone; above 1 the batch is doubled with the null
    class and guided through `forward_with_cfg`. The same seed gives the same images. A model
    with fewer than 3 input channels is always guided on all of them (the published 3-channel
    guidance assumes 4-channel latents). clip_denoised clamps predicted x_0 to [-1, 1] (pixels).
    """
    dit = _unwrap(model)
    check_sampling_request(num_steps, cfg_scale, dit.y_embedder.dropout_prob)
    guided = cfg_scale != 1.0
    weight = dit.x_embedder.proj.weight
    device = weight.device
    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).to(device)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= dit.num_classes):
        raise ValueError(f"class labels must lie in 0..{dit.num_classes - 1}, got {labels.tolist()}")
    diffusion = create_diffusion(str(num_steps), learn_sigma=dit.learn_sigma)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    shape = (labels.numel(), dit.in_channels, dit.input_size, dit.input_size)
    noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        if guided:
            all_channels = guide_all_channels or dit.in_channels < 3
            null = torch.full_like(labels, dit.num_classes)
            both_labels = torch.cat([labels, null])

            # through the wrapper where it passes the method on (torch.compile), else the DiT's (DDP)
            guide = getattr(model, "forward_with_cfg", dit.forward_with_cfg)

            def model_fn(x, t):
                return guide(x.to(weight.dtype), t, both_labels, cfg_scale, guide_all_channels=all_channels)

            samples = diffusion.sample_loop(model_fn, torch.cat([noise, noise]), generator, sampler, eta, clip_denoised, progress)
            return samples[: labels.numel()]

        def model_fn(x, t):
            return model(x.to(weight.dtype), t, labels)

        return diffusion.sample_loop(model_fn, noise, generator, sampler, eta, clip_denoised, progress)
    finally:
        model.train(was_training)
