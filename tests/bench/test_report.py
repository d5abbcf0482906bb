"""fusedit.bench.report: strict JSON that never half-writes, the README's markdown naming its
device, MFU as a percentage, the plot, the schema check catching a drifted record, output paths
checked early."""
import io
import json
import os

import pytest
import torch

import fusedit.bench as bench
from fusedit.bench import report

TINY = {"name": "tiny", "depth": 1, "hidden_size": 32, "num_heads": 2, "patch_size": 2}


@pytest.fixture(scope="module")
def records():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: on a shared 2-core machine a second thread only waits
    try:
        # on the CPU wherever the suite runs: a known GPU would have a peak, and this test wants none
        return bench.run_benchmark(models=[TINY], backends=["reference", "xformers"], image_size=32, batch_size=1,
                                   repeats=1, warmup=0, train=False, sample=False, parity=False, measure_peak=False,
                                   device="cpu")
    finally:
        torch.set_num_threads(threads)


def test_json_has_the_layout_and_turns_non_finite_numbers_into_null(tmp_path, records):
    broken = [dict(records[0], parity_output_rel_error=float("inf"))] + records[1:]
    path = tmp_path / "bench.json"
    report.write_json(str(path), "models", broken, {"repeats": 1})
    payload = json.loads(path.read_text())
    assert list(payload) == ["schema_version", "kind", "complete", "settings", "environment", "records"]
    assert payload["complete"] is True
    assert payload["records"][0]["parity_output_rel_error"] is None
    assert payload["environment"] == {field: records[0][field] for field in report.ENVIRONMENT_FIELDS}
    report.check_records(payload["records"], "models")


def test_a_failed_write_keeps_the_previous_file(tmp_path, records):
    path = tmp_path / "bench.json"
    path.write_text("previous results")
    with pytest.raises(TypeError):
        report.write_json(str(path), "models", [dict(records[0], notes=[object()])], {})
    assert path.read_text() == "previous results"
    assert os.listdir(tmp_path) == ["bench.json"]  # no temporary file left behind


def test_markdown_names_the_device_and_the_unavailable_reason(records):
    text = report.models_markdown(records)
    assert records[0]["device"] in text
    assert "| backend | forward img/s |" in text
    assert "unavailable: " + records[1]["reason"] in text
    assert "unknown device: pass --measure-peak" in text  # the MFU footnote names its missing peak


def test_the_memory_footnote_names_each_backends_kind(records):
    jax_row = dict(records[0], backend="jax", memory_kind="JAX peak bytes in use since the runner started")
    text = report.models_markdown([records[0], jax_row])
    assert (f"Peak memory: {records[0]['memory_kind']} (reference); JAX peak bytes in use since the runner started "
            "(jax).") in text
    unmeasured = dict(jax_row, forward_peak_memory_bytes=None, train_peak_memory_bytes=None)  # JAX on a CPU
    assert f"Peak memory: {records[0]['memory_kind']}." in report.models_markdown([*records, unmeasured])


def test_plot_is_an_image(tmp_path, records):
    report.plot_models(str(tmp_path / "bench.png"), records)
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_plots_leave_out_interpreter_rows_and_untimed_backends(tmp_path, records, monkeypatch):
    """A timed interpreter row (--time-interpreter) is no speed figure: no bar, no point, no legend
    entry; nor does an unavailable backend get an empty one."""
    interpreted = dict(records[0], backend="triton", status="interpreter", reason="not a speed figure")
    drawn, bars = [], report._bars
    monkeypatch.setattr(report, "_bars", lambda axis, groups, series, *rest: drawn.append(list(series)) or
                        bars(axis, groups, series, *rest))
    report.plot_models(str(tmp_path / "bench.png"), [records[0], interpreted, records[1]])
    assert drawn == [["reference"], ["reference"]]
    kernel_rows = [{"op": "attention", "pass": "forward", "backend": backend, "status": status, "roofline_fraction": 0.5,
                    "model": "DiT-S/8", "image_size": 256, "dtype": "fp32", "batch_size": 1, "device": "cpu",
                    "tokens": 16, "hidden_size": 384, "num_heads": 6, "head_dim": 64} for backend, status in (("eager", "ok"), ("triton", "interpreter"))]
    drawn.clear()
    report.plot_kernels(str(tmp_path / "kernels.png"), kernel_rows)
    assert drawn == [["eager"]]


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("forward_ms"), "fields missing \\['forward_ms'\\]"),
    (lambda r: r.update(flux=1), "not in the schema \\['flux'\\]"),
    (lambda r: r.update(model=None), "model is null"),
    (lambda r: r.update(batch_size=2.5), "batch_size=2.5 is not a JSON integer"),
    (lambda r: r.update(params=True), "params=True is not a JSON integer"),
])
def test_schema_check_catches_drift(records, change, message):
    record = dict(records[0])
    change(record)
    with pytest.raises(ValueError, match=message):
        report.check_records([record], "models")


