"""fusedit.bench.run_benchmark on a tiny DiT: every field present and sane, parity small (and
large when an op is broken), unavailable and failing backends reported, not raised, and
the arguments checked with errors that name the problem."""
import json

import pytest
import torch

import fusedit.bench as bench
from fusedit.bench.configs import build_model
from fusedit.bench.models import Settings, _fill_timing, _ParityCase, _timed_with_memory, _torch_parity
from fusedit.bench.timing import Timing
from fusedit.dit.flops import count_gflops

ON_GPU = torch.cuda.is_available()
# 16 tokens of 64 channels in 2 heads of 32, two blocks: seconds, not minutes, on a CPU.
TINY = {"name": "tiny", "depth": 2, "hidden_size": 64, "num_heads": 2, "patch_size": 2}
BATCH, IMAGE_SIZE = 2, 64
QUICK = dict(image_size=IMAGE_SIZE, batch_size=BATCH, repeats=2, warmup=1, sample_steps=2, compile_backend="eager")


@pytest.fixture(scope="module")
def records():
    return bench.run_benchmark(models=[TINY], backends=list(bench.BACKENDS), measure_peak=True, **QUICK)


def by_backend(records):
    return {record["backend"]: record for record in records}


def test_one_record_per_backend_matching_the_schema(records):
    assert [record["backend"] for record in records] == list(bench.BACKENDS)
    bench.report.check_records(records, "models")
    assert list(records[0]) == list(bench.report.load_schema()["models"]), "fields out of the schema's order"
    for record in records:
        assert record["status"] in bench.STATUSES


@pytest.mark.parametrize("backend", ["reference", "sdpa", "compile"])
def test_timed_backends_have_sane_numbers(records, backend):
    record = by_backend(records)[backend]
    assert record["status"] == "ok" and record["reason"] is None and record["notes"] == []
    for prefix in ("forward", "train"):
        median, low, high = record[f"{prefix}_ms"], record[f"{prefix}_ms_min"], record[f"{prefix}_ms_max"]
        assert 0 < low <= median <= high
        assert record[f"{prefix}_images_per_s"] == pytest.approx(BATCH / (median / 1e3))
        flops_per_image = (2 if prefix == "forward" else 6) * record["gflops_per_image"] * 1e9
        expected_mfu = flops_per_image * record[f"{prefix}_images_per_s"] / (record["peak_tflops"] * 1e12)
        assert record[f"{prefix}_mfu"] == pytest.approx(expected_mfu)
        assert 0 < record[f"{prefix}_mfu"] < 1
        assert record[f"{prefix}_peak_memory_bytes"] > 2 ** 20
    assert 0 < record["sample_seconds_min"] <= record["sample_seconds"] <= record["sample_seconds_max"]
    assert record["sample_images_per_s"] == pytest.approx(record["sample_batch_size"] / record["sample_seconds"])
    assert record["sample_steps"] == 2 and record["cfg_scale"] == 4.0
    assert record["peak_source"].startswith("measured")
    assert record["compile_mode"] == ("eager backend" if backend == "compile" else None)


@pytest.mark.skipif(not ON_GPU, reason="CUDA's allocator statistics: a CPU row's peak is the whole process's RSS")
def test_a_rows_peak_memory_holds_its_own_model_not_the_harness_copies():
    # wide enough that the weights outweigh the activations and cuBLAS's workspace
    wide = {"name": "wide", "depth": 4, "hidden_size": 1024, "num_heads": 16, "patch_size": 2}
    fp32_bytes = 4 * sum(p.numel() for p in build_model(wide, IMAGE_SIZE, "meta").parameters())
    records = bench.run_benchmark(models=[wide], backends=["sdpa", "triton"], dtype="bf16", **QUICK)
    for record in records:  # the triton row runs after sdpa's parity, whose fp32 gradients the harness keeps
        assert record["status"] == "ok", record
        # its bf16 weights, inputs and activations; not the fp32 weights every row is copied from
        assert record["forward_peak_memory_bytes"] < fp32_bytes, record["backend"]


def test_gflops_and_params_are_the_models(records):
    model = build_model(TINY, IMAGE_SIZE, "cpu")
    for record in records:
        assert record["gflops_per_image"] == pytest.approx(count_gflops(model.eval()))
        assert record["params"] == sum(p.numel() for p in model.parameters())
        assert record["tokens"] == 16 and record["paper_gflops"] is None


