"""fusedit.bench.targets: each triton kernel row held to its speed target (85% of the copy
bandwidth, the fastest SDPA backend, eager matmul + GELU), on made-up rows whose verdicts
are known, and shown in the kernels' markdown and JSON."""
import json

import pytest

from fusedit.bench import report
from fusedit.bench.targets import target_checks

CONFIG = {"model": "DiT-XL/2", "image_size": 256, "dtype": "bf16", "batch_size": 32}
BANDWIDTH = 1000.0  # GB/s


def row(op, backend, ms, status="ok", reason=None, nbytes=10**9, pass_name="forward"):
    timed = ms is not None and status == "ok"
    return {**CONFIG, "op": op, "pass": pass_name, "backend": backend, "status": status, "reason": reason, "ms": ms,
            "bytes": nbytes if timed else None, "achieved_gb_per_s": nbytes / ms / 1e6 if timed else None,
            "bandwidth_gb_per_s": BANDWIDTH}


def only_check(records):
    checks = target_checks(records)
    assert len(checks) == 1
    report.check_records(checks, "targets")
    return checks[0]


# 1 GB at 85% of 1000 GB/s: 1.176 ms just meets the target
@pytest.mark.parametrize("triton_ms, met", [(1.1, True), (1.3, False)])
@pytest.mark.parametrize("op", ["adaln_modulate", "gated_residual", "residual_adaln_modulate"])
def test_memory_bound_ops_are_held_to_85_percent_of_the_copy_bandwidth(op, triton_ms, met):
    check = only_check([row(op, "eager", 0.5), row(op, "triton", triton_ms)])  # eager is no baseline here
    assert check["baseline_ms"] == pytest.approx(1e9 / (0.85 * BANDWIDTH * 1e9) * 1e3)
    assert check["ratio"] == pytest.approx(check["baseline_ms"] / triton_ms)
    assert check["met"] is met and check["reason"] is None
    assert "85%" in check["target"] and "1000 GB/s" in check["baseline"]


def test_a_copy_of_the_same_bytes_is_shown_beside_the_verdict():
    check = only_check([row("adaln_modulate", "copy", 1.05), row("adaln_modulate", "triton", 1.2)])
    assert check["copy_ms"] == 1.05 and check["copy_ratio"] == pytest.approx(1.05 / 1.2)
    assert check["met"] is False, "the verdict is still against 85% of the measured (large) copy bandwidth"
    check = only_check([row("adaln_modulate", "copy", None, status="error", reason="boom"),
                        row("adaln_modulate", "triton", 1.0)])
    assert (check["copy_ms"], check["copy_ratio"], check["met"]) == (None, None, True)
    check = only_check([row("adaln_modulate", "copy", 1.0), row("adaln_modulate", "triton", None,
                                                                status="interpreter", reason="not a speed figure")])
    assert (check["copy_ms"], check["copy_ratio"]) == (1.0, None)
    assert only_check([row("linear_gelu", "eager", 3.0), row("linear_gelu", "triton", 2.5)])["copy_ms"] is None


@pytest.mark.parametrize("triton_ms, met", [(1.9, True), (2.0, True), (2.1, False)])
def test_attention_is_held_to_the_fastest_sdpa_backend_that_ran(triton_ms, met):
    check = only_check([row("attention", "eager", 1.0), row("attention", "triton", triton_ms),
                        row("attention", "sdpa-math", 5.0), row("attention", "sdpa-flash", 2.0),
                        row("attention", "sdpa-cudnn", None, status="unavailable", reason="no cudnn"),
                        row("attention", "xformers", 0.5)])
    assert (check["baseline"], check["baseline_ms"]) == ("sdpa-flash", 2.0)
    assert check["ratio"] == pytest.approx(2.0 / triton_ms) and check["met"] is met


def test_linear_gelu_is_held_to_eager_matmul_then_gelu():
    check = only_check([row("linear_gelu", "eager", 3.0), row("linear_gelu", "compile", 2.0),
                        row("linear_gelu", "triton", 2.5)])
    assert (check["baseline"], check["baseline_ms"], check["met"]) == ("eager", 3.0, True)
    assert check["ratio"] == pytest.approx(1.2)


def test_no_verdict_without_a_timed_baseline_or_a_timed_triton_row():
    check = only_check([row("attention", "triton", 1.0), row("attention", "sdpa-flash", None, status="unavailable",
                                                                     reason="head dim")])
    assert (check["met"], check["ratio"], check["reason"]) == (None, None, "no baseline row was timed")
    # --time-interpreter times the interpreter: still no speed figure, so no verdict
    check = only_check([row("linear_gelu", "eager", 3.0),
                        row("linear_gelu", "triton", 900.0, status="interpreter", reason="not a speed figure")])
    assert (check["met"], check["triton_ms"]) == (None, None)
    assert check["reason"] == "triton row interpreter: not a speed figure"
    # a memory-bound op's target needs the triton row's bytes, which an untimed row lacks
    check = only_check([row("gated_residual", "triton", None, status="unavailable", reason="no triton")])
    assert (check["met"], check["baseline_ms"], check["reason"]) == (None, None, "triton row unavailable: no triton")


def test_one_check_per_triton_row_of_each_config_and_pass():
    # each pass against its own eager row: the slower backward does not lend the forward its time
    records = [row("linear_gelu", backend, ms, pass_name=pass_name)
               for pass_name, eager_ms in (("forward", 3.0), ("forward+backward", 9.0))
               for backend, ms in (("eager", eager_ms), ("triton", 4.0))]
    records += [dict(r, batch_size=64, ms=r["ms"] / 2 if r["backend"] == "triton" else r["ms"]) for r in records]
    checks = target_checks(records)
    assert [(c["batch_size"], c["pass"], c["baseline_ms"], c["met"]) for c in checks] == [
        (32, "forward", 3.0, False), (32, "forward+backward", 9.0, True), (64, "forward", 3.0, True),
        (64, "forward+backward", 9.0, True)]


def kernel_records(records):
    """The made-up rows completed with the other fields of a kernel record."""
    fields = report.load_schema()["kernels"]
    filler = {"string": "x", "integer": 1, "number": 1.0, "array": [], "boolean": False}
    return [{name: record.get(name, None if spec["nullable"] else filler[spec["type"]])
             for name, spec in fields.items()} for record in records]


def test_markdown_and_json_show_the_verdicts(tmp_path):
    records = kernel_records([row("linear_gelu", "eager", 3.0), row("linear_gelu", "triton", 2.5),
                              row("gated_residual", "triton", 1.3), row("gated_residual", "copy", 1.04)])
    text = report.kernels_markdown(records)
    assert "| op | pass | target | triton | baseline | baseline / triton | same-size copy / triton | verdict |" in text
    assert "| linear_gelu | forward | as fast as eager: a matmul (cuBLAS on CUDA), then GELU | 2.50 ms | eager: 3.00 ms " \
           "| 1.20 | - | met |" in text
    assert "| gated_residual | forward |" in text and "| 0.90 | 0.80 | missed |" in text
    assert "- copy: one tensor copy that reads and writes the pass's bytes (half each)" in text
    path = tmp_path / "kernels.json"
    report.write_json(str(path), "kernels", records, {})
    payload = json.loads(path.read_text())
    assert [check["met"] for check in payload["targets"]] == [True, False]
    report.check_records(payload["targets"], "targets")
