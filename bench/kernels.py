"""Per-op microbenchmarks (`fusedit bench kernels`): each fused op at a DiT config's shapes,
forward and forward+backward, against the eager op, torch.compile of the eager op and,
for attention, every SDPA backend (flash, efficient, cudnn, math) and xformers. The
memory-bound ops also get a `copy` row: one tensor copy that reads and writes the pass's
lower-bound bytes, timed the same way, which shows the bandwidth a kernel of that size can
reach (launch, ramp-up and tail included) beside the large copy their target is set by.

Each row: time (median, min, max), achieved GB/s and Tflop/s, and the fraction of its
roofline, max(bytes / measured copy bandwidth, matmul flops / peak). Bytes and flops are
lower bounds: every tensor the math needs is read or written once, matmuls count 2 flops
per multiply-add, elementwise math is free. With B batch, T tokens, C channels (H heads
of D), N = 4C the MLP width, and e bytes per element:

    op                       forward bytes        backward bytes       flops fwd / bwd
    adaln_modulate           e(2BTC + 2BC)        e(3BTC + 3BC)        - / -
    gated_residual           e(3BTC + BC)         e(3BTC + 2BC)        - / -
    residual_adaln_modulate  e(4BTC + 3BC)        e(6BTC + 5BC)        - / -
    attention                e 4BTC               e 8BTC               4BT^2C / 8BT^2C
    cross_attention          e(2BTC + 2BLC)       e(4BTC + 4BLC)       4BTLC / 8BTLC
    linear_gelu (M = BT)     e(MC + NC + N + MN)  e(MN + 2MC + 2NC + 2N)  2MNC / 4MNC

(gated_residual's backward passes the incoming gradient on as dx without a copy; the
attention backward's 4 matmuls exclude a flash kernel's recomputation of the scores.)
cross_attention is the `attention` op as the cross_attn block calls it: T image-token
queries against keys and values from its L = 2 context tokens (t and y); only configs with
that block have it, and it is timed for them by default.
At DiT-XL/2 (B=32, T=256, C=1152, bf16) one (B,T,C) tensor is 18.9 MB: the elementwise
ops and attention are memory-bound on an H100 (attention at T=256 does 128 flop/byte,
under the ~300 of the ridge), linear_gelu is compute-bound (87 Gflop forward).

Inputs are random and never zero, laid out as the DiT lays them out (q, k, v are views of
one (B,T,3,H,D) qkv tensor), and rotated through enough copies to overflow the cache.
"""
import math
import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from fusedit.kernels import reference
from fusedit.kernels.testing import random_like_nonzero, relative_error

from .devices import DTYPES, cache_bytes, matmul_peak, measure_copy_bandwidth
from .environment import environment
from .configs import (build_model, check_choices, check_device, check_options, check_seed, compile_label,
                      compile_options, default_device, enable_triton_interpreter_on_cpu, model_label, model_sizes,
                      non_negative_int, note_error, positive_int, run_grid)
from .report import progress_bar
from .targets import ATTENTION_OPS, MEMORY_BOUND_OPS
from .timing import time_calls

OPS = ("adaln_modulate", "gated_residual", "residual_adaln_modulate", "attention", "cross_attention", "linear_gelu")
PASSES = ("forward", "forward+backward")
SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                 "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}
# compile last, as in the model runs: its autotuning is the slow part of a run
KERNEL_BACKENDS = ("eager", "triton", "copy", *SDPA_BACKENDS, "xformers", "compile")
ATTENTION_ONLY = (*SDPA_BACKENDS, "xformers")
MAX_INPUT_SETS = 64  # a CPU's small ops need dozens to pass its last-level cache; a GPU's need 2 or 3


@dataclass(frozen=True)
class KernelSettings:
    device: str
    warmup: int
    repeats: int
    compile_mode: str
    compile_backend: str = "inductor"
    measure_peak: bool | None = None
    time_interpreter: bool = False
    seed: int = 0