@pytest.mark.parametrize("backend", ["sdpa", "compile", "triton", "triton-compile"])
def test_parity_with_the_reference_is_small(records, backend):
    record = by_backend(records)[backend]
    if record["status"] == "unavailable":
        pytest.skip(record["reason"])
    assert record["parity_output_rel_error"] < 1e-4
    assert record["parity_grad_rel_error"] < 1e-4
    assert record["parity_batch_size"] >= 1


def test_reference_row_has_no_parity_with_itself(records):
    record = by_backend(records)["reference"]
    assert record["parity_output_rel_error"] is None and record["parity_grad_rel_error"] is None


@pytest.mark.parametrize("backend", ["triton", "triton-compile"])
def test_triton_on_cpu_is_parity_only(records, backend):
    record = by_backend(records)[backend]
    assert record["compile_mode"] == ("eager backend" if backend == "triton-compile" else None)
    if ON_GPU:
        assert record["status"] == "ok"
        return
    assert (record["status"], record["reason"]) == ("interpreter", "not a speed figure")
    assert record["forward_ms"] is None and record["train_ms"] is None and record["sample_seconds"] is None
    assert record["parity_output_rel_error"] is not None


def test_triton_compile_compiles_a_model_on_the_triton_ops(monkeypatch):
    compiled = []

    def compile_recorded(model, settings):
        compiled.append(model.kernels)
        return model

    monkeypatch.setattr(bench.models, "compile_model_", compile_recorded)
    settings = Settings(device="cpu", warmup=0, repeats=1, compile_mode="default")
    base = build_model(TINY, IMAGE_SIZE, "cpu")
    for backend in ("triton-compile", "compile", "triton"):
        model = bench.models._backend_model(base, backend, torch.float32, settings)
        assert model.kernels == bench.models.backend_ops(backend)
    assert compiled == ["triton", "reference"]


def test_unavailable_backends_are_rows_with_a_reason(records):
    rows = by_backend(records)
    assert rows["jax"]["status"] == "unavailable" and "named configs" in rows["jax"]["reason"]
    if not ON_GPU:
        assert rows["xformers"]["status"] == "unavailable" and "CUDA" in rows["xformers"]["reason"]
    for record in records:
        if record["status"] == "unavailable":
            assert record["reason"] and record["forward_ms"] is None


def test_environment_is_stamped_on_every_record(records):
    for record in records:
        assert record["torch_version"] == torch.__version__
        assert record["device_type"] == ("cuda" if ON_GPU else "cpu") and record["device"]
        assert record["date"][:2] == "20"


@pytest.mark.parametrize("peak_source, cause", [
    ("measured: 2048^3 fp32 matmul", "is one torch matmul"),
    ("table: NVIDIA H100 SXM, bf16 dense", "check its clocks and the table entry"),
])
def test_mfu_above_the_peak_is_flagged_with_its_likely_cause(peak_source, cause):
    record = {"notes": [], "peak_source": peak_source, "status": "ok"}
    # 2 Tflop in 1 s against a 1 Tflop/s peak: 200%
    _fill_timing(record, "forward", Timing(1.0, 0.9, 1.1, 3), images=2, flops_per_image=1e12, peak_tflops=1.0)
    assert record["forward_mfu"] == pytest.approx(2.0)
    assert len(record["notes"]) == 1 and record["notes"][0].startswith("forward MFU above 100%")
    assert peak_source in record["notes"][0] and cause in record["notes"][0]
    _fill_timing(record, "train", Timing(4.0, 3.9, 4.1, 3), images=2, flops_per_image=1e12, peak_tflops=1.0)
    assert record["train_mfu"] == pytest.approx(0.5) and len(record["notes"]) == 1


def test_a_config_in_another_block_design_keeps_the_papers_gflops(monkeypatch):
    import fusedit.bench.models as bench_models

    counted = []

    def flops_row(name, image_size=256, block="adaln_zero"):  # the real count of XL/2 takes seconds
        counted.append((name, image_size, block))
        return {"gflops": 1.0, "params": 2, "tokens": 256, "paper_gflops": 137.62}

    monkeypatch.setattr(bench_models, "flops_row", flops_row)
    model = {"name": "DiT-XL/2 cross_attn", "config": "DiT-XL/2", "block": "cross_attn"}  # what --block gives
    assert bench_models.gflops_info(model, 256)["paper_gflops"] == 137.62
    assert counted == [("DiT-XL/2", 256, "cross_attn")]


