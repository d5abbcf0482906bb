"""Checking a fused op against the reference: the float64 ground truth, poisoned outputs,
and the project's tolerances. Used by the tests and by the benchmark's parity rows."""
import contextlib

import torch
from torch._subclasses.fake_tensor import is_fake

# Max relative error (max |got - want| / max |want|) a fused op may show against the
# float64 reference, by storage dtype; attention gets more room in fp32 (online softmax).
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
ATTENTION_FP32_TOLERANCE = 1e-4


# Where the kernel tests run (CUDA when there is one; on a CPU, Triton's interpreter) and the
# storage dtypes every op takes.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (B, T, C) for the row ops (adaln_modulate, gated_residual, residual_adaln_modulate): T=1 and
# batch 1; T not a multiple of the rows one program holds (forward / backward: 32 / 16 at
# C=100, 2 / 1 at C=1152), the backward's second split short; C not a power of two; on CUDA
# also DiT-XL/2's rows and a long ragged T.
ROW_SHAPES = [(1, 1, 72), (2, 33, 100), (3, 7, 1152)] + ([(4, 256, 1152), (2, 301, 384)] if DEVICE == "cuda" else [])


def tolerance(dtype, op=None):
    if op == "attention" and dtype == torch.float32:
        return ATTENTION_FP32_TOLERANCE
    return TOLERANCES[dtype]


def relative_error(got, want):
    """max |got - want| / max |want|, in float64; inf when got holds a NaN or inf; 0 for
    empty tensors (no element differs)."""
    got64, want64 = got.detach().double(), want.detach().double()
    if not torch.isfinite(got64).all():
        return float("inf")
    if not want64.numel():
        return 0.0
    scale = want64.abs().max().clamp_min(1e-30)
    return float((got64 - want64).abs().max() / scale)


def assert_close(got, want, dtype, op=None, what="output"):
    """Fails on NaN/inf, on a shape mismatch, or on an error above the dtype's tolerance."""
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} != reference {tuple(want.shape)}")
    error, limit = relative_error(got, want), tolerance(dtype, op)
    if not error <= limit:  # written so that NaN fails too
        raise AssertionError(f"{what}: relative error {error:.3e} > {limit:.0e} ({dtype})")
    return error


@torch.no_grad()
def randomize_parameters_(model, seed=0):
    """Every trainable parameter drawn at random and non-zero: matrices N(0, 1/fan_in),
    vectors N(0, 0.1^2). The published DiT init zeroes the adaLN and final layers, so a
    model compared at init would match any backend trivially. Frozen tensors (the sin-cos
    position embedding) are left alone. Returns the model."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        if parameter.requires_grad:
            std = parameter[0].numel() ** -0.5 if parameter.dim() > 1 else 0.1
            values = torch.randn(parameter.shape, generator=generator) * std
            parameter.copy_(values.to(parameter.device, parameter.dtype))
    return model


def random_like_nonzero(shape, dtype, device, generator=None, low=0.1):
    """Standard-normal values pushed away from zero (|v| >= low), so no test passes on zeros."""
    values = torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu")
    values = torch.where(values.abs() < low, torch.sign(values + 1e-12) * low, values)
    return values.to(device=device, dtype=dtype)


def float64_reference(op, *args, **kwargs):
    """op evaluated on float64 copies of every tensor argument (grad-enabled leaves)."""
    def lift(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.detach().double().requires_grad_(value.requires_grad)
        return value

    lifted = [lift(a) for a in args]
    return op(*lifted, **{k: lift(v) for k, v in kwargs.items()}), lifted


# NaN elements allocated after every poisoned buffer, beyond as many as the buffer holds: a
# kernel writing past a buffer's end (a whole tile past it, say) changes them instead of
# corrupting a neighbour, or the interpreter's own memory, unseen.
GUARD_ELEMENTS = 64


def holds_data(tensor):
    """False for a compiler's stand-ins (fake tensors while tracing, meta tensors): they have a
    shape but no values to poison or check. Asked of the tensor itself, since a fake kernel run
    for torch.compile's shape propagation sees torch.compiler.is_compiling() False (torch 2.11)."""
    return tensor.device.type != "meta" and not is_fake(tensor) and not torch.compiler.is_compiling()


