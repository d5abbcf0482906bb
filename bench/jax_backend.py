"""The `jax` backend rows of `fusedit bench`: the JAX DiT's forward and training-step
throughput under jit, with the same weights as the PyTorch rows.

    ok, why = jax_available()
    runner = build_jax_runner("DiT-XL/2", 256, 32, "bf16", torch_state_dict, kernels="xla")
    out = runner.forward(x, t, y)           # numpy, blocks until done; compiles on the first call
    loss = runner.train_step(x, y, seed)    # one sharded AdamW + EMA step; blocks until done
    images = runner.sample(labels, num_steps=250, cfg_scale=4.0, seed=0)  # the guided DDPM loop
    out, grads = runner.output_and_gradients(x, t, y, cotangent)  # grads keyed like the torch DiT

kernels="xla" runs everywhere; kernels="pallas" needs a TPU (elsewhere Pallas only
interprets its kernels, and an interpreter's time is never a speed number).
"""
import math

import numpy as np

DTYPE_NAMES = ("fp32", "bf16", "fp16")
VAE_DOWNSAMPLE = 8


def jax_available():
    """(True, "") when the JAX DiT can run here, else (False, why)."""
    try:
        import jax

        import fusedit.dit.jax  # noqa: F401
        import fusedit.train.jax_train  # noqa: F401
    except ImportError as error:
        return False, f"JAX is not installed ({error}); pip install -e '.[jax]'"
    try:
        devices = jax.devices()
    except RuntimeError as error:  # a broken backend install raises here, not at import
        return False, f"JAX found no usable device ({error})"
    return True, f"jax {jax.__version__} on {len(devices)} {devices[0].platform} device(s)"


def model_input_size(model_name, image_size, torch_state_dict=None, patch_size=None):
    """The DiT's input side: read off the weights' pos_embed when there is one (it fixes the
    token grid), else the VAE latents of an image_size-pixel image (image_size / 8)."""
    if torch_state_dict is not None and "pos_embed" in torch_state_dict:
        tokens = torch_state_dict["pos_embed"].shape[1]
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"pos_embed holds {tokens} tokens, not a square grid")
        return side * (patch_size or int(model_name.rsplit("/", 1)[1]))
    if image_size % VAE_DOWNSAMPLE:
        raise ValueError(f"image_size {image_size} must be a multiple of {VAE_DOWNSAMPLE} (the VAE's downsampling)")
    return image_size // VAE_DOWNSAMPLE