def test_schema_version_matches_the_committed_file():
    assert report.load_schema()["schema_version"] == report.SCHEMA_VERSION


def test_output_paths_are_checked_before_running(tmp_path):
    assert report.check_output_path("--json", str(tmp_path / "x.json")) == str(tmp_path / "x.json")
    missing = tmp_path / "missing" / "deeper" / "x.json"  # the write makes the folders; the check makes nothing
    assert report.check_output_path("--json", str(missing)) == str(missing) and not (tmp_path / "missing").exists()
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="afile is a file, so no folder can be made in it"):
        report.check_output_path("--json", str(tmp_path / "afile" / "deeper" / "x.json"))
    with pytest.raises(ValueError, match="is a folder"):
        report.check_output_path("--markdown", str(tmp_path))
    with pytest.raises(ValueError, match="unknown image format 'bmp'"):
        report.check_output_path("--plot", str(tmp_path / "x.bmp"), report.PLOT_FORMATS)


def model_row(**fields):
    """A models record built by hand: every schema field, the unset ones null."""
    record = {name: None for name in report.load_schema()["models"]}
    record.update(model="tiny", image_size=32, dtype="fp32", batch_size=1, backend="reference", status="ok",
                  notes=[], gflops_per_image=1.0, params=10, peak_source="x", repeats=1, warmup=0, memory_kind="x",
                  device="cpu", date="2025-01-01", git_dirty=False)
    return dict(record, **fields)


def kernel_row(**fields):
    """A kernels record built by hand (a DiT-XL/2 attention row), the unset fields null."""
    record = {name: None for name in report.load_schema()["kernels"]}
    record.update({"model": "DiT-XL/2", "image_size": 256, "dtype": "bf16", "batch_size": 32, "tokens": 256,
                   "hidden_size": 1152, "num_heads": 16, "head_dim": 72, "op": "attention", "pass": "forward",
                   "backend": "eager", "status": "ok", "notes": [], "repeats": 5, "warmup": 2, "device": "cpu",
                   "date": "2025-01-01", "git_dirty": False})
    return dict(record, **fields)


def test_markdown_escapes_a_pipe_in_a_cell():
    record = model_row(status="error", reason="shape a | b")
    text = report.models_markdown([record])
    assert "error: shape a \\| b |" in text


def test_mfu_is_shown_as_a_percentage(records):
    from rich.console import Console

    record = dict(records[0], forward_mfu=0.123)  # a fraction of the peak: 12.3%, not 0.1%
    assert "12.3%" in report.models_markdown([record])
    console = Console(file=io.StringIO(), width=300)
    report.print_models([record], console=console)
    assert "12.3%" in console.file.getvalue()


def test_kernel_markdown_row_shows_each_figure():
    record = kernel_row(op="adaln_modulate", ms=1.0, ms_min=0.5, ms_max=2.0, achieved_gb_per_s=123.0,
                        achieved_tflops=4.5, bound="memory", roofline_fraction=0.5)
    text = report.kernels_markdown([record])
    # time (min-max), GB/s, Tflop/s, bound, % of roofline (a fraction shown as a percentage)
    assert "| adaln_modulate | forward | eager | 1.00 ms (0.5-2.00) | 123 | 4.5 | memory | 50.0% | - | ok |" in text, text


