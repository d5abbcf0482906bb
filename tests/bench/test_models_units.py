"""fusedit.bench.models piece by piece, on stub models and hand-made configs: the inputs
drawn, the rotation of input sets, the sampling count and repeats, the settings' boundaries,
parity's dtype, eval mode and non-finite note, which backends a default CPU run skips, and
how a failed measurement becomes the row's status and reason.
The whole runs in test_models.py reach these only through medians and tolerances, or with
one input set's worth of difference."""
import copy
import types
from dataclasses import replace

import pytest
import torch

import fusedit.bench.models as models
from fusedit.bench.models import Settings, _Config, _ParityCase
from fusedit.bench.timing import Timing

# One block of 32 channels on 16 tokens (64 px -> 8x8 latents, patch 2): milliseconds on a CPU.
TINY = {"name": "tiny", "depth": 1, "hidden_size": 32, "num_heads": 2, "patch_size": 2}
IMAGE_SIZE = 64
CPU = Settings(device="cpu", warmup=0, repeats=3, compile_mode="default")
NO_PEAK = types.SimpleNamespace(tflops=None, source="none")


def _config(inputs=None, batch_size=1, dtype="fp32"):
    return _Config(TINY, "tiny", IMAGE_SIZE, dtype, batch_size, {"gflops_per_image": 1.0}, NO_PEAK, inputs=inputs)


def test_random_inputs_span_the_timesteps_and_classes_with_their_own_noise():
    dit = types.SimpleNamespace(in_channels=4, input_size=2, num_classes=1000)
    x, t, y, noise = models.random_inputs(dit, 512, torch.bfloat16, "cpu", torch.Generator().manual_seed(0))
    assert x.shape == noise.shape == (512, 4, 2, 2) and x.dtype == noise.dtype == torch.bfloat16
    assert t.shape == y.shape == (512,)
    # 512 draws of 0..999 cover both halves of the schedule and many classes, never past the last
    assert 0 <= t.min() < 100 and 900 <= t.max() <= 999
    assert 0 <= y.min() and y.max() < 1000 and len(y.unique()) > 100
    assert not torch.equal(x, noise), "the noise must be drawn apart from the latents"


def test_prepare_draws_different_inputs_for_each_set():
    config = _config(batch_size=2)
    models._prepare(config, CPU)
    assert len(config.inputs) == models.INPUT_SETS == 3
    for first in range(3):
        for second in range(first + 1, 3):
            assert not torch.equal(config.inputs[first][0], config.inputs[second][0])
            assert not torch.equal(config.inputs[first][3], config.inputs[second][3])


class _LabelRecorder(torch.nn.Module):
    """Records the label of each call: input set k carries label k."""
    learn_sigma = False

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.labels = []

    def forward(self, x, t, y):
        self.labels.append(int(y[0]))
        return self.weight * x


def _labelled_inputs():
    return [(torch.randn(1, 1, 2, 2), torch.tensor([10 * k]), torch.tensor([k]), torch.randn(1, 1, 2, 2))
            for k in range(3)]


@pytest.mark.parametrize("timer", [models._time_forward, models._time_train])
def test_warmup_and_timed_calls_rotate_through_the_input_sets(timer):
    model, record = _LabelRecorder(), {"notes": [], "status": "ok"}
    timer(model, _config(_labelled_inputs()), Settings(device="cpu", warmup=2, repeats=4, compile_mode="default"),
          record)
    assert model.labels == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize("option, value", [
    ("sample_steps", 1000), ("sample_steps", 1), ("cfg_scale", 1.0), ("warmup", 0),
])
def test_settings_take_their_boundaries(option, value):
    assert getattr(models.resolve_settings("cpu", **{option: value}), option) == value