def test_a_timed_interpreter_row_gets_its_times_but_no_mfu():
    record = {"notes": [], "peak_source": "measured: 2048^3 fp32 matmul", "status": "interpreter"}
    _fill_timing(record, "forward", Timing(1.0, 0.9, 1.1, 3), images=2, flops_per_image=1e12, peak_tflops=1.0)
    assert record["forward_ms"] == 1e3 and "forward_mfu" not in record and record["notes"] == []


def test_a_broken_op_shows_in_parity(monkeypatch):
    """Parity measures something: attention that ignores k and v is caught (it would not be
    with the published zero-initialised adaLN, whose output ignores every block)."""
    import fusedit.kernels.attention_backends as attention_backends

    monkeypatch.setattr(attention_backends, "sdpa_attention", lambda q, k, v, key_padding_mask=None: q)
    records = bench.run_benchmark(models=[TINY], backends=["sdpa"], train=False, sample=False, **QUICK)
    assert records[0]["parity_output_rel_error"] > 1e-2
    assert records[0]["parity_grad_rel_error"] > 1e-2


def test_a_failing_backend_is_an_error_row_and_the_run_goes_on(monkeypatch):
    import fusedit.kernels.attention_backends as attention_backends

    def broken(q, k, v, key_padding_mask=None):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(attention_backends, "sdpa_attention", broken)
    records = bench.run_benchmark(models=[TINY], backends=["sdpa", "reference"], train=False, sample=False,
                                  parity=False, **QUICK)
    failed, fine = records
    assert failed["status"] == "error" and "kernel exploded" in failed["reason"] and failed["forward_ms"] is None
    assert fine["status"] == "ok" and fine["forward_ms"] > 0


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_rows_train_in_that_dtype(dtype):
    records = bench.run_benchmark(models=[TINY], backends=["reference"], dtype=dtype, sample=False, parity=False,
                                  image_size=IMAGE_SIZE, batch_size=BATCH, repeats=1, warmup=0, measure_peak=False)
    assert records[0]["dtype"] == dtype and records[0]["train_ms"] > 0 and records[0]["notes"] == []


def test_jax_unavailable_is_reported_for_a_named_config(monkeypatch):
    import fusedit.bench.jax_backend as jax_backend

    monkeypatch.setattr(jax_backend, "jax_available", lambda: (False, "no JAX on this test machine"))
    records = bench.run_benchmark(models=["DiT-S/8"], backends=["jax"], image_size=64, batch_size=1, repeats=1)
    assert (records[0]["status"], records[0]["reason"]) == ("unavailable", "no JAX on this test machine")
    assert records[0]["paper_gflops"] is None and records[0]["gflops_per_image"] > 0


