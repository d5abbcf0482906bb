"""Whole-model benchmark rows: what each way of running a DiT buys, per config.

For every (model config, image size, dtype, batch size) and every backend, one record:
Gflops per image and parameters (fusedit.dit.flops, the paper's counting); forward and
training-step throughput (forward + backward + AdamW step on the DiT's diffusion loss)
with their MFU and peak memory; sampling throughput (the whole guided DDPM loop); and the
backend's numerical parity with `reference` in fp32 on the same weights and inputs.

All rows of a config share one set of weights, drawn at random in full (the published
init zeroes the adaLN and final layers, which would make every backend's output equal
to the reference's trivially), and the same inputs: random, never zero, rotated between
repetitions.

dtype is the dtype of weights and activations alike: a bf16 or fp16 row holds its weights
in that dtype, and its training step is AdamW on them (no fp32 master copy, no autocast,
no loss scaling). It measures what the kernels cost in that dtype, not a mixed-precision
recipe (`fusedit train --precision` uses autocast over fp32 weights).

MFU counts 2 flops per multiply-add: a forward is 2 x Gflops per image, a training step
6 x Gflops (the backward costs twice the forward); the peak is the device's dense peak for
the dtype (fusedit.bench.devices), or a measured large matmul.

Backends: reference (eager PyTorch, the published math), sdpa (attention through
F.scaled_dot_product_attention), compile (torch.compile of the reference model), xformers,
triton (fusedit's fused kernels), triton-compile (torch.compile of the model on fusedit's
kernels: the custom ops stay whole and the compiler fuses everything between them) and jax
(the JAX model under jit, through fusedit.bench.jax_backend). A backend that cannot run
here becomes a row with status "unavailable" and the reason, never an exception.
"""
import contextlib
import copy
import math
import os
from dataclasses import dataclass, replace

import torch

from fusedit.dit.flops import VAE_DOWNSAMPLE, count_gflops, flops_row
from fusedit.kernels import get_ops, tf32_matmuls
from fusedit.kernels.testing import one_config_per_autotuned_kernel, randomize_parameters_, relative_error

from .configs import (build_model, check_choices, check_device, check_options, check_seed, compile_label,
                      compile_options, default_device, enable_triton_interpreter_on_cpu, free_memory, model_arguments,
                      model_label, model_sizes, non_negative_int, note_error, positive_int, run_grid)
from .devices import DTYPES, matmul_peak
from .environment import environment
from .report import progress_bar
from .timing import memory_kind, peak_memory_bytes, reset_peak_memory, synchronize, time_calls

# The compiled backends run after the eager ones: a max-autotune build takes minutes at
# DiT-XL/2, and a run cut short (a time limit, Ctrl-C) has then already written the other
# rows (see on_record). jax runs last: XLA's allocator keeps the GPU memory it grew (tens of
# GB for a DiT-XL/2 training step) until the process ends, starving any torch row after it.
BACKENDS = ("reference", "sdpa", "xformers", "triton", "compile", "triton-compile", "jax")
# compiled backend -> the op set of the model it compiles
COMPILED_OPS = {"compile": "reference", "triton-compile": "triton"}
# incomplete: the files' copy of the row in progress, which a stopped run leaves behind
STATUSES = ("ok", "unavailable", "skipped", "interpreter", "error", "incomplete")
NUM_TIMESTEPS = 1000
INPUT_SETS = 3  # inputs are tiny next to the weights; rotating three keeps every call fresh


def backend_ops(backend):
    """The fusedit.kernels op set a torch backend's model runs on."""
    return COMPILED_OPS.get(backend, backend)