@pytest.mark.parametrize("option, value, message", [
    ("sample_steps", 1001, "sample steps must lie in 1..1000"),
    ("cfg_scale", float("inf"), "cfg scale must be a finite number"),
    ("parity_batch_size", 0, "parity batch size must be a positive integer"),
    ("sample_batch_size", 0, "sample batch size must be a positive integer"),
    ("sample_repeats", 0, "sample repeats must be a positive integer"),
    ("warmup", -1, "warmup must be a non-negative integer"),
])
def test_settings_refuse_past_their_boundaries(option, value, message):
    with pytest.raises(ValueError, match=message):
        models.resolve_settings("cpu", **{option: value})


@pytest.mark.parametrize("batch_size, sample_batch_size, expected", [(8, None, 4), (1, None, 1), (8, 3, 3)])
def test_sampling_batch_is_half_the_batch_unless_given(batch_size, sample_batch_size, expected):
    # half: classifier-free guidance doubles it back to the batch
    settings = Settings(device="cpu", warmup=0, repeats=1, compile_mode="default", sample_batch_size=sample_batch_size)
    assert models._sample_batch_size(_config(batch_size=batch_size), settings) == expected


def test_sampling_rate_counts_every_image_of_the_batch():
    record = {}
    models._fill_sampling(record, Timing(2.0, 1.0, 3.0, 3), 4, replace(CPU, sample_steps=7, sample_repeats=3))
    assert record["sample_images_per_s"] == 2.0
    assert (record["sample_seconds"], record["sample_seconds_min"], record["sample_seconds_max"]) == (2.0, 1.0, 3.0)
    assert (record["sample_batch_size"], record["sample_steps"], record["sample_repeats"]) == (4, 7, 3)


def test_sampling_warms_up_on_one_step_then_times_each_repeat(monkeypatch):
    import fusedit.dit.diffusion as diffusion

    calls = []

    def sample_images(model, labels, num_steps, cfg_scale, sampler, seed):
        calls.append((num_steps, cfg_scale, len(labels), int(labels.max())))

    monkeypatch.setattr(diffusion, "sample_images", sample_images)
    record, model = {}, types.SimpleNamespace(num_classes=5)
    settings = replace(CPU, sample_steps=7, sample_repeats=3, cfg_scale=2.5)
    models._time_sampling(model, _config(batch_size=4), settings, record)
    assert [steps for steps, *_ in calls] == [1, 7, 7, 7]
    assert all(cfg == 2.5 and count == 2 and label < 5 for _, cfg, count, label in calls)
    assert record["sample_repeats"] == 3


