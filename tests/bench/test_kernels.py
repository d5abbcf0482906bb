"""fusedit.bench.run_kernel_benchmark: one row per (op, pass, backend) with its roofline,
attention-only backends only for attention, unavailable backends reported with a reason,
and the bytes and flops counts checked by hand at DiT-XL/2 shapes."""
import contextlib
from types import SimpleNamespace

import pytest
import torch

import fusedit.bench as bench
from fusedit.bench import kernels
from fusedit.bench.timing import Timing
from fusedit.kernels import reference
from fusedit.bench.kernels import OP_CASES, Shapes, input_set_count, pass_cost, shapes_for
from fusedit.dit.models import CrossAttention

ON_GPU = torch.cuda.is_available()
# 25 tokens (5x5 latents, patch 1) of 80 channels in 2 heads of 40: odd sizes, quick on a CPU.
TINY = {"name": "tiny", "depth": 1, "hidden_size": 80, "num_heads": 2, "patch_size": 1}
BACKENDS = ["eager", "compile", "triton", "copy", "sdpa-math", "sdpa-efficient", "xformers"]


@pytest.fixture(scope="module")
def run_with_snapshots():
    """(records, the list on_record saw after each row)."""
    snapshots = []
    # fp32 on every device (a GPU's default is bf16): the rows' errors against eager are held to 1e-5
    records = bench.run_kernel_benchmark(models=[TINY], image_size=40, batch_size=2, backends=BACKENDS, repeats=2,
                                         warmup=1, compile_backend="eager", dtype="fp32",
                                         on_record=lambda so_far: snapshots.append(list(so_far)))
    return records, snapshots


@pytest.fixture(scope="module")
def records(run_with_snapshots):
    return run_with_snapshots[0]


def test_rows_are_reported_as_they_finish_with_compile_last(run_with_snapshots):
    records, snapshots = run_with_snapshots
    assert len(snapshots) == len(records) and snapshots[-1] == records
    finished_order = [next(r for r in snapshot if all(r is not earlier for earlier in previous))["backend"]
                      for previous, snapshot in zip([[]] + snapshots, snapshots)]
    first_compile = finished_order.index("compile")
    assert set(finished_order[first_compile:]) == {"compile"}, finished_order
    assert all(snapshot == [r for r in records if any(r is s for s in snapshot)] for snapshot in snapshots), \
        "every snapshot is in table order"


def rows(records, **match):
    return [r for r in records if all(r[key] == value for key, value in match.items())]


def test_rows_cover_every_op_pass_and_applicable_backend(records):
    attention_only = {"sdpa-math", "sdpa-efficient", "xformers"}
    # TINY has no cross-attention blocks, so no cross_attention rows
    memory_bound = {"adaln_modulate", "gated_residual", "residual_adaln_modulate"}
    expected = [(op, pass_name, backend) for op in bench.OPS if op != "cross_attention" for pass_name in bench.PASSES
                for backend in BACKENDS if (op == "attention" or backend not in attention_only)
                and (op in memory_bound or backend != "copy")]
    assert [(r["op"], r["pass"], r["backend"]) for r in records] == expected


def test_records_match_the_schema(records):
    bench.report.check_records(records, "kernels")
    assert list(records[0]) == list(bench.report.load_schema()["kernels"]), "fields out of the schema's order"


@pytest.mark.parametrize("backend", ["eager", "compile", "sdpa-math", "copy"])
def test_timed_rows_are_sane(records, backend):
    for record in rows(records, backend=backend):
        assert record["status"] == "ok", record["reason"]
        assert 0 < record["ms_min"] <= record["ms"] <= record["ms_max"]
        assert record["achieved_gb_per_s"] == pytest.approx(record["bytes"] / (record["ms"] / 1e3) / 1e9)
        assert record["bound"] in ("memory", "compute")
        assert record["roofline_fraction"] == pytest.approx(record["roofline_ms"] / record["ms"])
        assert record["roofline_fraction"] > 0 and record["input_sets"] >= 1
        assert record["compile_mode"] == ("eager backend" if backend == "compile" else None)
        if record["op"] in ("attention", "linear_gelu"):
            assert record["achieved_tflops"] == pytest.approx(record["flops"] / (record["ms"] / 1e3) / 1e12)
        else:
            assert record["flops"] is None and record["bound"] == "memory"
        if backend in ("eager", "copy"):
            assert record["rel_error_vs_eager"] is None
        else:
            assert record["rel_error_vs_eager"] < 1e-5