@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
def test_kernel_footnotes_say_whether_launch_overhead_is_in_the_times(device_type):
    text = report.kernels_markdown([kernel_row(op="adaln_modulate", device_type=device_type)])
    said = "device time, the host queueing each group of calls while the GPU is held in a spin kernel"
    assert (said in text) == (device_type == "cuda"), text


def test_model_markdown_row_shows_each_figure(records):
    record = dict(records[0], backend="compile", compile_mode="max-autotune", status="ok", reason=None,
                  forward_images_per_s=1234.4, forward_ms=2.5, forward_ms_min=2.25, forward_ms_max=3.0,
                  forward_mfu=0.123, train_images_per_s=45.6, train_ms=50.0, train_ms_min=49.0, train_ms_max=100.0,
                  train_mfu=0.25, sample_images_per_s=0.5, sample_seconds=8.0, sample_seconds_min=7.5,
                  sample_seconds_max=9.0, forward_peak_memory_bytes=1_500_000_000,
                  train_peak_memory_bytes=3_250_000_000, parity_output_rel_error=1.5e-6, parity_grad_rel_error=2.5e-4)
    text = report.models_markdown([record])
    # thousands separator, min-max order, GB (1e9 bytes) forward / train, parity output / gradient, seconds
    assert ("| compile (max-autotune) | 1,234<br>2.50 ms (2.25-3.00) | 12.3% | 45.6<br>50.00 ms (49.00-100) | 25.0% "
            "| 0.5<br>8.00 s (7.50-9.00) | 1.50 / 3.25 | 1.5e-06 / 2.5e-04 | ok |") in text, text


def test_model_caption_and_footnotes_give_the_settings(records):
    unavailable = dict(records[1], sample_steps=None)
    sampled = dict(records[0], sample_steps=50, cfg_scale=1.5, sample_batch_size=1, sample_repeats=3,
                   gflops_per_image=0.5, params=1_234_567, repeats=1, warmup=0, peak_tflops=989.4,
                   peak_source="table: H100")
    sampled = dict(sampled, model=unavailable["model"])
    text = report.models_markdown([dict(unavailable, gflops_per_image=0.5, params=1_234_567, repeats=1, warmup=0,
                                        peak_tflops=989.4, peak_source="table: H100"), sampled])
    assert ("at 32x32: 0.50 Gflops/image, 1.2 M params, batch 1, fp32; sampling: 50 DDPM steps, CFG 1.5, "
            "1 image per loop, median of 3**") in text, text
    assert ("MFU: 2 flops per multiply-add (forward 2 x Gflops, training step 6 x Gflops per image) over "
            "989 Tflop/s (table: H100).") in text
    assert "Times: median of 1 run after 0 warm-up runs, (min-max)." in text
    assert "Throughput cells: images/s, then the median time per call (min-max)." in text


def test_each_dtype_gets_its_own_section(records):
    text = report.models_markdown([records[0], dict(records[0], dtype="bf16")])
    assert text.count("Measured on ") == 2 and " fp32; " in text and " bf16; " in text


@pytest.mark.parametrize("device_type, cuda", [("cuda", ", CUDA 12.4"), ("cpu", "")])
def test_the_environment_line_names_commit_changes_and_cuda(records, device_type, cuda):
    record = dict(records[0], git_commit="0123456789abcdef", git_dirty=True, device_type=device_type,
                  cuda_version="12.4", triton_version=None, jax_version=None)
    text = report.models_markdown([record])
    assert (f"Measured on {record['device']}; torch {record['torch_version']}{cuda}; "
            f"commit 0123456789 (uncommitted changes); {record['date']}.") in text


def test_json_marks_an_unfinished_run_and_takes_the_first_rows_environment(tmp_path, records):
    path = tmp_path / "bench.json"
    report.write_json(str(path), "models", [records[0], dict(records[1], date="2099-01-01")], {}, complete=False)
    payload = json.loads(path.read_text())
    assert payload["complete"] is False and payload["environment"]["date"] == records[0]["date"]
    report.write_json(str(path), "models", [dict(records[0], parity_grad_rel_error=float("nan"))], {})
    assert json.loads(path.read_text())["records"][0]["parity_grad_rel_error"] is None