def default_kernel_settings(device=None):
    """GPU: enough repetitions for microsecond kernels; compile without CUDA graphs: the
    launch overhead a graph saves is not in these figures (the host queues ahead, see
    timing.py), and a graph would copy each fresh input into its own buffers. CPU: quick."""
    device = device or default_device()
    if torch.device(device).type == "cuda":
        return KernelSettings(device=device, warmup=10, repeats=50, compile_mode="max-autotune-no-cudagraphs")
    return KernelSettings(device=device, warmup=2, repeats=5, compile_mode="default")


def resolve_kernel_settings(device=None, **options):
    """default_kernel_settings(device) with `options` (fields of KernelSettings) replacing defaults, checked."""
    device = check_device(device or default_device())
    check_options(options, KernelSettings)
    settings = replace(default_kernel_settings(device), device=device, **options)
    positive_int("repeats", settings.repeats)
    non_negative_int("warmup", settings.warmup)
    check_seed(settings.seed)
    return settings


def default_kernel_run(device=None):
    """The shapes the kernels' docstrings quote on GPU (DiT-XL/2, batch 32); small on CPU."""
    device = device or default_device()
    if torch.device(device).type == "cuda":
        return {"models": ["DiT-XL/2"], "dtype": "bf16", "batch_size": 32, "image_size": 256}
    return {"models": ["DiT-S/2"], "dtype": "fp32", "batch_size": 2, "image_size": 256}


# ---- shapes and the five ops -----------------------------------------------------------------

@dataclass(frozen=True)
class Shapes:
    batch: int
    tokens: int
    hidden: int
    heads: int
    mlp_hidden: int
    context_tokens: int = 0  # L, the keys of the cross_attn block's second attention; 0 without one

    @property
    def head_dim(self):
        return self.hidden // self.heads


