"""Checking a fused op against the reference: the float64 ground truth, poisoned outputs,
and the project's tolerances. Used by the tests and by the benchmark's parity rows."""
import torch

# Max relative error (max |got - want| / max |want|) a fused op may show against the
# float64 reference, by storage dtype; attention gets more room in fp32 (online softmax).
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
ATTENTION_FP32_TOLERANCE = 1e-4


def tolerance(dtype, op=None):
    if op == "attention" and dtype == torch.float32:
        return ATTENTION_FP32_TOLERANCE
    return TOLERANCES[dtype]


def relative_error(got, want):
    """max |got - want| / max |want|, in float64; inf when got holds a NaN or inf."""
    got64, want64 = got.detach().double(), want.detach().double()
    if not torch.isfinite(got64).all():
        return float("inf")
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


def poison_(tensor):
    """Fill with NaN so an element a kernel forgets to write fails the comparison."""
    return tensor.fill_(float("nan"))


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