@dataclass(frozen=True)
class Settings:
    """How a benchmark runs; `default_settings(device)` fills the per-device defaults."""
    device: str
    warmup: int
    repeats: int
    compile_mode: str
    compile_backend: str = "inductor"
    train: bool = True
    sample: bool = True
    sample_steps: int = 250
    sample_batch_size: int | None = None  # None: half the batch, so the CFG batch is the batch
    sample_repeats: int = 1
    cfg_scale: float = 4.0
    parity: bool = True
    parity_batch_size: int = 2
    measure_peak: bool | None = None  # None: the table, or a measured matmul for unknown devices
    time_interpreter: bool = False
    seed: int = 0


def default_settings(device=None):
    """GPU: the paper's DiT-XL/2 regime. CPU: small enough for a laptop in a couple of minutes."""
    device = device or default_device()
    if torch.device(device).type == "cuda":
        return Settings(device=device, warmup=5, repeats=20, compile_mode="max-autotune", sample_steps=250)
    return Settings(device=device, warmup=1, repeats=3, compile_mode="default", sample_steps=5, sample_batch_size=1)


def default_run(device=None):
    """models, dtype and batch size of a run with no arguments, per device."""
    device = device or default_device()
    if torch.device(device).type == "cuda":
        return {"models": ["DiT-XL/2"], "dtype": "bf16", "batch_size": 64, "image_size": 256}
    return {"models": ["DiT-S/2"], "dtype": "fp32", "batch_size": 2, "image_size": 256}


def resolve_settings(device=None, **options):
    """default_settings(device) with `options` (fields of Settings) replacing defaults, checked."""
    device = check_device(device or default_device())
    check_options(options, Settings)
    return check_settings(replace(default_settings(device), device=device, **options))


def check_settings(settings):
    positive_int("repeats", settings.repeats)
    non_negative_int("warmup", settings.warmup)
    positive_int("sample repeats", settings.sample_repeats)
    positive_int("parity batch size", settings.parity_batch_size)
    if settings.sample_batch_size is not None:
        positive_int("sample batch size", settings.sample_batch_size)
    if not 1 <= settings.sample_steps <= NUM_TIMESTEPS:
        raise ValueError(f"sample steps must lie in 1..{NUM_TIMESTEPS}, got {settings.sample_steps}")
    if not (math.isfinite(settings.cfg_scale) and settings.cfg_scale >= 1.0):
        raise ValueError(f"cfg scale must be a finite number >= 1.0 (1.0 = no guidance), got {settings.cfg_scale}")
    check_seed(settings.seed)
    check_device(settings.device)
    return settings


# ---- models, weights and inputs ------------------------------------------------------