def test_results_name_is_device_date_and_kind():
    records = [{"device": "NVIDIA H100 80GB HBM3 ", "date": "2025-06-01T12:34:56"}, {"device": "other", "date": "x"}]
    assert report.results_name(records, "kernels") == "nvidia-h100-80gb-hbm3_2025-06-01T1234_kernels"


def test_a_plot_format_may_be_upper_case(tmp_path):
    assert report.check_output_path("--plot", str(tmp_path / "x.PNG"), report.PLOT_FORMATS) == str(tmp_path / "x.PNG")


def test_the_memory_footnote_counts_a_row_that_measured_only_training():
    # A run with the forward pass off measures the training step's memory alone; its kind still counts.
    rows = [model_row(memory_kind="torch peak allocated", forward_peak_memory_bytes=10**9),
            model_row(backend="jax", memory_kind="JAX peak bytes in use", train_peak_memory_bytes=2 * 10**9)]
    assert "Peak memory: torch peak allocated (reference); JAX peak bytes in use (jax)." in report.models_markdown(rows)


def printed_gflops_rows(records):
    """The body rows of print_models's Gflops table, as lists of cell texts."""
    from rich.console import Console

    console = Console(file=io.StringIO(), width=300)
    report.print_models(records, console=console)
    table = console.file.getvalue().split(f"{records[0]['model']} at ")[0]  # before the first config's section
    return [[cell.strip() for cell in line.split("│")[1:-1]] for line in table.splitlines()
            if line.startswith("│ ") and "model" not in line]


def test_the_terminal_gflops_table_has_one_row_per_model_and_image_size_with_the_papers_figure():
    # Two backends and two dtypes at 32 px are one row; 64 px is another, with its own figures.
    small = dict(tokens=16, params=2_500_000, gflops_per_image=1.5, paper_gflops=1.25)
    rows = [model_row(**small), model_row(**small, backend="sdpa"), model_row(**small, dtype="bf16"),
            model_row(image_size=64, tokens=64, params=2_500_000, gflops_per_image=6.0, paper_gflops=5.5)]
    assert printed_gflops_rows(rows) == [["tiny", "32", "16", "2.50", "1.50", "1.25"],
                                         ["tiny", "64", "64", "2.50", "6.00", "5.50"]]


def test_the_kernel_caption_gives_heads_then_head_size():
    text = report.kernels_markdown([kernel_row(num_heads=12, head_dim=96)])
    assert "**fused ops at DiT-XL/2 256px shapes: batch 32, 256 tokens, 1152 channels, 12 heads of 96, bf16**" in text


def test_a_target_without_a_verdict_says_why():
    # A timed triton attention row with no SDPA row beside it has nothing to be measured against.
    text = report.kernels_markdown([kernel_row(backend="triton", ms=1.0)])
    assert "| attention | forward | as fast as the fastest SDPA backend | 1.00 ms | -: - | - | - | " \
           "no verdict (no baseline row was timed) |" in text, text


@pytest.mark.parametrize("image_sizes, labelled", [((256,), False), ((256, 512), True)])
def test_kernel_plot_groups_name_the_config_only_when_there_are_several(tmp_path, monkeypatch, image_sizes,
                                                                         labelled):
    groups_drawn, bars = [], report._bars
    monkeypatch.setattr(report, "_bars", lambda axis, groups, *rest: groups_drawn.append(groups) or
                        bars(axis, groups, *rest))
    rows = [kernel_row(image_size=size, roofline_fraction=0.5) for size in image_sizes]
    report.plot_kernels(str(tmp_path / "kernels.png"), rows)
    expected = [f"attention\nforward\nDiT-XL/2 {size}px bf16 b32" if labelled else "attention\nforward"
                for size in image_sizes]
    assert groups_drawn == [expected]


def test_json_environment_of_a_single_record(tmp_path):
    path = tmp_path / "bench.json"
    record = model_row(device_type="cpu", torch_version="2.5", python_version="3.11", git_commit="abc")
    report.write_json(str(path), "models", [record], {})
    assert json.loads(path.read_text())["environment"] == {field: record[field] for field in report.ENVIRONMENT_FIELDS}