def test_a_copy_row_moves_its_ops_bytes(records):
    copies = rows(records, backend="copy")
    assert {r["op"] for r in copies} == {"adaln_modulate", "gated_residual", "residual_adaln_modulate"}
    for record in copies:
        eager = rows(records, op=record["op"], backend="eager", **{"pass": record["pass"]})[0]
        # one copy reads and writes half the pass's bytes each: the same bytes, to an odd element
        assert eager["bytes"] - 4 <= record["bytes"] <= eager["bytes"]


def test_copy_buffers_hold_half_the_bytes_each_and_overflow_the_cache():
    case, shapes = OP_CASES["residual_adaln_modulate"], shapes_for("DiT-S/2", 256, 2)
    sources, destinations = kernels.copy_buffers(case, shapes, "forward", torch.float32, "cpu", seed=0)
    nbytes, _ = pass_cost(case, shapes, "forward", 4)  # 3.2 MB
    assert [s.numel() for s in sources] == [nbytes // 8] * len(sources) == [d.numel() for d in destinations]
    assert len(sources) * nbytes >= 2 * 64 * 2**20 > (len(sources) - 1) * nbytes  # the CPU's 64 MiB, twice
    assert all((s != 0).all() for s in sources) and not sources[0].equal(sources[1])


def test_every_triton_row_is_held_to_its_target(records):
    checks = bench.target_checks(records)
    bench.report.check_records(checks, "targets")
    assert [(c["op"], c["pass"]) for c in checks] == [(r["op"], r["pass"]) for r in rows(records, backend="triton")]
    for check in checks:
        if ON_GPU:  # sdpa-math is attention's baseline, eager linear_gelu's
            assert check["met"] in (True, False) and check["ratio"] > 0, check
        else:
            assert (check["met"], check["reason"]) == (None, "triton row interpreter: not a speed figure")


def test_shapes_are_the_configs():
    record_shapes = shapes_for(TINY, 40, 2)
    assert record_shapes == Shapes(batch=2, tokens=25, hidden=80, heads=2, mlp_hidden=320)
    assert record_shapes.head_dim == 40


def test_unavailable_backends_say_why(records):
    if ON_GPU:
        return
    for record in rows(records, backend="triton"):
        assert (record["status"], record["reason"], record["ms"]) == ("interpreter", "not a speed figure", None)
    for record in rows(records, backend="sdpa-efficient") + rows(records, backend="xformers"):
        assert record["status"] == "unavailable" and record["reason"]


def test_costs_at_dit_xl2_match_the_hand_count():
    shapes = shapes_for("DiT-XL/2", 256, 32)
    assert shapes == Shapes(batch=32, tokens=256, hidden=1152, heads=16, mlp_hidden=4608)
    activation = 32 * 256 * 1152  # one (B, T, C) tensor: 18.9 MB in bf16
    nbytes, flops = pass_cost(OP_CASES["adaln_modulate"], shapes, "forward", 2)
    assert (nbytes, flops) == (2 * (2 * activation + 2 * 32 * 1152), None)
    nbytes, flops = pass_cost(OP_CASES["attention"], shapes, "forward", 2)
    assert nbytes == 2 * 4 * activation and flops == 4 * 32 * 256 ** 2 * 1152  # 9.7 Gflop
    _, both = pass_cost(OP_CASES["attention"], shapes, "forward+backward", 2)
    assert both == 3 * flops
    _, flops = pass_cost(OP_CASES["linear_gelu"], shapes, "forward", 2)
    assert flops == 2 * 32 * 256 * 4608 * 1152  # 87 Gflop
    nbytes, _ = pass_cost(OP_CASES["gated_residual"], shapes, "forward+backward", 4)
    assert nbytes == 4 * (3 * activation + 32 * 1152 + 3 * activation + 2 * 32 * 1152)


def test_input_sets_overflow_the_cache():
    # x, y, the output's gradient and gate: 113 MB in fp32 at DiT-XL/2, batch 32; two sets
    # exceed twice the 64 MiB assumed for a CPU's last-level cache, one would not.
    shapes = shapes_for("DiT-XL/2", 256, 32)
    assert input_set_count(OP_CASES["gated_residual"], shapes, torch.float32, "cpu") == 2
    # DiT-S/2, batch 2 (the CPU default): 2.4 MB a set, 57 sets for 128 MiB
    assert input_set_count(OP_CASES["gated_residual"], shapes_for("DiT-S/2", 256, 2), torch.float32, "cpu") == 57
    # DiT-S/8: 38 KB a set; a round of 64 sets (the most made) stays in the cache
    assert input_set_count(OP_CASES["gated_residual"], shapes_for("DiT-S/8", 256, 1), torch.float32, "cpu") == 64


@pytest.mark.parametrize("arguments, message", [
    (dict(ops=["softmax"]), "unknown op 'softmax'"),
    (dict(backends=["cutlass"]), "unknown kernel backend 'cutlass'"),
    (dict(passes=["backward"]), "unknown pass 'backward'"),
    (dict(batch_size=-1), "batch size must be a positive integer"),
    (dict(dtype="int8"), "unknown dtype 'int8'"),
    (dict(ops=[]), "no op given"),
    (dict(seed=2 ** 32), "seed must be an integer in 0..4294967295"),
    (dict(repeats=0), "repeats must be a positive integer"),
    (dict(warmup=-1), "warmup must be a non-negative integer"),
    (dict(ops=["cross_attention"]), r"op cross_attention: no config here has cross-attention blocks \(tiny\); pass "
                                    "--block cross_attn"),
])
def test_bad_arguments_name_the_problem(arguments, message):
    with pytest.raises(ValueError, match=message):
        bench.run_kernel_benchmark(models=[TINY], image_size=40, **arguments)


@pytest.mark.parametrize("flops, bound, roofline_ms", [(1e12, "compute", 10.0), (1e10, "memory", 1.0)])
def test_roofline_is_the_slower_of_memory_and_compute(flops, bound, roofline_ms):
    record = {"notes": [], "status": "ok"}
    # 1 GB at 1000 GB/s: 1 ms; 1 Tflop at 100 Tflop/s: 10 ms; measured 20 ms
    kernels._fill_roofline(record, Timing(0.02, 0.01, 0.03, 3), 10 ** 9, flops, 1000.0, 100.0)
    assert record["bound"] == bound and record["roofline_ms"] == pytest.approx(roofline_ms)
    assert record["roofline_fraction"] == pytest.approx(roofline_ms / 20.0)
    interpreted = {"notes": [], "status": "interpreter"}  # timed by --time-interpreter: a time, no rate
    kernels._fill_roofline(interpreted, Timing(0.02, 0.01, 0.03, 3), 10 ** 9, flops, 1000.0, 100.0)
    assert interpreted["ms"] == pytest.approx(20.0) and not {"achieved_gb_per_s", "roofline_fraction"} & set(interpreted)
    assert record["notes"] == []


def test_a_row_faster_than_its_roofline_says_so():
    record = {"notes": [], "status": "ok"}
    kernels._fill_roofline(record, Timing(0.5e-3, 0.4e-3, 0.6e-3, 3), 10 ** 9, None, 1000.0, 100.0)  # 1 ms of bytes
    assert record["roofline_fraction"] == pytest.approx(2.0)
    assert record["notes"] == ["faster than its roofline (200%): part of its data stayed in a cache, or the copy "
                               "bandwidth or peak was measured low (a busy machine?)"]


def test_in_context_blocks_are_timed_with_the_two_condition_tokens():
    plain = kernels.shapes_for("DiT-S/8", 256, 2)
    in_context = kernels.shapes_for({"name": "x", "config": "DiT-S/8", "block": "in_context"}, 256, 2)
    assert (plain.tokens, in_context.tokens) == (16, 18) and in_context.hidden == plain.hidden == 384


def test_cross_attention_rows_time_the_attention_over_the_two_condition_tokens():
    model = {**TINY, "block": "cross_attn"}
    records = bench.run_kernel_benchmark(models=[model], image_size=40, batch_size=2, backends=["eager", "triton", "sdpa-math"],
                                         repeats=1, warmup=0, dtype="fp32", time_interpreter=True)
    cross = rows(records, op="cross_attention")
    assert [(r["pass"], r["backend"]) for r in cross] == [(p, b) for p in bench.PASSES for b in ["eager", "triton", "sdpa-math"]]
    assert {r["context_tokens"] for r in cross} == {2} and {r["context_tokens"] for r in records if r not in cross} == {None}
    b, t, l, c = 2, 25, 2, 80  # fp32: 4 bytes
    for record in cross:
        forward = record["pass"] == "forward"
        assert record["bytes"] == 4 * ((2 * b * t * c + 2 * b * l * c) if forward else (6 * b * t * c + 6 * b * l * c))
        assert record["flops"] == (4 if forward else 12) * b * t * l * c
        if record["backend"] != "eager":
            assert record["rel_error_vs_eager"] < 1e-5, record
    checks = [c for c in bench.target_checks(records) if c["op"] == "cross_attention"]
    assert [(c["pass"], c["baseline"]) for c in checks] == [(p, "sdpa-math") for p in bench.PASSES]
    assert "cross_attention (2 keys)" in bench.kernels_markdown(records)


def test_cross_attention_inputs_are_laid_out_as_the_block_lays_them_out():
    shapes = Shapes(batch=2, tokens=5, hidden=12, heads=3, mlp_hidden=48, context_tokens=2)
    seen = {}

    def recording(name):
        def attention(q, k, v, key_padding_mask=None):
            seen[name] = [(tensor.shape, tensor.stride()) for tensor in (q, k, v)]
            return q
        return attention

    case = OP_CASES["cross_attention"]
    case.call(recording("bench"), {name: torch.randn(shape(shapes)) for name, shape in case.inputs.items()})
    block = CrossAttention(12, 3)
    block(torch.randn(2, 5, 12), torch.randn(2, 2, 12), None, SimpleNamespace(attention=recording("model")))
    assert seen["bench"] == seen["model"]
    assert shapes_for({"name": "x", "config": "DiT-XL/2", "block": "cross_attn"}, 256, 32).context_tokens == 2


def test_input_sets_count_outputs_the_dtype_and_the_cache(monkeypatch):
    shapes = kernels.shapes_for("DiT-XL/2", 256, 32)
    # x, y, the output's gradient and gate: 56.7 MB in bf16 (113 MB in fp32), 2 x 64 MiB: three sets
    assert kernels.input_set_count(kernels.OP_CASES["gated_residual"], shapes, torch.bfloat16, "cpu") == 3
    monkeypatch.setattr(kernels, "cache_bytes", lambda device: 4 * 2 ** 20)
    assert kernels.input_set_count(kernels.OP_CASES["gated_residual"], shapes, torch.float32, "cpu") == 1


def test_backward_costs_at_dit_xl2_match_the_hand_count():
    shapes = kernels.shapes_for("DiT-XL/2", 256, 32)
    btc, bc, m, n, c = 32 * 256 * 1152, 32 * 1152, 32 * 256, 4608, 1152
    assert kernels.pass_cost(kernels.OP_CASES["adaln_modulate"], shapes, "forward+backward", 2)[0] == \
        2 * (2 * btc + 2 * bc + 3 * btc + 3 * bc)
    assert kernels.pass_cost(kernels.OP_CASES["residual_adaln_modulate"], shapes, "forward+backward", 2)[0] == \
        2 * (4 * btc + 3 * bc + 6 * btc + 5 * bc)
    assert kernels.pass_cost(kernels.OP_CASES["attention"], shapes, "forward+backward", 2)[0] == 2 * 12 * btc
    nbytes, flops = kernels.pass_cost(kernels.OP_CASES["linear_gelu"], shapes, "forward+backward", 2)
    assert flops == 6 * m * n * c
    assert nbytes == 2 * ((m * c + n * c + n + m * n) + (m * n + 2 * m * c + 2 * n * c + 2 * n))


def test_kernel_defaults_are_as_documented():
    # a device string is enough: no GPU is needed to pick the CUDA defaults
    assert kernels.default_kernel_settings("cuda") == kernels.KernelSettings(
        device="cuda", warmup=10, repeats=50, compile_mode="max-autotune-no-cudagraphs")
    assert kernels.default_kernel_settings("cpu") == kernels.KernelSettings(device="cpu", warmup=2, repeats=5, compile_mode="default")
    assert kernels.default_kernel_run("cuda") == {"models": ["DiT-XL/2"], "dtype": "bf16", "batch_size": 32, "image_size": 256}
    assert kernels.default_kernel_run("cpu") == {"models": ["DiT-S/2"], "dtype": "fp32", "batch_size": 2, "image_size": 256}




def test_error_vs_eager_covers_the_gradients_and_a_broken_backend_keeps_its_message(monkeypatch):

    real = kernels.backend_function

    def wrong_grad_of_y(x, gate, y):
        return reference.gated_residual(x, gate, 3 * y - 2 * y.detach())  # right output, y's grad 3x

    def exploding(*args):
        raise RuntimeError("kernel exploded")

    def fake(op, backend, settings, compiled):
        if backend == "compile":
            return wrong_grad_of_y if op == "gated_residual" else exploding
        return real(op, backend, settings, compiled)

    monkeypatch.setattr(kernels, "backend_function", fake)
    records = bench.run_kernel_benchmark(models=[TINY], image_size=40, batch_size=2, backends=["eager", "compile"],
                                         ops=["gated_residual", "adaln_modulate"], repeats=1, warmup=0, dtype="fp32")
    rows = {(r["op"], r["pass"], r["backend"]): r for r in records}
    assert rows["gated_residual", "forward", "compile"]["rel_error_vs_eager"] < 1e-6
    assert rows["gated_residual", "forward+backward", "compile"]["rel_error_vs_eager"] == pytest.approx(2.0)
    broken = rows["adaln_modulate", "forward", "compile"]
    assert broken["status"] == "error" and "kernel exploded" in broken["reason"]


def test_each_sdpa_backend_forces_its_kernel(monkeypatch):

    import torch.nn.attention as attention

    forced = []

    @contextlib.contextmanager
    def recording(backend):
        forced.append(backend)
        yield

    monkeypatch.setattr(attention, "sdpa_kernel", recording)
    settings = kernels.resolve_kernel_settings("cpu")
    q = torch.randn(1, 1, 4, 8)
    for name, enum_name in [("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-efficient", "EFFICIENT_ATTENTION"),
                            ("sdpa-cudnn", "CUDNN_ATTENTION"), ("sdpa-math", "MATH")]:
        kernels.backend_function("attention", name, settings, {})(q, q, q)
        assert forced[-1] == getattr(attention.SDPBackend, enum_name)


def test_an_unknown_peak_gives_a_compute_op_no_roofline():
    record = {"notes": [], "status": "ok"}
    kernels._fill_roofline(record, Timing(0.02, 0.01, 0.03, 3), 10 ** 9, 1e12, 1000.0, None)
    assert record["achieved_tflops"] == pytest.approx(50.0)
    assert (record.get("bound"), record.get("roofline_fraction")) == (None, None)
    assert record["notes"] == ["roofline: the device's peak flops are unknown (pass --measure-peak)"]


def test_input_sets_are_independent_nonzero_draws_with_scaled_weights():
    shapes = Shapes(batch=2, tokens=25, hidden=80, heads=2, mlp_hidden=320)
    sets = kernels.make_input_sets(OP_CASES["linear_gelu"], shapes, torch.float32, "cpu", 3, seed=0)
    assert len(sets) == 3
    for name in ("x", "weight", "bias"):
        first, *others = [tensors[name] for tensors, _ in sets]
        assert first.requires_grad and first.abs().min() > 0
        assert all(not torch.equal(first, other) for other in others), name
    tensors, (grad,) = sets[0]
    assert grad.shape == (2, 25, 320) and not torch.equal(grad, sets[1][1][0])
    # x @ W^T of order one: W drawn at 1/sqrt(C) of x's scale
    assert float(tensors["weight"].detach().std() / tensors["x"].detach().std()) == pytest.approx(80 ** -0.5, rel=0.1)


def test_forward_pass_builds_no_graph_and_forward_backward_returns_the_input_gradients():
    case = OP_CASES["gated_residual"]
    ((tensors, grads),) = kernels.make_input_sets(case, Shapes(2, 3, 8, 2, 32), torch.float32, "cpu", 1, seed=0)
    (output,) = kernels.run_pass(case, reference.gated_residual, tensors, grads, "forward")
    assert not output.requires_grad
    output, *gradients = kernels.run_pass(case, reference.gated_residual, tensors, grads, "forward+backward")
    assert [g.shape for g in gradients] == [t.shape for t in tensors.values()]


def test_timed_calls_follow_the_warmup_and_rotate_through_the_input_sets(monkeypatch):
    seen, timed = [], []

    def recording(x, gate, y):
        seen.append(x)
        return reference.gated_residual(x, gate, y)

    real_time_calls = kernels.time_calls

    def spy(call, device, warmup, repeats, **options):
        timed.append((warmup, repeats, options))
        return real_time_calls(call, device, warmup, repeats, **options)

    monkeypatch.setattr(kernels, "backend_function", lambda op, backend, settings, compiled: recording)
    monkeypatch.setattr(kernels, "time_calls", spy)
    (record,) = bench.run_kernel_benchmark(models=[TINY], image_size=40, batch_size=2, backends=["compile"],
                                           ops=["gated_residual"], passes=["forward"], repeats=3, warmup=2, dtype="fp32")
    # queue_ahead: on CUDA, the device's time without the launch overhead (fusedit.bench.timing)
    assert timed == [(2, 3, {"queue_ahead": True})] and record["input_sets"] == kernels.MAX_INPUT_SETS
    checked, *calls = seen  # the first call, on set 0, is checked against eager; then sets 0, 1, 2, 3, 4
    assert calls[0] is checked and len({id(x) for x in calls}) == 5