@contextlib.contextmanager
def poisoned_allocations():
    """Test hook: while active, torch.empty and torch.empty_like return NaN-filled floating
    tensors, so an output element (or partial sum) a kernel forgets to write fails the
    comparison with the reference instead of passing on leftover memory. Each buffer is
    followed in its storage by as many NaNs again plus GUARD_ELEMENTS, checked on leaving: a
    write past its end fails there. The Triton ops allocate every output and scratch buffer
    through these two functions."""
    original_empty, original_empty_like = torch.empty, torch.empty_like
    guards = []  # (guard, what it guards)

    def poisoned(tensor):
        if not tensor.is_floating_point() or not holds_data(tensor):
            return tensor
        with torch.no_grad():
            if tensor.requires_grad:  # a leaf of its own: poisoned where it lies, unguarded
                return tensor.fill_(float("nan"))
            storage = original_empty(2 * tensor.numel() + GUARD_ELEMENTS, dtype=tensor.dtype, device=tensor.device)
            storage.fill_(float("nan"))
            guards.append((storage[tensor.numel():], f"{tuple(tensor.shape)} {tensor.dtype}"))
            # the layout torch chose (empty_like keeps its input's) on the bigger storage, as a
            # tensor of its own rather than a view, so in-place use behaves as on the original
            return original_empty(0, dtype=tensor.dtype, device=tensor.device).set_(
                storage.untyped_storage(), 0, tensor.shape, tensor.stride())

    torch.empty = lambda *args, **kwargs: poisoned(original_empty(*args, **kwargs))
    torch.empty_like = lambda *args, **kwargs: poisoned(original_empty_like(*args, **kwargs))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = original_empty, original_empty_like
    overrun = [what for guard, what in guards if not guard.isnan().all()]
    if overrun:
        raise AssertionError(f"a kernel wrote past the end of {len(overrun)} of the {len(guards)} buffers allocated "
                             f"here: {', '.join(overrun)}")


def check_against_reference(op, reference_op, dtype, inputs, seed=0):
    """Test support: runs op(*inputs.values()) forward and backward under poisoned_allocations
    and compares every output, and the gradient of every input that requires grad, with
    reference_op evaluated in float64 (fusedit.kernels.testing tolerances for `dtype`).
    The output gradients are fresh random non-zero tensors. Returns the largest error."""
    generator = torch.Generator().manual_seed(seed)
    names = [name for name, value in inputs.items() if isinstance(value, torch.Tensor) and value.requires_grad]
    with poisoned_allocations():
        outputs = op(*inputs.values())
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        grad_outputs = [random_like_nonzero(out.shape, out.dtype, out.device, generator) for out in outputs]
        grads = torch.autograd.grad(outputs, [inputs[name] for name in names], grad_outputs) if names else ()
    expected, lifted = float64_reference(reference_op, *inputs.values())
    expected = expected if isinstance(expected, tuple) else (expected,)
    if len(outputs) != len(expected):
        raise AssertionError(f"{len(outputs)} outputs, the reference has {len(expected)}")
    lifted = dict(zip(inputs, lifted))
    expected_grads = (
        torch.autograd.grad(expected, [lifted[name] for name in names], [g.double() for g in grad_outputs])
        if names else ()
    )
    op_name = getattr(op, "__name__", "op")
    errors = [
        assert_close(got, want, dtype, what=f"{op_name} output {index}")
        for index, (got, want) in enumerate(zip(outputs, expected))
    ]
    errors += [
        assert_close(got, want, dtype, what=f"{op_name} d {name}")
        for name, got, want in zip(names, grads, expected_grads)
    ]
    return max(errors)


def autotuned_kernels():
    """{"module.kernel": Autotuner} for every autotuned kernel of fusedit.kernels.triton, so a
    test suite can narrow their configs (see one_config_per_autotuned_kernel)."""
    import importlib
    import pkgutil

    from triton.runtime.autotuner import Autotuner

    package = importlib.import_module("fusedit.kernels.triton")
    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        found.update({f"{info.name}.{name}": value for name, value in vars(module).items()
                      if isinstance(value, Autotuner)})
    return found


@contextlib.contextmanager
def one_config_per_autotuned_kernel():
    """Inside the block every autotuned kernel keeps only its last config, the small one that
    fits every head dim and dtype: for runs that check numbers rather than time them (the
    CUDA test suite, the benchmark's parity rows), where autotuning each new shape would
    compile and time every config for nothing. Triton's autotuner runs a lone config without
    looking at its cache, so shapes tuned before the block also take the small config in it."""
    kernels = list(autotuned_kernels().values())
    saved = [kernel.configs for kernel in kernels]
    for kernel in kernels:
        kernel.configs = kernel.configs[-1:]
    try:
        yield
    finally:
        for kernel, configs in zip(kernels, saved):
            kernel.configs = configs