def gflops_info(model, image_size):
    """gflops_per_image, params, tokens and the paper's figure, counted as `fusedit flops` does."""
    if isinstance(model, str) or set(model) <= {"name", "config", "block"}:  # a config, in any block design
        row = flops_row(model, image_size) if isinstance(model, str) else \
            flops_row(model["config"], image_size, model.get("block", "adaln_zero"))
        return {"gflops_per_image": row["gflops"], "params": row["params"], "tokens": row["tokens"],
                "paper_gflops": row["paper_gflops"]}
    dit = build_model(model, image_size, "cpu").eval()
    return {"gflops_per_image": count_gflops(dit), "params": sum(p.numel() for p in dit.parameters()),
            "tokens": (dit.input_size // dit.patch_size) ** 2, "paper_gflops": None}


def random_inputs(dit, batch_size, dtype, device, generator):
    """(x, t, y, noise): latents and noise N(0, 1), timesteps in 0..999, labels of real classes."""
    shape = (batch_size, dit.in_channels, dit.input_size, dit.input_size)
    x = torch.randn(shape, generator=generator, device=device).to(dtype)
    noise = torch.randn(shape, generator=generator, device=device).to(dtype)
    t = torch.randint(0, NUM_TIMESTEPS, (batch_size,), generator=generator, device=device)
    y = torch.randint(0, dit.num_classes, (batch_size,), generator=generator, device=device)
    return x, t, y, noise


def compile_model_(model, settings):
    """torch.compile the model's forward in place, so model(...) and forward_with_cfg (which
    calls self.forward) both run the compiled graph."""
    model.forward = torch.compile(model.forward, **compile_options(settings))
    return model


def _new_step(model):
    # CUDA-graph trees (compile's max-autotune mode) reuse output memory between calls;
    # marking each iteration tells them the previous outputs are dead. Only for a model
    # compile_model_ compiled: the call imports all of inductor.
    if "forward" in vars(model):
        torch.compiler.cudagraph_mark_step_begin()


# ---- records ------------------------------------------------------------------------

def new_record(config, backend, settings, env):
    """Every field of a model record (fusedit/bench/schema.json), unmeasured ones None."""
    return {
        "model": config.label, "image_size": config.image_size, "tokens": config.gflops["tokens"],
        "dtype": config.dtype, "batch_size": config.batch_size, "backend": backend,
        "status": "ok", "reason": None, "notes": [],
        "compile_mode": compile_label(settings) if backend in COMPILED_OPS else None,
        "gflops_per_image": config.gflops["gflops_per_image"], "paper_gflops": config.gflops["paper_gflops"],
        "params": config.gflops["params"],
        "forward_ms": None, "forward_ms_min": None, "forward_ms_max": None,
        "forward_images_per_s": None, "forward_mfu": None, "forward_peak_memory_bytes": None,
        "train_ms": None, "train_ms_min": None, "train_ms_max": None,
        "train_images_per_s": None, "train_mfu": None, "train_peak_memory_bytes": None,
        "sample_seconds": None, "sample_seconds_min": None, "sample_seconds_max": None,
        "sample_images_per_s": None, "sample_steps": None, "sample_batch_size": None, "sample_repeats": None,
        "cfg_scale": None,
        "parity_output_rel_error": None, "parity_grad_rel_error": None, "parity_batch_size": None,
        "peak_tflops": config.peak.tflops, "peak_source": config.peak.source,
        "memory_kind": memory_kind(settings.device),
        "warmup": settings.warmup, "repeats": settings.repeats,
        **env,
    }


def _why_above_peak(peak_source):
    if peak_source.startswith("measured"):
        return (f"the peak ({peak_source}) is one torch matmul, which this backend's own matmuls "
                "(another library's, on a CPU) or a busy machine at measuring time can leave behind")
    return f"the peak ({peak_source}) is below what this device did: check its clocks and the table entry"


def _fill_timing(record, prefix, timing, images, flops_per_image, peak_tflops):
    record[f"{prefix}_ms"] = timing.median_s * 1e3
    record[f"{prefix}_ms_min"] = timing.min_s * 1e3
    record[f"{prefix}_ms_max"] = timing.max_s * 1e3
    record[f"{prefix}_images_per_s"] = images / timing.median_s
    if peak_tflops and record["status"] != "interpreter":  # an interpreter's time (--time-interpreter) has no MFU
        mfu = record[f"{prefix}_mfu"] = flops_per_image * images / timing.median_s / (peak_tflops * 1e12)
        if mfu > 1:
            record["notes"].append(f"{prefix} MFU above 100%: {_why_above_peak(record['peak_source'])}")


# ---- one config ---------------------------------------------------------------------

@dataclass
class _Config:
    model: object  # a name or a custom dict
    label: str
    image_size: int
    dtype: str
    batch_size: int
    gflops: dict
    peak: object
    base: object = None  # the fp32 model with random weights every backend copies, on the CPU
    inputs: list = None
    parity_cases: dict = None

    @property
    def forward_flops_per_image(self):
        return 2.0 * self.gflops["gflops_per_image"] * 1e9

    @property
    def train_flops_per_image(self):
        return 3.0 * self.forward_flops_per_image


@dataclass
class _ParityCase:
    """The fp32 reference's output and parameter gradients on fixed inputs and cotangent."""
    base: object
    inputs: tuple
    cotangent: object
    output: object
    gradients: dict
    note: str | None


def _parity_case(config, settings, reduced):
    """The case every backend's parity is measured on; `reduced` is the interpreter's: one
    block and 16 tokens of the same widths (Triton's interpreter would take hours on the
    full model), batch 1."""
    cache = config.parity_cases
    if reduced in cache:
        return cache[reduced]
    device = settings.device
    if reduced:
        sizes = model_sizes(config.base)
        patch, full_latent = sizes["patch_size"], config.base.input_size
        latent = min(full_latent, 4 * patch)
        base = randomize_parameters_(build_model({**sizes, "depth": 1}, latent * VAE_DOWNSAMPLE, "cpu"), settings.seed + 1)
        batch = 1
        shrunk = [f"{sizes['depth']} -> 1 blocks" if sizes["depth"] > 1 else "",
                  f"{(full_latent // patch) ** 2} -> {(latent // patch) ** 2} tokens" if latent < full_latent else ""]
        shrunk = ", ".join(part for part in shrunk if part)
        note = f"parity in the interpreter on a reduced instance ({shrunk}, batch 1)" if shrunk else None
    else:
        base, batch, note = config.base, settings.parity_batch_size, None
    generator = torch.Generator(device=device).manual_seed(settings.seed + 2)
    x, t, y, _ = random_inputs(base, batch, torch.float32, device, generator)
    cotangent = torch.randn((batch, base.out_channels, base.input_size, base.input_size), generator=generator, device=device)
    reference = copy.deepcopy(base).to(device).eval()
    output = reference(x, t, y)
    (output * cotangent).sum().backward()
    # on the CPU, as the weights: kept for the rows after this one, they would count in their peak memory
    gradients = {name: p.grad.detach().cpu() for name, p in reference.named_parameters() if p.requires_grad}
    case = _ParityCase(base, (x, t, y), cotangent, output.detach(), gradients, note)
    cache[reduced] = case
    return case


def _torch_parity(record, case, model):
    model.eval()
    _new_step(model)
    output = model(*case.inputs)
    (output.float() * case.cotangent).sum().backward()
    record["parity_output_rel_error"] = relative_error(output, case.output)
    errors = [float("inf") if parameter.grad is None else relative_error(parameter.grad.cpu(), case.gradients[name])
              for name, parameter in model.named_parameters() if name in case.gradients]
    record["parity_grad_rel_error"] = max(errors)
    record["parity_batch_size"] = case.inputs[0].shape[0]
    if case.note:
        record["notes"].append(case.note)
    if not (math.isfinite(record["parity_output_rel_error"]) and math.isfinite(record["parity_grad_rel_error"])):
        record["notes"].append("parity: NaN or inf in the output or a gradient (or a gradient missing)")


def _torch_availability(backend, settings, explicit, triton_problem):
    """(status, reason) before building anything: ok, unavailable, skipped or interpreter."""
    on_cpu = torch.device(settings.device).type == "cpu"
    if backend in COMPILED_OPS and on_cpu and not explicit:
        return "skipped", f"torch.compile takes minutes to build a DiT on CPU; pass --backend {backend} to time it"
    ops = backend_ops(backend)
    if ops in ("reference", "sdpa"):
        return "ok", None
    if ops == "xformers" and on_cpu:
        return "unavailable", "xformers' memory_efficient_attention runs on CUDA only"
    if ops == "triton" and triton_problem:
        return "unavailable", triton_problem
    try:
        get_ops(ops)
    except Exception as error:  # ValueError from get_ops, or the triton package failing to import
        return "unavailable", f"{type(error).__name__}: {error}"
    if ops == "triton" and on_cpu:
        return "interpreter", "not a speed figure"
    return "ok", None


def _backend_model(base, backend, dtype, settings):
    """A copy of the shared weights in `dtype` on the benchmark's device, running through
    `backend`'s op set."""
    model = copy.deepcopy(base).to(device=settings.device, dtype=dtype).set_kernels(backend_ops(backend))
    return compile_model_(model, settings) if backend in COMPILED_OPS else model


def _run_torch_backend(config, backend, settings, record, progress):
    device = settings.device
    interpreted = record["status"] == "interpreter"  # before a failed measurement makes the row an error
    timed = record["status"] == "ok" or (interpreted and settings.time_interpreter)
    if timed:
        if backend in COMPILED_OPS:
            torch._dynamo.reset()  # each config compiles DiT.forward anew: stay clear of the recompile limit
        built = {}

        def forward():
            built["model"] = _backend_model(config.base, backend, DTYPES[config.dtype], settings)
            _time_forward(built["model"], config, settings, record)

        error = _measure(record, "forward", progress, device, forward)
        if error is not None:
            _fail(record, error)
        else:
            model = built["model"]
            if settings.sample:
                _measure(record, "sampling", progress, device, lambda: _time_sampling(model, config, settings, record))
            if settings.train:
                _measure(record, "train", progress, device, lambda: _time_train(model, config, settings, record))
            del model
        built.clear()
        free_memory(device)
    forward_ran = record["status"] in ("ok", "interpreter") or record["forward_ms"] is not None
    if settings.parity and backend != "reference" and forward_ran:
        reduced = interpreted

        parity_settings = settings
        if backend in COMPILED_OPS and settings.compile_backend == "inductor" and "max-autotune" in settings.compile_mode:
            # The fp32 copy has its own matmul shapes: autotuning them again would cost minutes.
            parity_settings = replace(settings, compile_mode="default")
            record["notes"].append("parity: the fp32 copy is compiled with mode=default (no GEMM autotuning)")

        def parity():
            # fp32 math, and fusedit's kernels untuned at the parity shapes: nothing here is timed
            untuned = one_config_per_autotuned_kernel() if backend_ops(backend) == "triton" else contextlib.nullcontext()
            with tf32_matmuls(False), untuned:
                case = _parity_case(config, settings, reduced)
                _torch_parity(record, case, _backend_model(case.base, backend, torch.float32, parity_settings))

        _measure(record, "parity", progress, device, parity)
        free_memory(device)


def _measure(record, what, progress, device, run):
    """Run one measurement; an exception becomes a note on the record (and is returned), not a
    crash. A failure after the forward makes the row an error (the run's exit status says so),
    keeping the figures measured around it; the caller handles a failed forward (_fail). Then
    the row so far goes to the output files (progress.measured)."""
    progress.describe(f"{record['model']} {record['dtype']} b{record['batch_size']} | {record['backend']} | {what}")
    failure = None
    try:
        run()
    except Exception as error:  # one failing measurement must not lose the others
        note_error(record, what, error)
        free_memory(device)
        failure = error
        if what != "forward" and record["status"] != "error":
            record["status"], record["reason"] = "error", f"{record['notes'].pop()} (the row's other figures stand)"
    progress.measured(record, what)  # not on Ctrl-C or SIGTERM: the files keep the row as it was
    return failure


class _RowProgress:
    """The progress bar, plus on_record after each measurement of a row with the row so far
    as "incomplete": a run stopped by a time limit mid-row (compile's autotuning, say) keeps
    that row's finished measurements in the files, saying which came last. The row's own
    status replaces it when the row ends."""

    def __init__(self, bar, records, on_record):
        self.bar, self.records, self.on_record = bar, records, on_record

    def describe(self, text):
        self.bar.describe(text)

    def measured(self, record, what):
        if self.on_record is None:
            return
        was = record["status"] + (f": {record['reason']}" if record["reason"] else "")
        reason = f"the run stopped after the {what} measurement; those after it are missing (the row was {was})"
        self.on_record(self.records + [{**record, "status": "incomplete", "reason": reason,
                                        "notes": list(record["notes"])}])


def _fail(record, error):
    """The row's first measurement failed: the backend cannot run here, or it broke."""
    record["status"] = "unavailable" if isinstance(error, NotImplementedError) else "error"
    record["reason"] = record["notes"].pop()


def _timed_with_memory(call, settings, record, prefix, images, flops_per_image, peak):
    for index in range(settings.warmup):
        call(index)
    synchronize(settings.device)
    reset_peak_memory(settings.device)
    # indices go on from the warm-up's, so the first timed call does not reuse its last input set
    timing = time_calls(lambda index: call(settings.warmup + index), settings.device, warmup=0,
                        repeats=settings.repeats)
    record[f"{prefix}_peak_memory_bytes"] = peak_memory_bytes(settings.device)
    _fill_timing(record, prefix, timing, images, flops_per_image, peak)


def _time_forward(model, config, settings, record):
    model.eval()
    inputs = config.inputs

    def call(index):
        x, t, y, _ = inputs[index % len(inputs)]
        _new_step(model)
        with torch.no_grad():
            model(x, t, y)

    _timed_with_memory(call, settings, record, "forward", config.batch_size, config.forward_flops_per_image,
                       config.peak.tflops)


def _time_train(model, config, settings, record):
    from fusedit.dit.diffusion import create_diffusion

    diffusion = create_diffusion(learn_sigma=model.learn_sigma)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    inputs, dtype = config.inputs, DTYPES[config.dtype]

    def in_model_dtype(x_t, t, **kwargs):
        return model(x_t.to(dtype), t, **kwargs)  # the noised latents come out of float32 schedule tables

    def call(index):
        x, t, y, noise = inputs[index % len(inputs)]
        _new_step(model)
        loss = diffusion.training_losses(in_model_dtype, x, t, {"y": y}, noise)["loss"].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        _timed_with_memory(call, settings, record, "train", config.batch_size, config.train_flops_per_image,
                           config.peak.tflops)
    finally:
        model.zero_grad(set_to_none=True)  # the optimizer's state goes with this function's scope


def _sample_batch_size(config, settings):
    return settings.sample_batch_size or max(1, config.batch_size // 2)


def _time_sampling(model, config, settings, record):
    from fusedit.dit.diffusion import sample_images

    count = _sample_batch_size(config, settings)
    labels = _sample_labels(model, count, settings)

    def run(steps):
        _new_step(model)
        return sample_images(model, labels, num_steps=steps, cfg_scale=settings.cfg_scale, sampler="ddpm",
                             seed=settings.seed)

    run(1)  # warm-up: compilation, autotuning, allocator growth
    timing = time_calls(lambda _: run(settings.sample_steps), settings.device, warmup=0,
                        repeats=settings.sample_repeats)
    _fill_sampling(record, timing, count, settings)


def _sample_labels(model, count, settings):
    """The class labels every backend's sampling rows draw for."""
    generator = torch.Generator(device="cpu").manual_seed(settings.seed + 3)
    return torch.randint(0, model.num_classes, (count,), generator=generator)


def _fill_sampling(record, timing, count, settings):
    record.update(sample_seconds=timing.median_s, sample_seconds_min=timing.min_s, sample_seconds_max=timing.max_s,
                  sample_images_per_s=count / timing.median_s, sample_steps=settings.sample_steps,
                  sample_batch_size=count, sample_repeats=settings.sample_repeats, cfg_scale=settings.cfg_scale)


# ---- the jax backend ------------------------------------------------------------------

def _jax_module(config, settings):
    """(fusedit.bench.jax_backend, None) or (None, the reason the jax row is unavailable)."""
    if not isinstance(config.model, str) and "config" not in config.model:
        return None, "the JAX runner builds the 12 named configs (and their variants, e.g. --block) only, not a custom model"
    # JAX would otherwise take 75% of the GPU at import and starve the torch rows after it.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        from . import jax_backend
    except Exception as error:  # not written yet, or jax itself failing to import
        return None, f"fusedit.bench.jax_backend is not importable ({type(error).__name__}: {error})"
    available, why = jax_backend.jax_available()
    if not available:
        return None, why
    import jax

    platform = jax.default_backend()
    wanted = torch.device(settings.device).type
    if (wanted == "cuda") != (platform in ("gpu", "cuda", "rocm")):
        return None, f"jax runs on {platform} here but this benchmark runs on {wanted}"
    return jax_backend, None


def _run_jax_backend(config, settings, record, progress):
    jax_backend, why = _jax_module(config, settings)
    if jax_backend is None:
        record["status"], record["reason"] = "unavailable", why
        return
    record["memory_kind"] = "JAX peak bytes in use since the runner started"
    state = {name: tensor.detach().cpu() for name, tensor in config.base.state_dict().items()}
    base = config.base

    name, overrides = config.model, {}
    if isinstance(name, dict):  # a named config with other settings
        name, overrides = name["config"], model_arguments(name)

    def build(batch_size, dtype_name):
        return jax_backend.build_jax_runner(name, config.image_size, batch_size, dtype_name, state,
                                            kernels="xla", **{**overrides, "num_classes": base.num_classes,
                                                              "in_channels": base.in_channels,
                                                              "learn_sigma": base.learn_sigma})

    inputs = [tuple(tensor.float().cpu().numpy() for tensor in batch) for batch in config.inputs]
    runners, placed = {}, []

    def timed():
        runner = runners["timed"] = build(config.batch_size, config.dtype)
        record["notes"].append(f"jax device: {runner.device_name}")
        placed.extend(runner.place(x, t, y) for x, t, y, _ in inputs)  # on the devices before timing, as torch's
        timing = time_calls(lambda index: runner.forward_and_wait(placed[index % len(placed)]), None,
                            settings.warmup, settings.repeats)
        _fill_timing(record, "forward", timing, config.batch_size, config.forward_flops_per_image, config.peak.tflops)
        record["forward_peak_memory_bytes"] = runner.peak_memory_bytes()

    def train():
        runner = runners["timed"]
        timing = time_calls(lambda index: runner.train_step_and_wait(placed[index % len(placed)], index), None,
                            settings.warmup, settings.repeats)
        _fill_timing(record, "train", timing, config.batch_size, config.train_flops_per_image, config.peak.tflops)
        record["train_peak_memory_bytes"] = runner.peak_memory_bytes()

    def sampling():
        runner, count = runners["timed"], _sample_batch_size(config, settings)
        labels = _sample_labels(base, count, settings).numpy()
        runner.compile_sampler(count, settings.sample_steps, settings.cfg_scale)  # warm-up: compilation
        timing = time_calls(lambda _: runner.sample(labels, settings.sample_steps, settings.cfg_scale, settings.seed),
                            None, warmup=0, repeats=settings.sample_repeats)
        _fill_sampling(record, timing, count, settings)

    def parity():
        import jax

        with tf32_matmuls(False):
            case = _parity_case(config, settings, reduced=False)
        batch = case.inputs[0].shape[0]
        runner = build(batch, "fp32")
        arrays = [tensor.cpu().numpy() for tensor in (*case.inputs, case.cotangent)]
        with jax.default_matmul_precision("highest"):  # JAX would take TF32 for fp32 matmuls on a GPU
            output, gradients = runner.output_and_gradients(*arrays)
        record["parity_output_rel_error"] = relative_error(torch.from_numpy(output), case.output.cpu())
        record["parity_grad_rel_error"] = max(
            relative_error(gradients[name], gradient.cpu()) if name in gradients else float("inf")
            for name, gradient in case.gradients.items())
        record["parity_batch_size"] = batch

    error = _measure(record, "forward", progress, settings.device, timed)
    if error is not None:
        _fail(record, error)
        return
    if settings.sample:
        _measure(record, "sampling", progress, settings.device, sampling)
    if settings.train:
        _measure(record, "train", progress, settings.device, train)
    # the timed runner's weights, optimizer state and inputs go before parity builds the fp32 one:
    # XLA's allocator reuses what they held, never handing it back
    runners.clear()
    placed.clear()
    if settings.parity:
        _measure(record, "parity", progress, settings.device, parity)
    free_memory(settings.device)


# ---- the run --------------------------------------------------------------------------

def run_benchmark(models=None, backends=None, dtype=None, batch_size=None, image_size=None, device=None,
                  progress=False, on_record=None, **options):
    """Benchmark every backend on every (model, image size, dtype, batch size); one record each.

    models: config names from fusedit.dit.models.DiT_models, or dicts of DiT sizes with a
        'name' (e.g. {"name": "tiny", "depth": 2, "hidden_size": 64, "num_heads": 2});
    backends: a subset of BACKENDS (default: all; on CPU the compiled ones, `compile` and
        `triton-compile`, are then skipped, as their builds take minutes there, unless named);
    dtype, batch_size, image_size: one value or a list of them;
    on_record: called with the list of records so far each time a row is done, and after
        each measurement within a row with that row so far, marked "incomplete" (the CLI
        rewrites its output files there, so an interrupted run keeps what it measured);
    options: any field of Settings (warmup, repeats, compile_mode, sample_steps, parity, ...).
    Defaults come from default_run(device) and default_settings(device).
    Returns a list of dicts with the fields of fusedit/bench/schema.json ("models").
    """
    settings = resolve_settings(device, **options)
    device = settings.device
    explicit = backends is not None
    backends = check_choices("backend", backends if explicit else BACKENDS, BACKENDS)
    runs = run_grid(models, image_size, dtype, batch_size, default_run(device))
    dtypes = list(dict.fromkeys(run[2] for run in runs))

    on_cpu = torch.device(device).type == "cpu"
    needs_triton = any(backend_ops(backend) == "triton" for backend in backends)
    triton_problem = enable_triton_interpreter_on_cpu() if on_cpu and needs_triton else None
    env = environment(device)
    peaks = {name: matmul_peak(device, name, settings.measure_peak) for name in dtypes}
    records = []
    with progress_bar(len(runs) * len(backends), progress) as bar:
        row_progress = _RowProgress(bar, records, on_record)
        gflops_cache = {}
        for model, size, dtype_name, batch in runs:
            key = (model_label(model), size)
            bar.describe(f"{key[0]} at {size}px: counting Gflops")
            if key not in gflops_cache:
                gflops_cache[key] = gflops_info(model, size)
            config = _Config(model, key[0], size, dtype_name, batch, gflops_cache[key], peaks[dtype_name])
            _prepare(config, settings)
            for backend in backends:
                record = new_record(config, backend, settings, env)
                if backend == "jax":
                    _run_jax_backend(config, settings, record, row_progress)
                else:
                    record["status"], record["reason"] = _torch_availability(backend, settings, explicit, triton_problem)
                    _run_torch_backend(config, backend, settings, record, row_progress)
                records.append(record)
                if on_record is not None:
                    on_record(records)
                bar.advance()
            config.base = config.inputs = config.parity_cases = None
            free_memory(device)
    return records


def _prepare(config, settings):
    # The fp32 weights every row copies stay on the CPU: on a GPU they (2.7 GB at DiT-XL/2) would
    # count in every row's peak memory.
    config.base = randomize_parameters_(build_model(config.model, config.image_size, "cpu"), settings.seed)
    config.base.eval()
    generator = torch.Generator(device=settings.device).manual_seed(settings.seed + 4)
    dtype = DTYPES[config.dtype]
    config.inputs = [random_inputs(config.base, config.batch_size, dtype, settings.device, generator)
                     for _ in range(INPUT_SETS)]
    config.parity_cases = {}