def shapes_for(model, image_size, batch_size):
    """The op shapes inside `model`'s blocks at `image_size`, read off a model built on the meta
    device: in-context blocks see the t and y tokens too, and cross-attention blocks read
    those 2 tokens as their context."""
    dit = build_model(model, image_size, "meta")
    sizes = model_sizes(dit)
    tokens = (dit.input_size // dit.patch_size) ** 2 + (2 if dit.block == "in_context" else 0)
    return Shapes(batch_size, tokens, sizes["hidden_size"], sizes["num_heads"], dit.blocks[0].mlp.fc1.out_features,
                  context_tokens=2 if dit.block == "cross_attn" else 0)


def config_has(op, shapes):
    """Whether the config's blocks call `op`: cross_attention needs cross-attention blocks."""
    return op != "cross_attention" or shapes.context_tokens > 0


@dataclass(frozen=True)
class OpCase:
    """One op: its named inputs (shape functions), how to call it, its outputs' shapes, and
    the lower-bound bytes (in elements) and matmul flops of each pass. `kernel` names the
    fusedit op it runs when that is not `name`."""
    name: str
    inputs: dict  # name -> shape(Shapes) ; the op's differentiable leaves
    call: object  # (function, tensors dict) -> output or tuple of outputs
    outputs: object  # Shapes -> list of output shapes
    forward_elements: object
    backward_elements: object
    forward_flops: object = None
    backward_flops: object = None
    kernel: str = None

    @property
    def kernel_op(self):
        return self.kernel or self.name


def _activation(s):
    return (s.batch, s.tokens, s.hidden)


def _per_sample(s):
    return (s.batch, s.hidden)


def _btc(s):
    return s.batch * s.tokens * s.hidden


def _bc(s):
    return s.batch * s.hidden


def _head_views(packed):
    """The DiT's (B,T,n,H,D) packed projections (qkv, or a context's kv) -> n (B,H,T,D) views."""
    return packed.permute(2, 0, 3, 1, 4).unbind(0)


def _btlc(s):
    return s.batch * s.context_tokens * s.hidden


def _mlp_forward_elements(s):
    """linear_gelu, M = B*T rows: read x (M,C), W (N,C), b (N); write (M,N)."""
    return _btc(s) + s.mlp_hidden * s.hidden + s.mlp_hidden + s.batch * s.tokens * s.mlp_hidden


def _mlp_backward_elements(s):
    """Read dout (M,N), x, W, b (to recompute the pre-activation); write dx, dW, db."""
    return s.batch * s.tokens * s.mlp_hidden + 2 * _btc(s) + 2 * s.mlp_hidden * s.hidden + 2 * s.mlp_hidden


OP_CASES = {case.name: case for case in (
    OpCase(name="adaln_modulate",
           inputs={"x": _activation, "shift": _per_sample, "scale": _per_sample},
           call=lambda fn, t: fn(t["x"], t["shift"], t["scale"]),
           outputs=lambda s: [_activation(s)],
           forward_elements=lambda s: 2 * _btc(s) + 2 * _bc(s),
           backward_elements=lambda s: 3 * _btc(s) + 3 * _bc(s)),
    OpCase(name="gated_residual",
           inputs={"x": _activation, "gate": _per_sample, "y": _activation},
           call=lambda fn, t: fn(t["x"], t["gate"], t["y"]),
           outputs=lambda s: [_activation(s)],
           forward_elements=lambda s: 3 * _btc(s) + _bc(s),
           backward_elements=lambda s: 3 * _btc(s) + 2 * _bc(s)),
    OpCase(name="residual_adaln_modulate",
           inputs={"x": _activation, "gate": _per_sample, "y": _activation, "shift": _per_sample,
                   "scale": _per_sample},
           call=lambda fn, t: fn(t["x"], t["gate"], t["y"], t["shift"], t["scale"]),
           outputs=lambda s: [_activation(s)] * 2,
           forward_elements=lambda s: 4 * _btc(s) + 3 * _bc(s),
           backward_elements=lambda s: 6 * _btc(s) + 5 * _bc(s)),
    OpCase(name="attention",
           inputs={"qkv": lambda s: (s.batch, s.tokens, 3, s.heads, s.head_dim)},
           call=lambda fn, t: fn(*_head_views(t["qkv"])),
           outputs=lambda s: [(s.batch, s.heads, s.tokens, s.head_dim)],
           forward_elements=lambda s: 4 * _btc(s),
           backward_elements=lambda s: 8 * _btc(s),
           forward_flops=lambda s: 4 * s.tokens * _btc(s),
           backward_flops=lambda s: 8 * s.tokens * _btc(s)),
    OpCase(name="cross_attention", kernel="attention",
           inputs={"q": lambda s: (s.batch, s.tokens, s.heads, s.head_dim),
                   "kv": lambda s: (s.batch, s.context_tokens, 2, s.heads, s.head_dim)},
           call=lambda fn, t: fn(t["q"].transpose(1, 2), *_head_views(t["kv"])),
           outputs=lambda s: [(s.batch, s.heads, s.tokens, s.head_dim)],
           forward_elements=lambda s: 2 * _btc(s) + 2 * _btlc(s),
           backward_elements=lambda s: 4 * _btc(s) + 4 * _btlc(s),
           forward_flops=lambda s: 4 * s.tokens * _btlc(s),
           backward_flops=lambda s: 8 * s.tokens * _btlc(s)),
    OpCase(name="linear_gelu",
           inputs={"x": _activation, "weight": lambda s: (s.mlp_hidden, s.hidden), "bias": lambda s: (s.mlp_hidden,)},
           call=lambda fn, t: fn(t["x"], t["weight"], t["bias"]),
           outputs=lambda s: [(s.batch, s.tokens, s.mlp_hidden)],
           forward_elements=_mlp_forward_elements,
           backward_elements=_mlp_backward_elements,
           forward_flops=lambda s: 2 * _btc(s) * s.mlp_hidden,
           backward_flops=lambda s: 4 * _btc(s) * s.mlp_hidden),
)}


def pass_cost(case, shapes, pass_name, element_size):
    """(bytes, flops or None) of one call of `pass_name`, lower bounds."""
    elements = case.forward_elements(shapes)
    flops = case.forward_flops(shapes) if case.forward_flops else None
    if pass_name == "forward+backward":
        elements += case.backward_elements(shapes)
        flops = flops + case.backward_flops(shapes) if flops is not None else None
    return elements * element_size, flops


def make_input_sets(case, shapes, dtype, device, count, seed):
    """`count` independent (inputs, output gradients) pairs; inputs are grad-enabled leaves."""
    generator = torch.Generator().manual_seed(seed)
    sets = []
    for _ in range(count):
        tensors = {}
        for name, shape in case.inputs.items():
            tensor = random_like_nonzero(shape(shapes), torch.float32, "cpu", generator)
            if name == "weight":
                tensor = tensor * shape(shapes)[-1] ** -0.5  # keep x @ W^T of order one, like a trained layer
            tensors[name] = tensor.to(device=device, dtype=dtype).requires_grad_(True)
        grads = [random_like_nonzero(shape, dtype, device, generator) for shape in case.outputs(shapes)]
        sets.append((tensors, grads))
    return sets


def input_set_count(case, shapes, dtype, device):
    """Enough input sets that one round through them overflows the cache twice over."""
    element_size = torch.empty((), dtype=dtype).element_size()
    per_set = sum(math.prod(shape(shapes)) for shape in case.inputs.values())
    per_set += sum(math.prod(shape) for shape in case.outputs(shapes))
    return max(1, min(MAX_INPUT_SETS, math.ceil(2 * cache_bytes(device) / (per_set * element_size))))


def _as_tuple(outputs):
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def run_pass(case, function, tensors, grads, pass_name):
    """One call of the pass; forward+backward returns the gradients of the inputs."""
    if pass_name == "forward":
        with torch.no_grad():
            return _as_tuple(case.call(function, tensors))
    outputs = _as_tuple(case.call(function, tensors))
    return outputs + torch.autograd.grad(outputs, list(tensors.values()), grads)


# ---- backends ------------------------------------------------------------------------------------

def backend_times(op, backend):
    """The SDPA backends and xformers time the attention ops only, copy the memory-bound ones."""
    if backend == "copy":
        return op in MEMORY_BOUND_OPS
    return op in ATTENTION_OPS or backend not in ATTENTION_ONLY


def copy_buffers(case, shapes, pass_name, dtype, device, seed):
    """(sources, destinations) of the `copy` row of `case`'s pass: each copy reads and writes
    half of the pass's lower-bound bytes, rotated through enough pairs to miss the cache."""
    element_size = torch.empty((), dtype=dtype).element_size()
    nbytes, _ = pass_cost(case, shapes, pass_name, element_size)
    count = max(1, min(MAX_INPUT_SETS, math.ceil(2 * cache_bytes(device) / max(nbytes, 1))))
    generator = torch.Generator().manual_seed(seed)
    sources = [random_like_nonzero((nbytes // (2 * element_size),), dtype, device, generator) for _ in range(count)]
    return sources, [torch.empty_like(source) for source in sources]


class Unavailable(Exception):
    """The backend cannot run this op here; the message says why."""


def _sdpa(enum_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, enum_name, None)
    if backend is None:
        raise Unavailable(f"this torch ({torch.__version__}) has no SDPBackend.{enum_name}")

    def attention(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return attention


def backend_function(op, backend, settings, compiled):
    """The callable `backend` runs `op` (a name of OP_CASES) with; raises Unavailable with the reason."""
    on_cpu = torch.device(settings.device).type == "cpu"
    kernel = OP_CASES[op].kernel_op
    if backend == "eager":
        return getattr(reference, kernel)
    if backend == "compile":
        if op not in compiled:
            compiled[op] = torch.compile(getattr(reference, kernel), **compile_options(settings))
        return compiled[op]
    if backend == "triton":
        problem = enable_triton_interpreter_on_cpu() if on_cpu else None
        if problem:
            raise Unavailable(problem)
        try:
            from fusedit.kernels import triton as triton_ops
        except Exception as error:
            raise Unavailable(f"fusedit.kernels.triton is not importable ({type(error).__name__}: {error})") from error
        return getattr(triton_ops, kernel)
    if backend in SDPA_BACKENDS:
        return _sdpa(SDPA_BACKENDS[backend])
    if backend == "xformers":
        from fusedit.kernels.attention_backends import xformers_attention, xformers_available

        if on_cpu:
            raise Unavailable("xformers' memory_efficient_attention runs on CUDA only")
        available, why = xformers_available()
        if not available:
            raise Unavailable(why)
        return xformers_attention
    raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(KERNEL_BACKENDS)}")


# ---- records ---------------------------------------------------------------------------------------

def new_kernel_record(label, image_size, dtype_name, shapes, op, pass_name, backend, settings, measured, env):
    """Every field of a kernel record (fusedit/bench/schema.json, "kernels"), unmeasured ones None."""
    return {
        "model": label, "image_size": image_size, "dtype": dtype_name, "batch_size": shapes.batch,
        "tokens": shapes.tokens, "hidden_size": shapes.hidden, "num_heads": shapes.heads, "head_dim": shapes.head_dim,
        "context_tokens": shapes.context_tokens if op == "cross_attention" else None,
        "op": op, "pass": pass_name, "backend": backend, "status": "ok", "reason": None, "notes": [],
        "compile_mode": compile_label(settings) if backend == "compile" else None,
        "ms": None, "ms_min": None, "ms_max": None, "bytes": None, "flops": None,
        "achieved_gb_per_s": None, "achieved_tflops": None, "roofline_ms": None, "bound": None,
        "roofline_fraction": None, "rel_error_vs_eager": None, "input_sets": None,
        "bandwidth_gb_per_s": measured["bandwidth"], "peak_tflops": measured["peak"].tflops,
        "peak_source": measured["peak"].source, "warmup": settings.warmup, "repeats": settings.repeats,
        **env,
    }


def _fill_roofline(record, timing, nbytes, flops, bandwidth, peak_tflops):
    seconds = timing.median_s
    record.update(ms=seconds * 1e3, ms_min=timing.min_s * 1e3, ms_max=timing.max_s * 1e3, bytes=nbytes, flops=flops)
    if record["status"] == "interpreter":
        return  # its time (--time-interpreter) is the interpreter's: no rate or roofline fraction drawn from it
    record["achieved_gb_per_s"] = nbytes / seconds / 1e9
    memory_seconds = nbytes / (bandwidth * 1e9)
    compute_seconds = None
    if flops is not None:
        record["achieved_tflops"] = flops / seconds / 1e12
        compute_seconds = flops / (peak_tflops * 1e12) if peak_tflops else None
        if compute_seconds is None:
            record["notes"].append("roofline: the device's peak flops are unknown (pass --measure-peak)")
            return
    bound_seconds, bound = (compute_seconds, "compute") if compute_seconds and compute_seconds > memory_seconds \
        else (memory_seconds, "memory")
    record.update(roofline_ms=bound_seconds * 1e3, bound=bound, roofline_fraction=bound_seconds / seconds)
    if record["roofline_fraction"] > 1.05:
        record["notes"].append(f"faster than its roofline ({record['roofline_fraction']:.0%}): part of its data "
                               "stayed in a cache, or the copy bandwidth or peak was measured low (a busy machine?)")


class _EagerResults:
    """The eager op's outputs (and input gradients) on input set 0, per op and pass."""

    def __init__(self):
        self.cache = {}

    def get(self, case, input_sets, pass_name):
        key = (case.name, pass_name)
        if key not in self.cache:
            tensors, grads = input_sets[0]
            self.cache[key] = [r.detach() for r in run_pass(case, getattr(reference, case.kernel_op), tensors, grads,
                                                            pass_name)]
        return self.cache[key]


def first_call(case, backend, function, tensors, grads, pass_name, device):
    """The first (untimed) call, which also compiles or autotunes. An SDPA backend or xformers
    failing on these inputs is Unavailable, with torch's warnings saying why."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return run_pass(case, function, tensors, grads, pass_name)
        except (RuntimeError, NotImplementedError) as error:
            if backend not in ATTENTION_ONLY:
                raise
            said = "; ".join(dict.fromkeys(str(w.message).strip() for w in caught))
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise Unavailable(f"{backend} does not run these inputs on {torch.device(device).type}: {first_line}"
                              + (f" ({said})" if said else "")) from error


def _copy_row(case, pass_name, shapes, dtype, settings, record):
    sources, destinations = copy_buffers(case, shapes, pass_name, dtype, settings.device, settings.seed)
    count = len(sources)
    timing = time_calls(lambda index: destinations[index % count].copy_(sources[index % count]),
                        settings.device, settings.warmup, settings.repeats, queue_ahead=True)
    record["input_sets"] = count
    nbytes = 2 * sources[0].numel() * sources[0].element_size()
    _fill_roofline(record, timing, nbytes, None, record["bandwidth_gb_per_s"], record["peak_tflops"])


def _row(case, backend, pass_name, shapes, input_sets, eager, settings, record, compiled):
    """Fill one record: the first call checked against eager on input set 0, then timing."""
    function = backend_function(case.name, backend, settings, compiled)
    if backend == "triton" and torch.device(settings.device).type == "cpu":
        record["status"], record["reason"] = "interpreter", "not a speed figure"
        if not settings.time_interpreter:
            return
    tensors, grads = input_sets[0]
    results = first_call(case, backend, function, tensors, grads, pass_name, settings.device)
    if backend != "eager":
        record["rel_error_vs_eager"] = max(relative_error(got, want)
                                           for got, want in zip(results, eager.get(case, input_sets, pass_name)))
        if not math.isfinite(record["rel_error_vs_eager"]):
            record["notes"].append("its result holds NaN or inf")
    del results
    count = len(input_sets)
    timing = time_calls(lambda index: run_pass(case, function, *input_sets[index % count], pass_name),
                        settings.device, settings.warmup, settings.repeats, queue_ahead=True)
    record["input_sets"] = count
    element_size = tensors[next(iter(tensors))].element_size()
    nbytes, flops = pass_cost(case, shapes, pass_name, element_size)
    _fill_roofline(record, timing, nbytes, flops, record["bandwidth_gb_per_s"], record["peak_tflops"])


def run_kernel_benchmark(models=None, ops=None, backends=None, passes=None, dtype=None, batch_size=None,
                         image_size=None, device=None, progress=False, on_record=None, **options):
    """Time each fused op at each model config's shapes on each backend; one record per
    (config, dtype, batch size, op, pass, backend) with the fields of fusedit/bench/schema.json
    ("kernels"). Ops default to all of OPS (cross_attention for configs with cross-attention
    blocks only); backends to all of KERNEL_BACKENDS (the SDPA ones and xformers
    for the attention ops only, copy for the memory-bound ones; on CPU `compile` is
    skipped unless named, as its C++ build is slow);
    on_record: called with the records so far after each row, as in run_benchmark;
    options: any field of KernelSettings."""
    settings = resolve_kernel_settings(device, **options)
    device = settings.device
    explicit_ops = ops is not None
    ops = check_choices("op", ops if explicit_ops else OPS, OPS)
    passes = check_choices("pass", passes if passes is not None else PASSES, PASSES)
    explicit = backends is not None
    backends = check_choices("kernel backend", backends if explicit else KERNEL_BACKENDS, KERNEL_BACKENDS)
    runs = run_grid(models, image_size, dtype, batch_size, default_kernel_run(device))
    rows = [(op, pass_name, backend) for op in ops for pass_name in passes for backend in backends
            if backend_times(op, backend)]
    if not rows:
        what = [f"{', '.join(b for b in backends if b in ATTENTION_ONLY)} time attention ops only "
                f"({', '.join(ATTENTION_OPS)})" if any(b in ATTENTION_ONLY for b in backends) else None,
                f"copy times memory-bound ops only ({', '.join(MEMORY_BOUND_OPS)})" if "copy" in backends else None]
        raise ValueError(f"nothing to time: {'; '.join(filter(None, what))}; add such an op or another backend "
                         "(eager, compile, triton)")

    on_cpu = torch.device(device).type == "cpu"
    if on_cpu and "triton" in backends:
        enable_triton_interpreter_on_cpu()  # now, before anything imports triton; rows report if too late
    # the shapes (meta-device models) only now: building a DiT imports triton
    runs = [(model, size, dtype_name, batch, shapes_for(model, size, batch)) for model, size, dtype_name, batch in runs]
    if explicit_ops and "cross_attention" in ops and not any(shapes.context_tokens for *_, shapes in runs):
        raise ValueError(f"op cross_attention: no config here has cross-attention blocks "
                         f"({', '.join(dict.fromkeys(model_label(run[0]) for run in runs))}); pass --block cross_attn "
                         "(block='cross_attn' in a custom model)")
    env = environment(device)
    bandwidth = measure_copy_bandwidth(device)
    peaks = {name: matmul_peak(device, name, settings.measure_peak) for name in dict.fromkeys(r[2] for r in runs)}
    # The compile rows run after all the others (their autotuning is the slow part), so a run
    # cut short keeps every other row; records stay in table order.
    records, compiled = [], {}
    with progress_bar(sum(config_has(row[0], run[-1]) for run in runs for row in rows), progress) as bar:
        for model, size, dtype_name, batch, shapes in runs:
            config_rows = [row for row in rows if config_has(row[0], shapes)]
            run_order = sorted(range(len(config_rows)), key=lambda index: config_rows[index][2] == "compile")
            dtype = DTYPES[dtype_name]
            measured = {"bandwidth": bandwidth, "peak": peaks[dtype_name]}
            eager, input_sets, finished = _EagerResults(), {}, [None] * len(config_rows)
            for index in run_order:
                op, pass_name, backend = config_rows[index]
                case = OP_CASES[op]
                record = new_kernel_record(model_label(model), size, dtype_name, shapes, op, pass_name, backend,
                                           settings, measured, env)
                bar.describe(f"{model_label(model)} {dtype_name} b{batch} | {op} {pass_name} | {backend}")
                if backend == "compile" and on_cpu and not explicit:
                    record["status"], record["reason"] = "skipped", ("torch.compile's C++ build takes minutes on CPU; "
                                                                     "pass --backend compile to time it")
                else:
                    if op not in input_sets and backend != "copy":
                        count = input_set_count(case, shapes, dtype, device)
                        input_sets = {op: make_input_sets(case, shapes, dtype, device, count, settings.seed)}
                    try:
                        if backend == "copy":
                            _copy_row(case, pass_name, shapes, dtype, settings, record)
                        else:
                            _row(case, backend, pass_name, shapes, input_sets[op], eager, settings, record, compiled)
                    except Unavailable as why:
                        record["status"], record["reason"] = "unavailable", str(why)
                    except Exception as error:  # a broken backend must not lose the other rows
                        note_error(record, "run", error)
                        record["status"], record["reason"] = "error", record["notes"].pop()
                finished[index] = record
                if on_record is not None:
                    on_record(records + [record for record in finished if record is not None])
                bar.advance()
            records += finished
    return records
