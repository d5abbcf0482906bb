"""`fusedit bench` and `fusedit bench kernels` end to end on a small config (JSON, markdown and
plot written and consistent), and every bad argument refused up front with a clear error."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from fusedit.bench.report import SCHEMA_VERSION, check_records
from fusedit.cli import main

# DiT-S/8 at 64x64 pixels: 8x8 latents, a single token per image (the T=1 edge).
SMALL = ["--model", "DiT-S/8", "--image-size", "64", "--batch-size", "1", "--repeats", "1", "--warmup", "0"]


def run(capsys, *argv):
    code = main(["bench", *argv])
    return code, capsys.readouterr()


def test_models_run_writes_json_markdown_and_plot(tmp_path, capsys):
    out, results = tmp_path, tmp_path / "results"
    results.mkdir()
    code, captured = run(capsys, *SMALL, "--backend", "reference", "xformers", "--sample-steps", "1",
                         "--json", str(out / "bench.json"), "--markdown", str(out / "bench.md"),
                         "--plot", str(out / "bench.png"), "--save-results", str(results))
    assert code == 0, captured.err
    payload = json.loads((out / "bench.json").read_text())
    assert (payload["schema_version"], payload["kind"]) == (SCHEMA_VERSION, "models")
    check_records(payload["records"], "models")
    assert [r["backend"] for r in payload["records"]] == ["reference", "xformers"]
    assert payload["records"][0]["tokens"] == 1 and payload["records"][0]["status"] == "ok"
    assert payload["environment"]["device"] == payload["records"][0]["device"]
    assert payload["complete"] is True
    assert payload["settings"]["sample_steps"] == 1 and payload["settings"]["models"] == ["DiT-S/8"]
    assert [payload["settings"][name] for name in ("warmup", "repeats", "seed", "backends")] == [
        0, 1, 0, ["reference", "xformers"]]
    assert (payload["settings"]["dtype"], payload["settings"]["batch_size"]) == ([payload["records"][0]["dtype"]], [1])
    markdown = (out / "bench.md").read_text()
    assert payload["environment"]["device"] in markdown and "| backend |" in markdown
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "DiT-S/8" in captured.out and "wrote" in captured.out
    saved = sorted(path.name for path in results.iterdir())  # <device>_<date>_models.{json,md}
    assert len(saved) == 2 and saved[0].endswith("_models.json") and saved[1].endswith("_models.md")
    assert json.loads((results / saved[0]).read_text())["records"] == payload["records"]


def test_kernels_run_writes_json_and_markdown(tmp_path, capsys):
    code, captured = run(capsys, "kernels", *SMALL, "--backend", "eager", "sdpa-math", "--op", "attention",
                         "gated_residual", "--pass", "forward", "--json", str(tmp_path / "k.json"),
                         "--markdown", str(tmp_path / "k.md"), "--plot", str(tmp_path / "k.svg"))
    assert code == 0, captured.err
    payload = json.loads((tmp_path / "k.json").read_text())
    assert payload["kind"] == "kernels"
    assert (payload["settings"]["ops"], payload["settings"]["passes"]) == (["attention", "gated_residual"], ["forward"])
    # lists whether given (--batch-size) or defaulted (--dtype), as in a models file
    assert (payload["settings"]["dtype"], payload["settings"]["batch_size"]) == ([payload["records"][0]["dtype"]], [1])
    check_records(payload["records"], "kernels")
    assert [(r["op"], r["backend"]) for r in payload["records"]] == [
        ("attention", "eager"), ("attention", "sdpa-math"), ("gated_residual", "eager")]
    assert "| op |" in (tmp_path / "k.md").read_text()
    assert "<svg" in (tmp_path / "k.svg").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--model", "DiT-Q/2"], "unknown model config 'DiT-Q/2'"),
    (["--backend", "tensorrt"], "unknown backend 'tensorrt'"),
    (["kernels", "--backend", "reference"], "unknown kernel backend 'reference'"),
    (["--batch-size", "0"], "--batch-size: must be a positive integer, got '0'"),
    (["--batch-size", "two"], "--batch-size: must be a positive integer, got 'two'"),
    (["--dtype", "fp64"], "argument --dtype: invalid choice: 'fp64'"),
    (["--image-size", "100"], "image size 100 is not divisible by 8"),
    (["--warmup", "-1"], "--warmup: must be a non-negative integer, got '-1'"),
    (["--warmup", "one"], "--warmup: must be a non-negative integer, got 'one'"),
    (["--model", "DiT-S/2", "kernels"], "`kernels` goes before --model (fusedit bench kernels --model ...): after it, it reads as a model name"),
    (["--model", "DiT-S/2", "models"], "`models` goes before --model (fusedit bench models --model ...): after it, it reads as a model name"),
    (["--backend", "eager", "kernels"], "`kernels` goes before --backend (fusedit bench kernels --backend ...): after it, it reads as a backend"),
    (["--op", "attention", "kernels"], "`kernels` goes before --op (fusedit bench kernels --op ...): after it, it reads as an op"),
    # the list options that convert or check their words (argparse's own error before this one)
    (["--dtype", "fp32", "kernels"], "`kernels` goes before --dtype (fusedit bench kernels --dtype ...): after it, it reads as a dtype"),
    (["--batch-size", "2", "kernels"], "`kernels` goes before --batch-size (fusedit bench kernels --batch-size ...): after it, it reads as a batch size"),
    (["--image-size", "64", "models"], "`models` goes before --image-size (fusedit bench models --image-size ...): after it, it reads as an image size"),
    (["kernels", "--pass", "forward", "models"], "`models` goes before --pass (fusedit bench models --pass ...): after it, it reads as a pass"),
    (["kernels", "--sample-steps", "3"], "--sample-steps applies to model runs"),
    (["kernels", "--sample-steps", "1", "--sample-batch-size", "1", "--sample-repeats", "1", "--cfg-scale", "2",
      "--parity-batch-size", "1", "--no-train", "--no-sample", "--no-parity"],
     "--sample-steps, --sample-batch-size, --sample-repeats, --cfg-scale, --parity-batch-size, --no-train, --no-sample, "
     "--no-parity apply to model runs"),
    (["--op", "attention"], "--op applies to `fusedit bench kernels` only"),
    (["--op", "attention", "--pass", "forward"], "--op, --pass apply to `fusedit bench kernels` only"),
    (["--plot", "out.gif"], "unknown image format 'gif'"),
    (["--json", "/proc/version/bench.json"], "--json /proc/version/bench.json: /proc/version is a file, so no folder "
                                             "can be made in it"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    pytest.param(["--device", "cuda"], "device 'cuda' requested but torch.cuda.is_available() is False",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
    (["--save-results", "/no/such/folder"], "--save-results /no/such/folder: no such folder"),
    (["--seed", "-1"], "seed must be an integer in 0..4294967295, got -1"),
    (["kernels", "--seed", "-1"], "seed must be an integer in 0..4294967295, got -1"),
    (["--cfg-scale", "inf"], "cfg scale must be a finite number >= 1.0"),
    (["kernels", "--op", "adaln_modulate", "--backend", "sdpa-flash"],
     "nothing to time: sdpa-flash time attention ops only"),
    (["kernels", "--op", "linear_gelu", "--backend", "copy", "sdpa-math"],
     "nothing to time: sdpa-math time attention ops only (attention, cross_attention); copy times memory-bound ops "
     "only (adaln_modulate, gated_residual, residual_adaln_modulate); add such an op or another backend"),
    (["kernels", "--op", "cross_attention"], "op cross_attention: no config here has cross-attention blocks"),
    # procfs takes no new file, even from root: found before measuring, not after
    (["--json", "/proc/bench.json"], "--json /proc/bench.json: cannot write files in /proc"),
    (["--save-results", "/proc"], "--save-results /proc: cannot write files in /proc"),
    (["--save-results", "/proc/version"], "--save-results /proc/version: no such folder (it is a file; give a folder)"),
])
def test_bad_arguments_exit_2_with_a_clear_error(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a check that failed to fire would write its relative paths
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_lists_both_modes(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    assert "kernels" in text and "--json" in text and "--measure-peak" in text


def _stopped_run(tmp_path, capsys, monkeypatch, stop_at, stop, exit_status=130):
    """The small run, stopped by stop() right after the first file write whose records pass
    stop_at; returns the JSON payload it left."""
    import fusedit.bench.cli as bench_cli

    real_run = bench_cli.run_benchmark

    def stopped(*args, on_record, **kwargs):
        def record_then_stop(records):
            on_record(records)
            if stop_at(records):
                stop()

        return real_run(*args, on_record=record_then_stop, **kwargs)

    monkeypatch.setattr(bench_cli, "run_benchmark", stopped)
    code, captured = run(capsys, *SMALL, "--backend", "reference", "xformers", "--no-sample",
                         "--json", str(tmp_path / "bench.json"), "--markdown", str(tmp_path / "bench.md"),
                         "--plot", str(tmp_path / "bench.png"))
    assert code == exit_status  # 128 + the signal
    assert "interrupted" in captured.err and str(tmp_path / "bench.json") in captured.err
    payload = json.loads((tmp_path / "bench.json").read_text())
    assert payload["complete"] is False
    return payload


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter switch is a CPU matter: on a GPU triton compiles "
                                                   "whenever it is imported")
def test_block_option_leaves_triton_to_the_run():
    # --block rewrites the models before the run; building one there (even on the meta device)
    # imported triton before the run could switch its interpreter on, so a CPU triton row
    # came out unavailable. In a fresh process, as a user starts it:
    code = ("import sys; from fusedit.bench.configs import with_block; "
            "model = with_block('DiT-S/8', 'cross_attn'); "
            "assert model == {'name': 'DiT-S/8 cross_attn', 'config': 'DiT-S/8', 'block': 'cross_attn'}, model; "
            "assert 'triton' not in sys.modules, 'with_block imported triton'")
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_an_interrupted_run_keeps_its_finished_rows(tmp_path, capsys, monkeypatch):
    """The files are rewritten after every row, so a run stopped by Ctrl-C (or a time limit's
    SIGTERM) leaves the rows it finished, the file marked incomplete, and no half-written file."""
    def control_c():
        raise KeyboardInterrupt

    payload = _stopped_run(tmp_path, capsys, monkeypatch, lambda records: records[-1]["status"] != "incomplete",
                           control_c)
    assert [(r["backend"], r["status"]) for r in payload["records"]] == [("reference", "ok")]
    assert payload["records"][0]["forward_images_per_s"] > 0 and payload["records"][0]["train_images_per_s"] > 0
    assert "| reference |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bench.json", "bench.md", "bench.png"]


def test_a_run_stopped_mid_row_keeps_that_rows_finished_measurements(tmp_path, capsys, monkeypatch):
    """Within a row the files are rewritten after each measurement: a run stopped between the
    forward and the training measurement (compile's autotuning may outlast a time limit) keeps
    the forward figures, in a row marked incomplete that says where it stopped. A SIGTERM (what
    `timeout` sends) stops the run as Ctrl-C does."""
    def guard(signum, frame):  # fails the test, rather than killing pytest, if the CLI sets no handler
        raise AssertionError("the SIGTERM reached the test's handler: fusedit bench installed none")

    previous = signal.signal(signal.SIGTERM, guard)
    try:
        payload = _stopped_run(tmp_path, capsys, monkeypatch, lambda records: True,
                               lambda: os.kill(os.getpid(), signal.SIGTERM), exit_status=143)
        assert signal.getsignal(signal.SIGTERM) is guard  # the run's own handler goes with it
    finally:
        signal.signal(signal.SIGTERM, previous)
    (row,) = payload["records"]
    assert (row["backend"], row["status"]) == ("reference", "incomplete")
    assert "after the forward measurement" in row["reason"] and "(the row was ok)" in row["reason"]
    assert row["forward_images_per_s"] > 0 and row["train_images_per_s"] is None
    assert "incomplete: the run stopped after the forward" in (tmp_path / "bench.md").read_text()
    # the plot is drawn after whole rows only; no temporary file is left behind
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bench.json", "bench.md"]


def _import_under_sigterm(folder, monkeypatch):
    """A function that imports a fresh module which sends this process a SIGTERM, and checks
    that the import completed."""
    (folder / "imports_under_sigterm.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\nCOMPLETED = True\n")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "imports_under_sigterm", raising=False)

    def import_under_sigterm():
        import imports_under_sigterm

        assert imports_under_sigterm.COMPLETED
        del sys.modules["imports_under_sigterm"]

    return import_under_sigterm


def test_a_sigterm_during_an_import_stops_the_run_at_the_next_measurement(tmp_path, capsys, monkeypatch):
    """Raising inside an import can crash a native module's initialisation (jaxlib's did), and an
    exception raised in a garbage-collector callback is dropped: the handler only notes a SIGTERM
    that lands in an import, the import completes, and the run stops after the next measurement."""
    payload = _stopped_run(tmp_path, capsys, monkeypatch, lambda records: True,
                           _import_under_sigterm(tmp_path, monkeypatch), exit_status=143)
    (row,) = payload["records"]
    assert row["status"] == "incomplete" and "after the train measurement" in row["reason"], row["reason"]
    assert row["forward_images_per_s"] > 0 and row["train_images_per_s"] > 0


@pytest.mark.parametrize("stop, exit_status", [("control-c", 130), ("sigterm in an import", 143)])
def test_a_run_stopped_after_its_last_measurement_says_no_file_was_written(stop, exit_status, tmp_path, capsys,
                                                                          monkeypatch):
    """A stop after the last record (a SIGTERM noted during an import is acted on once the run
    returns) ends the run as one mid-way does; without --json/--markdown the message says so."""
    import fusedit.bench.cli as bench_cli

    def control_c():
        raise KeyboardInterrupt

    stopper = control_c if stop == "control-c" else _import_under_sigterm(tmp_path, monkeypatch)

    def stopped_run(**kwargs):
        stopper()
        return []

    monkeypatch.setattr(bench_cli, "run_benchmark", stopped_run)
    code, captured = run(capsys, *SMALL)
    assert code == exit_status  # 128 + the signal
    assert "interrupted; what was measured so far is in no file (no --json/--markdown)" in captured.err


def test_error_rows_make_the_exit_status_1(monkeypatch, capsys):
    import fusedit.kernels.attention_backends as attention_backends

    def broken(q, k, v, key_padding_mask=None):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(attention_backends, "sdpa_attention", broken)
    assert main(["bench", *SMALL, "--backend", "sdpa", "--no-sample", "--no-train", "--no-parity"]) == 1
    assert "1 row(s) ended in an error" in capsys.readouterr().err


def test_a_failed_later_measurement_makes_the_row_an_error_and_keeps_the_rest(monkeypatch, capsys, tmp_path):
    import fusedit.bench.models as bench_models

    def broken(*args):
        raise RuntimeError("sampler exploded")

    monkeypatch.setattr(bench_models, "_time_sampling", broken)
    path = tmp_path / "bench.json"
    assert main(["bench", *SMALL, "--backend", "sdpa", "--sample-steps", "1", "--json", str(path)]) == 1
    assert "1 row(s) ended in an error" in capsys.readouterr().err
    (row,) = json.loads(path.read_text())["records"]
    assert (row["status"], row["reason"]) == ("error", "sampling: RuntimeError: sampler exploded (the row's other "
                                                       "figures stand)")
    assert row["forward_ms"] > 0 and row["train_ms"] > 0 and row["parity_output_rel_error"] < 1e-4
    assert row["sample_images_per_s"] is None


@pytest.mark.parametrize("earlier", [".json", ".md"])
def test_saved_results_never_overwrite_an_earlier_file(earlier, tmp_path):
    from fusedit.bench.cli import _results_stem

    records = [{"device": "NVIDIA H100 80GB HBM3", "date": "2025-06-01T12:00:00"}]
    first = _results_stem(str(tmp_path), records, "models")
    assert first == str(tmp_path / "nvidia-h100-80gb-hbm3_2025-06-01T1200_models")
    (tmp_path / (os.path.basename(first) + earlier)).write_text("earlier")
    assert _results_stem(str(tmp_path), records, "models") == first + "-2"
    (tmp_path / (os.path.basename(first) + "-2" + earlier)).write_text("earlier too")
    assert _results_stem(str(tmp_path), records, "models") == first + "-3"


@pytest.mark.parametrize("what, flags, passed", [
    ([], ["--time-interpreter"], {"time_interpreter": True}),
    (["kernels"], ["--time-interpreter"], {"time_interpreter": True}),
    ([], ["--measure-peak"], {"measure_peak": True}),
    (["kernels"], ["--measure-peak"], {"measure_peak": True}),
    (["kernels"], ["--compile-mode", "reduce-overhead"], {"compile_mode": "reduce-overhead"}),
    ([], ["--no-train"], {"train": False}),
    ([], ["--no-sample"], {"sample": False}),
    ([], ["--no-parity"], {"parity": False}),
])
def test_flags_reach_the_run_only_when_given(what, flags, passed, monkeypatch, capsys):
    import fusedit.bench.cli as bench_cli

    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        return []

    monkeypatch.setattr(bench_cli, "run_kernel_benchmark" if what else "run_benchmark", fake_run)
    assert run(capsys, *what, *SMALL, *flags)[0] == 0
    assert {name: seen[name] for name in passed} == passed
    seen.clear()
    assert run(capsys, *what, *SMALL)[0] == 0
    assert not set(passed) & set(seen)  # left to the run's default


@pytest.mark.parametrize("what, runner", [([], "run_benchmark"), (["kernels"], "run_kernel_benchmark")])
def test_the_json_settings_list_a_defaulted_grid(what, runner, tmp_path, monkeypatch, capsys):
    import fusedit.bench.cli as bench_cli

    monkeypatch.setattr(bench_cli, runner, lambda **kwargs: [])
    assert run(capsys, *what, "--json", str(tmp_path / "bench.json"))[0] == 0
    settings = json.loads((tmp_path / "bench.json").read_text())["settings"]
    default = bench_cli.default_kernel_run(settings["device"]) if what else bench_cli.default_run(settings["device"])
    assert {name: settings[name] for name in ("models", "dtype", "batch_size", "image_size")} == {
        "models": default["models"], "dtype": [default["dtype"]], "batch_size": [default["batch_size"]],
        "image_size": [default["image_size"]]}