class _Toy(torch.nn.Module):
    """a * x, doubled in training mode; b is a parameter the forward never uses."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        self.b = torch.nn.Parameter(torch.tensor([3.0]))

    def forward(self, x, t, y):
        return self.a * x * (2.0 if self.training else 1.0)


def _toy_case(gradients):
    # the eval-mode toy's output a * x and gradient cotangent * x
    x, cotangent = torch.tensor([1.0, -2.0]), torch.tensor([1.0, 0.5])
    return _ParityCase(None, (x, None, None), cotangent, torch.tensor([1.0, -4.0]), gradients, None)


def test_parity_runs_the_model_in_eval_mode():
    # a DiT in training mode drops class labels at random: its parity would be noise
    record = {"notes": []}
    models._torch_parity(record, _toy_case({"a": torch.tensor([1.0, -1.0])}), _Toy().train())
    assert record["parity_output_rel_error"] == 0 and record["parity_grad_rel_error"] == 0
    assert record["notes"] == []


def test_a_missing_gradient_is_infinite_and_noted():
    record = {"notes": []}
    models._torch_parity(record, _toy_case({"a": torch.tensor([1.0, -1.0]), "b": torch.tensor([1.0])}), _Toy())
    assert record["parity_output_rel_error"] == 0 and record["parity_grad_rel_error"] == float("inf")
    assert record["notes"] == ["parity: NaN or inf in the output or a gradient (or a gradient missing)"]


def _stub_timing(monkeypatch):
    """The torch backend with its timed measurements stubbed out: only parity runs for real."""
    built = []

    def backend_model(base, backend, dtype, settings):
        built.append((dtype, settings.compile_mode))
        return copy.deepcopy(base).to(dtype)

    monkeypatch.setattr(models, "_backend_model", backend_model)
    for timer in ("_time_forward", "_time_sampling", "_time_train"):
        monkeypatch.setattr(models, timer, lambda *args: None)
    return built


class _NoProgress:
    def describe(self, text):
        pass

    def measured(self, record, what):
        pass


def _run_torch_backend(backend, settings, dtype="fp32"):
    config = _config(batch_size=1, dtype=dtype)
    models._prepare(config, settings)
    record = {"model": "tiny", "dtype": dtype, "batch_size": 1, "backend": backend, "status": "ok", "reason": None,
              "notes": [], "forward_ms": None}
    models._run_torch_backend(config, backend, settings, record, _NoProgress())
    return record


def test_parity_of_a_half_precision_row_is_measured_in_fp32(monkeypatch):
    built = _stub_timing(monkeypatch)
    record = _run_torch_backend("sdpa", replace(CPU, sample=False, train=False), dtype="bf16")
    assert [dtype for dtype, _ in built] == [torch.bfloat16, torch.float32]
    assert record["parity_output_rel_error"] < 1e-5 and record["parity_grad_rel_error"] < 1e-5


@pytest.mark.parametrize("compile_mode, parity_mode", [("max-autotune", "default"), ("reduce-overhead", "reduce-overhead")])
def test_an_autotuning_compile_is_not_repeated_for_parity(monkeypatch, compile_mode, parity_mode):
    # the fp32 parity copy has other matmul shapes: autotuning them again costs minutes
    built = _stub_timing(monkeypatch)
    monkeypatch.setattr(models.torch._dynamo, "reset", lambda: None)
    record = _run_torch_backend("compile", replace(CPU, sample=False, train=False, compile_mode=compile_mode))
    assert [mode for _, mode in built] == [compile_mode, parity_mode]
    assert any("mode=default" in note for note in record["notes"]) == (parity_mode != compile_mode)


def test_a_default_cpu_run_skips_the_compiled_backends(monkeypatch):
    # only a run that names them builds them: a default one would take minutes on a CPU
    monkeypatch.setattr(models, "BACKENDS", ("compile",))
    (record,) = models.run_benchmark(models=[TINY], device="cpu", image_size=IMAGE_SIZE, batch_size=1, repeats=1,
                                     measure_peak=False)
    assert record["status"] == "skipped" and "pass --backend compile" in record["reason"]


def _raise(error):
    def run():
        raise error
    return run


def _failed_row(what, error):
    record = {"model": "tiny", "dtype": "fp32", "batch_size": 1, "backend": "sdpa", "status": "ok", "reason": None,
              "notes": ["kept"]}
    returned = models._measure(record, what, _NoProgress(), "cpu", _raise(error))
    assert returned is error
    return record


def test_a_failure_after_the_forward_makes_the_row_an_error_with_its_reason():
    record = _failed_row("train", RuntimeError("out of memory\nmore detail"))
    assert record["status"] == "error"
    assert record["reason"] == "train: RuntimeError: out of memory (the row's other figures stand)"
    assert record["notes"] == ["kept"], "the error moves from the notes to the reason"


@pytest.mark.parametrize("error, status", [(RuntimeError("broke"), "error"), (NotImplementedError("broke"), "unavailable")])
def test_a_failed_forward_is_left_to_fail_which_moves_its_note_to_the_reason(error, status):
    record = _failed_row("forward", error)
    assert record["status"] == "ok" and record["notes"][-1] == f"forward: {type(error).__name__}: broke"
    models._fail(record, error)
    assert (record["status"], record["reason"]) == (status, f"forward: {type(error).__name__}: broke")
    assert record["notes"] == ["kept"]