class JaxRunner:
    """One JAX DiT, compiled for forward and training on every local device (a data x fsdp mesh)."""

    def __init__(self, model, dtype_name, batch_size, label_dropout):
        import jax
        import jax.numpy as jnp

        from fusedit.train.jax_train import COMPILER_OPTIONS, COMPUTE_DTYPES, JaxTrainer, make_mesh

        self._jax, self.dtype_name, self.batch_size = jax, dtype_name, batch_size
        self.label_dropout = label_dropout
        self.trainer = JaxTrainer(model, make_mesh(), compute_dtype=COMPUTE_DTYPES[dtype_name])
        self.num_classes = model.num_classes
        if batch_size % self.trainer.shards:
            raise ValueError(f"batch size {batch_size} does not split over the {self.trainer.shards} JAX devices")
        self.state = self.trainer.init_state()
        # inference weights cast once, like a torch model.to(dtype)
        dtype = COMPUTE_DTYPES[dtype_name]
        self.inference_params = jax.jit(lambda params: jax.tree.map(lambda leaf: leaf.astype(dtype), params),
                                        out_shardings=self.trainer.state_shardings["params"])(self.state["params"])
        self._jnp = jnp
        self._compiler_options, self._samplers, self._gradients = COMPILER_OPTIONS, {}, None
        device = jax.devices()[0]
        self.device_name = f"{getattr(device, 'device_kind', device.platform)} (jax {jax.__version__}, " \
                           f"{len(jax.devices())} device(s))"

    def _batch(self, **arrays):
        return self.trainer.global_batch(**arrays)

    def place(self, x, t=None, y=None):
        """NCHW x and int t, y (numpy; t may be None) as a batch on the devices: what the timed
        calls take, so that they time the model, not host-to-device copies (the torch rows'
        inputs live on their device too)."""
        arrays = {"x": np.asarray(x, np.float32), "y": np.asarray(y, np.int32)}
        if t is not None:
            arrays["t"] = np.asarray(t, np.int32)
        return self._batch(**arrays)

    def forward_and_wait(self, batch):
        """The model output (on the devices) for a placed batch, once computed."""
        return self.trainer.forward(self.inference_params, batch["x"], batch["t"], batch["y"]).block_until_ready()

    def train_step_and_wait(self, batch, seed):
        """One training step on a placed batch (timesteps, noise and label dropout drawn from
        `seed`), returning once the new weights are computed; the loss, on the devices."""
        drawn = self.trainer.random_batch(self._jax.random.key(int(seed)), batch["x"], batch["y"], self.label_dropout)
        self.state, metrics = self.trainer.step(self.state, drawn)
        return self._jax.block_until_ready((self.state, metrics["loss"]))[1]

    def forward(self, x, t, y):
        """Model output for NCHW float32 x and int t, y (numpy) as a float32 numpy array."""
        out = self.forward_and_wait(self.place(x, t, y))
        return np.array(out.astype(self._jnp.float32))  # a writable host copy

    def train_step(self, x, y, seed):
        """One training step on (x, y) with timesteps/noise/label dropout drawn from `seed`; the loss."""
        return float(self.train_step_and_wait(self.place(x, y=y), seed))

    def sample(self, labels, num_steps=250, cfg_scale=4.0, seed=0):
        """Guided DDPM samples (N, C, H, W) float32 numpy for class `labels`: the loop of
        fusedit.dit.jax.diffusion.sample_images in one compiled program, its noise drawn from
        `seed`."""
        labels = np.asarray(labels, np.int32).reshape(-1)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"class labels must lie in 0..{self.num_classes - 1}, got {labels.tolist()}")
        run = self.compile_sampler(labels.size, num_steps, cfg_scale)
        with self._jax.set_mesh(self.trainer.mesh):
            return np.array(run(self.inference_params, self.trainer.constants, labels, np.uint32(seed)))

    def compile_sampler(self, count, num_steps=250, cfg_scale=4.0):
        """The sampling program for `count` labels, compiled ahead of time once per (count,
        num_steps, cfg_scale): a benchmark's warm-up, without running the loop."""
        from flax import nnx

        from fusedit.dit.jax.diffusion import sample_images

        jax = self._jax
        key = (int(count), int(num_steps), float(cfg_scale))
        if key not in self._samplers:
            def run(params, constants, labels, seed):
                model = nnx.merge(self.trainer.graphdef, params, constants)
                return sample_images(model, labels, jax.random.key(seed), num_steps=key[1], cfg_scale=key[2])

            arguments = (self.inference_params, self.trainer.constants, np.zeros(key[0], np.int32), np.uint32(0))
            with jax.set_mesh(self.trainer.mesh):
                self._samplers[key] = jax.jit(run).lower(*arguments).compile(self._compiler_options)
        return self._samplers[key]

    def output_and_gradients(self, x, t, y, cotangent):
        """(output, gradients) of sum(model(x, t, y) * cotangent) over the float32 weights:
        output a float32 numpy array, gradients {torch state-dict key: float32 CPU tensor}."""
        from flax import nnx

        from fusedit.dit.jax import to_torch_state_dict

        jax, jnp = self._jax, self._jnp
        if self._gradients is None:
            def run(params, constants, x, t, y, cotangent):
                def weighted_sum(params):
                    model = nnx.merge(self.trainer.graphdef, params, constants)
                    output = model(x.astype(self.trainer.compute_dtype), t, y)
                    return jnp.sum(output.astype(jnp.float32) * cotangent), output

                (_, output), grads = jax.value_and_grad(weighted_sum, has_aux=True)(params)
                return output.astype(jnp.float32), grads

            self._gradients = jax.jit(run, compiler_options=self._compiler_options)
        batch = self._batch(x=np.asarray(x, np.float32), t=np.asarray(t, np.int32), y=np.asarray(y, np.int32),
                            cotangent=np.asarray(cotangent, np.float32))
        with jax.set_mesh(self.trainer.mesh):
            output, grads = self._gradients(self.state["params"], self.trainer.constants,
                                            *(batch[name] for name in ("x", "t", "y", "cotangent")))
        return np.array(output), to_torch_state_dict(grads)

    def peak_memory_bytes(self):
        """Peak device memory in use (first device), or None where the backend does not report it."""
        stats = self._jax.devices()[0].memory_stats()
        return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def build_jax_runner(model_name, image_size, batch_size, dtype_name, torch_state_dict, kernels="xla",
                     num_classes=1000, in_channels=4, learn_sigma=True, **overrides):
    """A JaxRunner for DiT config `model_name` at `image_size` pixels (see model_input_size),
    holding `torch_state_dict` (a PyTorch DiT state dict; None: the DiT's own
    initialization), running in dtype_name ("fp32" | "bf16" | "fp16"); overrides: other DiT
    arguments of the config (block="cross_attn", ...)."""
    ok, why = jax_available()
    if not ok:
        raise RuntimeError(why)
    import jax
    from flax import nnx

    from fusedit.dit.jax import create_model, from_torch_state_dict
    from fusedit.kernels.pallas import JAX_KERNEL_BACKENDS

    if dtype_name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype_name!r}; choose one of {', '.join(DTYPE_NAMES)}")
    if kernels not in JAX_KERNEL_BACKENDS:
        raise ValueError(f"unknown JAX kernels {kernels!r}; choose one of {', '.join(JAX_KERNEL_BACKENDS)}")
    if kernels == "pallas":
        if jax.default_backend() != "tpu":
            raise RuntimeError(f"kernels='pallas' compiles for TPU only; on {jax.default_backend()} Pallas interprets "
                               "its kernels, which is not a speed number (the JAX rows use kernels='xla' here)")
        if dtype_name == "fp16":
            raise ValueError("the Pallas kernels support fp32 and bf16, not fp16")
    input_size = model_input_size(model_name, image_size, torch_state_dict, overrides.get("patch_size"))
    config = dict(overrides, num_classes=num_classes, in_channels=in_channels, learn_sigma=learn_sigma, kernels=kernels)
    if torch_state_dict is None:
        model = create_model(model_name, input_size=input_size, rngs=nnx.Rngs(0), **config)
    else:
        model = from_torch_state_dict(model_name, torch_state_dict, input_size=input_size, **config)
    return JaxRunner(model, dtype_name, batch_size, label_dropout=model.class_dropout_prob)