@pytest.mark.parametrize("arguments, message", [
    (dict(models=["DiT-Q/2"]), "unknown model config 'DiT-Q/2'"),
    (dict(backends=["tpu"]), "unknown backend 'tpu'"),
    (dict(batch_size=0), "batch size must be a positive integer"),
    (dict(dtype="fp64"), "unknown dtype 'fp64'"),
    (dict(image_size=100), "not divisible by 8"),
    (dict(models=["DiT-S/8"], image_size=32), "patch size 8"),
    (dict(repeats=0), "repeats must be a positive integer"),
    (dict(sample_steps=0), "sample steps must lie in 1..1000"),
    (dict(cfg_scale=float("nan")), "cfg scale must be a finite number >= 1.0 (1.0 = no guidance), got nan"),
    (dict(cfg_scale=0.5), "cfg scale must be a finite number >= 1.0"),
    (dict(seed=-10), "seed must be an integer in 0..4294967295, got -10"),
    (dict(models=[]), "no models given"),
    (dict(backends=[]), "no backend given"),
    (dict(batch_size=[]), "no batch size given"),
    (dict(frobnicate=True), "unknown option(s) frobnicate"),
    (dict(models=[{"name": "x", "width": 3}]), "got keys"),
    (dict(models=[{"name": "x", "config": "DiT-S/8", "depth": 2}]), "cannot also set depth"),
])
def test_bad_arguments_name_the_problem(arguments, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        bench.run_benchmark(**{"models": [TINY], **arguments})


def test_records_are_strict_json(records):
    json.dumps(records, allow_nan=False)  # no NaN or inf anywhere


class _Toy(torch.nn.Module):
    """output = out_scale * (a x + b x); b's gradient is scaled by b_grad_scale, its value is not."""
    def __init__(self, out_scale=1.0, b_grad_scale=1.0):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
        self.b = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
        self.out_scale, self.b_grad_scale = out_scale, b_grad_scale

    def forward(self, x, t, y):
        b = self.b_grad_scale * self.b - (self.b_grad_scale - 1) * self.b.detach()
        return self.out_scale * (self.a * x + b * x)


def _parity(model):

    x, cotangent = torch.tensor([1.0, -2.0, 4.0]), torch.tensor([1.0, 0.5, -1.0])
    reference = _Toy()
    output = reference(x, None, None)
    (output * cotangent).sum().backward()
    case = _ParityCase(None, (x, None, None), cotangent, output.detach(),
                       {name: p.grad.detach() for name, p in reference.named_parameters()}, None)
    record = {"notes": []}
    _torch_parity(record, case, model)
    return record


def test_parity_divides_by_the_reference_and_takes_the_worst_gradient():
    record = _parity(_Toy(out_scale=2.0))  # |2r - r| / |r| = 1, not |r| / |2r|
    assert record["parity_output_rel_error"] == pytest.approx(1.0)
    record = _parity(_Toy(b_grad_scale=3.0))  # right output, right grad of a, b's grad 3x too large
    assert record["parity_output_rel_error"] < 1e-6
    assert record["parity_grad_rel_error"] == pytest.approx(2.0)


def test_warmup_calls_run_before_the_timed_ones():

    seen = []
    record = {"notes": [], "peak_source": "x"}
    settings = Settings(device="cpu", warmup=2, repeats=3, compile_mode="default")
    _timed_with_memory(seen.append, settings, record, "forward", 1, 1.0, None)
    assert len(seen) == 5 and record["forward_ms"] is not None


@pytest.mark.skipif(ON_GPU, reason="the CPU's defaults")
def test_compiled_backends_run_on_cpu_only_when_named():
    availability = bench.models._torch_availability
    settings = Settings(device="cpu", warmup=0, repeats=1, compile_mode="default")
    for backend, named in (("compile", ("ok", None)), ("triton-compile", ("interpreter", "not a speed figure"))):
        status, reason = availability(backend, settings, explicit=False, triton_problem=None)
        assert status == "skipped" and f"pass --backend {backend} to time it" in reason
        assert availability(backend, settings, explicit=True, triton_problem=None) == named
    assert availability("triton-compile", settings, explicit=True, triton_problem="no triton") == ("unavailable", "no triton")


def test_compiled_backends_follow_the_eager_ones_and_jax_comes_last():
    # compiled builds are slow: a run cut short has the eager rows; jax keeps the GPU memory it
    # grew, which a torch row after it would miss
    assert bench.BACKENDS[-3:] == ("compile", "triton-compile", "jax")
    assert set(bench.models.COMPILED_OPS) == {"compile", "triton-compile"}




def test_a_backend_raising_not_implemented_is_unavailable(monkeypatch):
    import fusedit.kernels.attention_backends as attention_backends

    def missing(q, k, v, key_padding_mask=None):
        raise NotImplementedError("no kernel for these shapes")

    monkeypatch.setattr(attention_backends, "sdpa_attention", missing)
    records = bench.run_benchmark(models=[TINY], backends=["sdpa"], train=False, sample=False, parity=False, **QUICK)
    assert records[0]["status"] == "unavailable" and "no kernel for these shapes" in records[0]["reason"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter row is CPU-only")
def test_interpreter_parity_runs_on_the_reduced_instance():
    records = bench.run_benchmark(models=[TINY], backends=["triton"], train=False, sample=False, **QUICK)
    record = records[0]
    assert record["status"] == "interpreter" and record["parity_batch_size"] == 1
    assert any("reduced instance (2 -> 1 blocks, batch 1)" in note for note in record["notes"])


def test_a_row_stopped_mid_measurement_names_the_last_finished_one(monkeypatch):
    # on_record sees the row after each finished measurement; a Ctrl-C inside one must not
    # count it as finished
    import fusedit.bench.models as models_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(models_module, "_time_train", interrupted)
    seen = []
    with pytest.raises(KeyboardInterrupt):
        bench.run_benchmark(models=[TINY], backends=["reference"], on_record=lambda rows: seen.append(rows[-1]),
                            **{**QUICK, "sample": False})
    (last,) = seen  # the row after its forward measurement, and nothing after the interrupted train
    assert last["status"] == "incomplete" and "after the forward measurement" in last["reason"]
    assert last["forward_ms"] > 0 and last["train_ms"] is None
